"""Compiled HF models end to end on CPU: exactness, sparsity, state across sequences."""

import functools

import pytest
import torch
import torch._dynamo.testing
from tiny_models import tiny_model
from transformers import CompileConfig, StaticCache

import prhs_compile

PROMPT, NEW = 40, 8
CACHE = 64  # static cache length, longer than any sequence here
EAGER = {"inductor": False}


def prompt(length=PROMPT, seed=0, batch=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    if kwargs.get("cache_implementation") == "static":
        kwargs.setdefault("max_cache_len", CACHE)
    with torch.no_grad():
        return model.generate(
            ids, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs
        )


def logits_of(out):
    return torch.stack(out.logits, dim=1)


def compile_config(options):
    config = CompileConfig(backend="prhs", mode=None, options=options)
    config._compile_all_devices = True  # transformers compiles only on accelerators by default
    return config


# Every decode step sees at most PROMPT + NEW - 1 valid tokens, so this budget covers them
# all while the cache stays longer than it (a cache no longer than the budget stays dense
# SDPA and would test nothing).
COVERING = {"policy": "oracle", "budget": PROMPT + NEW, "sink": 4, "local": 8}


@pytest.mark.parametrize("style", ["forward", "compile_config", "module"])
def test_budget_covering_the_context_is_exact(style):
    model = tiny_model("llama")
    ids = prompt()
    reference = generate(model, ids, cache_implementation="static")
    options = {**COVERING, **EAGER}
    if style == "forward":
        model.forward = torch.compile(model.forward, backend="prhs", options=options)
        out = generate(model, ids, cache_implementation="static")
    elif style == "compile_config":
        out = generate(model, ids, cache_implementation="static", compile_config=compile_config(options))
    else:
        compiled = torch.compile(model, backend="prhs", options=options)
        cache = StaticCache(config=model.config, max_cache_len=CACHE)
        steps, token, logits = [], ids, None
        with torch.no_grad():
            for _ in range(NEW):
                logits = compiled(input_ids=token, past_key_values=cache).logits[:, -1]
                steps.append(logits)
                token = logits.argmax(-1, keepdim=True)
        out = type(reference)(sequences=None, logits=tuple(steps))
        out.sequences = torch.cat([ids, torch.stack([s.argmax(-1) for s in steps], 1)], 1)
    torch.testing.assert_close(logits_of(out), logits_of(reference), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences, reference.sequences)
    stats = prhs_compile.stats()
    assert stats.decode_steps == NEW - 1
    assert set(stats.layers) == {0, 1}


def test_dynamic_cache_is_exact_without_per_step_recompiles():
    model = tiny_model("llama")
    reference = generate(model, prompt())
    counter = torch._dynamo.testing.CompileCounterWithBackend(functools.partial(prhs_compile.prhs_backend, options=EAGER))
    model.forward = torch.compile(model.forward, backend=counter)
    out = generate(model, prompt())
    torch.testing.assert_close(logits_of(out), logits_of(reference), rtol=1e-5, atol=1e-5)
    # prefill, first decode step (static length), then one decode graph for every length
    assert counter.frame_count == 3
    assert prhs_compile.stats().decode_steps > 0


def test_no_graphs_beyond_what_dynamo_captures_anyway():
    """Over prompts of new lengths, prhs compiles exactly the graphs the eager backend does.

    (Both without Inductor: Inductor adds stride guards of its own, whichever pass ran.)
    """
    counts = {}
    prhs_eager = functools.partial(prhs_compile.prhs_backend, options=EAGER)
    for name, backend in (("eager", "eager"), ("prhs", prhs_eager)):
        torch._dynamo.reset()
        model = tiny_model("llama")
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        model.forward = torch.compile(model.forward, backend=counter)
        counts[name] = []
        for length, seed in ((40, 0), (33, 1), (21, 2), (36, 3)):
            generate(model, prompt(length, seed=seed))
            counts[name].append(counter.frame_count)
    assert counts["prhs"] == counts["eager"]
    assert counts["prhs"][0] == 3  # prefill, first decode step, length-generic decode
    assert counts["prhs"][2] == counts["prhs"][1]  # a new length reused the graphs


def test_inductor_end_to_end_matches_eager_reference_path():
    model = tiny_model("llama")
    ids = prompt()
    sparse = {"policy": "oracle", "budget": 16, "sink": 2, "local": 4}
    model.forward = torch.compile(model.forward, backend="prhs", options={**sparse, **EAGER})
    eager_path = generate(model, ids, cache_implementation="static")
    torch._dynamo.reset()
    prhs_compile.clear_states()
    model.forward = torch.compile(model.__class__.forward.__get__(model), backend="prhs", options=sparse)
    inductor_path = generate(model, ids, cache_implementation="static")
    torch.testing.assert_close(logits_of(inductor_path), logits_of(eager_path), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["oracle", "streaming"])
def test_small_budget_really_selects(policy):
    model = tiny_model("llama")
    ids = prompt()
    dense = generate(model, ids, cache_implementation="static")
    options = {"policy": policy, "budget": 16, "sink": 2, "local": 4, "verify": True, **EAGER}
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    sparse = generate(model, ids, cache_implementation="static")
    assert (logits_of(sparse) - logits_of(dense)).abs().max() > 1e-3
    stats = prhs_compile.stats()
    assert stats.decode_steps == NEW - 1
    for layer in stats.layers.values():
        assert layer.slots == (NEW - 1) * 2  # batch 1, 2 KV heads
        assert layer.retrievals == (layer.slots if policy == "oracle" else 0)
        assert len(layer.dropped_mass) == NEW - 1
        assert 0 < layer.dropped_mean <= layer.dropped_max < 1
    assert "retrieval rate" in str(stats)


def test_two_prompts_in_a_row_match_fresh_runs():
    options = {"policy": "oracle", "budget": 16, "sink": 2, "local": 4, **EAGER}
    first, second = prompt(40, seed=3), prompt(29, seed=4)
    model = tiny_model("llama")
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    in_a_row = [generate(model, p, cache_implementation="static") for p in (first, second)]
    fresh = []
    for p in (first, second):
        torch._dynamo.reset()
        prhs_compile.clear_states()
        model = tiny_model("llama")
        model.forward = torch.compile(model.forward, backend="prhs", options=options)
        fresh.append(generate(model, p, cache_implementation="static"))
    for a, b in zip(in_a_row, fresh):
        assert torch.equal(a.sequences, b.sequences)
        torch.testing.assert_close(logits_of(a), logits_of(b), rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_unpadded_single_runs():
    options = {"policy": "oracle", "budget": 16, "sink": 2, "local": 4, **EAGER}
    long, short = prompt(40, seed=5), prompt(31, seed=6)
    model = tiny_model("llama")
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    singles = [generate(model, p, cache_implementation="static") for p in (long, short)]
    batch = torch.zeros(2, 40, dtype=torch.long)
    batch[0], batch[1, 9:] = long[0], short[0]
    attention_mask = (torch.arange(40) >= torch.tensor([[0], [9]])).long()
    padded = generate(model, batch, attention_mask=attention_mask, cache_implementation="static")
    for row, single in enumerate(singles):
        assert torch.equal(padded.sequences[row, -NEW:], single.sequences[0, -NEW:])
        torch.testing.assert_close(logits_of(padded)[row], logits_of(single)[0], rtol=1e-4, atol=1e-4)


def test_beam_search_runs_and_matches_eager_when_the_budget_covers():
    model = tiny_model("llama")
    ids = prompt()
    reference = generate(model, ids, num_beams=3, cache_implementation="static")
    model.forward = torch.compile(model.forward, backend="prhs", options={**COVERING, **EAGER})
    out = generate(model, ids, num_beams=3, cache_implementation="static")
    assert torch.equal(out.sequences, reference.sequences)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_inductor_and_cuda_graphs_match_eager_when_the_budget_covers(mode):
    model = tiny_model("llama").cuda()
    ids = prompt().cuda()
    reference = generate(model, ids, cache_implementation="static")
    options = {**COVERING, "policy": "prhs", "mode": mode}
    compiled = torch.compile(model.forward, backend="prhs", options=options)

    def forward(*args, **kwargs):
        # The static cache mutates its counters in place: each call is a new CUDA-graph step.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    model.forward = forward
    out = generate(model, ids, cache_implementation="static")
    out = generate(model, ids, cache_implementation="static")  # second run replays the graphs
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(logits_of(out), logits_of(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("options", [
    {"policy": "prhs", "budget": 16, "sink": 2, "local": 4, "tau": 0.5},
    {"policy": "lu_kv", "budget": 16, "sink": 2, "local": 4, "head_budgets": {0: [12, 20], 1: [16, 16]}},
], ids=["prhs", "lu_kv"])
def test_cuda_graph_trees_find_no_untracked_buffer_of_the_select_step(options):
    """reduce-overhead (CUDA-graph trees) with a sparse select, from a process that has not
    run a select step yet: the device buffers the CUDA step keeps between calls (the bounds
    kernel's tickets, the per-head budgets) must exist before the first graph records, or
    torch refuses them as allocations of the graph's memory pool that no output tracks."""
    from prhs_compile.kernels import plan, tickets

    tickets._BUFFERS.clear()
    plan._head_middles.cache_clear()
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    compiled = torch.compile(model.forward, backend="prhs",
                             options={**options, "mode": "reduce-overhead"})

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    model.forward = forward
    for _ in range(2):  # the second run replays the graphs
        out = generate(model, prompt().cuda(), cache_implementation="static")
        assert out.sequences.shape[1] == PROMPT + NEW
        assert not torch.isnan(logits_of(out)).any()


@pytest.mark.cuda
def test_cuda_sparse_prhs_bf16_runs_and_selects():
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    options = {"policy": "prhs", "budget": 16, "sink": 2, "local": 4, "tau": 0.5}
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    out = generate(model, prompt().cuda(), cache_implementation="static")
    assert out.sequences.shape[1] == PROMPT + NEW
    assert not torch.isnan(logits_of(out)).any()
    assert prhs_compile.stats().layers[0].slots > 0
