"""LU-KV's offline allocation math on hand-made curves."""

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from prhs_compile.lu_kv import allocate, convexify, pava_non_increasing


def test_pava_pools_increasing_runs():
    assert pava_non_increasing([3.0, 1.0, 2.0, 0.0], [1, 1, 1, 1]) == [3.0, 1.5, 1.5, 0.0]
    assert pava_non_increasing([1.0, 2.0], [3, 1]) == [1.25, 1.25]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=20))
def test_pava_output_is_non_increasing_and_keeps_the_weighted_mean(values):
    fitted = pava_non_increasing(values, [1.0] * len(values))
    assert all(a >= b - 1e-9 for a, b in zip(fitted, fitted[1:]))
    assert sum(fitted) == pytest.approx(sum(values), abs=1e-6)


def test_convexify_makes_gains_diminishing():
    budgets = [16, 32, 64, 128]
    losses = [0.9, 0.85, 0.3, 0.25]  # a late big drop: not convex
    curve = convexify(budgets, losses)
    gains = [(a - b) / (y - x) for a, b, x, y in zip(curve, curve[1:], budgets, budgets[1:])]
    assert all(g1 >= g2 - 1e-12 for g1, g2 in zip(gains, gains[1:]))
    assert curve[0] == 0.9 and curve[-1] == pytest.approx(0.25)


def test_allocation_gives_budget_where_it_buys_the_most():
    budgets = [16, 32, 64]
    curves = {
        (0, 0): [0.5, 0.1, 0.05],  # gains a lot from the first step
        (0, 1): [0.2, 0.19, 0.18],  # barely gains
    }
    assert allocate(curves, budgets, mean_budget=24) == {(0, 0): 32, (0, 1): 16}
    assert allocate(curves, budgets, mean_budget=40) == {(0, 0): 64, (0, 1): 16}
    assert allocate(curves, budgets, mean_budget=64) == {(0, 0): 64, (0, 1): 64}
    with pytest.raises(ValueError, match="below the smallest grid budget 16"):
        allocate(curves, budgets, mean_budget=8)


def test_profile_table_drives_per_head_budgets_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    import torch
    from tiny_models import tiny_model

    import prhs_compile
    from prhs_compile.kernels import selection_listeners

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    table = tmp_path / "lukv.json"
    cmd = [sys.executable, "-m", "prhs_compile.bench.cli", "profile", "--model", str(tmp_path / "model"),
           "--prompt-len", "64", "--prompts", "1", "--steps", "2", "--grid", "8,16,32", "--mean-budgets", "16",
           "--out", str(table)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    allocation = json.loads(table.read_text())["table"]["16"]
    assert set(allocation) == {"0", "1"} and all(len(b) == 2 for b in allocation.values())
    assert sum(sum(b) for b in allocation.values()) <= 16 * 4

    seen = {}
    record = lambda layer, idx, q, mass: seen.setdefault(layer, (idx >= 0).sum(-1)[0].tolist())  # noqa: E731
    for policy in ("lu_kv", "prhs"):
        seen.clear()
        torch._dynamo.reset()
        prhs_compile.clear_states()
        options = {"policy": policy, "budget": 16, "sink": 2, "local": 2, "head_budgets": str(table),
                   "max_reuse": 1, "dilation_m": 0, "inductor": False}
        model.forward = torch.compile(model.__class__.forward.__get__(model), backend="prhs", options=options)
        selection_listeners.append(record)
        try:
            with torch.no_grad():
                model.generate(torch.randint(0, 128, (1, 48)), max_new_tokens=2, do_sample=False,
                               cache_implementation="static", max_cache_len=64)
        finally:
            selection_listeners.remove(record)
        for layer, counts in seen.items():
            assert counts == allocation[str(layer)], (policy, layer)  # each head keeps its own budget

    with pytest.raises(ValueError, match="has no allocation for budget=99; its mean budgets are \\[16\\]"):
        prhs_compile.PrHSConfig.from_options({"policy": "lu_kv", "budget": 99, "head_budgets": str(table)})
    with pytest.raises(ValueError, match="needs per-head budgets"):
        prhs_compile.PrHSConfig.from_options({"policy": "lu_kv"})
    fresh = tiny_model("llama")
    compiled = torch.compile(fresh, backend="prhs", options={"policy": "lu_kv", "budget": 16, "head_budgets": {0: [8, 8, 8], 1: [8, 8]}, "sink": 1, "local": 1, "inductor": False})
    with torch.no_grad(), pytest.raises(Exception, match="gives layer 0 3 budgets, but it has 2 KV heads"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_a_layer_the_per_head_budgets_do_not_name_stays_dense_with_its_reason():
    """A table lists only the layers its profile saw rewritten (the global layers of a
    sliding-window model): the others stay dense, saying why, instead of failing."""
    import torch
    import transformers
    from tiny_models import tiny_model

    import prhs_compile

    model = tiny_model("llama")
    options = {"policy": "lu_kv", "budget": 16, "head_budgets": {1: [8, 8]}, "sink": 1, "local": 1,
               "inductor": False}
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    keyword = prhs_compile.cache_keyword(model)
    with torch.no_grad():
        model(input_ids=ids, **{keyword: cache})
        decisions = prhs_compile.explain(model, input_ids=ids[:, -1:], **{keyword: cache}, options=options).decisions
    by_layer = {d.layer: d for d in decisions}
    assert by_layer[0].kind == "dense" and "name no budget for layer 0" in by_layer[0].reason
    assert by_layer[1].kind == "decode"
