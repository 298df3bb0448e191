"""SAGE-KV with physical eviction: free the KV positions a one-shot policy will never read.

    python examples/evict.py                             # the project's model, a 4K-token needle task
    python examples/evict.py --prompt-len 16384 --budget 256 --policy snapkv

Runs the same greedy decode twice on the project's evaluation model (``models/substrate``):
once with the policy over the full ``DynamicCache``, once after ``prhs_compile.evict_kv``
compacted the cache to the sinks, the prompt selection and the recent window, decoding with
the plain model (dense SDPA over what is left). It prints the bytes freed, whether both
decodes produced the same tokens, whether the needle was found, and the time per token.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers

import prhs_compile
from prhs_compile.bench.substrate.tasks import niah_single, score

SUBSTRATE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "models", "substrate"))


def greedy(model, cache, first_logits, steps: int) -> tuple[list[int], float]:
    """``steps`` greedy tokens continuing from ``first_logits``; (tokens, seconds per token
    over the steps after the first two decode calls, which compile)."""
    token = first_logits[:, -1:].argmax(-1)
    tokens = [int(token)]
    times = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        token = model(input_ids=token, **{prhs_compile.cache_keyword(model): cache}).logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        times.append(time.perf_counter() - start)
    timed = times[2:] or times
    return tokens, sum(timed) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SUBSTRATE, help="checkpoint that speaks the task format")
    parser.add_argument("--policy", default="sage_kv", choices=prhs_compile.evict.ONE_SHOT_POLICIES)
    parser.add_argument("--budget", type=int, default=256, help="positions kept per KV head (sinks and window included)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inductor", action="store_true", help="lower the rewritten graph with Inductor")
    args = parser.parse_args()

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    example = niah_single(args.prompt_len, seed=0)
    ids = torch.tensor([example.prompt_ids], device=args.device)
    steps = len(example.answer_ids)
    options = {"policy": args.policy, "budget": args.budget, "sink": args.sink, "local": args.local,
               "inductor": args.inductor}
    compiled = torch.compile(model, backend="prhs", options=options)

    with torch.no_grad():
        cache = transformers.DynamicCache(config=model.config)
        first = compiled(input_ids=ids, **{prhs_compile.cache_keyword(model): cache}).logits
        full_tokens, full_s = greedy(compiled, cache, first, steps)
        del cache

        cache = transformers.DynamicCache(config=model.config)
        first = compiled(input_ids=ids, **{prhs_compile.cache_keyword(model): cache}).logits
        report = prhs_compile.evict_kv(cache)
        evicted_tokens, evicted_s = greedy(model, cache, first, steps)

    print(f"model: {args.model}; {args.policy}, budget {args.budget}, sink {args.sink}, local {args.local}; "
          f"{ids.shape[1]}-token prompt on {args.device}")
    print(f"evicted: {report}")
    print(f"{args.policy} over the full cache:  {full_tokens}  {full_s * 1e3:.1f} ms per token")
    print(f"dense over the evicted cache: {evicted_tokens}  {evicted_s * 1e3:.1f} ms per token")
    print(f"same tokens: {full_tokens == evicted_tokens}; needle answer {example.answer_ids}: "
          f"{'found' if score('niah_single', evicted_tokens, example) else 'missed'}")


if __name__ == "__main__":
    main()
