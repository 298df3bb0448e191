"""``prhs-bench calibrate``: write a cross-layer sharing map for a model."""

from __future__ import annotations

import json

import torch

from prhs_compile.bench.models import model_help


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help=model_help())
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8, help="decode steps to observe")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.8, help="overlap needed to share")
    parser.add_argument("--slack", type=float, default=0.02,
                        help="attention mass a reuse may lose against the exact set and still count as good")
    parser.add_argument("--precision", type=float, default=0.9,
                        help="share of the reuses above the suggested tau that must be good")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default=None,
                        help="take the prompt from this task (the byte-level tasks for the substrate, the text tasks "
                             "through the model's tokenizer for others, e.g. natural_text); default: random token ids")
    parser.add_argument("--out", required=True, help="JSON file to write")


def run(args) -> int:
    from prhs_compile.bench.evals.accuracy import load
    from prhs_compile.calibrate import calibrate

    model, codec = load(args.model, args.device, torch.float32)
    ids = prompt_ids(model, codec, args.task, args.prompt_len, args.seed, args.device)
    result = calibrate(model, ids, steps=args.steps, budget=args.budget, sink=args.sink, local=args.local,
                       threshold=args.threshold, slack=args.slack, precision=args.precision, out=args.out)
    print(json.dumps({"share": result["share"], "suggested_tau": result["suggested_tau"]}, indent=1))
    return 0


def prompt_ids(model, codec, task, length: int, seed: int, device) -> torch.Tensor:
    """``[1, length]`` prompt: an example of ``task`` through the model's codec, or random ids."""
    if task:
        example = codec.example(task, length, seed)
        return torch.tensor([codec.encode(example.prompt_ids, example)], device=device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(device)
