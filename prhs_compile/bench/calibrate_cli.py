"""``prhs-bench calibrate``: write a cross-layer sharing map for a model."""

from __future__ import annotations

import json

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local path or hub id of a causal LM")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8, help="decode steps to observe")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.8, help="overlap needed to share")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default=None,
                        help="take the prompt from this task of prhs_compile.bench.tasks (byte-level models, e.g. "
                             "the substrate); default: random token ids")
    parser.add_argument("--out", required=True, help="JSON file to write")


def run(args) -> int:
    import transformers

    from prhs_compile.calibrate import calibrate

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    if args.task:
        from prhs_compile.bench.tasks import TASKS

        ids = torch.tensor([TASKS[args.task](args.prompt_len, args.seed).prompt_ids], device=args.device)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=generator).to(args.device)
    result = calibrate(model, ids, steps=args.steps, budget=args.budget, sink=args.sink, local=args.local,
                       threshold=args.threshold, out=args.out)
    print(json.dumps({"share": result["share"], "suggested_tau": result["suggested_tau"]}, indent=1))
    return 0
