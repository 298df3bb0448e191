"""``prhs-bench profile``: LU-KV per-head budget table for a model."""

from __future__ import annotations

import json

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="decode steps measured after each prompt")
    parser.add_argument("--grid", default="16,32,64,128,256,512", help="budgets the curves are sampled at")
    parser.add_argument("--mean-budgets", default="64,128,256", help="mean per-head budgets to allocate")
    parser.add_argument("--sink", type=int, default=0, help="sinks every measured selection keeps (as at run time)")
    parser.add_argument("--local", type=int, default=0, help="local window every measured selection keeps (as at run time)")
    parser.add_argument("--task", default=None, help="prompts from this task (byte-level models); default random ids")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)


def run(args) -> int:
    import transformers

    from prhs_compile.lu_kv import profile

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").to(args.device).eval()
    prompts = []
    for seed in range(args.prompts):
        if args.task:
            from prhs_compile.bench.tasks import TASKS

            ids = TASKS[args.task](args.prompt_len, seed).prompt_ids
        else:
            ids = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
        prompts.append(torch.tensor([ids], device=args.device))
    result = profile(model, prompts, [int(b) for b in args.grid.split(",")],
                     [int(b) for b in args.mean_budgets.split(",")], steps=args.steps, sink=args.sink, local=args.local)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for mean, layers in result["table"].items():
        print(f"mean budget {mean}: " + "  ".join(f"L{layer}={budgets}" for layer, budgets in layers.items()))
    return 0
