"""One rank of the tensor-parallel test (``tests/test_tensor_parallel.py`` starts two with
``torch.distributed.run`` over gloo). Rank 0 writes a tiny Llama checkpoint; every rank loads
it with ``tp_plan="auto"`` (so it holds half of the query and KV heads), decodes through
``backend="prhs"`` with a covering and with a sparse budget, and writes what it saw as JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

import prhs_compile

PROMPT, NEW, CACHE = 40, 4, 64


def decode(forward, model, ids):
    cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE)
    keyword = prhs_compile.cache_keyword(model)
    steps, token = [], ids
    with torch.no_grad():
        for _ in range(NEW):
            logits = forward(input_ids=token, **{keyword: cache}).logits[:, -1]
            steps.append(logits)
            token = logits.argmax(-1, keepdim=True)
    return torch.stack(steps, 1)


def main(workdir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = os.path.join(workdir, "tiny")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    if rank == 0:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    dist.barrier()
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    whole = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    unsharded = decode(whole, whole, ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, tp_plan="auto", attn_implementation="sdpa", dtype=torch.float32).eval()
    sharded = decode(model, model, ids)

    covering = {"policy": "oracle", "budget": PROMPT + NEW, "sink": 4, "local": 8, "inductor": False}
    exact = decode(torch.compile(model, backend="prhs", options=covering), model, ids)

    torch._dynamo.reset()
    prhs_compile.reset_stats()
    # LU-KV budgets name the 4 global KV heads of each layer; each rank applies its two.
    budgets = {0: [8, 12, 16, 20], 1: [20, 16, 12, 8]}
    sparse_options = {"policy": "lu_kv", "budget": 16, "sink": 2, "local": 4,
                      "head_budgets": budgets, "inductor": False}
    sparse = decode(torch.compile(model, backend="prhs", options=sparse_options), model, ids)
    local = prhs_compile.stats().as_dict()
    gathered = prhs_compile.stats(across_ranks=True).as_dict()
    from prhs_compile.state import all_states

    head_budgets = sorted({(plan.layer, plan.head_budgets) for plan, _ in all_states() if plan.head_budgets})
    result = {
        "rank": rank,
        "world": dist.get_world_size(),
        "sharded_vs_unsharded": float((sharded - unsharded).abs().max()),
        "exact_vs_unsharded": float((exact - unsharded).abs().max()),
        "same_tokens": bool(torch.equal(exact.argmax(-1), unsharded.argmax(-1))),
        "sparse_vs_dense": float((sparse - sharded).abs().max()),
        "local_slots": {str(k): v["slots"] for k, v in local["layers"].items()},
        "gathered_slots": {str(k): v["slots"] for k, v in gathered["layers"].items()},
        "decode_steps": gathered["decode_steps"],
        "head_budgets": [list(x) for x in head_budgets],
    }
    with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip the interpreter's teardown: on a loaded 2-core machine a rank was seen aborting
    # there ("terminate called without an active exception", a native thread still joinable)
    # after its results were written; the results are what the test checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
