"""``prhs-bench sparsity``: how much attention mass the exact top-k keeps, per layer.

For each example: dense prefill of a task prompt, then one decode step (the first answer
token, the step that must retrieve) through ``backend="prhs"`` with the ``oracle`` policy, no
sinks, no local window and ``verify=True``: the retained mass of the exact top-k per KV head
is ``1 - dropped``. Reported per layer, averaged over query heads and examples.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from prhs_compile.bench.substrate import tasks as task_lib
from prhs_compile.hf_compat import cache_keyword


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--budgets", default="256,1024")
    parser.add_argument("--task", default="niah_single", choices=sorted(task_lib.TASKS))
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", required=True)


def topk_mass(model, examples, budget: int, device) -> dict[int, float]:
    import transformers

    import prhs_compile
    from prhs_compile.kernels import dropped_mass_listeners

    kept = defaultdict(list)

    def record(r):
        kept[r["layer"]].append(1.0 - r["dropped"].mean().item())

    torch._dynamo.reset()
    prhs_compile.clear_states()
    options = {"policy": "oracle", "budget": budget, "sink": 0, "local": 0, "verify": True, "inductor": False}
    compiled = torch.compile(model, backend="prhs", options=options)
    longest = max(len(e.prompt_ids) for e in examples) + 2
    cache = transformers.StaticCache(config=model.config, max_cache_len=longest)
    dropped_mass_listeners.append(record)
    try:
        with torch.no_grad():
            for example in examples:
                cache.reset()
                ids = torch.tensor([example.prompt_ids], device=device)
                logits = compiled(input_ids=ids, **{cache_keyword(model): cache}).logits[:, -1]
                compiled(input_ids=logits.argmax(-1, keepdim=True), **{cache_keyword(model): cache})
    finally:
        dropped_mass_listeners.remove(record)
    return {layer: sum(v) / len(v) for layer, v in sorted(kept.items())}


def run(args) -> int:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model = model.to(args.device).eval()
    examples = task_lib.make_examples(args.task, args.examples, args.context, seed=7)
    budgets = [int(b) for b in args.budgets.split(",")]
    table = {b: topk_mass(model, examples, b, args.device) for b in budgets}
    result = {"model": args.model, "context": args.context, "task": args.task, "examples": args.examples,
              "kept_mass": {str(b): {str(l): m for l, m in t.items()} for b, t in table.items()}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    layers = sorted(next(iter(table.values())))
    print("| layer | " + " | ".join(f"top-{b} mass" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for layer in layers:
        print(f"| {layer} | " + " | ".join(f"{table[b][layer]:.3f}" for b in budgets) + " |")
    return 0
