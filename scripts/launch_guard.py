"""Which launch of a PrHS decode step writes into memory it does not own: ``prhs-bench
latency``'s step (``_PrHSStep``) set up at one shape, with every Triton launch of the engine
checked before and after against a host copy of the set-up's snapshot (a copy that nothing
but the benchmark writes, allocated from the same memory pool as the step's buffers).

    python scripts/launch_guard.py [--batch 8] [--context 131072] [--budget 16384]
                                   [--rates 0,0.1,1] [--out launch_guard.json] [--smoke]

A change found before a launch was made by what ran since the previous check (the glue's
Inductor kernels, torch ops); one found after it, by that launch. Each rate also reports
whether its set-up held (the step retrieved where it was set up to) and its top-k guess
misses. ``--smoke`` runs a tiny shape on CPU under ``TRITON_INTERPRET=1`` (checks the
script).
"""

from __future__ import annotations

import argparse
import json
import math
import os


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--rates", default="0,0.1,1")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.batch, args.context, args.budget = 1, 1024, 128

    import torch

    from prhs_compile.bench.speed.latency import _PrHSStep, _step_plan
    from prhs_compile.kernels import select_step_triton, topk_triton
    from prhs_compile.kernels import ops as kernel_ops
    from prhs_compile.kernels.plan import decode_plan

    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:  # the CPU op is the torch reference: call the Triton step itself
        def engine_ops(self):
            plan = decode_plan(self.plan_text)
            named = kernel_ops._state_dict(plan, self.state, self.q, self.k)
            return select_step_triton.select_step_triton(self.q, self.k, self.mask, self.scale,
                                                         plan, named, None)
        _PrHSStep._ops = engine_ops

    Hq, Hkv, D = 32, 8, 128
    B, L, S = args.batch, args.context, args.budget
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)

    class PageArgs:  # the latency benchmark's defaults for the plan
        page_size, candidates = 16, 4

    events = []
    step = None
    launches = [0]

    def check(where: str) -> None:
        if step is None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        changes = step.snapshot_changes()
        if changes:
            events.append({"launch": launches[0], "where": where, "changes": changes})
            print(f"launch {launches[0]} ({where}): {changes}", flush=True)
            # attribute later changes separately
            step.snapshot_host = [None if t is None else t.to("cpu", copy=True)
                                  for t in step.snapshot]

    kernel_class = type(topk_triton._topk_kernel)
    original_run = kernel_class.run

    def guarded_run(self, *a, **kw):
        name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "?")
        check(f"before {name}")
        out = original_run(self, *a, **kw)
        launches[0] += 1
        check(f"after {name}")
        return out

    kernel_class.run = guarded_run
    try:
        plan = _step_plan(S, 4, 64, "exact", PageArgs, L)
        step = _PrHSStep(torch, q, k, v, mask, 1 / math.sqrt(D), plan)
        rates = []
        for r in [float(x) for x in args.rates.split(",") if x.strip()]:
            row = {"rate": r}
            try:
                row["achieved"] = step.set_rate(r)
            except RuntimeError as exc:
                row["error"] = str(exc)[:1500]
            row["guess_misses"] = step.guess_misses
            row["guess_miss_example"] = step.guess_miss_example
            rates.append(row)
            print(json.dumps(row), flush=True)
    finally:
        kernel_class.run = original_run
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": B, "context": L, "budget": S,
              "launches": launches[0], "events": events, "rates": rates}
    print(f"{launches[0]} launches checked; {len(events)} changed the snapshot")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
