"""Sweep the select engine's kernel configurations on a GPU: the retrieval's pass over K
(``retrieve_keys``) and the radix top-k with dilation (``topk_picks``).

    python scripts/engine_sweep.py [--out engine_sweep.json]

Llama-3-8B attention shape (32 query heads, 8 KV heads, D=128, bf16), budget 2048, sink 4,
local 64, a static-cache bool mask, PrHS's dilation (m = 682, r = 1), for B=1 at 128K and
B=16 at 32K and 128K, with every slot retrieving (r = 1) and one in ten (r = 0.1).
CUDA-graph medians. For the K pass: every (block_n, num_warps, num_stages) and a few
programs-per-SM targets, as a fraction of the read floor of K (bytes of K of the retrieving
slots / measured read bandwidth). For the top-k: (block, num_warps, programs_per_sm), each
checked to pick exactly the default configuration's set. Prints the best and the default
of each shape; the JSON holds every row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

from tqdm import tqdm


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
    from prhs_compile.kernels import kpass_triton as kp
    from prhs_compile.kernels import topk_triton as tk
    from prhs_compile.kernels.retrieve_triton import retrieve_keys

    device = torch.device("cpu" if args.smoke else "cuda")
    timer = Timer(device, "cudagraph", 10)
    read_gbps = _read_bandwidth(torch, device, timer) / 1e9
    Hq, Hkv, D, S, sink, local = 32, 8, 128, args.budget, 4, 64
    scale = 1 / math.sqrt(D)
    middle = S - sink - local
    radius, cores = 1, middle // 3
    lse_default, topk_default = dict(kp.CONFIG), dict(tk.CONFIG)
    lse_grid = [dict(block_n=n, num_warps=w, num_stages=s, programs_per_sm=4)
                for n, w, s in itertools.product((64, 128), (4, 8), (3, 4))]
    lse_grid += [dict(lse_default, programs_per_sm=p) for p in (2, 8)]
    topk_grid = [dict(topk_default, block=b, num_warps=w, programs_per_sm=p)
                 for b, (w, p) in itertools.product((2048, 4096, 8192), ((8, 1), (4, 2)))]
    rows = []
    shapes = [(1, 131072), (16, 32768), (16, 131072)]
    if args.smoke:
        S, middle, cores = 256, 256 - sink - local, (256 - sink - local) // 3
        shapes, lse_grid, topk_grid = [(2, 1024)], lse_grid[:2], topk_grid[:2]
    bar = tqdm(total=len(shapes) * 2 * (len(lse_grid) + len(topk_grid) + 1), desc="engine sweep")
    for B, L in shapes:
        q, k, operand, bounds = decode_problem(B, L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                               sink=sink, local=local, budget=S, device=device)
        for rate in (1.0, 0.1):
            n_active = max(1, round(rate * B * Hkv))
            flags = torch.zeros(B * Hkv, dtype=torch.int32, device=device)
            flags[torch.randperm(B * Hkv, generator=torch.Generator().manual_seed(L))[:n_active]] = 1
            active = None if rate == 1.0 else flags
            k_bytes = n_active * L * D * 2
            for cfg in lse_grid:
                kp.CONFIG.update(cfg)
                ms = timer(lambda: retrieve_keys(q, k, operand, bounds, scale, active,
                                                 want_window_mass=True))
                rows.append(dict(kernel="k_pass", batch=B, context=L, rate=rate, **cfg, ms=ms,
                                 read_floor_fraction=k_bytes / (read_gbps * 1e6) / ms))
                bar.write(json.dumps(rows[-1]))
                bar.update()
            kp.CONFIG.update(lse_default)
            pristine = retrieve_keys(q, k, operand, bounds, scale, active).keys
            keys = pristine.clone()
            restore_ms = timer(lambda: keys.copy_(pristine))
            reference = None
            for cfg in topk_grid:
                tk.CONFIG.update(cfg)

                def run(guess=None):
                    keys.copy_(pristine)  # dilation flags neighbours in place
                    return tk.topk_picks(keys, bounds, middle, active=active, dilation_m=cores,
                                         dilation_r=radius, width=middle, guess=guess)

                picks = run()[0]
                if active is not None:
                    picks = picks.view(B * Hkv, -1)[flags.bool()]
                if reference is None:
                    reference = picks.clone()
                same = bool(torch.equal(picks, reference))
                ms = timer(run) - restore_ms
                rows.append(dict(kernel="topk", batch=B, context=L, rate=rate, **cfg, ms=ms,
                                 same_picks=same))
                bar.write(json.dumps(rows[-1]))
                bar.update()
            tk.CONFIG.update(topk_default)
            # The default configuration with a guessed threshold, warmed by one call (as a
            # slot that retrieved before has it): same picks, fewer passes.
            guess = torch.zeros(B, Hkv, dtype=torch.int32, device=device)

            def run_guessed():
                return run(guess)

            run_guessed()
            picks = run_guessed()[0]
            if active is not None:
                picks = picks.view(B * Hkv, -1)[flags.bool()]
            rows.append(dict(kernel="topk_guess", batch=B, context=L, rate=rate, **topk_default,
                             ms=timer(run_guessed) - restore_ms,
                             same_picks=bool(torch.equal(picks, reference))))
            bar.write(json.dumps(rows[-1]))
            bar.update()
        q = k = keys = pristine = None  # free this shape's cache before the next
        torch.cuda.empty_cache()
    bar.close()

    def key(r):
        return (r["kernel"], r["batch"], r["context"], r["rate"])

    print(f"read bandwidth {read_gbps:.0f} GB/s")
    for group in sorted({key(r) for r in rows}):
        these = [r for r in rows if key(r) == group]
        best = min(these, key=lambda r: r["ms"])
        default = lse_default if group[0] == "k_pass" else topk_default
        base = next((r for r in these if all(r[n] == v for n, v in default.items())), best)
        names = list(default)
        print(f"{group}: default {base['ms']:.4f} ms, best {best['ms']:.4f} ms with "
              + ", ".join(f"{n}={best[n]}" for n in names)
              + (f" ({best['read_floor_fraction']:.0%} of the read floor; default "
                 f"{base['read_floor_fraction']:.0%})" if group[0] == "k_pass" else
                 f"; every config same picks: {all(r['same_picks'] for r in these)}"))
    if args.out:
        with open(args.out, "w") as f:
            name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            json.dump({"device": name, "torch": torch.__version__,
                       "read_bandwidth_gbps": read_gbps, "budget": S, "sink": sink,
                       "local": local, "dilation": [cores, radius], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
