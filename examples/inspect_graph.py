"""Print what ``backend="prhs"`` does to a model's prefill and decode graphs.

    python examples/inspect_graph.py                  # a small random-init Llama
    python examples/inspect_graph.py --model PATH --full
"""

from __future__ import annotations

import argparse

import torch
import transformers

import prhs_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local path or hub id (default: a random-init Llama)")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--policy", default="oracle", choices=prhs_compile.available_policies())
    parser.add_argument("--full", action="store_true", help="print whole graphs, not only attention lines")
    args = parser.parse_args()

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
    else:
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
    model.eval()
    options = {"policy": args.policy, "budget": args.budget, "sink": 2, "local": 4}
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    cache = transformers.StaticCache(config=model.config, max_cache_len=4 * args.budget)
    with torch.no_grad():
        prefill = prhs_compile.explain(model, input_ids=ids, **{prhs_compile.cache_keyword(model): cache}, options=options)
        token = prefill.output.logits[:, -1:].argmax(-1)
        decode = prhs_compile.explain(model, input_ids=token, **{prhs_compile.cache_keyword(model): cache}, options=options)

    for name, explained in (("prefill", prefill), ("decode", decode)):
        print(f"##### {name} #####")
        if args.full:
            print(explained)
            continue
        for graph in explained.graphs:
            print(graph)
            print("--- attention lines after the rewrite ---")
            for line in graph.after.splitlines():
                if "torch.ops.prhs." in line or "scaled_dot_product_attention" in line:
                    print(line.split(";  ")[0].strip())
        print()


if __name__ == "__main__":
    main()
