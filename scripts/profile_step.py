"""Where the time of one PrHS decode step goes: the GPU kernels of ``select`` + ``attend``
(through the registered ops, as ``prhs-bench latency`` runs them), per launch.

    python scripts/profile_step.py [--batch 16 --context 32768 --budget 2048 --rate 0]
        [--glue-options '{"combo_kernels": false}']

Prints the kernels of one step in launch order with their GPU time (torch.profiler, after a
warm-up; no CUDA graph, so the gaps between kernels are launch overhead that a graph would
shrink but not remove), the totals, and the step's median time replayed in a CUDA graph
(net of the state restore the benchmark runs before each step). ``--glue-options``: Inductor
options for the select engine's compiled glue (``GLUE_INDUCTOR_OPTIONS``).
"""

from __future__ import annotations

import argparse
import json
import math


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--retrieval", default="exact", choices=["exact", "pages"])
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--glue-options", default="{}", help="JSON dict of Inductor options")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import prhs_compile  # noqa: F401  (registers the ops)
    from prhs_compile.bench.latency import _PrHSStep, _step_plan
    from prhs_compile.bench.timing import Timer
    from prhs_compile.kernels import select_step_triton

    select_step_triton.GLUE_INDUCTOR_OPTIONS.update(json.loads(args.glue_options))

    B, Hq, Hkv, D, L = args.batch, 32, 8, 128, args.context
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
    plan = _step_plan(args.budget, 4, 64, args.retrieval, args, L)
    step = _PrHSStep(torch, q, k, v, mask, 1 / math.sqrt(D), plan)
    rate = step.set_rate(args.rate)
    for _ in range(5):
        step.call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step.call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    print(f"B={B} L={L} budget={args.budget} retrieval={args.retrieval} rate {rate}: {len(kernels)} kernels, "
          f"{sum(e.device_time for e in kernels):.1f} us of GPU time")
    for e in kernels:
        print(f"{e.device_time:9.1f} us  {e.name[:110]}")
    timer = Timer(torch.device("cuda"), "cudagraph", 50)
    step_ms, restore_ms = timer(step.call), timer(step.restore)
    print(f"step in a CUDA graph: {1e3 * (step_ms - restore_ms):.1f} us net of the restore "
          f"({1e3 * step_ms:.1f} us with it); glue options {args.glue_options}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
