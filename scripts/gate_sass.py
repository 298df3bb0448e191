"""The bounds-and-gate kernel's machine code, without a GPU: compile ``_bounds_gate_kernel``
(``kernels/gate_triton.py``) as the gated PrHS step launches it at the Llama-3-8B shape (32
query heads, 8 KV heads, head dim 128, bf16, one query, a boolean mask of 2048-position
chunks, PSAW) for an H100/H200 (``sm_90a``) with the installed Triton and its bundled
``ptxas``, and count its instructions: the row's last program runs the gate alone, so its
instructions per thread are most of the launch's time.

    python scripts/gate_sass.py [--warps 8] [--out gate_sass.json] [--sass gate.sass]

Static counts (each line of code once, whether it runs or not), with the registers per
thread and the spill bytes ``ptxas -v`` reports. ``--warps`` defaults to what
``gate_triton.bounds_and_gate`` launches at this shape.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from prhs_compile.bench.report import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from topk_sass import COUNTED, machine_code, memory_before_wait  # noqa: E402  (the same compile and categories)

CONSTANTS = dict(MASK_KIND=1, TQ_P2=1, CHUNK=2048, SUB=2048, C_P2=16, HAS_PSAW=True, HKV=8, G=4,
                 D=128, HKV_P2=8, HQ_P2=32, BLOCK_D=128, SCR_BLOCK=1024, EARLY_LOADS=True, PDL=1)
POINTERS = {"MASK": "*u8", "Q": "*bf16", "K": "*bf16", "POS": "*i64", "FINGERPRINT": "*fp32",
            "ANCHOR": "*fp32", "KEY_NORM": "*fp32", "COUNTERS": "*i64", "STATS": "*i32",
            "TICKETS": "*i32", "BOUNDS": "*i32", "AGE": "*i32", "FLAGS": "*i32",
            "SCRATCH": "*i32"}
FLOATS = {"psaw_frac", "mask_min", "tau"}


def analyse(warps: int, sass_path: str | None = None) -> dict:
    import triton

    from prhs_compile.kernels import gate_triton

    fn = gate_triton._bounds_gate_kernel
    signature = {name: ("constexpr" if name in CONSTANTS else POINTERS.get(name)
                        or ("fp32" if name in FLOATS else "i32")) for name in fn.arg_names}
    code, registers, spills = machine_code(fn, signature, CONSTANTS, warps, sass_path)
    report = {"kernel": "_bounds_gate_kernel", "warps": warps, "triton": triton.__version__,
              "registers": registers, "spill_bytes": spills, "instructions": len(code),
              "memory before the launch wait": memory_before_wait(code)}
    report.update({k: sum(1 for line in code if re.search(p, line)) for k, p in COUNTED.items()})
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sass", default=None, help="also write the machine code here")
    args = parser.parse_args()
    report = analyse(args.warps, args.sass)
    print(json.dumps(report, indent=1))
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
