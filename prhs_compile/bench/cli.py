"""``prhs-bench``: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported lazily so that ``prhs-bench --help`` stays fast and a missing optional dependency of
one subcommand does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> (module under prhs_compile.bench, one-line help)
SUBCOMMANDS = {
    "train-substrate": ("substrate.train_substrate", "train the small long-context evaluation model"),
    "calibrate": ("evals.calibrate_cli", "write a cross-layer sharing map (PrHS layer axis) for a model"),
    "accuracy": ("evals.accuracy", "task accuracy of policies and budgets through backend='prhs'"),
    "sparsity": ("evals.sparsity", "attention mass kept by the exact top-k, per layer"),
    "profile": ("evals.profile_cli", "LU-KV per-(layer, KV head) budget table for a model"),
    "latency": ("speed.latency", "decode-attention kernel latency against dense baselines (GPU)"),
    "compare": ("evals.compare", "every policy: LU-KV table, accuracy, dropped mass, decode latency, one report"),
    "frontier": ("evals.frontier", "PrHS tau/budget frontier on a real model: accuracy, KL, top-1, retrieval rate"),
    "prefill": ("speed.prefill", "windowed (PSAW) prefill attention, block-sparse vs dense (GPU)"),
    "throughput": ("speed.throughput", "end-to-end decode throughput of a compiled model (GPU)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="prhs-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module that will run
            module = importlib.import_module(f"prhs_compile.bench.{module_name}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    args.command_line = ["prhs-bench", *argv]  # reports record how they were made
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
