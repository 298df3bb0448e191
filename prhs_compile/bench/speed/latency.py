"""``prhs-bench latency``: decode-attention kernel latency against dense baselines, in one run.

One decode step of one attention layer (Llama-3-8B shape by default: Hq=32, Hkv=8, D=128,
bf16, one query position), for every context length x batch size x budget:

=================  ===========================================================================
``dense_sdpa``     ``F.scaled_dot_product_attention(enable_gqa=True)`` over the whole
                   contiguous cache (flash / efficient / cuDNN backends only: never the math
                   backend, which would materialise a GQA-expanded cache)
``dense_at_budget`` the same over a contiguous cache only ``budget`` long (attend's yardstick)
``flex``           FlexAttention (compiled) with a block-sparse ``BlockMask`` of the same
                   budget: ``budget / 128`` KV blocks of 128 per (row, KV head), the first and
                   last block always in (sinks / local window), the rest random
``gather_sdpa``    unfused: gather the selected K/V rows, then SDPA over them
``attend``         ``attend_triton`` over the selected positions (the indices ``select``
                   returned)
``select``         ``oracle_select_triton``: one oracle retrieval of every slot (bounds, one
                   read of K, the radix top-k, the composed indices)
``select_score``   its pass over K alone (``retrieve_keys``: scores, log-sum-exp, keys)
``topk``           its radix top-k alone (``topk_picks`` over the keys of every slot)
``select_attend``  select then attend, measured back to back (a step at retrieval rate 1)
``prhs@r``         the whole PrHS decode step through the registered ops
                   (``torch.ops.prhs.select`` with policy ``prhs`` + ``torch.ops.prhs.attend``),
                   with a share ``r`` of the (row, KV head) slots retrieving and the others
                   reusing their stored set (``--step-rates``); each call first restores the
                   layer state (a few small copies, timed alone as ``restore``), so every
                   call sees the same mix
``prhs-pages@r``   the same with two-stage retrieval (``retrieval="pages"``: page summaries,
                   then the candidates' rows; ``--retrievals exact,pages``); its page
                   summaries are not restored (replaying the step rewrites them unchanged)
``quest``          Quest's decode step through the same ops (``--retrievals ...,quest``):
                   page bounds from the summaries, the best pages by the radix top-k,
                   attend; no rate (every step chooses)
=================  ===========================================================================

Timing: ``triton.testing.do_bench_cudagraph`` (median of 10 replays of a CUDA graph holding
as many calls as fit in ``--rep`` ms) by default, because decode runs inside CUDA graphs
(``mode="reduce-overhead"``) and the multi-kernel methods (select, gather+SDPA) would
otherwise be measured mostly as Python launch overhead. Graph replays do not flush L2 between
calls, so each method rotates over enough copies of the KV cache that the data touched by
consecutive calls exceeds 4x the L2 size (only small caches need copies). ``--timer plain``
uses ``triton.testing.do_bench`` (median, L2 flushed, launch overhead included) instead.

Floors: the bytes a method must move divided by the *read* bandwidth measured in the same
run (bytes / time of a read-only reduction over 2 GiB, ``x.sum()``); the copy bandwidth
(read + write bytes / time of a 1 GiB copy) is reported beside it, but a copy moves fewer
bytes per second than a kernel that only reads, so it is no floor. Dense reads
``2*B*Hkv*L*D*2`` bytes; attend (and flex, gather+SDPA: the same job) ``2*B*Hkv*budget*D*2``
plus the int32 indices; a retrieval reads K over the valid region once plus its fp32 scores
and int32 keys (``retrieve_triton.retrieval_bytes``). ``fraction`` is floor / time; every
method also reports the bandwidth it reached (``read_tbps`` = bytes / time).

``--quick`` runs tiny shapes (on CPU too, through the Triton interpreter, with a wall-clock
timer) as a smoke test; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

from ..report import Progress, environment, finish, parse_sizes, write_json
from .timing import Timer, copies_past_l2, l2_bytes, rotating

log = logging.getLogger("prhs.bench.latency")

_FLEX_BLOCK = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", default="4K,32K,128K",
                        help="context lengths, comma separated (K = 1024)")
    parser.add_argument("--batches", default="1,8,16", help="batch sizes, comma separated")
    parser.add_argument("--budgets", default="1/8,2048",
                        help="budgets: absolute positions or fractions of the context (1/8)")
    parser.add_argument("--step-rates", default="0,0.1,0.5,1",
                        help="retrieval rates of the measured PrHS step (prhs@r), comma separated")
    parser.add_argument("--retrievals", default="exact",
                        help="how the PrHS step retrieves: exact, pages or both (exact,pages)")
    parser.add_argument("--candidates", type=int, default=4,
                        help="two-stage retrieval's candidates (pages holding this x budget positions)")
    parser.add_argument("--page-size", type=int, default=16, help="two-stage retrieval's page size")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=64)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--timer", default="cudagraph", choices=["cudagraph", "plain"],
                        help="do_bench_cudagraph (default) or do_bench")
    parser.add_argument("--rep", type=int, default=25, help="milliseconds per measurement")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--lean", action="store_true",
                        help="time only dense SDPA, attend, the K pass, the top-k and the PrHS "
                             "steps (no FlexAttention, oracle select, gather+SDPA or "
                             "select+attend): the full grid in half the time")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, runs on CPU (Triton interpreter): a smoke test")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _budget_for(spec: str, context: int) -> int:
    spec = spec.strip()
    if "/" in spec:
        num, den = spec.split("/")
        return int(context * int(num) // int(den))
    return int(spec)


# ---------------------------------------------------------------------------------------------
# timing


def _read_bandwidth(torch, device, timer) -> float:
    """Bytes per second of a read-only kernel: a reduction over 2 GiB (bf16) that writes
    one number, the floor of any kernel that only reads."""
    nbytes = (2 << 30) if device.type == "cuda" else (64 << 20)
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    ms = timer(lambda: x.sum())
    del x
    return nbytes / (ms * 1e-3)


def _copy_bandwidth(torch, device, timer) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def _flex_setup(torch):
    """(compiled flex_attention, BlockMask class) or raise with the reason."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    import torch._dynamo

    # One compiled function serves every shape of the run: allow the recompiles.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(flex_attention), BlockMask


def _flex_block_mask(torch, BlockMask, B, Hq, Hkv, L, budget, gen, device):
    nblk_total = L // _FLEX_BLOCK
    nsel = max(1, min(nblk_total, budget // _FLEX_BLOCK))
    # First and last block always (sinks, local window), the rest random; sorted.
    inner = torch.rand((B, Hkv, max(nblk_total - 2, 0)), generator=gen, device=device)
    inner = inner.argsort(-1)[..., : max(nsel - 2, 0)] + 1
    ends = torch.tensor([0, nblk_total - 1], device=device)[: min(2, nsel)]
    chosen = torch.cat([ends.expand(B, Hkv, -1), inner], -1).sort(-1).values.to(torch.int32)
    chosen = chosen.repeat_interleave(Hq // Hkv, dim=1)  # the group's heads share the blocks
    indices = torch.zeros((B, Hq, 1, nblk_total), dtype=torch.int32, device=device)
    indices[..., : chosen.shape[-1]] = chosen[:, :, None, :]
    full = torch.full((B, Hq, 1), chosen.shape[-1], dtype=torch.int32, device=device)
    empty = torch.zeros_like(full)
    # All chosen blocks are "full" blocks: no mask_mod is evaluated inside them.
    bm = BlockMask.from_kv_blocks(empty, torch.zeros_like(indices), full, indices,
                                  BLOCK_SIZE=_FLEX_BLOCK, seq_lengths=(1, L))
    return bm, chosen.shape[-1] * _FLEX_BLOCK


def _dense_backends(torch):
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION]


# ---------------------------------------------------------------------------------------------
# run


def run(args) -> int:
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        if not args.quick:
            print("prhs-bench latency needs a CUDA GPU (use --quick for a CPU smoke test)",
                  file=sys.stderr)
            return 2
        # The kernels run through the Triton interpreter; must be set before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from prhs_compile.kernels.attend_triton import attend_triton
    from prhs_compile.kernels.pages_triton import two_stage_bytes
    from prhs_compile.kernels.retrieve_triton import retrieval_bytes, retrieve_keys
    from prhs_compile.kernels.select_step_triton import oracle_select_triton
    from prhs_compile.kernels.bounds_triton import compute_bounds, mask_operand
    from prhs_compile.kernels.topk_triton import topk_picks

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    Hq, Hkv, D = args.q_heads, args.kv_heads, args.head_dim
    sink, local = args.sink, args.local
    contexts, batches = parse_sizes(args.contexts), parse_sizes(args.batches)
    budget_specs = [s for s in args.budgets.split(",") if s.strip()]
    if args.quick:
        Hq, Hkv, D = 4, 2, 32
        contexts, batches, budget_specs = [256], [1], ["1/8", "64"]
        sink, local = 2, 8
        if device.type != "cuda":
            dtype = torch.float32
    if Hq % Hkv:
        raise SystemExit(f"--q-heads {Hq} is not a multiple of --kv-heads {Hkv}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    scale = 1.0 / math.sqrt(D)
    timer = Timer(device, args.timer, args.rep)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    flex = BlockMask = None
    flex_reason = None
    if args.no_flex or args.lean:
        flex_reason = "disabled with --no-flex" if args.no_flex else "disabled with --lean"
    elif device.type != "cuda":
        flex_reason = "FlexAttention is compiled for CUDA only here (CPU smoke test)"
    else:
        try:
            flex, BlockMask = _flex_setup(torch)
        except Exception as exc:  # noqa: BLE001 - record any reason, keep benchmarking
            flex_reason = f"FlexAttention unavailable: {type(exc).__name__}: {exc}"
    if flex_reason:
        log.warning("skipping FlexAttention: %s", flex_reason)

    bandwidth = _read_bandwidth(torch, device, timer)
    copy_bandwidth = _copy_bandwidth(torch, device, timer)
    l2 = l2_bytes(device)

    configs = []
    for L in contexts:
        for B in batches:
            budgets = []
            for spec in budget_specs:
                S = _budget_for(spec, L)
                if S >= L or S <= sink + local or S in budgets:
                    log.warning("skipping budget %s at context %d: %s", spec, L,
                                "not below the context" if S >= L else
                                ("sink + local leave no room" if S <= sink + local
                                 else "duplicate"))
                    continue
                budgets.append(S)
            configs.append((B, L, budgets))
    step_rates = [float(r) for r in args.step_rates.split(",") if r.strip()]
    if any(not 0.0 <= r <= 1.0 for r in step_rates):
        raise SystemExit(f"--step-rates {args.step_rates!r}: every rate must be in [0, 1]")
    retrievals = [r.strip() for r in args.retrievals.split(",") if r.strip()]
    if not retrievals or any(r not in ("exact", "pages", "quest") for r in retrievals):
        raise SystemExit(f"--retrievals {args.retrievals!r}: a comma-separated list of exact, pages, quest")
    ticks_per_budget = 8 + sum(1 if r == "quest" else 1 + len(step_rates) for r in retrievals)
    total = sum(1 + ticks_per_budget * len(b) for _, _, b in configs)

    progress = Progress(total, "latency", enabled=not args.no_progress)
    tick = progress.tick

    results = []
    report = {
        **environment(torch, device),
        "quick": bool(args.quick),
        "complete": False,
        "timer": timer.name,
        "read_bandwidth_gbps": bandwidth / 1e9,
        "copy_bandwidth_gbps": copy_bandwidth / 1e9,
        "l2_bytes": l2,
        "shape": {"q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "dtype": str(dtype),
                  "q_len": 1},
        "sink": sink, "local": local,
        "flex_block": _FLEX_BLOCK,
        "notes": ("floors = bytes / measured read bandwidth; fraction = floor / time; "
                  "vs_dense = dense time / method time; select, attend and gather_sdpa use "
                  "the indices of an oracle retrieval over random data; the mask is the "
                  "static-cache bool mask [B,1,1,L] (all valid) for our kernels, none for "
                  "SDPA and flex"),
        "results": results,
    }

    t_start = time.perf_counter()
    for B, L, budgets in configs:
        kv_bytes = 2 * B * Hkv * L * D * itemsize
        copies = copies_past_l2(kv_bytes, l2, cap=16)
        q = torch.randn((B, Hq, 1, D), generator=gen, device=device, dtype=dtype)
        caches = []
        for _ in range(copies):
            k = torch.randn((B, Hkv, L, D), generator=gen, device=device, dtype=dtype)
            v = torch.randn((B, Hkv, L, D), generator=gen, device=device, dtype=dtype)
            caches.append((k, v))
        # The static-cache decode mask (every position holds a token).
        mask = torch.ones((B, 1, 1, L), dtype=torch.bool, device=device)

        dense = {"bytes": kv_bytes}
        try:
            backends = _dense_backends(torch) if device.type == "cuda" else None

            def dense_call(k, v):
                if backends is None:
                    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

            dense["ms"] = timer(rotating([lambda k=k, v=v: dense_call(k, v)
                                           for k, v in caches]))
        except Exception as exc:  # noqa: BLE001
            dense = {"skipped": f"{type(exc).__name__}: {exc}"}
            log.warning("dense SDPA failed at B=%d L=%d: %s", B, L, dense["skipped"])
        tick(f"B={B} L={L} dense")

        for S in budgets:
            methods = {"dense_sdpa": dict(dense)}
            # Dense SDPA over a contiguous cache as long as the budget: what attend is held to.
            try:
                short = [(k[:, :, :S].contiguous(), v[:, :, :S].contiguous()) for k, v in caches]
                methods["dense_at_budget"] = {
                    "ms": timer(rotating([lambda k=k, v=v: dense_call(k, v) for k, v in short])),
                    "bytes": 2 * B * Hkv * S * D * itemsize,
                }
                del short
            except Exception as exc:  # noqa: BLE001
                methods["dense_at_budget"] = {"skipped": f"{type(exc).__name__}: {exc}"}
            idx_bytes = B * Hkv * S * 4
            attend_bytes = 2 * B * Hkv * S * D * itemsize + idx_bytes

            # flex
            if flex is None:
                methods["flex"] = {"skipped": flex_reason}
            else:
                try:
                    bm, flex_tokens = _flex_block_mask(torch, BlockMask, B, Hq, Hkv, L, S,
                                                       gen, device)
                    t0 = time.perf_counter()
                    flex(q, caches[0][0], caches[0][1], block_mask=bm, scale=scale,
                         enable_gqa=True)
                    torch.cuda.synchronize()
                    first_call = time.perf_counter() - t0
                    ms = timer(rotating([
                        lambda k=k, v=v: flex(q, k, v, block_mask=bm, scale=scale,
                                              enable_gqa=True)
                        for k, v in caches]))
                    methods["flex"] = {
                        "ms": ms, "tokens": flex_tokens, "first_call_s": first_call,
                        "bytes": 2 * B * Hkv * flex_tokens * D * itemsize,
                    }
                except Exception as exc:  # noqa: BLE001
                    methods["flex"] = {"skipped": f"{type(exc).__name__}: {exc}"}
                    log.warning("FlexAttention failed at B=%d L=%d S=%d: %s", B, L, S,
                                methods["flex"]["skipped"])
            tick(f"B={B} L={L} S={S} flex")

            # select (its output feeds attend and gather+SDPA)
            idxs = [oracle_select_triton(q, k, mask, scale, S, sink, local, 0)
                    for k, _ in caches]
            rows = Hq // Hkv
            if args.lean:
                methods["select"] = {"skipped": "--lean"}
            else:
                sel_ms = timer(rotating([
                    lambda k=k: oracle_select_triton(q, k, mask, scale, S, sink, local, 0)
                    for k, _ in caches]))
                methods["select"] = {"ms": sel_ms, "bytes": retrieval_bytes(
                    B, Hkv, L, D, itemsize, q_rows=rows, key_passes=5)}
            tick(f"B={B} L={L} S={S} select")

            operand = mask_operand(mask, B, 1, L)
            bounds = compute_bounds(*operand, B, 1, L, sink, local, S, 0, device)
            score_ms = timer(rotating([
                lambda k=k: retrieve_keys(q, k, operand, bounds, scale)
                for k, _ in caches]))
            methods["select_score"] = {"ms": score_ms, "bytes": retrieval_bytes(
                B, Hkv, L, D, itemsize, q_rows=rows, key_passes=0)}
            tick(f"B={B} L={L} S={S} score")

            keys = retrieve_keys(q, caches[0][0], operand, bounds, scale).keys
            topk_ms = timer(lambda: topk_picks(keys, bounds, S - sink - local))
            methods["topk"] = {"ms": topk_ms, "bytes": 5 * B * Hkv * L * 4}
            del keys
            tick(f"B={B} L={L} S={S} topk")

            att_ms = timer(rotating([
                lambda k=k, v=v, i=i: attend_triton(q, k, v, i, mask, scale)
                for (k, v), i in zip(caches, idxs)]))
            methods["attend"] = {"ms": att_ms, "bytes": attend_bytes}
            tick(f"B={B} L={L} S={S} attend")

            def gather_sdpa(k, v, i):
                ix = i.long()[..., None].expand(-1, -1, -1, D)
                return F.scaled_dot_product_attention(q, k.gather(2, ix), v.gather(2, ix),
                                                      scale=scale, enable_gqa=True)

            if args.lean:
                methods["gather_sdpa"] = {"skipped": "--lean"}
            else:
                g_ms = timer(rotating([lambda k=k, v=v, i=i: gather_sdpa(k, v, i)
                                        for (k, v), i in zip(caches, idxs)]))
                methods["gather_sdpa"] = {"ms": g_ms, "bytes": attend_bytes}
            tick(f"B={B} L={L} S={S} gather")

            def select_attend(k, v):
                i = oracle_select_triton(q, k, mask, scale, S, sink, local, 0)
                return attend_triton(q, k, v, i, mask, scale)

            if args.lean:
                methods["select_attend"] = {"skipped": "--lean"}
            else:
                sa_ms = timer(rotating([lambda k=k, v=v: select_attend(k, v) for k, v in caches]))
                methods["select_attend"] = {"ms": sa_ms,
                                            "bytes": methods["select"]["bytes"] + attend_bytes}
            # What a PrHS retrieval moves (its top-k dilates: two selects over the keys).
            sel_bytes = retrieval_bytes(B, Hkv, L, D, itemsize, q_rows=rows, key_passes=10)
            tick(f"B={B} L={L} S={S} select+attend")


            for retrieval in retrievals:
                plan = _step_plan(S, sink, local, retrieval, args, L)
                if retrieval == "quest":  # stage one alone, at every step: no rate to set
                    steps = [_PrHSStep(torch, q, k, v, mask, scale, plan) for k, v in caches]
                    step_ms = timer(rotating([st.call for st in steps]))
                    pages_read = -(-L // args.page_size)
                    methods["quest"] = {
                        "ms": step_ms, "restore_ms": timer(rotating([st.restore for st in steps])),
                        "bytes": 2 * B * Hkv * pages_read * D * itemsize + attend_bytes
                        + 2 * steps[0].state_bytes}
                    tick(f"B={B} L={L} S={S} quest")
                    del steps
                    continue
                steps = [_PrHSStep(torch, q, k, v, mask, scale, plan) for k, v in caches]
                tag = "prhs" if retrieval == "exact" else "prhs-pages"
                restore_ms = timer(rotating([st.restore for st in steps]))
                methods["restore" if retrieval == "exact" else "restore-pages"] = {
                    "ms": restore_ms, "bytes": steps[0].state_bytes * 2}
                tick(f"B={B} L={L} S={S} {tag} restore")
                retrieval_bytes_now = sel_bytes if retrieval == "exact" else two_stage_bytes(
                    B, Hkv, L, D, itemsize, plan, q_rows=rows)
                for r in step_rates:
                    try:
                        achieved = [st.set_rate(r) for st in steps][0]
                    except RuntimeError as exc:  # one rate's failure must not end the grid
                        methods[f"{tag}@{r:g}"] = {"error": str(exc)[:1000]}
                        log.error("B=%d L=%d S=%d %s@%g: %s", B, L, S, tag, r, exc)
                        continue
                    step_ms = timer(rotating([st.call for st in steps]))
                    methods[f"{tag}@{r:g}"] = {
                        "ms": step_ms, "retrieval_rate": achieved, "restore_ms": restore_ms,
                        "bytes": achieved * retrieval_bytes_now + attend_bytes + 2 * steps[0].state_bytes,
                    }
                    if steps[0].guess_misses is not None:
                        methods[f"{tag}@{r:g}"]["guess_misses"] = steps[0].guess_misses
                    if steps[0].guess_miss_example is not None:
                        methods[f"{tag}@{r:g}"]["guess_miss_example"] = steps[0].guess_miss_example
                    changed = steps[0].snapshot_changes()  # after the timed replays too
                    if changed:
                        methods[f"{tag}@{r:g}"]["snapshot_changed"] = changed
                        log.error("B=%d L=%d S=%d %s@%g: the set-up snapshot changed: %s",
                                  B, L, S, tag, r, changed)
                    if retrieval == "pages":
                        methods[f"{tag}@{r:g}"]["retrieval_bytes_vs_k"] = retrieval_bytes_now / (B * Hkv * L * D * itemsize)
                    tick(f"B={B} L={L} S={S} {tag}@{r:g}")
                del steps

            for m in methods.values():
                if "ms" in m:
                    m["floor_ms"] = m["bytes"] / bandwidth * 1e3
                    m["fraction"] = m["floor_ms"] / m["ms"]
                    m["read_tbps"] = m["bytes"] / (m["ms"] * 1e-3) / 1e12
                    if "ms" in dense:
                        m["vs_dense"] = dense["ms"] / m["ms"]  # speed-up over dense
            results.append({"batch": B, "context": L, "budget": S, "copies": copies,
                            "methods": methods})
            write_json(args.out, report)  # partial results survive an interrupted run
            progress.row(f"B={B} L={L} S={S}", methods)
            del idxs
        del q, caches, mask
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    finish(args.out, report, t_start, _markdown(report))
    return 0


def _step_plan(budget: int, sink: int, local: int, retrieval: str, args, context: int):
    """The plan of the measured PrHS step (its page summaries cover the context), or of
    Quest's (``retrieval="quest"``: the policy, at a layer past its dense ones)."""
    from prhs_compile.kernels.plan import SelectPlan

    if retrieval == "quest":
        return SelectPlan(policy="quest", layer=2, num_layers=4, budget=budget, sink=sink,
                          local=local, page_size=args.page_size,
                          max_cache_len=max(context, args.page_size))
    return SelectPlan(policy="prhs", layer=0, budget=budget, sink=sink, local=local,
                      retrieval=retrieval, page_size=args.page_size, candidates=args.candidates,
                      max_cache_len=max(context, args.page_size) if retrieval == "pages" else 32768)


class _PrHSStep:
    """One attention layer's decode step through the registered ops, on a state set up so
    that a chosen share of the (row, KV head) slots retrieves and the rest reuses (PrHS;
    ``set_rate``), or Quest's, which chooses at every step and has no rate to set."""

    def __init__(self, torch, q, k, v, mask, scale, plan):
        from prhs_compile.kernels.pages import PAGE_MAX, PAGE_MIN
        from prhs_compile.kernels.select_reference import state_spec
        from prhs_compile.state import allocate_state

        self.torch, self.q, self.k, self.v, self.mask, self.scale = torch, q, k, v, mask, scale
        B, Hq, _, D = q.shape
        self.plan = plan
        self.plan_text = self.plan.encode()
        self.names = list(state_spec(self.plan, B, Hq, k.shape[1], D))
        self.state = allocate_state(self.plan, B, Hq, k.shape[1], D, q.device, k.dtype)
        # Page summaries: the replayed step recomputes the newest key's page to what it holds.
        self.restored = [name not in (PAGE_MIN, PAGE_MAX) for name in self.names]
        # What the gate reads besides the state, before any kernel ran: a step that changed
        # them (a kernel writing out of bounds) shows in ``_gate_diagnosis``.
        L = k.shape[2]
        self.inputs_at_setup = (mask.clone(), k[:, 0, L - 2:].clone())
        # One full retrieval fills the stored sets; then the state is made to continue from
        # position L - 2, so that the step at L - 1 follows it.
        self._ops()
        st = dict(zip(self.names, self.state))
        st["pos"].fill_(L - 2)
        st["fingerprint"].copy_(k[:, 0, L - 2].float())
        if "age" in st:  # PrHS: every slot holds a set (quest keeps none)
            st["age"].fill_(0)
        self.snapshot = [t.clone() if keep else None for t, keep in zip(self.state, self.restored)]
        # A host copy of the snapshot: a kernel that writes out of bounds into it (it lies
        # in the same memory pool as the step's buffers) shows in ``snapshot_changes``.
        self.snapshot_host = [None if t is None else t.to("cpu", copy=True) for t in self.snapshot]
        self.guess_misses = None  # set by set_rate: retrieving slots whose top-k guess failed
        self.guess_miss_example = None  # (slot, guess before, guess after) of the first miss
        self.state_bytes = sum(t.numel() * t.element_size()
                               for t, keep in zip(self.state, self.restored) if keep)

    def set_rate(self, rate: float) -> float:
        """Anchors equal to the query reuse (cosine 1), opposite ones retrieve; returns the
        share of slots that retrieves (whole slots: ``round(rate * B * Hkv)``)."""
        torch = self.torch
        self.guess_misses = self.guess_miss_example = None  # this rate's, not the last one's
        B, Hq = self.q.shape[:2]
        Hkv = self.k.shape[1]
        n = round(rate * B * Hkv)
        retrieve = torch.zeros(B * Hkv, dtype=torch.bool, device=self.q.device)
        retrieve[torch.randperm(B * Hkv, device=self.q.device)[:n]] = True
        sign = torch.where(retrieve.view(B, Hkv).repeat_interleave(Hq // Hkv, 1), -1.0, 1.0)
        from prhs_compile.kernels.select_reference import RETRIEVALS, TOPK_GUESS

        snapshot = dict(zip(self.names, self.snapshot))
        snapshot["anchor"].copy_(self.q[:, :, -1].float() * sign[..., None])
        self.snapshot_host[self.names.index("anchor")] = snapshot["anchor"].to("cpu", copy=True)
        self.call()  # restores the snapshot first
        state = dict(zip(self.names, self.state))
        counters = state["counters"]
        measured = int(counters[RETRIEVALS] - snapshot["counters"][RETRIEVALS])
        # The top-k keeps its guess where it held and writes a new one where it did not:
        # the retrieving slots whose guess changed are the misses (the slow path).
        if TOPK_GUESS in state:
            changed = state[TOPK_GUESS].view(-1) != snapshot[TOPK_GUESS].view(-1)
            missed = changed & retrieve
            self.guess_misses = int(missed.sum())
            if self.guess_misses:
                slot = int(missed.nonzero()[0])
                self.guess_miss_example = (slot, int(snapshot[TOPK_GUESS].view(-1)[slot]),
                                           int(state[TOPK_GUESS].view(-1)[slot]))
        if measured != n:
            raise RuntimeError(f"state set up for {n} retrievals, the step ran {measured}; "
                               f"{self.snapshot_report()}; {self._gate_diagnosis()}; "
                               f"{self._reference_retrievals()}")
        return n / (B * Hkv)

    def snapshot_changes(self) -> list:
        """The snapshot's entries that differ from their host copy (nothing but ``set_rate``
        may change them), each with its first differing element: ``name[i] old -> new``."""
        changes = []
        for name, t, host in zip(self.names, self.snapshot, self.snapshot_host):
            if t is None:
                continue
            now = t.cpu()
            differ = (now != host).reshape(-1)
            if differ.any():
                i = int(differ.nonzero()[0])
                changes.append(f"{name}[{i}] {host.reshape(-1)[i].item()} -> "
                               f"{now.reshape(-1)[i].item()} ({int(differ.sum())} elements)")
        return changes

    def snapshot_report(self) -> str:
        changes = self.snapshot_changes()
        if not changes:
            return "the set-up snapshot is intact"
        return "the set-up snapshot CHANGED since it was taken: " + ", ".join(changes)

    def _reference_retrievals(self) -> str:
        """What the torch reference does from the same state: tells a wrong set-up (it
        retrieves as often) from a wrong step (it retrieves as set up)."""
        from prhs_compile.kernels.plan import decode_plan
        from prhs_compile.kernels.select_reference import RETRIEVALS, select_reference

        try:  # it scores the whole cache: at long contexts it may itself run out of memory
            state = [t.clone() for t in self._set_up_state()]
            before = int(dict(zip(self.names, state))["counters"][RETRIEVALS])
            select_reference(self.q, self.k, self.v, self.mask, self.scale,
                             decode_plan(self.plan_text), state)
            after = int(dict(zip(self.names, state))["counters"][RETRIEVALS])
        except Exception as exc:  # the mismatch is the error to report, not this one
            return f"the torch reference from the same state failed: {type(exc).__name__}: {exc}"
        return f"the torch reference from the same state ran {after - before}"

    def _gate_diagnosis(self) -> str:
        """Why the gate retrieves from the set-up state: per condition of a reuse
        (``rule_prhs.prhs_gate``), how many rows or slots fail it, and whether the mask or
        the newest keys differ from what the set-up saw."""
        try:
            return self._diagnose_gate()
        except Exception as exc:  # the mismatch is the error to report, not this one
            return f"the gate's diagnosis failed: {type(exc).__name__}: {exc}"[:200]

    def _diagnose_gate(self) -> str:
        torch = self.torch
        from prhs_compile.kernels.plan import decode_plan
        from prhs_compile.kernels.rule_prhs import age_allows_reuse, anchor_reuse_bound, near_anchor
        from prhs_compile.kernels.select_reference import StepView, follows_stored, holds_stored_key

        plan = decode_plan(self.plan_text)
        st = dict(zip(self.names, self._set_up_state()))
        B = self.q.shape[0]
        Hkv = self.k.shape[1]
        view = StepView(self.q, self.k, self.mask, self.scale)
        pos = st["pos"][:B]
        not_following = int((~follows_stored(pos, view.newest, view.q_len, view.kv_len)).sum())
        key_differs = int((~holds_stored_key(pos, st["fingerprint"][:B], self.k)).sum())
        age_out = int((~age_allows_reuse(st["age"][:B], plan.max_reuse)).sum())
        query, anchor = self.q[:, :, -1].float(), st["anchor"][:B]
        bound = anchor_reuse_bound(query, anchor, st["anchor_dropped"][:B], st["key_norm"][:B],
                                   self.scale, Hkv)
        far = int((~near_anchor(query, anchor, bound, plan.tau, plan.delta_target, Hkv)).sum())
        mask0, keys0 = self.inputs_at_setup
        return (f"gate from the set-up state: {not_following} of {B} rows do not follow the "
                f"stored position, {key_differs} hold another key there, {age_out} slots are "
                f"past max_reuse or unset, {far} have queries too far from their anchor; mask "
                f"{'unchanged' if torch.equal(mask0, self.mask) else 'CHANGED'} and newest keys "
                f"{'unchanged' if torch.equal(keys0, self.k[:, 0, -keys0.shape[1]:]) else 'CHANGED'} "
                "since before the set-up's first step")

    def _set_up_state(self) -> list:
        """The state as the set-up left it: the snapshot, and the entries it does not keep
        (page summaries) as they are now."""
        return [t if s is None else s for t, s in zip(self.state, self.snapshot)]

    def restore(self):
        for t, s in zip(self.state, self.snapshot):
            if s is not None:
                t.copy_(s)

    def call(self):
        self.restore()
        return self._ops()

    def _ops(self):
        ops = self.torch.ops.prhs
        idx = ops.select(self.q, self.k, self.v, self.mask, self.scale, self.plan_text, self.state)
        return ops.attend(self.q, self.k, self.v, idx, self.mask, self.scale)


def _markdown(report) -> str:
    def ms(m):
        return f"{m['ms']:.3f}" if "ms" in m else "skip"

    def frac(m):
        return f"{100 * m['fraction']:.0f}%" if "fraction" in m else "-"

    lines = [
        f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
        f"read bandwidth {report['read_bandwidth_gbps']:.0f} GB/s (copy "
        f"{report['copy_bandwidth_gbps']:.0f} GB/s); timer: {report['timer']}",
        f"shape Hq={report['shape']['q_heads']} Hkv={report['shape']['kv_heads']} "
        f"D={report['shape']['head_dim']} {report['shape']['dtype']}, sink={report['sink']} "
        f"local={report['local']}; "
        "times in ms, (% of the byte floor)",
        "",
        "| B | context | budget | dense SDPA | dense SDPA at budget | flex | gather+SDPA | attend "
        "| select | select (K pass) | top-k | select+attend |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m = r["methods"]
        cells = [str(r["batch"]), str(r["context"]), str(r["budget"])]
        for name in ("dense_sdpa", "dense_at_budget", "flex", "gather_sdpa", "attend", "select",
                     "select_score", "topk", "select_attend"):
            cells.append(f"{ms(m[name])} ({frac(m[name])})" if "ms" in m[name] else "skip")
        lines.append("| " + " | ".join(cells) + " |")
    rates = [n for n in report["results"][0]["methods"]
             if n.startswith(("prhs@", "prhs-pages@")) or n == "quest"] if report["results"] else []
    if rates:
        lines += [
            "",
            "Whole PrHS step (select + attend through the ops, state restore included) at "
            "retrieval rate r (and Quest's step), ms and speed-up over dense SDPA:",
            "",
            "| B | context | budget | dense SDPA | " + " | ".join(rates) + " |",
            "|---|---|---|---|" + "---|" * len(rates),
        ]
        for r in report["results"]:
            m = r["methods"]
            cells = [str(r["batch"]), str(r["context"]), str(r["budget"]), ms(m["dense_sdpa"])]
            for name in rates:
                vs = m[name].get("vs_dense")
                cells.append(f"{ms(m[name])} ({vs:.1f}x)" if vs is not None else ms(m[name]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
