"""Sliding-window layers whose cache rolls every step (HF's static sliding-window cache once
its window is full) stay dense whatever the budget, with the reason logged: a selection there
cannot survive a step, so sparse attention would retrieve over the whole window at every step,
which is slower than dense attention."""

import pytest
import torch
import transformers
from tiny_models import tiny_model

import prhs_compile

EAGER = {"inductor": False}
WINDOW = 8  # tiny gemma3: layer 0 slides over 8 keys, layer 1 is global
PROMPT, NEW = 12, 6  # the prompt already fills the window: every decode step rolls it


def _decode(options):
    """Prefill and NEW - 1 decode steps through the backend, then the decisions of one more
    decode step (explain), and the stats of the decode steps."""
    model = tiny_model("gemma3")
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    keyword = prhs_compile.cache_keyword(model)
    options = {**options, **EAGER}
    compiled = torch.compile(model, backend="prhs", options=options)
    token = ids
    with torch.no_grad():
        for _ in range(NEW):
            token = compiled(input_ids=token, **{keyword: cache}).logits[:, -1:].argmax(-1)
        stats = prhs_compile.stats()
        decisions = prhs_compile.explain(model, input_ids=token, **{keyword: cache}, options=options).decisions
    return decisions, stats


@pytest.mark.parametrize("budget", [4, 3])  # window = 2 x budget, and a window well past it
def test_rolling_window_stays_dense_with_its_reason(budget):
    decisions, stats = _decode({"budget": budget, "sink": 1, "local": 1})
    by_layer = {d.layer: d for d in decisions}
    assert by_layer[0].kind == "dense" and "rolling sliding-window cache of 8 keys" in by_layer[0].reason
    assert by_layer[1].kind == "decode"
    # Only the global layer selects, and its state carries over from step to step: no reset
    # beyond the first decode step after the prefill.
    assert set(stats.layers) == {1}
    assert stats.layers[1].decode_steps == NEW - 1
    assert stats.layers[1].resets == 0
