"""``prhs-bench prefill``: prefill attention inside the PrHS recency window (PSAW), block-sparse
against dense, in one run.

One prefill attention call of one layer (Llama-3-8B shape by default: Hq=32, Hkv=8, D=128,
bf16, batch 1, causal, no padding) for every prompt length x PSAW layer of a
``--num-layers``-layer model whose window starts at ``--psaw-start`` (layer l leaves out the
oldest ``floor((1 - phi ** (alpha * (l - start) / (N - start))) * t)`` non-sink tokens of a
query row that sees t tokens, never the sinks, never the last ``local``):

==================  ==========================================================================
``dense_causal``    ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` (flash /
                    efficient / cuDNN backends only): what a layer outside the window runs
``masked_sdpa``     the reference path's call: SDPA with ``enable_gqa=True`` and the layer's
                    window as an additive bias ``[B, 1, Tq, L]``. PyTorch has no fused GQA
                    kernel with a mask, so this runs the math backend (it materialises the
                    scores; reported as skipped where it does not fit in memory)
``masked_sdpa_kv``  the same bias with K/V repeated to Hq heads (outside the timing), so a
                    fused backend (memory-efficient / cuDNN) runs: the best a dense masked
                    kernel does
``flex``            ``window_prefill_flex``, as ``prhs::window_prefill`` runs on CUDA (without
                    the O(L) state reset): the window's per-row tensors, its BlockMask
                    (compiled ``create_block_mask``) and the compiled block-sparse
                    FlexAttention
``flex_attention``  the FlexAttention call alone, on a BlockMask built beforehand
``block_mask``      building the window and its BlockMask alone
==================  ==========================================================================

For each: ``ms`` (median), ``pair_fraction`` (the (query, key) pairs it must compute over
those of causal attention: 1 for dense, the window's kept pairs for the others),
``tflops`` (4 * B * Hq * D * pairs / time: useful attention FLOPs per second),
``vs_dense`` (dense causal time / its time). For the BlockMask: ``kv_block_fraction``
(computed KV blocks over those of the causal BlockMask at the same block size: the ideal
speed-up of skipping blocks) and ``partial_block_fraction`` (computed blocks where the
mask_mod runs). ``rel_err`` is ``||flex - masked_sdpa_kv|| / ||masked_sdpa_kv||``.

Timing: ``triton.testing.do_bench`` (median, L2 flushed between calls). Prefill calls are long
(milliseconds), so launch overhead hardly counts. ``--mask bool`` passes HF's padded-prefill
form instead (a bool ``[B, 1, T, T]`` causal mask, ``is_causal=False``): the per-row path,
which counts ranks over the mask.

``--quick`` runs tiny shapes (on CPU too, FlexAttention eager, wall-clock timer) as a smoke
test; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time

from ..report import Progress, environment, finish, parse_sizes, write_json
from .timing import Timer

log = logging.getLogger("prhs.bench.prefill")

METHODS = ("dense_causal", "masked_sdpa", "masked_sdpa_kv", "flex", "flex_attention", "block_mask")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="8K,32K", help="prompt lengths, comma separated (K = 1024)")
    parser.add_argument("--layers", default="0.25,0.5,1.0",
                        help="PSAW layers: depth fractions of the model (0.5 -> layer "
                             "round(0.5 * (N - 1))) or layer indices (integers), comma separated")
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--psaw-start", type=int, default=2, help="psaw_start_layer")
    parser.add_argument("--psaw-phi", type=float, default=0.5)
    parser.add_argument("--psaw-alpha", type=float, default=1.0)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--mask", default="none", choices=["none", "bool"],
                        help="none: is_causal=True without a mask (HF, batch 1); bool: a bool "
                             "causal mask [B,1,T,T] (HF's padded-prefill form)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="BlockMask block (default 128; 32 with --quick)")
    parser.add_argument("--rep", type=int, default=200, help="milliseconds per measurement")
    parser.add_argument("--no-masked-gqa", action="store_true",
                        help="skip masked_sdpa (the math-backend reference call)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, runs on CPU: a smoke test")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _layers(text: str, num_layers: int, start: int) -> list[int]:
    """Layer indices from depth fractions / indices; layers the window does not cover (at or
    before its start: prefill stays dense there) are left out with a warning."""
    layers = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        layer = round(float(part) * (num_layers - 1)) if "." in part else int(part)
        if not start < layer < num_layers:
            log.warning("skipping layer %s: PSAW prefill covers layers %d..%d", part, start + 1, num_layers - 1)
        elif layer not in layers:
            layers.append(layer)
    return layers


def _window_bias(window, q_len: int, kv_len: int, dtype, device):
    """The window as the reference's additive bias ``[B, 1, Tq, L]`` (0 allowed, -inf not),
    built in chunks of rows from the window's small tensors (bool masks and no mask)."""
    import torch

    batch = window.count.shape[0]
    bias = torch.empty((batch, 1, q_len, kv_len), dtype=dtype, device=device)
    positions = torch.arange(kv_len, device=device)
    step = max(1, (1 << 26) // max(1, batch * kv_len))
    for start in range(0, q_len, step):
        rows = slice(start, min(q_len, start + step))
        row_index = torch.arange(rows.start, rows.stop, device=device)
        keep = (positions < window.lo[:, rows, None]) | (positions >= window.hi[:, rows, None])
        if window.causal:
            keep &= positions <= row_index[:, None]
        if window.key_valid is not None:
            keep &= window.key_valid[:, None, :]
        if window.mask_rows is not None:
            keep &= window.mask_rows[:, rows]
        chunk = bias[:, 0, rows]
        chunk.zero_()
        chunk.masked_fill_(~keep, float("-inf"))
    return bias


def _skip_reason(exc: Exception) -> str:
    """What a skipped measurement records: the exception's type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


class _Bench:
    """One run's settings, and the measurement of one prompt length / one layer."""

    def __init__(self, args, torch, kernels, device, dtype, shape, psaw_plan, block: int, tick):
        self.args, self.torch, self.k, self.device, self.dtype = args, torch, kernels, device, dtype
        self.B, self.Hq, self.Hkv, self.D = shape
        self.scale = 1.0 / math.sqrt(self.D)
        self.psaw_plan, self.block, self.tick = psaw_plan, block, tick
        self.timer = Timer(device, "plain", args.rep)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)
        _, self.flex_attention = kernels.flex_functions(device)

    def measure(self, name: str, fn, where: str) -> dict:
        """``{"ms": ...}``, or ``{"skipped": reason}`` (out of memory, no kernel, ...)."""
        try:
            return {"ms": self.timer(fn)}
        except Exception as exc:  # noqa: BLE001 - record the reason, keep benchmarking
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
            log.warning("%s failed at %s: %s", name, where, exc)
            return {"skipped": _skip_reason(exc)}

    def sdpa(self, q, k, v, backends, **kwargs):
        """SDPA restricted to ``backends`` on CUDA (so a fallback to math is an error, not a
        silent measurement of something else); any backend on CPU."""
        F = self.torch.nn.functional
        if self.device.type != "cuda" or backends is None:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, **kwargs)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, **kwargs)

    def length(self, T: int, layers: list[int]) -> list[dict]:
        torch, k_ = self.torch, self.k
        from torch.nn.attention import SDPBackend

        B, Hq, Hkv, D, device, dtype = self.B, self.Hq, self.Hkv, self.D, self.device, self.dtype
        q = torch.randn((B, Hq, T, D), generator=self.gen, device=device, dtype=dtype)
        k = torch.randn((B, Hkv, T, D), generator=self.gen, device=device, dtype=dtype)
        v = torch.randn((B, Hkv, T, D), generator=self.gen, device=device, dtype=dtype)
        if self.args.mask == "bool":
            positions = torch.arange(T, device=device)
            mask, is_causal = (positions[None, :] <= positions[:, None]).expand(B, 1, T, T), False
        else:
            mask, is_causal = None, True
        inputs = (q, k, v, mask, is_causal)

        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        dense = self.measure("dense SDPA", lambda: self.sdpa(q, k, v, fused, is_causal=True, enable_gqa=True),
                             f"T={T}")
        # Causal attention's pairs and blocks: the window of a plan that leaves nothing out.
        no_window = dataclasses.replace(self.psaw_plan, psaw_start=-1)
        causal_window = k_.prefill_window(T, T, mask, is_causal, no_window, B, device)
        causal = {"pairs": int(causal_window.valid_pairs), "blocks": None}
        try:
            causal_mask = k_.window_block_mask(causal_window, T, T, device, self.block)
            causal["blocks"] = k_.block_counts(causal_mask)["computed"]
        except Exception as exc:  # noqa: BLE001 - the flex rows report it as well
            log.warning("causal BlockMask failed at T=%d: %s", T, exc)
        if "ms" in dense:
            dense.update(pair_fraction=1.0, vs_dense=1.0, tflops=self.tflops(causal["pairs"], dense["ms"]))
        self.tick(f"T={T} dense")
        return [self.layer(T, layer, inputs, dense, causal) for layer in layers]

    def tflops(self, pairs: int, ms: float) -> float:
        return 4 * self.B * self.Hq * self.D * pairs / (ms * 1e-3) / 1e12

    def masked_kv(self, q, k, v, bias, out_flex, where: str):
        """SDPA with the window bias and K/V repeated to Hq heads (a fused kernel runs), and
        the relative error of the flex output against it."""
        from torch.nn.attention import SDPBackend

        group = self.Hq // self.Hkv
        k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

        def call():
            return self.sdpa(q, k_rep, v_rep, backends, attn_mask=bias)

        result = self.measure("masked SDPA (K/V repeated)", call, where)
        if "ms" not in result or out_flex is None:
            return result, None
        expected = call().float()
        return result, float((out_flex.float() - expected).norm() / expected.norm())

    def flex(self, T: int, layer: int, inputs, plan, window, where: str) -> tuple[dict, object, object]:
        """The three FlexAttention measurements, the window's block counts and the flex output
        (for the error check); a failure (compiling, memory) skips all three with its reason."""
        torch, k_, device, block = self.torch, self.k, self.device, self.block
        q, k, v, mask, is_causal = inputs

        def flex_op():
            return k_.window_prefill_flex(q, k, v, mask, is_causal, self.scale, plan, block_size=block)

        try:
            block_mask = k_.window_block_mask(window, T, T, device, block)
            blocks = k_.block_counts(block_mask)
            t0 = time.perf_counter()
            out = flex_op()  # the first call compiles (on CUDA)
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_call_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - record the reason, keep benchmarking
            log.warning("FlexAttention failed at %s: %s", where, exc)
            skipped = {"skipped": _skip_reason(exc)}
            for name in ("flex", "flex_attention", "block_mask"):
                self.tick(f"T={T} l={layer} {name}")
            return {name: dict(skipped) for name in ("flex", "flex_attention", "block_mask")}, None, None

        methods = {"flex": dict(self.measure("flex", flex_op, where), first_call_s=first_call_s)}
        self.tick(f"T={T} l={layer} flex")
        score_mod = window.score_mod()
        methods["flex_attention"] = self.measure("flex_attention", lambda: self.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=self.scale, enable_gqa=True), where)
        self.tick(f"T={T} l={layer} flex_attention")
        methods["block_mask"] = self.measure("block_mask", lambda: k_.window_block_mask(
            k_.prefill_window(T, T, mask, is_causal, plan, self.B, device), T, T, device, block), where)
        self.tick(f"T={T} l={layer} block_mask")
        return methods, blocks, out

    def layer(self, T: int, layer: int, inputs, dense: dict, causal: dict) -> dict:
        q, k, v, mask, is_causal = inputs
        plan = dataclasses.replace(self.psaw_plan, layer=layer)
        where = f"B={self.B} T={T} layer={layer}"
        window = self.k.prefill_window(T, T, mask, is_causal, plan, self.B, self.device)
        kept_pairs = int(window.kept_pairs)
        methods = {"dense_causal": dict(dense)}
        flex_methods, blocks, out_flex = self.flex(T, layer, inputs, plan, window, where)
        methods.update(flex_methods)

        bias = _window_bias(window, T, T, self.dtype, self.device)
        methods["masked_sdpa_kv"], rel_err = self.masked_kv(q, k, v, bias, out_flex, where)
        del out_flex
        self.tick(f"T={T} l={layer} masked_sdpa_kv")
        if self.args.no_masked_gqa:
            methods["masked_sdpa"] = {"skipped": "disabled with --no-masked-gqa"}
        else:  # as the reference calls it (no backend restriction: it falls back to math)
            methods["masked_sdpa"] = self.measure("masked SDPA (GQA, the reference call)", lambda: self.sdpa(
                q, k, v, None, attn_mask=bias, enable_gqa=True), where)
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        self.tick(f"T={T} l={layer} masked_sdpa")

        for name, m in methods.items():
            if "ms" not in m or name == "dense_causal":
                continue
            if name != "block_mask":
                m["pair_fraction"] = kept_pairs / causal["pairs"]
                m["tflops"] = self.tflops(kept_pairs, m["ms"])
            if "ms" in dense:
                m["vs_dense"] = dense["ms"] / m["ms"]
        depth = (layer - plan.psaw_start) / (plan.num_layers - plan.psaw_start)
        block_share = blocks is not None and causal["blocks"] is not None
        return {
            "batch": self.B, "length": T, "layer": layer, "depth": depth,
            "causal_pairs": causal["pairs"], "kept_pairs": kept_pairs,
            "pair_fraction": kept_pairs / causal["pairs"],
            "kv_block_fraction": blocks["computed"] / causal["blocks"] if block_share else None,
            "partial_block_fraction": blocks["partial"] / causal["blocks"] if block_share else None,
            "blocks": dict(blocks, causal=causal["blocks"]) if blocks is not None else None,
            "rel_err": rel_err,
            "methods": {name: methods[name] for name in METHODS},
        }


def run(args) -> int:
    import torch

    if not torch.cuda.is_available() and not args.quick:
        print("prhs-bench prefill needs a CUDA GPU (use --quick for a CPU smoke test)", file=sys.stderr)
        return 2
    try:
        from prhs_compile.kernels import window_prefill_flex as kernels
        from prhs_compile.kernels.plan import SelectPlan
    except ImportError:  # source checkout without the package mapping
        from kernels import window_prefill_flex as kernels
        from kernels.plan import SelectPlan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.q_heads, args.kv_heads, args.head_dim)
    lengths, sink, local = parse_sizes(args.lengths), args.sink, args.local
    block = args.block_size or 128
    if args.quick:
        shape, lengths, sink, local, block = (1, 4, 2, 32), [256], 4, 16, args.block_size or 32
        if device.type != "cuda":
            dtype = torch.float32
    if shape[1] % shape[2]:
        raise SystemExit(f"--q-heads {shape[1]} is not a multiple of --kv-heads {shape[2]}")
    layers = _layers(args.layers, args.num_layers, args.psaw_start)
    if not layers:
        raise SystemExit("no PSAW layer to measure (see --layers, --psaw-start, --num-layers)")
    psaw_plan = SelectPlan(policy="prhs", layer=0, budget=max(1024, sink + local), sink=sink, local=local,
                           psaw_start=args.psaw_start, psaw_phi=args.psaw_phi, psaw_alpha=args.psaw_alpha,
                           num_layers=args.num_layers)

    progress = Progress(len(lengths) * (1 + (len(METHODS) - 1) * len(layers)), "prefill",
                        enabled=not args.no_progress)

    bench = _Bench(args, torch, kernels, device, dtype, shape, psaw_plan, block, progress.tick)
    results = []
    report = {
        **environment(torch, device),
        "command": getattr(args, "command_line", None),
        "quick": bool(args.quick),
        "complete": False,
        "timer": bench.timer.name,
        "shape": {"batch": shape[0], "q_heads": shape[1], "kv_heads": shape[2], "head_dim": shape[3],
                  "dtype": str(dtype)},
        "psaw": {"start": args.psaw_start, "phi": args.psaw_phi, "alpha": args.psaw_alpha,
                 "num_layers": args.num_layers, "sink": sink, "local": local},
        "mask": args.mask, "block_size": block,
        "notes": ("pair_fraction = pairs computed / causal pairs; tflops = 4*B*Hq*D*pairs / time; "
                  "vs_dense = dense_causal ms / ms; kv_block_fraction = computed KV blocks of the "
                  "window's BlockMask / those of the causal BlockMask; rel_err = "
                  "||flex - masked_sdpa_kv|| / ||masked_sdpa_kv||"),
        "results": results,
    }

    t_start = time.perf_counter()
    for T in lengths:
        for result in bench.length(T, layers):
            results.append(result)
            progress.row(f"T={T} layer={result['layer']}", result["methods"])
        write_json(args.out, report)  # partial results survive an interrupted run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    finish(args.out, report, t_start, _markdown(report))
    return 0


def _markdown(report) -> str:
    def cell(m):
        if "ms" not in m:
            return "skip"
        vs = m.get("vs_dense")
        return f"{m['ms']:.3f}" + (f" ({vs:.2f}x)" if vs is not None else "")

    shape = report["shape"]
    psaw = report["psaw"]
    setting = (f"shape B={shape['batch']} Hq={shape['q_heads']} Hkv={shape['kv_heads']} D={shape['head_dim']} "
               f"{shape['dtype']}; PSAW start={psaw['start']} phi={psaw['phi']} alpha={psaw['alpha']} "
               f"N={psaw['num_layers']} sink={psaw['sink']} local={psaw['local']}; mask={report['mask']}; "
               f"block {report['block_size']}; times in ms (speed-up over dense causal)")
    header = ("| T | layer | kept pairs | kept KV blocks | dense causal | masked SDPA (GQA) "
              "| masked SDPA (K/V repeated) | flex (op) | flex attention only | block mask "
              "| flex TFLOP/s | rel err |")
    lines = [
        f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}; timer: {report['timer']}",
        setting,
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m = r["methods"]
        flex_tflops = m["flex"].get("tflops")
        blocks = r["kv_block_fraction"]
        cells = [str(r["length"]), str(r["layer"]), f"{100 * r['pair_fraction']:.1f}%",
                 f"{100 * blocks:.1f}%" if blocks is not None else "-"]
        cells += [cell(m[name]) for name in METHODS]
        cells.append(f"{flex_tflops:.1f}" if flex_tflops is not None else "-")
        cells.append(f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
