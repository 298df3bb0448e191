"""Greedy generation through ``backend="prhs"``: generated ids, time per token, selection stats.

    python examples/generate.py                      # the project's 6M-parameter model, a needle task
    python examples/generate.py --model gemma3-270m --budget 256 --prompt-len 4096   # pip install -e ".[real]"
    python examples/generate.py --model PATH --budget 1024 --prompt-len 8192 --device cuda

With no ``--model`` it loads the checkpoint committed in ``models/substrate`` (trained by
``prhs-bench train-substrate``) and asks it to retrieve a needle from a long haystack; without
that folder (an installed package) it falls back to a small random-init Llama. A model with
its own tokenizer (a named model such as ``gemma3-270m``, a ``.gguf`` file, a checkpoint) is
asked for a pass key hidden in filler text of ``--prompt-len`` tokens.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers

import prhs_compile


SUBSTRATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "models", "substrate")


def random_model() -> transformers.PreTrainedModel:
    """A small Llama (GQA, RoPE) with random weights: runs anywhere, downloads nothing."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="gemma3-270m, a .gguf file, or a local path / hub id of a causal LM "
                                        "(default: models/substrate, else a random-init Llama)")
    parser.add_argument("--policy", default="oracle", choices=prhs_compile.available_policies())
    parser.add_argument("--budget", type=int, default=128, help="positions attended per KV head")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-inductor", action="store_true", help="run the rewritten graph eagerly (fast to start)")
    parser.add_argument("--verify", action="store_true", help="measure the exact dropped attention mass")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    path = args.model or (SUBSTRATE if os.path.isdir(SUBSTRATE) else None)
    example = tokenizer = None
    if path:
        from prhs_compile.bench.models import load_model

        model, tokenizer = load_model(path, args.device, dtype)
    else:
        model = random_model().to(dtype).to(args.device).eval()
    if path == SUBSTRATE:  # the project's model speaks the task format: ask it for a needle
        from prhs_compile.bench.substrate.tasks import niah_single

        example = niah_single(args.prompt_len, seed=0)
        args.new_tokens = len(example.answer_ids)
    elif tokenizer is not None:  # a pretrained model: the pass key test through its tokenizer
        from prhs_compile.bench.substrate.text_tasks import passkey

        example = passkey(tokenizer, args.prompt_len, seed=0)
        args.new_tokens = len(example.answer_ids) + 2
    if example is not None:
        ids = torch.tensor([example.prompt_ids], device=args.device)
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=generator).to(args.device)

    options = {
        "policy": args.policy, "budget": args.budget, "sink": args.sink, "local": args.local,
        "inductor": not args.no_inductor, "verify": args.verify,
    }
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    # One cache length for the warm-up and the timed run, so the timed run compiles nothing.
    generate = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static",
                    max_cache_len=ids.shape[1] + args.new_tokens, pad_token_id=0, eos_token_id=None)
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

    new = out[0, ids.shape[1]:].tolist()
    print(f"model: {path or 'random-init Llama'}")
    print(f"generated ids: {new}")
    if example is not None and example.meta.get("tokenized"):
        from prhs_compile.bench.substrate.text_tasks import score

        text = tokenizer.decode(new)
        print(f"pass key {example.meta['answer']}: generated {text!r} -> {'correct' if score(text, example) else 'wrong'}")
    elif example is not None:
        from prhs_compile.bench.substrate.tasks import score

        print(f"needle answer: {example.answer_ids} -> {'correct' if score('niah_single', new, example) else 'wrong'}")
    print(f"compile + warm-up: {compile_s:.1f} s; generate: {elapsed / len(new) * 1e3:.1f} ms per token "
          f"(prefill of {ids.shape[1]} tokens included) on {args.device}")
    print(prhs_compile.stats())


if __name__ == "__main__":
    main()
