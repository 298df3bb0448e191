"""The evaluation substrate: task generators, byte-level tokenizer, ``train-substrate --tiny``.

All on CPU, a few seconds each; the tiny training run is the slowest (about 10 s).
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prhs_compile.bench.substrate import tasks
from prhs_compile.bench.substrate.tasks import RETRIEVAL_TASKS, TASKS, score, teacher_forced, training_sequence
from prhs_compile.bench.substrate.tokenizer import (
    BOS_ID, END_ID, KEY_ID, QUERY_ID, VALUE_ID, VOCAB_SIZE, build_tokenizer, decode_ids, encode_bytes,
)


def _facts(ids):
    """All ``<|key|>k<|value|>v<|end|>`` facts in ``ids``: list of (start, key bytes, value bytes)."""
    out, i = [], 0
    while True:
        try:
            i = ids.index(KEY_ID, i)
        except ValueError:
            return out
        v = ids.index(VALUE_ID, i)
        e = ids.index(END_ID, v)
        out.append((i, bytes(ids[i + 1 : v]), bytes(ids[v + 1 : e])))
        i = e


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [1024, 4096])
def test_deterministic_by_seed_and_exact_length(task, length):
    a, b, c = TASKS[task](length, seed=3), TASKS[task](length, seed=3), TASKS[task](length, seed=4)
    assert a.prompt_ids == b.prompt_ids and a.answer_ids == b.answer_ids and a.meta == b.meta
    assert (a.prompt_ids, a.answer_ids) != (c.prompt_ids, c.answer_ids)
    assert len(a.prompt_ids) == length
    assert a.prompt_ids[0] == BOS_ID and all(0 <= t < VOCAB_SIZE for t in a.prompt_ids + a.answer_ids)
    assert a.answer_ids and a.task == task


@settings(max_examples=25, deadline=None)
@given(task=st.sampled_from(RETRIEVAL_TASKS), length=st.integers(400, 20000), seed=st.integers(0, 10**6))
def test_any_length(task, length, seed):
    ex = TASKS[task](length, seed)
    assert len(ex.prompt_ids) == length
    assert ex.prompt_ids[-1] == VALUE_ID  # the question ends where the answer starts


def test_too_short_context_is_an_error():
    with pytest.raises(ValueError):
        tasks.niah_multikey(40, 0)


def test_single_needle_sits_at_its_depth_and_holds_the_answer():
    for depth in (0.0, 0.25, 0.5, 0.9):
        ex = tasks.niah_single(8192, 11, depth=depth)
        (s, e), = ex.meta["needle_spans"]
        fact = ex.prompt_ids[s:e]
        assert fact[0] == KEY_ID and fact[-1] == END_ID
        assert fact[fact.index(VALUE_ID) + 1 : -1] == ex.answer_ids
        assert abs(s / 8192 - depth) < 0.02  # snapped to a line start near the depth
        assert s == 1 or ex.prompt_ids[s - 1] == ord("\n")  # facts start a line
        key = fact[1 : fact.index(VALUE_ID)]
        assert ex.prompt_ids[-len(key) - 2 :] == [QUERY_ID, *key, VALUE_ID]
        assert len(_facts(ex.prompt_ids)) == 1


def test_multikey_answer_is_the_asked_keys_value():
    ex = tasks.niah_multikey(4096, 5, n_keys=8)
    facts = _facts(ex.prompt_ids)
    assert len(facts) == 8 and len({k for _, k, _ in facts}) == 8
    asked = bytes(ex.prompt_ids[ex.prompt_ids.index(QUERY_ID) + 1 : -1])
    assert [v for _, k, v in facts if k == asked] == [bytes(ex.answer_ids)]
    (s, _), = ex.meta["needle_spans"]
    assert bytes(ex.prompt_ids[s + 1 : s + 1 + len(asked)]) == asked


def test_multivalue_answer_lists_every_value_in_order():
    ex = tasks.niah_multivalue(4096, 2, n_values=4)
    facts = _facts(ex.prompt_ids)
    assert len(facts) == 4 and len({k for _, k, _ in facts}) == 1
    assert bytes(ex.answer_ids).split(b",") == [v for _, _, v in facts]
    assert [s for s, _ in ex.meta["needle_spans"]] == [s for s, _, _ in facts]


def test_variable_tracking_answer_follows_the_chain():
    ex = tasks.variable_tracking(4096, 9, n_chains=2, n_hops=4)
    facts = _facts(ex.prompt_ids)
    bound = {k: v for _, k, v in facts}
    assert len(facts) == 10 and len(bound) == 10  # every name assigned once
    name = bytes(ex.prompt_ids[ex.prompt_ids.index(QUERY_ID) + 1 : -1])
    hops = []
    while not name.isdigit():  # resolve by chasing assignments through the prompt
        name = bound[name]
        hops.append(name)
    expected = []
    for i, h in enumerate(hops):
        expected += ([VALUE_ID] if i else []) + list(h)
    assert ex.answer_ids == expected and len(hops) == 5


def test_natural_text_continues_held_out_text():
    ex = tasks.natural_text(2048, 1, continuation=64)
    corpus = tasks.get_corpus("eval")
    text = bytes(ex.prompt_ids[1:] + ex.answer_ids)
    assert text in corpus.data or len(corpus) < len(text)
    assert len(ex.answer_ids) == 64 and ex.meta["haystack_file"] in tasks.EVAL_MODULES


def test_eval_and_train_text_are_disjoint_stdlib_files():
    ev, tr = tasks.get_corpus("eval"), tasks.get_corpus("train")
    assert set(ev.files) <= set(tasks.EVAL_MODULES)
    assert not {f"stdlib/{f}" for f in ev.files} & set(tr.files)
    assert tasks.niah_single(1024, 0).meta["haystack_file"] in ev.files
    assert tasks.niah_single(1024, 0, split="train").meta["split"] == "train"


def test_corpus_text_wraps_around():
    c = tasks.get_corpus("eval")
    n = len(c)
    assert c.text(n - 5, 10) == c.data[-5:] + c.data[:5]


# ----------------------------------------------------------------------------- scoring


def test_score_exact_match_and_orderless_multivalue():
    ex = tasks.niah_single(1024, 0)
    assert score("niah_single", ex.answer_ids + [END_ID, 1, 2], ex) == 1.0  # extra tokens ignored
    assert score("niah_single", ex.answer_ids[:-1], ex) == 0.0
    wrong = list(ex.answer_ids)
    wrong[0] = ord("0") if wrong[0] != ord("0") else ord("1")
    assert score("niah_single", wrong, ex) == 0.0
    mv = tasks.niah_multivalue(1024, 0, n_values=3)
    vals = bytes(mv.answer_ids).split(b",")
    assert score("niah_multivalue", list(b",".join(vals[::-1])), mv) == 1.0
    assert score("niah_multivalue", list(b",".join([vals[0]] * 3)), mv) == 0.0
    nt = tasks.natural_text(1024, 0, continuation=10)
    half = nt.answer_ids[:5] + [(t + 1) % 256 for t in nt.answer_ids[5:]]
    assert score("natural_text", half, nt) == 0.5


def test_teacher_forced_layout():
    ex = tasks.niah_multikey(1024, 1)
    ids, start = teacher_forced(ex)
    assert ids[: len(ex.prompt_ids)] == ex.prompt_ids and len(ids) == len(ex.prompt_ids) + len(ex.answer_ids) - 1
    assert ids[start + 1 :] == ex.answer_ids[:-1]  # logits[start + i] predicts answer[i]


# ----------------------------------------------------------------------------- training mix


def test_training_sequence_shape_weights_and_questions_after_facts():
    corpus = tasks.get_corpus("eval")  # any corpus will do; eval is small
    a = training_sequence(4096, random.Random(7), corpus)
    assert a == training_sequence(4096, random.Random(7), corpus)  # deterministic by rng
    for seed in range(6):
        tokens, weights = training_sequence(4096, random.Random(seed), corpus, answer_weight=3.0)
        assert len(tokens) == len(weights) == 4097 and tokens[0] == BOS_ID
        bound = {}
        for s, k, v in _facts(tokens):
            bound.setdefault(k, []).append(v)
            assert weights[s + 1] == 0.0  # random key bytes carry no loss
        q = [i for i, t in enumerate(tokens) if t == QUERY_ID]
        for i in q:
            v = tokens.index(VALUE_ID, i)
            key = bytes(tokens[i + 1 : v])
            # every question's key was bound earlier, and its answer carries the answer weight
            assert any(s < i for s, k, _ in _facts(tokens[:i]) if k == key)
            assert weights[v + 1] == 3.0
        assert sum(w == 1.0 for w in weights) > 0.5 * len(weights)  # mostly natural text


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_bytes_plus_specials_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    text = "def f(x):\n\treturn x  # é, 😀, \x00"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == encode_bytes(text) == list(text.encode())
    assert tok(text).input_ids == [BOS_ID] + ids
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok("<|key|>ab<|value|>").input_ids[1:] == [KEY_ID, 97, 98, VALUE_ID]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text).input_ids == [BOS_ID] + ids
    assert loaded.decode(ids) == text and len(loaded) == VOCAB_SIZE
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (257, 258, 256)
    assert decode_ids([KEY_ID, 104, 105, END_ID]) == "<|key|>hi<|end|>"


# ----------------------------------------------------------------------------- training


def test_default_model_is_small_gqa_long_rope():
    from prhs_compile.bench.substrate.train_substrate import Recipe, build_model

    model = build_model(Recipe())
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    assert 4e6 < n < 8e6 and 2 * n < 16 * 2**20  # bf16 checkpoint under 16 MB
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.max_position_embeddings >= 32768
    assert cfg.rope_parameters["rope_theta"] >= 1e5
    assert max(length for length, _ in Recipe().phases) >= 16384


def test_train_substrate_tiny_end_to_end(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prhs_compile.bench.cli import main

    out = tmp_path / "ck"
    assert main(["train-substrate", "--tiny", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("import os\n").input_ids])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] > 0 and report["tokens_per_s"] > 0 and report["params"] > 0
    assert set(report["dense_accuracy"]["256"]) >= set(RETRIEVAL_TASKS) | {"natural_text"}
    assert "mean_over_layers" in report["attention_sparsity"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["event"] == "done"
    assert any(r["event"] == "train" for r in log)
