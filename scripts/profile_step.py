"""Where the time of one PrHS decode step goes: the GPU kernels of ``select`` + ``attend``
(through the registered ops, as ``prhs-bench latency`` runs them), per launch.

    python scripts/profile_step.py [--batch 16 --context 32768 --budget 2048 --rate 0]
        [--glue-options '{"combo_kernels": false}'] [--attend-config '{"prefetch_idx": false}']
        [--topk-config '{"max_parties": 16}']
    python scripts/profile_step.py --configs 1:32768:0,16:131072:1 [--quiet] [--out F.json]

Prints the kernels of one step in launch order with their GPU time (torch.profiler, after a
warm-up; no CUDA graph, so the gaps between kernels are launch overhead that a graph would
shrink but not remove; with programmatic dependent launch off, ``PRHS_PDL=0``, since with it
a kernel's programs start while the kernel before still runs and wait there, and its time
would include that wait), the totals, and the step's median time replayed in a CUDA graph
(net of the state restore the benchmark runs before each step), under the environment's
``PRHS_PDL`` setting. ``--glue-options``: Inductor
options for the select engine's compiled glue (``GLUE_INDUCTOR_OPTIONS``); ``--attend-config``
and ``--topk-config``: entries of those kernels' ``CONFIG``. ``--configs``
profiles several (batch, context, rate) steps in one process (the glue compiles once);
``--quiet`` prints only the step times; ``--out`` writes them, with each kernel's time, as
JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os


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
    parser.add_argument("--attend-config", default="{}",
                        help='JSON dict of attend CONFIG entries, e.g. {"prefetch_idx": false}')
    parser.add_argument("--topk-config", default="{}",
                        help='JSON dict of top-k CONFIG entries, e.g. {"max_parties": 16}')
    parser.add_argument("--configs", default=None,
                        help="comma-separated batch:context:rate triples (overrides the three)")
    parser.add_argument("--quiet", action="store_true", help="only the step times")
    parser.add_argument("--out", default=None, help="JSON file for the step and kernel times")
    args = parser.parse_args()

    import torch

    import prhs_compile  # noqa: F401  (registers the ops)
    from prhs_compile.kernels import select_step_triton

    from prhs_compile.kernels import attend_triton, topk_triton

    select_step_triton.GLUE_INDUCTOR_OPTIONS.update(json.loads(args.glue_options))
    attend_triton.CONFIG.update(json.loads(args.attend_config))
    topk_triton.CONFIG.update(json.loads(args.topk_config))
    if args.configs:
        configs = [tuple(c.split(":")) for c in args.configs.split(",")]
        configs = [(int(b), int(c), float(r)) for b, c, r in configs]
    else:
        configs = [(args.batch, args.context, args.rate)]
    results = [_profile(torch, args, *config) for config in configs]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "budget": args.budget, "retrieval": args.retrieval,
                       "glue_options": json.loads(args.glue_options),
                       "attend_config": attend_triton.CONFIG, "topk_config": topk_triton.CONFIG,
                       "steps": results}, f,
                      indent=1)
    return 0


def _profile(torch, args, B: int, L: int, rate: float) -> dict:
    """Profile one step; returns its kernels and CUDA-graph time."""
    from torch.profiler import ProfilerActivity, profile

    from prhs_compile.bench.speed.latency import _PrHSStep, _step_plan
    from prhs_compile.bench.speed.timing import Timer

    Hq, Hkv, D = 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
    plan = _step_plan(args.budget, 4, 64, args.retrieval, args, L)
    step = _PrHSStep(torch, q, k, v, mask, 1 / math.sqrt(D), plan)
    rate = step.set_rate(rate)
    for _ in range(5):
        step.call()
    # The kernel table with PDL off (each kernel's own time); the CUDA-graph time below with
    # the environment's setting. The launches read PRHS_PDL each time (kernels/pdl.py).
    setting = os.environ.get("PRHS_PDL")
    os.environ["PRHS_PDL"] = "0"
    try:
        for _ in range(2):  # the kernels' variants without PDL compile here
            step.call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step.call()
            torch.cuda.synchronize()
    finally:
        if setting is None:
            del os.environ["PRHS_PDL"]
        else:
            os.environ["PRHS_PDL"] = setting
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    if not args.quiet:
        print(f"B={B} L={L} budget={args.budget} retrieval={args.retrieval} rate {rate}: "
              f"{len(kernels)} kernels, {sum(e.device_time for e in kernels):.1f} us of GPU time")
        for e in kernels:
            print(f"{e.device_time:9.1f} us  {e.name[:110]}")
    timer = Timer(torch.device("cuda"), "cudagraph", 50)
    step_ms, restore_ms = timer(step.call), timer(step.restore)
    net_us = 1e3 * (step_ms - restore_ms)
    print(f"B={B} L={L} rate {rate}: step in a CUDA graph: {net_us:.1f} us net of the restore "
          f"({1e3 * step_ms:.1f} us with it); glue options {args.glue_options}")
    del q, k, v, step
    torch.cuda.empty_cache()
    return {"batch": B, "context": L, "rate": rate, "step_us": net_us,
            "pdl": os.environ.get("PRHS_PDL", "1"), "kernels_pdl": "0",
            "kernels": [[e.name, e.device_time] for e in kernels]}


if __name__ == "__main__":
    raise SystemExit(main())
