"""The top-k kernel's machine code, phase by phase, without a GPU: compile ``_topk_kernel``
as the gated PrHS step launches it (one retrieving slot: keys from the K pass's scores, a
guess, PrHS's dilation, composed output, dropped mass; budget 2048, so 4096 candidates) for
an H100/H200 (``sm_90a``) with the installed Triton and its bundled ``ptxas``, and count the
instructions between the timeline's checkpoints (``topk_picks(timeline=...)``).

    python scripts/topk_sass.py [--warps 8] [--variant guess+dilate] [--out topk_sass.json]
                                [--sass topk.sass]

Static counts of the code between consecutive timer reads, in the order the compiler laid
it out (a branch placed elsewhere, such as the radix rounds a guess that holds skips,
counts where it lies). A phase whose code runs once (party 0's in-register selects are unrolled
digit rounds) runs about that many instructions per thread; loops (the passes over a
party's share of the row) run theirs once per block. Beside each phase: CTA barriers,
warp votes (``tl.histogram``'s ballots in Triton 3.6), global loads and stores, shared
memory traffic, shuffles (reductions), local-memory spills. Also the registers per thread
and the spill bytes ``ptxas -v`` reports. What the counts explain, the timeline
(``scripts/topk_probe.py --timeline``) measures.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

from prhs_compile.bench.report import write_json

VARIANTS = {  # constexprs that differ from the step's launch
    "guess+dilate": {},
    "guess": {"DILATE": False, "M_P2": 1, "R_P2": 1},
    "dilate": {"HAS_GUESS": False, "CAND_P2": 2048},
}
COUNTED = {"barriers": r"BAR\.SYNC", "votes": r"VOTE", "global loads": r"LDG",
           "global stores": r"STG", "shared memory": r"LDS|STS|ATOMS", "shuffles": r"SHFL",
           "spill traffic": r"LDL|STL"}
_GLOBAL_ACCESS = r"\b(LDG|STG|LDGSTS|ATOMG|ATOM|REDG|RED|LD|ST|UTMA\w*|UBLKCP)\b"


def memory_before_wait(code: list) -> int | None:
    """Global memory instructions before the programmatic-launch wait (``griddepcontrol.wait``,
    SASS ``ACQBULK``; ``kernels/pdl.py``: there must be none), or None without a wait."""
    for i, line in enumerate(code):
        if "ACQBULK" in line:
            return sum(1 for before in code[:i] if re.search(_GLOBAL_ACCESS, before))
    return None


def _launch_constants(variant: str) -> dict:
    """The constexprs of the gated step's launch at the Llama-3-8B shape (four query rows per
    KV head), budget 2048 (1980 picks), dilation m = 660, r = 1, guess slack 2."""
    const = dict(HAS_ACTIVE=True, HAS_CAPS=False, DILATE=True, HAS_GUESS=True, MULTI=True,
                 BLOCK=2048, BLOCK_BH=8, C_P2=256, CAND_P2=4096, M_P2=1024, R_P2=4,
                 MAP=False, WHOLE=False, PENDING=True, WANT_WMASS=True, ROWS_P2=4, M_PAD=16,
                 KEY_BLOCK=1024, LSE_CHUNK=64, COMPOSE=True, MASK_KIND=0, TQ_P2=1, BLOCK_W=1024,
                 SLOT_BLOCK=2048, HAS_DROPPED=True, TIMED=True, PDL=1)
    const.update(VARIANTS[variant])
    return const


def _signature(fn, const: dict) -> dict:
    fp32 = {"PICKED_MASS", "SCORES", "LSE_PART", "WMASS", "DROPPED", "WINDOW"}
    pointers = fn.arg_names[:fn.arg_names.index("mass_rows")]  # the tensors come first
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name == "TIMES":
            sig[name] = "*i64"
        elif name in pointers:
            sig[name] = "*fp32" if name in fp32 else "*i32"
        else:
            sig[name] = "fp32" if name == "mask_min" else "i32"
    return sig


def _tools(triton):
    """(ptxas, cuobjdump) bundled with Triton; a newer ptxas where the default one is older
    than the PTX this Triton writes."""
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = [n for n in ("ptxas", "ptxas-blackwell") if os.path.exists(os.path.join(base, n))]
    if not names or not os.path.exists(os.path.join(base, "cuobjdump")):
        raise SystemExit(f"no ptxas/cuobjdump under {base}: this Triton has no bundled CUDA tools")
    return [os.path.join(base, n) for n in names], os.path.join(base, "cuobjdump")


def machine_code(fn, signature: dict, constexprs: dict, warps: int,
                 sass_path: str | None = None):
    """Compile the Triton kernel ``fn`` for sm_90a with the installed Triton and its bundled
    ``ptxas``: (its instructions, one SASS line each; registers per thread or None; spill
    store and load bytes). ``sass_path``: also write the instructions there."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptxas_list, cuobjdump = _tools(triton)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        for ptxas in ptxas_list:  # the first that takes this PTX version
            run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                break
        else:
            raise SystemExit(f"ptxas failed: {run.stderr.strip()[:300]}")
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    code = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    if sass_path:
        with open(sass_path, "w") as f:
            f.write("\n".join(code) + "\n")
    registers = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    return (code, int(registers.group(1)) if registers else None,
            [int(spills.group(1)), int(spills.group(2))] if spills else [0, 0])


def analyse(variant: str, warps: int, sass_path: str | None = None) -> dict:
    import triton

    from prhs_compile.kernels import topk_triton as tk

    const = _launch_constants(variant)
    code, registers, spills = machine_code(tk._topk_kernel, _signature(tk._topk_kernel, const),
                                           const, warps, sass_path)
    marks = [i for i, line in enumerate(code) if "GLOBALTIMER" in line]
    # the timer reads in the order the code stamps them, launch first (the dilation's
    # checkpoints 8-10 are not in a launch without it)
    phases = ((0, "launch"),) + tk.TIMELINE_PHASES
    stamped = [(p, n) for p, n in phases if variant != "guess" or p not in (8, 9, 10)]
    if len(marks) != len(stamped):
        raise SystemExit(f"{len(marks)} timer reads in the code, {len(stamped)} checkpoints "
                         "expected: the kernel's checkpoints changed")
    phases, start = [], 0
    for (point, name), end in zip(stamped, marks):  # the code up to each checkpoint's read
        part = code[start:end]
        row = {"ends_at": point, "phase": name, "instructions": len(part)}
        row.update({k: sum(1 for line in part if re.search(p, line)) for k, p in COUNTED.items()})
        phases.append(row)
        start = end
    return {"variant": variant, "warps": warps, "triton": triton.__version__,
            "registers": registers, "spill_bytes": spills,
            "instructions": len(code), "memory before the launch wait": memory_before_wait(code),
            "phases": phases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="guess+dilate", choices=sorted(VARIANTS))
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sass", default=None, help="also write the machine code here")
    args = parser.parse_args()
    report = analyse(args.variant, args.warps, args.sass)
    print(f"top-k, {report['variant']}, {report['warps']} warps, Triton {report['triton']}: "
          f"{report['instructions']} instructions, {report['registers']} registers, "
          f"spills (store, load bytes) {report['spill_bytes']}")
    print(f"{'phase (ends at checkpoint)':34s} {'instr':>6s} " + " ".join(f"{k:>8.8s}" for k in COUNTED))
    for row in report["phases"]:
        print(f"{row['phase'] + ' (' + str(row['ends_at']) + ')':34s} {row['instructions']:6d} "
              + " ".join(f"{row[k]:8d}" for k in COUNTED))
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
