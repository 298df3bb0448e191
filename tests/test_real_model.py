"""Gemma 3 270M (real pretrained weights, the ``real`` extra) through ``backend="prhs"``.

The model loads once per session (``models.load_model`` caches it; dequantizing takes about a
minute on two cores). Without the extra these tests fail, naming what to install; set
``PRHS_NO_REAL_MODEL=1`` to skip them where the model is known to be unavailable.
"""

import argparse
import json
import os

import pytest
import torch
import transformers

import prhs_compile
from prhs_compile.bench.evals import accuracy
from prhs_compile.bench import models
from prhs_compile.bench.substrate import text_tasks

pytestmark = pytest.mark.real_model
EAGER = {"inductor": False}
GLOBAL_LAYERS = {5, 11, 17}  # Gemma 3 270M: every sixth layer attends globally, the rest slide over 512


@pytest.fixture(scope="module")
def gemma():
    if os.environ.get("PRHS_NO_REAL_MODEL") == "1":
        pytest.skip("PRHS_NO_REAL_MODEL=1: the real model is declared unavailable")
    return accuracy.load("gemma3-270m", "cpu", torch.float32)


def _greedy(forward, model, ids, new, max_cache_len):
    """Prefill and ``new - 1`` greedy decode steps over a static cache: tokens and logits."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
    keyword = prhs_compile.cache_keyword(model)
    tokens, logits, token = [], [], ids
    with torch.no_grad():
        for _ in range(new):
            step = forward(input_ids=token, **{keyword: cache}).logits[:, -1]
            token = step.argmax(-1, keepdim=True)
            tokens.append(int(token))
            logits.append(step)
    return tokens, torch.cat(logits)


def test_prhs_gives_eagers_tokens_when_the_budget_covers_the_prompt(gemma):
    model, codec = gemma
    example = codec.example("passkey", 160, seed=0)
    ids = torch.tensor([example.prompt_ids])
    # The cache (1024) is longer than the budget, so the global layers are rewritten and
    # really select; every row's context (< 256) fits the budget, so the result is exact.
    eager_tokens, eager_logits = _greedy(model, model, ids, 8, 1024)
    compiled = torch.compile(model, backend="prhs", options={"budget": 256, "sink": 4, "local": 32, **EAGER})
    tokens, logits = _greedy(compiled, model, ids, 8, 1024)
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert example.meta["answer"] in codec.tokenizer.decode(tokens)  # the model finds the key
    assert GLOBAL_LAYERS <= set(prhs_compile.stats().layers)


def test_sparse_decode_selects_in_the_global_layers_and_keeps_rolling_windows_dense(gemma):
    model, codec = gemma
    example = codec.example("passkey", 640, seed=1)  # longer than the 512-key windows: they roll
    ids = torch.tensor([example.prompt_ids])
    options = {"budget": 256, "sink": 4, "local": 32, "verify": True, **EAGER}
    compiled = torch.compile(model, backend="prhs", options=options)
    _greedy(compiled, model, ids, 4, 1024)
    stats = prhs_compile.stats()
    assert set(stats.layers) == GLOBAL_LAYERS  # the sliding layers stayed dense
    for layer in GLOBAL_LAYERS:
        s = stats.layers[layer]
        assert s.decode_steps == 3 and s.retrievals >= 1 and s.resets == 0
        assert 0.0 < s.dropped_mean < 1.0  # positions were really left out
    cache = transformers.StaticCache(config=model.config, max_cache_len=1024)
    keyword = prhs_compile.cache_keyword(model)
    with torch.no_grad():
        model(input_ids=ids, **{keyword: cache})
        decisions = prhs_compile.explain(model, input_ids=ids[:, :1], **{keyword: cache}, options=options).decisions
    sliding = [d for d in decisions if d.layer not in GLOBAL_LAYERS]
    assert len(sliding) == 15 and all(d.kind == "dense" and "rolling sliding-window" in d.reason for d in sliding)


def test_accuracy_harness_reports_fidelity_on_natural_text(gemma):
    model, codec = gemma
    rows = accuracy.evaluate(model, codec, policies=["prhs"], budgets=[128], contexts=[600],
                             task_names=["niah_single", "natural_text"], examples=1, sink=4, local=16, extra={},
                             verify=False, inductor=False, device="cpu", seed=1,
                             task_options={"natural_text": {"continuation": 8}})
    text = next(r for r in rows if r["task"] == "natural_text")
    assert text["fidelity_steps"] == 8 and 0.0 <= text["top1_agreement"] <= 1.0 and text["kl_mean"] >= 0.0
    assert set(text["layer_retrieval_rate"]) == {str(layer) for layer in GLOBAL_LAYERS}


@pytest.mark.parametrize("context", [2048, 4096, 8192])
def test_text_tasks_are_exactly_the_context_long_and_hold_their_answer(gemma, context):
    _, codec = gemma
    for task in ("passkey", "niah_single", "niah_multikey", "natural_text"):
        example = codec.example(task, context, seed=3)
        assert len(example.prompt_ids) == context and example.prompt_ids[0] == codec.tokenizer.bos_token_id
        if task != "natural_text":
            assert example.meta["answer"] in codec.tokenizer.decode(example.prompt_ids)


def test_calibrate_cli_takes_the_named_model(gemma, tmp_path):
    from prhs_compile.bench.evals import calibrate_cli

    parser = argparse.ArgumentParser()
    calibrate_cli.add_arguments(parser)
    args = parser.parse_args(["--model", "gemma3-270m", "--prompt-len", "600", "--steps", "2", "--budget", "128",
                              "--sink", "4", "--local", "16", "--device", "cpu", "--task", "natural_text",
                              "--out", str(tmp_path / "cal.json")])
    assert calibrate_cli.run(args) == 0
    result = json.loads((tmp_path / "cal.json").read_text())
    assert set(result["suggested_tau"]) == {str(layer) for layer in GLOBAL_LAYERS}


def test_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(models.NAMED, "absent-model", ("no_such_package_for_prhs_tests", "a test model"))
    with pytest.raises(models.MissingExtraError, match=r'pip install -e "\.\[real\]"'):
        models.resolve("absent-model")
    with pytest.raises(ValueError, match="no such GGUF file"):
        models.resolve("/nonexistent/model.gguf")
    assert set(text_tasks.TASKS) == {"passkey", "niah_single", "niah_multikey", "natural_text"}
