"""Sweep the two-stage retrieval's kernel configurations on a GPU: stage one's page bounds
(``page_keys``: the page summaries read once) and stage two's exact scores of the candidate
rows (``candidate_keys``: two launches over the chosen pages' keys).

    python scripts/pages_sweep.py [--out pages_sweep.json]

Llama-3-8B attention shape (32 query heads, 8 KV heads, D=128, bf16), budget 2048, sink 4,
local 64, pages of 16 keys, 4 budgets of candidates, a static-cache bool mask, every slot
retrieving (r = 1) and one in ten (r = 0.1), for B=16 at 32K and 128K and B=1 at 128K.
Random summaries and a random sorted choice of pages (the kernels' time does not depend on
the values). CUDA-graph medians. For each kernel: every configuration of a small grid
(``pages_triton.CONFIG``), its time, the bytes it must read (the retrieving slots'
summaries; their candidate rows of K and the windows' rows, the fp32 scores written and
read back) and the time those bytes take at the read bandwidth measured in the same run,
each configuration checked to give the default's keys (the same positions pickable, the
values they stand for within 1e-5 relative error by norm: a configuration may sum in
another order). Prints the best and the default of each shape; the JSON holds every row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

from tqdm import tqdm


def _key_values(kernel: str, keys):
    """(pickable, value) of a kernel's top-k keys: stage one's are a page bound's fp32 bits
    made to order as unsigned ints, stage two's a mass's bits + 1; 0 is never pickable."""
    import torch

    pickable = keys != 0
    if kernel == "page_keys":
        bits = torch.where(keys < 0, keys ^ torch.iinfo(torch.int32).min, ~keys)
    else:
        bits = keys - 1
    return pickable, bits.view(torch.float32)


def _same_keys(kernel: str, got, reference) -> bool:
    """Whether ``got`` picks the positions ``reference`` does, at values within 1e-5."""
    ok, value = _key_values(kernel, got)
    ref_ok, ref_value = _key_values(kernel, reference)
    if not bool((ok == ref_ok).all()):
        return False
    a, b = value[ok].double(), ref_value[ref_ok].double()
    return bool(((a - b).norm() <= 1e-5 * b.norm()).item()) if b.numel() else True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and grid on CPU under TRITON_INTERPRET=1 (checks the script)")
    args = parser.parse_args()

    import torch

    from prhs_compile.bench.speed.latency import _read_bandwidth
    from prhs_compile.bench.speed.problems import decode_problem
    from prhs_compile.bench.speed.timing import Timer
    from prhs_compile.kernels import pages_triton as pt
    from prhs_compile.kernels.pages import PAGE_MAX, PAGE_MIN, candidate_pages
    from prhs_compile.kernels.plan import SelectPlan

    device = torch.device("cpu" if args.smoke else "cuda")
    timer = Timer(device, "cudagraph", 10)
    read_gbps = _read_bandwidth(torch, device, timer) / 1e9
    Hq, Hkv, D, S, sink, local, P = 32, 8, 128, args.budget, 4, 64, 16
    scale = 1 / math.sqrt(D)
    default = dict(pt.CONFIG)
    # The default first: every other configuration's keys are checked against its.
    page_grid = [dict(default)] + [
        dict(default, pages_per_program=n, page_warps=w)
        for n, w in itertools.product((16, 32, 64), (4, 8))
        if (n, w) != (default["pages_per_program"], default["page_warps"])]
    cand_grid = [dict(default)] + [
        dict(default, candidate_splits=s, candidate_warps=w)
        for s, w in itertools.product((8, 16, 32), (4, 8))
        if (s, w) != (default["candidate_splits"], default["candidate_warps"])]
    shapes = [(16, 131072), (16, 32768), (1, 131072)]
    if args.smoke:
        S, local, P = 64, 8, 4
        shapes, page_grid, cand_grid = [(2, 1024)], page_grid[:2], cand_grid[:2]
    plan = SelectPlan(policy="prhs", layer=0, budget=S, sink=sink, local=local,
                      retrieval="pages", page_size=P, candidates=4)
    rows = []
    bar = tqdm(total=len(shapes) * 2 * (len(page_grid) + len(cand_grid)), desc="pages sweep")
    for B, L in shapes:
        q, k, operand, bounds = decode_problem(B, L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                               sink=sink, local=local, budget=S, device=device)
        pages = -(-L // P)
        gen = torch.Generator(device=device).manual_seed(L)
        low = torch.randn(B, Hkv, pages, D, device=device, dtype=torch.bfloat16, generator=gen)
        st = {PAGE_MIN: low, PAGE_MAX: low + torch.rand(B, Hkv, pages, D, device=device,
                                                        dtype=torch.bfloat16, generator=gen)}
        n_pages = min(candidate_pages(plan), pages)
        chosen = torch.rand(B, Hkv, pages, device=device, generator=gen).argsort(-1)[..., :n_pages]
        chosen = chosen.sort(-1).values
        for rate in (1.0, 0.1):
            n_active = max(1, round(rate * B * Hkv))
            active = torch.zeros(B * Hkv, dtype=torch.int32, device=device)
            active[torch.randperm(B * Hkv, generator=torch.Generator().manual_seed(L))[:n_active]] = 1
            on = active.bool()
            summary_bytes = n_active * 2 * pages * D * 2
            cand_bytes = n_active * ((n_pages * P + sink + local) * D * 2 + 2 * 4 * n_pages * P * 4)
            for kernel, grid, nbytes in (("page_keys", page_grid, summary_bytes),
                                         ("candidate_keys", cand_grid, cand_bytes)):
                if kernel == "page_keys":
                    def run():
                        return pt.page_keys(q, st, operand, bounds, active, plan, L)
                else:
                    def run():
                        return pt.candidate_keys(q, k, operand, bounds, scale, chosen, active, P)
                reference = None
                for cfg in grid:
                    pt.CONFIG.update(cfg)
                    out = run()
                    got = (out if kernel == "page_keys" else out.keys).view(B * Hkv, -1)[on]
                    if reference is None:
                        reference = got.clone()
                    ms = timer(run)
                    floor_ms = nbytes / (read_gbps * 1e6)
                    rows.append(dict(kernel=kernel, batch=B, context=L, rate=rate, **cfg, ms=ms,
                                     bytes=nbytes, floor_ms=floor_ms,
                                     read_floor_fraction=floor_ms / ms,
                                     same_keys=_same_keys(kernel, got, reference)))
                    bar.write(json.dumps(rows[-1]))
                    bar.update()
                pt.CONFIG.update(default)
        q = k = st = low = None  # free this shape's tensors before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()

    def key(r):
        return (r["kernel"], r["batch"], r["context"], r["rate"])

    print(f"read bandwidth {read_gbps:.0f} GB/s")
    for group in sorted({key(r) for r in rows}):
        these = [r for r in rows if key(r) == group]
        best = min(these, key=lambda r: r["ms"])
        base = next((r for r in these if all(r[n] == v for n, v in default.items())), best)
        knobs = (("pages_per_program", "page_warps") if group[0] == "page_keys"
                 else ("candidate_splits", "candidate_warps"))
        print(f"{group}: default {base['ms']:.4f} ms ({base['read_floor_fraction']:.0%} of the "
              f"read floor), best {best['ms']:.4f} ms with "
              + ", ".join(f"{n}={best[n]}" for n in knobs)
              + f" ({best['read_floor_fraction']:.0%}); every config same keys: "
              + str(all(r["same_keys"] for r in these)))
    if args.out:
        from prhs_compile.bench.report import write_json

        write_json(args.out, {"device": torch.cuda.get_device_name() if device.type == "cuda"
                              else "cpu", "torch": torch.__version__,
                              "read_gbps": read_gbps, "default": default, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
