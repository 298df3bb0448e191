"""The step's bounds and PrHS's cosine gate in one Triton launch (what CUDA runs before a
gated step's retrieval).

The launch is the bounds kernel's (``bounds_triton``: one program per chunk of a row's mask,
the row's last chunk to finish writes its bounds); that program then does, for every KV head
of the row, what the step's torch functions do (they are the reference,
``prhs_gate_reference`` below strings them together):

* the row's continuity (``select_reference.continuing_rows``): its newest valid position
  (from the bounds) follows the stored one, and the cache still holds the stored key;
* the gate (``rule_prhs.prhs_gate`` with the cosine test, ``delta_target = 0``): the largest
  key norm meets the newest key, a slot reuses its set while its age allows one more step and
  every query head of its group is within cosine ``tau`` of its anchor, and a slot of a row
  that does not fit the budget retrieves otherwise;
* the state the decision alone sets (``rule_prhs.prhs_advance``): anchors, ages;
* the step's bookkeeping (``select_reference.step_bookkeeping``): the counters (by atomics),
  the row's newest position and the key it ends with;
* the int32 flags the pass over K and the top-k read (1: the slot retrieves), and zeros in
  the top-k's scratch rows of the retrieving slots (the only rows the top-k reads).

Why a kernel: compiled by Inductor, the same torch code is several small kernels (the
reductions over the head dimension of keys, queries and anchors have different shapes and
depend on each other) after the bounds' own, and in a CUDA graph each small kernel costs
its own microseconds. One program per row runs the gate, so its instructions per thread
are its time: keep its tiles two-dimensional and its arithmetic cheap
(``scripts/gate_sass.py`` counts them; README, "Kernels and the GPU"). The ``delta_target``
gate and two-stage retrieval (whose page summaries read the stored position before the
bookkeeping moves it) keep the compiled torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bounds_triton import BoundsColumn as Col
from .bounds_triton import MASK_NONE, bounds_launch, chunk_stats_last, write_row_bounds
from .rule_prhs import prhs_advance, prhs_gate
from .select_reference import CALLS, RESETS, RETRIEVALS, SLOTS, continuing_rows, step_bookkeeping
from .kpass_triton import num_sms
from .pdl import launch_options, wait_for_inputs
from .tickets import tickets

__all__ = ["GateState", "bounds_and_gate", "prhs_gate_reference"]

# Every program of a row loads the gate's inputs before its chunk of the mask while the
# launch has at most this many programs per SM; in larger launches only the program that
# writes the row's bounds loads them, after: the early loads of every chunk's program then
# cost more than they hide (docs/gpu_runs.md, the eleventh run: faster at 16-256 programs,
# slower at 1024).
EARLY_LOADS_PER_SM = 4

# The counters' entries (select_reference.COUNTER_NAMES), as the kernel's constants.
_CALLS, _SLOTS = tl.constexpr(CALLS), tl.constexpr(SLOTS)
_RESETS, _RETRIEVALS = tl.constexpr(RESETS), tl.constexpr(RETRIEVALS)


@triton.jit
def _gate_inputs(b, K, POS, FINGERPRINT, AGE, KEY_NORM, Tq, L,
                 stride_kb, stride_kh, stride_kl, stride_kd,
                 HKV: tl.constexpr, D: tl.constexpr, HKV_P2: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """The gate's loads that wait on other loads or that the bounds do not decide (in a
    small launch every program of the row issues them before its chunk of the mask, and the
    one that writes the bounds keeps them: ``EARLY_LOADS_PER_SM``): the stored position and
    the key there, the fingerprint, the keys one query past the stored position (the newest ones
    when the row continues its sequence), the ages and the key norms. (The queries and the
    anchors, two [Hq, D] tiles, are loaded after the bounds: held across the mask's chunk
    they would double the registers of every program of the launch.)"""
    pos = tl.load(POS + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_row = K + b * stride_kb
    old = tl.load(k_row + tl.minimum(tl.maximum(pos, 0), L - 1) * stride_kl + offs_d * stride_kd,
                  mask=d_ok, other=0.0).to(tl.float32)
    fingerprint = tl.load(FINGERPRINT + b * D + offs_d, mask=d_ok, other=0.0)
    offs_h = tl.arange(0, HKV_P2)
    h_ok = offs_h < HKV
    next_pos = tl.minimum(tl.maximum(pos + Tq, 0), L - 1)
    k_next = tl.load(k_row + offs_h[:, None].to(tl.int64) * stride_kh + next_pos * stride_kl
                     + offs_d[None, :] * stride_kd, mask=h_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
    age = tl.load(AGE + b * HKV + offs_h, mask=h_ok, other=-1)
    key_norm = tl.load(KEY_NORM + b * HKV + offs_h, mask=h_ok, other=0.0)
    return pos, old, fingerprint, k_next, age, key_norm


@triton.jit
def _gate_queries(b, Q, ANCHOR, Tq, stride_qb, stride_qh, stride_qt, stride_qd,
                  HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HQ_P2: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """The newest query row of every query head of batch row ``b`` and its anchor (fp32
    ``[HQ_P2, BLOCK_D]`` tiles, zeros past the heads and the head dimension). The program
    that writes the row's bounds issues these right after drawing the row's last ticket,
    with the chunks' stats: after the bounds' stores they would wait on memory once more
    (the compiler cannot move a load above a store it cannot tell apart from it)."""
    offs_q = tl.arange(0, HQ_P2)
    offs_d = tl.arange(0, BLOCK_D)
    qd_ok = (offs_q < HKV * G)[:, None] & (offs_d < D)[None, :]
    query = tl.load(Q + b * stride_qb + offs_q[:, None].to(tl.int64) * stride_qh
                    + (Tq - 1) * stride_qt + offs_d[None, :] * stride_qd,
                    mask=qd_ok, other=0.0).to(tl.float32)
    anchor = tl.load(ANCHOR + (b * (HKV * G) + offs_q[:, None]) * D + offs_d[None, :],
                     mask=qd_ok, other=0.0)
    return query, anchor


@triton.jit
def _gate_row(b, hi, count, fits, pos, old, fingerprint, k_next, age, key_norm, query, anchor,
              Q, K, POS, FINGERPRINT, AGE, ANCHOR, KEY_NORM, COUNTERS,
              FLAGS, SCRATCH, Tq, L, tau, max_reuse, n_slots, scratch_width,
              stride_qb, stride_qh, stride_qt, stride_qd,
              stride_kb, stride_kh, stride_kl, stride_kd,
              HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HKV_P2: tl.constexpr,
              HQ_P2: tl.constexpr, BLOCK_D: tl.constexpr, SCR_BLOCK: tl.constexpr):
    """The gate of batch row ``b`` (every KV head) once its bounds are known, from what
    ``_gate_inputs`` and ``_gate_queries`` loaded (module docstring)."""
    newest = tl.where(count > 0, hi - 1, -1).to(tl.int64)
    fits = fits != 0
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_row = K + b * stride_kb

    # Continuity: follows the stored position, and KV head 0 still holds the stored key there.
    holds = tl.sum((d_ok & (old != fingerprint)).to(tl.int32), 0) == 0  # NaN never equal
    follows = (pos >= 0) & (newest == pos + Tq) & (pos < L)
    continuing = follows & holds

    # The newest key of every KV head: its norm, and head 0's as the next fingerprint. Where
    # the newest position is not the one after the stored one (a new or reordered sequence)
    # the keys are loaded here; otherwise the load is predicated off.
    offs_h = tl.arange(0, HKV_P2)
    h_ok = offs_h < HKV
    at_newest = tl.minimum(tl.maximum(newest, 0), L - 1)
    moved = at_newest != tl.minimum(tl.maximum(pos + Tq, 0), L - 1)
    k_moved = tl.load(k_row + offs_h[:, None].to(tl.int64) * stride_kh + at_newest * stride_kl
                      + offs_d[None, :] * stride_kd,
                      mask=(h_ok[:, None] & d_ok[None, :] & moved) != 0, other=0.0)
    k_new = tl.where(moved, k_moved.to(tl.float32), k_next)
    new_norm = tl.sqrt(tl.sum(k_new * k_new, 1))
    new_fingerprint = tl.sum(tl.where(offs_h[:, None] == 0, k_new, 0.0), 0)

    # The cosine of each query head's newest row with its anchor, as torch's
    # cosine_similarity up to rounding: the dot over the product of the norms (each at least
    # 1e-8). Rows of the tile are the query heads; a KV head's group is rows h*G .. h*G+G-1.
    # Approximate roots and divisions: correctly rounded ones carry a slow path per value,
    # and a decision they could change lies within a few units in the last place of tau.
    offs_q = tl.arange(0, HQ_P2)
    q_ok = offs_q < HKV * G
    qd_ok = q_ok[:, None] & d_ok[None, :]
    anchor_ptrs = ANCHOR + (b * (HKV * G) + offs_q[:, None]) * D + offs_d[None, :]
    q_norm = tl.maximum(tl.sqrt(tl.sum(query * query, 1)), 1e-8)
    a_norm = tl.maximum(tl.sqrt(tl.sum(anchor * anchor, 1)), 1e-8)
    cosine = tl.sum(query * anchor, 1) / (q_norm * a_norm)
    in_group = (offs_q[None, :] // G) == offs_h[:, None]  # [KV head, query head]
    near = tl.min(tl.where(in_group & q_ok[None, :], (cosine >= tau).to(tl.int32)[None, :], 1),
                  1) != 0

    reuse = (continuing & (age >= 0) & (age + 1 < max_reuse) & near) != 0  # int1 (interpreter)
    retrieve = ((reuse == 0) & (fits == 0)) != 0

    # Every load of this row's state above happens before any of its stores below (the
    # threads that load an entry need not be those that store it).
    tl.debug_barrier()
    tl.store(KEY_NORM + b * HKV + offs_h,
             tl.where(continuing, tl.maximum(key_norm, new_norm, propagate_nan=tl.PropagateNan.ALL),
                      key_norm), mask=h_ok)
    retrieve_q = tl.max(tl.where(in_group, retrieve.to(tl.int32)[:, None], 0), 0) != 0
    tl.store(anchor_ptrs, query, mask=(qd_ok & retrieve_q[:, None]) != 0)
    tl.store(AGE + b * HKV + offs_h, tl.where(retrieve, 0, tl.where(reuse, age + 1, -1)),
             mask=h_ok)
    tl.store(FLAGS + b * HKV + offs_h, retrieve.to(tl.int32), mask=h_ok)
    tl.store(POS + b, newest)
    tl.store(FINGERPRINT + b * D + offs_d, new_fingerprint, mask=d_ok)
    # Relaxed: nothing in the launch reads the counters, so no fence need order them.
    if b == 0:
        tl.atomic_add(COUNTERS + _CALLS, tl.full([], 1, tl.int64), sem="relaxed")
        tl.atomic_add(COUNTERS + _SLOTS, tl.full([], 0, tl.int64) + n_slots, sem="relaxed")
    tl.atomic_add(COUNTERS + _RESETS, (continuing == 0).to(tl.int64), sem="relaxed")
    tl.atomic_add(COUNTERS + _RETRIEVALS, tl.sum(tl.where(h_ok, retrieve, 0).to(tl.int64), 0),
                  sem="relaxed")

    # The top-k's scratch (barriers, counts) starts at zero in each slot it works on.
    scr_rows = SCRATCH + (b * HKV + offs_h[:, None]).to(tl.int64) * scratch_width
    for s0 in range(0, scratch_width, SCR_BLOCK):
        offs_s = s0 + tl.arange(0, SCR_BLOCK)
        tl.store(scr_rows + offs_s[None, :], tl.zeros([HKV_P2, SCR_BLOCK], tl.int32),
                 mask=((h_ok & retrieve)[:, None] & (offs_s < scratch_width)[None, :]) != 0)


@triton.jit
def _bounds_gate_kernel(
    MASK, STATS, TICKETS, BOUNDS, Tq, L, C, sink, local, budget, min_context, psaw_frac,
    stride_mb, stride_mt, stride_ml, mask_min,
    Q, K, POS, FINGERPRINT, AGE, ANCHOR, KEY_NORM, COUNTERS, FLAGS, SCRATCH,
    tau, max_reuse, n_slots, scratch_width,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
    C_P2: tl.constexpr, HAS_PSAW: tl.constexpr,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HKV_P2: tl.constexpr,
    HQ_P2: tl.constexpr, BLOCK_D: tl.constexpr, SCR_BLOCK: tl.constexpr,
    EARLY_LOADS: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(B, chunks of the mask)`` (``(B, 1)`` without a mask): the row's bounds as
    ``compute_bounds`` writes them, then, in the program that wrote them, the row's gate.
    With ``EARLY_LOADS`` every program issues the gate's dependent loads first
    (``_gate_inputs``), so that they overlap its chunk's mask loads instead of following the
    bounds (the row's state is written only by the program that draws the row's last
    ticket, after every other has loaded); without, the program that writes the bounds
    loads them after (``EARLY_LOADS_PER_SM``)."""
    wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    if EARLY_LOADS:
        pos, old, fingerprint, k_next, age, key_norm = _gate_inputs(
            b, K, POS, FINGERPRINT, AGE, KEY_NORM, Tq, L, stride_kb, stride_kh, stride_kl,
            stride_kd, HKV, D, HKV_P2, BLOCK_D)
    last = True
    if MASK_KIND != 0:
        last = chunk_stats_last(MASK, STATS, TICKETS, b, tl.program_id(1), Tq, L, C, stride_mb,
                                stride_mt, stride_ml, mask_min, MASK_KIND, TQ_P2, CHUNK, SUB)
    if last:
        query, anchor = _gate_queries(b, Q, ANCHOR, Tq, stride_qb, stride_qh, stride_qt,
                                      stride_qd, HKV, G, D, HQ_P2, BLOCK_D)
        hi, count, fits = write_row_bounds(MASK, STATS, BOUNDS, b, Tq, L, C, sink, local,
                                           budget, min_context, psaw_frac, stride_mb,
                                           stride_mt, stride_ml, mask_min, MASK_KIND, TQ_P2,
                                           CHUNK, SUB, C_P2, HAS_PSAW)
        if not EARLY_LOADS:
            pos, old, fingerprint, k_next, age, key_norm = _gate_inputs(
                b, K, POS, FINGERPRINT, AGE, KEY_NORM, Tq, L, stride_kb, stride_kh,
                stride_kl, stride_kd, HKV, D, HKV_P2, BLOCK_D)
        _gate_row(b, hi, count, fits, pos, old, fingerprint, k_next, age, key_norm, query,
                  anchor, Q, K, POS, FINGERPRINT, AGE, ANCHOR, KEY_NORM, COUNTERS, FLAGS,
                  SCRATCH, Tq, L, tau, max_reuse, n_slots, scratch_width,
                  stride_qb, stride_qh, stride_qt, stride_qd,
                  stride_kb, stride_kh, stride_kl, stride_kd,
                  HKV, G, D, HKV_P2, HQ_P2, BLOCK_D, SCR_BLOCK)


class GateState(NamedTuple):
    """The state tensors the gate reads and writes, sliced to the batch: ``pos`` int64
    ``[B]``, ``fingerprint`` fp32 ``[B, D]``, ``age`` int32 ``[B, Hkv]``, ``anchor`` fp32
    ``[B, Hq, D]``, ``key_norm`` fp32 ``[B, Hkv]``, ``counters`` int64 (the state's)."""

    pos: torch.Tensor
    fingerprint: torch.Tensor
    age: torch.Tensor
    anchor: torch.Tensor
    key_norm: torch.Tensor
    counters: torch.Tensor


def bounds_and_gate(operand, q, k, sink: int, local: int, budget: int, min_context: int,
                    psaw_frac: float, state: GateState, tau: float, max_reuse: int,
                    scratch_width: int):
    """One launch: the step's bounds (what ``compute_bounds`` returns for the mask
    ``operand``, ``bounds_triton.mask_operand``) and the cosine gate of every row (module
    docstring), its state update and bookkeeping, ``state`` modified in place. ``q``
    ``[B, Hq, Tq, D]`` and ``k`` ``[B, Hkv, L, D]`` (any strides). Returns the bounds, the
    int32 retrieve flags ``[B * Hkv]`` and the top-k's scratch ``[B * Hkv, scratch_width]``
    (zeros in the rows of retrieving slots; the others are left as they were)."""
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if Hq % Hkv != 0 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not form GQA groups")
    for name, dtype, shape in (("pos", torch.int64, (B,)), ("fingerprint", torch.float32, (B, D)),
                               ("age", torch.int32, (B, Hkv)),
                               ("anchor", torch.float32, (B, Hq, D)),
                               ("key_norm", torch.float32, (B, Hkv))):
        t = getattr(state, name)
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous {dtype} of shape {shape}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    counters = state.counters
    if counters.dtype != torch.int64 or counters.numel() <= max(CALLS, SLOTS, RESETS, RETRIEVALS):
        raise ValueError(f"counters must be int64 with the state's entries, got {counters.dtype} "
                         f"of {counters.numel()}")
    device = q.device
    mask_t, kind, ms, mask_min = operand
    grid, args, consts = bounds_launch(kind, ms, mask_min, B, Tq, L, sink, local, budget,
                                       min_context, psaw_frac)
    bounds = torch.empty((B, 8), dtype=torch.int32, device=device)
    stats = (bounds if kind == MASK_NONE
             else torch.empty((B, grid[1], 3), dtype=torch.int32, device=device))
    flags = torch.empty(B * Hkv, dtype=torch.int32, device=device)
    scratch = torch.empty((B * Hkv, scratch_width), dtype=torch.int32, device=device)
    G = Hq // Hkv
    hq_p2, block_d = triton.next_power_of_2(Hq), triton.next_power_of_2(D)
    # Two [Hq, D] fp32 tiles (queries, anchors), about 16 values of each per thread: the
    # row's last program runs the gate alone, and its instructions per thread are its time.
    warps = min(16, max(4, triton.next_power_of_2(hq_p2 * block_d // 512)))
    _bounds_gate_kernel[grid](
        bounds if mask_t is None else mask_t, stats, tickets(device, B), bounds, *args,
        q, k, state.pos, state.fingerprint, state.age, state.anchor, state.key_norm, counters,
        flags, scratch, float(tau), int(max_reuse), B * Hkv, scratch_width,
        *q.stride(), *k.stride(), **consts,
        HKV=Hkv, G=G, D=D, HKV_P2=triton.next_power_of_2(Hkv), HQ_P2=hq_p2, BLOCK_D=block_d,
        SCR_BLOCK=min(1024, triton.next_power_of_2(max(scratch_width, 1))), num_warps=warps,
        EARLY_LOADS=grid[0] * grid[1] <= EARLY_LOADS_PER_SM * num_sms(device),
        **launch_options(device),
    )
    return bounds, flags, scratch


def prhs_gate_reference(bounds, q, k, state: GateState, tau: float, max_reuse: int):
    """What ``bounds_and_gate`` computes past the bounds, from the step's torch functions
    (the reference's own); returns the int32 flags."""
    count, hi = bounds[:, Col.COUNT].long(), bounds[:, Col.HI].long()
    fits = bounds[:, Col.FITS] != 0
    newest = torch.where(count > 0, hi - 1, -1)
    continuing = continuing_rows(state.pos, state.fingerprint, k, newest, q.shape[2])
    dropped = torch.zeros_like(state.key_norm)  # only the reuse bound reads it: not this gate
    retrieve, reuse, _ = prhs_gate(q, k, newest, continuing, fits, state.age, state.anchor,
                                   dropped, state.key_norm, 1.0, tau, 0.0, max_reuse)
    prhs_advance(q, None, retrieve, reuse, state.age, state.anchor, state.key_norm)
    step_bookkeeping(state.counters, state.pos, state.fingerprint, k, newest, continuing,
                     retrieve)
    return retrieve.flatten().to(torch.int32)
