"""Greedy generation through ``backend="prhs"``: generated ids, time per token, selection stats.

    python examples/generate.py                      # a small random-init Llama, no download
    python examples/generate.py --model PATH --budget 1024 --prompt-len 8192 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import prhs_compile


def default_model() -> transformers.PreTrainedModel:
    """A small Llama (GQA, RoPE) with random weights: runs anywhere, downloads nothing."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local path or hub id of a causal LM (default: a random-init Llama)")
    parser.add_argument("--policy", default="oracle", choices=prhs_compile.available_policies())
    parser.add_argument("--budget", type=int, default=64, help="positions attended per KV head")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-inductor", action="store_true", help="run the rewritten graph eagerly (fast to start)")
    parser.add_argument("--verify", action="store_true", help="measure the exact dropped attention mass")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    else:
        model = default_model().to(dtype)
    model = model.to(args.device).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)).to(args.device)

    options = {
        "policy": args.policy, "budget": args.budget, "sink": args.sink, "local": args.local,
        "inductor": not args.no_inductor, "verify": args.verify,
    }
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    # One cache length for the warm-up and the timed run, so the timed run compiles nothing.
    generate = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static",
                    max_cache_len=args.prompt_len + args.new_tokens, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, **{**generate, "max_new_tokens": 2})  # compile prefill and decode
        compile_s = time.perf_counter() - start
        prhs_compile.reset_stats()
        start = time.perf_counter()
        out = model.generate(ids, **generate)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

    new = out[0, args.prompt_len:].tolist()
    print(f"generated ids: {new}")
    print(f"compile + warm-up: {compile_s:.1f} s; generate: {elapsed / len(new) * 1e3:.1f} ms per token "
          f"(prefill of {args.prompt_len} tokens included) on {args.device}")
    print(prhs_compile.stats())


if __name__ == "__main__":
    main()
