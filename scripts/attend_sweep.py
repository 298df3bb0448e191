"""Sweep ``attend_triton``'s kernel configuration against dense SDPA over a contiguous cache
of the budget's length (attend's yardstick), on a GPU.

    python scripts/attend_sweep.py [--out attend_sweep.json]

For B in {1, 8, 16} and context in {32K, 128K} (Llama-3-8B attention shape, bf16, budget
2048, random selected positions, caches rotated past L2, CUDA-graph medians) it times every
(block_n, num_warps, num_stages, programs_per_sm, prefetch_idx) of a small grid and prints, per shape, the
best configuration and the default's time, both as a ratio to dense SDPA at the budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--grid", choices=["short", "full"], default="short")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prhs_compile.bench.speed.timing import Timer, copies_past_l2, l2_bytes, rotating
    from prhs_compile.kernels import attend_triton as at

    device = torch.device("cuda")
    timer = Timer(device, "cudagraph", 25)
    Hq, Hkv, D, S = 32, 8, 128, args.budget
    scale = 1 / math.sqrt(D)
    default = dict(at.CONFIG)
    # (block_n, num_warps, num_stages, programs_per_sm, prefetch_idx); --grid full adds the
    # wider warp/stage choices of the first sweep.
    grid = list(itertools.product((64, 128), (4,), (2,), (1, 2, 4, 8), (False, True)))
    if args.grid == "full":
        grid += list(itertools.product((64, 128), (4, 8), (3,), (4, 8), (False, True)))
    rows = []
    for B, L in itertools.product((1, 8, 16), (32768, 131072)):
        kv_bytes = 2 * B * Hkv * L * D * 2
        copies = copies_past_l2(2 * B * Hkv * S * D * 2, l2_bytes(device), cap=16)
        copies = min(copies, max(1, int(40e9 // kv_bytes)))
        gen = torch.Generator(device=device).manual_seed(B + L)
        q = torch.randn(B, Hq, 1, D, device=device, dtype=torch.bfloat16, generator=gen)
        caches = [(torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16, generator=gen),
                   torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16, generator=gen))
                  for _ in range(copies)]
        idx = torch.rand(B, Hkv, L, device=device, generator=gen).argsort(-1)[..., :S]
        idx = idx.sort(-1).values.to(torch.int32)
        mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
        short = [(k[:, :, :S].contiguous(), v[:, :, :S].contiguous()) for k, v in caches]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            dense_ms = timer(rotating([
                lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
                for k, v in short]))
        results = []
        for config in grid:
            block_n, warps, stages, per_sm, prefetch = config
            at.CONFIG.update(block_n=block_n, num_warps=warps, num_stages=stages,
                             programs_per_sm=per_sm, prefetch_idx=prefetch)
            try:
                ms = timer(rotating([lambda k=k, v=v: at.attend_triton(q, k, v, idx, mask, scale)
                                     for k, v in caches]))
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile
                results.append({"config": list(config), "failed": str(exc)[:200]})
                continue
            results.append({"config": list(config), "ms": ms,
                            "vs_dense_at_budget": ms / dense_ms})
        at.CONFIG.update(default)
        ok = [r for r in results if "ms" in r]
        best = min(ok, key=lambda r: r["ms"])
        base = next(r for r in ok if r["config"] == [default["block_n"], default["num_warps"],
                                                     default["num_stages"], default["programs_per_sm"],
                                                     default["prefetch_idx"]])
        rows.append({"batch": B, "context": L, "budget": S, "dense_at_budget_ms": dense_ms,
                     "best": best, "default": base, "all": results})
        print(f"B={B:2d} L={L:6d}: dense@budget {dense_ms:.4f} ms; default {base['ms']:.4f} "
              f"({base['vs_dense_at_budget']:.2f}x); best {best['config']} {best['ms']:.4f} "
              f"({best['vs_dense_at_budget']:.2f}x)", flush=True)
        del caches, short
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
