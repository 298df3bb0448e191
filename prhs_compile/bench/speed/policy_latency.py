"""Decode-attention latency of every policy through the real ops, one layer at a time.

One decode step of one attention layer is what the rewritten graph runs per layer and step::

    idx = torch.ops.prhs.select(q, K, V, mask, scale, plan, state)
    out = torch.ops.prhs.attend(q, K, V, idx, mask, scale)

This module times exactly that, for a policy and budget at an attention shape and context,
with the layer's state primed the way a model primes it: ``torch.ops.prhs.prefill`` over the
prompt, then steady-state decode steps whose newest position advances by one per call (so
rules that reuse a selection, PrHS and HShare, reuse as they would, and one-shot rules keep
their prompt selection). Dense SDPA over the valid prefix of the same cache is timed in the
same run as the reference. On CUDA the steps are timed inside CUDA graphs (see ``Timer``),
as a served model runs them; the step reads its query and mask at a device-side cursor so
that replays advance.

The data are synthetic (the cost of the reference ops does not depend on them; the retrieval
rate does): keys and values are Gaussian, and the queries of consecutive steps follow an
AR(1) walk whose consecutive cosine is about ``QUERY_DRIFT``. The retrieval rate the timed
steps actually had is recorded beside each time.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from .timing import bench_cudagraph, copies_past_l2, l2_bytes, rotating, wall_median

# Prompt rows handed to the priming prefill: SnapKV scores the last 32, SAGE-KV the last one.
PREFILL_ROWS = 64
# Decode steps the cache has room for; the walk wraps around after them (the state then sees a
# new sequence and starts afresh, like a new prompt: a row's ``resets`` counts it, one per
# DECODE_STEPS timed calls).
DECODE_STEPS = 512
# Consecutive query cosine of the synthetic walk: with PrHS's default tau 0.8 a set is reused
# for roughly ten steps (the paper's 7B-scale regime, not the substrate's drift).
QUERY_DRIFT = 0.98


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The attention of one decoder layer: what the latency depends on."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


LLAMA3_8B = AttentionShape("llama3-8b", q_heads=32, kv_heads=8, head_dim=128)


def shape_of(config, name: str) -> AttentionShape:
    """The attention shape of a Hugging Face decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(name, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


class DecodeStream:
    """A static KV cache holding a ``context``-token prompt, with room for ``DECODE_STEPS``
    more, and the queries and masks of the prompt's tail and of every decode step.

    The current step lives in a device-side ``cursor``, so a captured CUDA graph replays a
    sequence of steps that really advances (each call reads the next query and mask, and the
    state sees its newest position move by one). ``kv`` holds ``copies`` identical copies of
    the cache: calls in a row use copies in turn, so a graph replay does not serve the cache
    out of L2 (identical contents keep one layer state valid for all of them)."""

    def __init__(self, shape: AttentionShape, context: int, dtype, device, seed: int = 0, copies: int = 1):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.context, self.length = context, context + DECODE_STEPS
        cache = (1, shape.kv_heads, self.length, shape.head_dim)
        self.k = torch.randn(cache, generator=gen, device=device, dtype=dtype)
        self.v = torch.randn(cache, generator=gen, device=device, dtype=dtype)
        self.kv = [(self.k, self.v)] + [(self.k.clone(), self.v.clone()) for _ in range(copies - 1)]
        self.scale = 1.0 / math.sqrt(shape.head_dim)
        walk = _query_walk(PREFILL_ROWS + DECODE_STEPS, shape, gen, device).to(dtype)  # [T, Hq, D]
        self.prompt_q = walk[:PREFILL_ROWS].permute(1, 0, 2)[None].contiguous()  # [1, Hq, rows, D]
        self.step_q = walk[PREFILL_ROWS:, None, :, None, :].contiguous()  # [steps, 1, Hq, 1, D]
        positions = torch.arange(self.length, device=device)
        prompt_rows = torch.arange(context - PREFILL_ROWS, context, device=device)
        self.prompt_mask = (positions[None, :] <= prompt_rows[:, None])[None, None]  # [1, 1, rows, L]
        newest = torch.arange(context, self.length, device=device)
        self.step_masks = (positions[None, :] <= newest[:, None])[:, None, None, None]  # [steps, 1, 1, 1, L]
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)
        self.calls = 0

    @staticmethod
    def copies_past_l2(shape: AttentionShape, context: int, dtype, device) -> int:
        """Cache copies whose bytes together exceed 4x the L2 size (1 off CUDA), at most 64."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        kv_bytes = 2 * shape.kv_heads * (context + DECODE_STEPS) * shape.head_dim * itemsize
        return copies_past_l2(kv_bytes, l2_bytes(device), cap=64)

    def rewind(self) -> None:
        """Back to the first decode step (right after the prompt a prefill primed)."""
        self.cursor.zero_()
        self.calls = 0

    def advance(self):
        """The next decode step: ``(q [1, Hq, 1, D], mask [1, 1, 1, L], k, v)``, read at the
        device cursor, which then moves on (wrapping after ``DECODE_STEPS``); ``k, v`` is the
        next cache copy."""
        q = self.step_q.index_select(0, self.cursor)[0]
        mask = self.step_masks.index_select(0, self.cursor)[0]
        self.cursor.add_(1).remainder_(DECODE_STEPS)
        k, v = self.kv[self.calls % len(self.kv)]
        self.calls += 1
        return q, mask, k, v


def _query_walk(steps: int, shape: AttentionShape, gen, device) -> torch.Tensor:
    """``[steps, Hq, D]`` fp32 queries; consecutive ones have cosine about ``QUERY_DRIFT``."""
    noise = torch.randn((steps, shape.q_heads, shape.head_dim), generator=gen, device=device)
    walk = torch.empty_like(noise)
    walk[0] = noise[0]
    keep = math.sqrt(1.0 - QUERY_DRIFT**2)
    for t in range(1, steps):
        walk[t] = QUERY_DRIFT * walk[t - 1] + keep * noise[t]
    return walk


class Timer:
    """Milliseconds per call of a decode step.

    On CUDA, ``triton.testing.do_bench_cudagraph`` (median of 10 replays of a CUDA graph that
    holds as many calls as fit in ``rep_ms``): decode runs inside CUDA graphs in a served
    model, and timing each call eagerly measures mostly Python and kernel launches. A step
    whose capture fails (a host synchronisation in a reference path) is timed eagerly with
    ``triton.testing.do_bench`` instead, and says so. Elsewhere a wall clock (smoke tests).
    """

    GRAPH = "cudagraph"
    EAGER = "eager"

    def __init__(self, device, rep_ms: int = 25, cpu_calls: int = 5):
        self.cuda = torch.device(device).type == "cuda"
        self.rep_ms, self.cpu_calls = rep_ms, cpu_calls
        self.name = (
            f"triton.testing.do_bench_cudagraph, median of 10 replays, rep {rep_ms} ms (cache copies rotated "
            "past 4x L2); where a step cannot be captured, triton.testing.do_bench, median, L2 flushed"
            if self.cuda
            else f"wall clock, median of {cpu_calls} calls after one warm-up (CPU reference ops: a smoke test)"
        )

    def __call__(self, fn) -> tuple[float, str]:
        """``(milliseconds per call of fn, how it was timed)``."""
        if self.cuda:
            import triton.testing

            try:
                return bench_cudagraph(fn, self.rep_ms), self.GRAPH
            except Exception as err:  # not capturable: time it eagerly, and say why
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(fn, warmup=25, rep=self.rep_ms, return_mode="median")
                return float(ms), f"{self.EAGER} (capture failed: {type(err).__name__}: {str(err)[:120]})"
        return wall_median(fn, self.cpu_calls), "wall clock"


def recompile_room(limit: int = 64):
    """A Dynamo config patch allowing ``limit`` compiled versions of a function. On CUDA the
    Triton select's torch glue is compiled once per (shape, budget) and every configuration
    timed here is one; past the default limit a ``fullgraph`` compile raises instead."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{name: max(limit, getattr(torch._dynamo.config, name))})


def select_path(plan, stream: DecodeStream) -> str:
    """Which implementation serves ``prhs.select`` for this plan: ``triton`` where the CUDA
    step supports it (as ``kernels/ops.py`` dispatches), else the torch ``reference``."""
    if stream.k.device.type != "cuda":
        return "reference"
    try:
        from prhs_compile.kernels.select_step_triton import supports
    except ImportError:  # a checkout without the Triton step
        return "reference"
    return "triton" if supports(plan, stream.step_q[0], stream.k) else "reference"


def select_plan(options: dict, layer: int, num_layers: int, kv_len: int):
    """The plan the backend would build for one layer from these options (validated)."""
    from prhs_compile.config import PrHSConfig
    from prhs_compile.kernels import get_rule

    config = PrHSConfig.from_options(options)
    plan = config.select_plan(layer, num_layers)
    if get_rule(plan.policy).needs_static_length:
        plan = dataclasses.replace(plan, kv_len=kv_len)  # as backend._plan_for does for a static cache
    return plan


def advance_cost(stream: DecodeStream, timer: Timer) -> float:
    """Milliseconds of ``stream.advance()`` alone (two small gathers and the cursor update),
    which every timed step includes and which the step times below are reported net of."""
    ms, _ = timer(stream.advance)
    stream.rewind()
    return ms


def time_policy(plan, shape: AttentionShape, stream: DecodeStream, timer: Timer, advance_ms: float = 0.0) -> dict:
    """Time one decode step (select + attend) of ``plan``, then attend alone.

    Returns ``step_ms`` (net of ``advance_ms``, the cost of reading the step's query and mask
    at the cursor), ``attend_ms`` (over the last step's selection), how each was timed, the
    wall time of the first step (``first_step_s``: Triton and Inductor compiles included), the
    retrieval rate and resets the timed steps had, the slots ``select`` returned per KV head,
    and which implementation served ``select``.
    """
    from prhs_compile.kernels import COUNTERS_INDEX
    from prhs_compile.kernels.select_reference import RESETS, RETRIEVALS, SLOTS
    from prhs_compile.state import allocate_state

    ops = torch.ops.prhs
    text = plan.encode()
    state = allocate_state(plan, 1, shape.q_heads, shape.kv_heads, shape.head_dim, stream.k.device,
                           stream.k.dtype)
    scale = stream.scale
    ops.prefill(stream.prompt_q, stream.k, stream.prompt_mask, False, scale, text, state)
    stream.rewind()  # the first step continues the primed prompt
    last = {}

    def step():
        q, mask, k, v = stream.advance()
        idx = ops.select(q, k, v, mask, scale, text, state, None)
        last.update(q=q, mask=mask, idx=idx)
        return ops.attend(q, k, v, idx, mask, scale)

    start = time.perf_counter()
    step()
    if timer.cuda:
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - start
    step_ms, step_timer = timer(step)
    counters = state[COUNTERS_INDEX].tolist()
    q, mask, idx = last["q"], last["mask"], last["idx"]
    attend_ms, attend_timer = timer(rotating([lambda k=k, v=v: ops.attend(q, k, v, idx, mask, scale)
                                              for k, v in stream.kv]))
    return {
        "step_ms": max(step_ms - advance_ms, 0.0),
        "advance_ms": advance_ms,
        "attend_ms": attend_ms,
        "timer": step_timer if step_timer == attend_timer else f"step {step_timer}; attend {attend_timer}",
        "first_step_s": first_step_s,
        "select": select_path(plan, stream),
        "retrieval_rate": counters[RETRIEVALS] / counters[SLOTS] if counters[SLOTS] else None,
        "resets": counters[RESETS],
        "steps_timed": stream.calls,
        "slots": idx.shape[-1],
    }


def time_dense_sdpa(shape: AttentionShape, stream: DecodeStream, timer: Timer, advance_ms: float = 0.0) -> dict:
    """Dense SDPA of one decode query over ``context + DECODE_STEPS // 2`` cached positions
    (the mean valid length of the policies' timed steps; no mask: what an ideal dense decode
    reads), net of ``advance_ms``. On CUDA only the flash and memory-efficient backends are
    allowed (the math backend would materialise a GQA-expanded cache); where neither takes the
    call, plain SDPA runs and the row says so."""
    import torch.nn.functional as F

    scale, valid = stream.scale, stream.context + DECODE_STEPS // 2

    def step():
        q, _, k, v = stream.advance()
        return F.scaled_dot_product_attention(q, k[:, :, :valid], v[:, :, :valid], scale=scale, enable_gqa=True)

    def row(ms, how, backend):
        return {"step_ms": max(ms - advance_ms, 0.0), "advance_ms": advance_ms, "timer": how,
                "backend": backend, "valid_length": valid}

    if not timer.cuda:
        return row(*timer(step), "default")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def fused_step():
        with sdpa_kernel(fused):
            return step()

    try:
        fused_step()
        return row(*timer(fused_step), "flash/efficient")
    except RuntimeError as err:
        return row(*timer(step), f"default (no fused backend took it: {err})")
