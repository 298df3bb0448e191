"""``prhs-bench profile``: LU-KV per-head budget table for a model."""

from __future__ import annotations

import json

import torch

from prhs_compile.bench.models import model_help


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help=model_help())
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="decode steps measured after each prompt")
    parser.add_argument("--grid", default="16,32,64,128,256,512", help="budgets the curves are sampled at")
    parser.add_argument("--mean-budgets", default="64,128,256", help="mean per-head budgets to allocate")
    parser.add_argument("--sink", type=int, default=0, help="sinks every measured selection keeps (as at run time)")
    parser.add_argument("--local", type=int, default=0, help="local window every measured selection keeps (as at run time)")
    parser.add_argument("--task", default=None, help="prompts from this task (as calibrate --task); default random ids")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)


def run(args) -> int:
    from prhs_compile.bench.evals.accuracy import load
    from prhs_compile.bench.evals.calibrate_cli import prompt_ids
    from prhs_compile.lu_kv import profile

    model, codec = load(args.model, args.device, torch.float32)
    prompts = [prompt_ids(model, codec, args.task, args.prompt_len, seed, args.device) for seed in range(args.prompts)]
    result = profile(model, prompts, [int(b) for b in args.grid.split(",")],
                     [int(b) for b in args.mean_budgets.split(",")], steps=args.steps, sink=args.sink, local=args.local)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for mean, layers in result["table"].items():
        print(f"mean budget {mean}: " + "  ".join(f"L{layer}={budgets}" for layer, budgets in layers.items()))
    return 0
