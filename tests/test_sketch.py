"""Key sketches (``retrieval="sketch"``): stage one of two-stage retrieval from one bit per channel.

* the bits pack and unpack to the signs of the keys around their centre;
* the sketch in the selection state equals a from-scratch sketch after the prefill and after
  every decode step, and a row that does not continue is rebuilt with a new centre;
* with every position a candidate two-stage retrieval picks what exact retrieval picks, and
  with few candidates it picks only among the best sketch scores;
* end to end the options run, stats report the sketch's memory, and CUDA falls back with a
  reason (no CUDA step yet).
"""

import dataclasses

import pytest
import torch

import prhs_compile
from prhs_compile.kernels import SelectPlan, state_spec
from prhs_compile.kernels.select_reference import prefill_reference, select_reference
from prhs_compile.kernels.select_step_triton import unsupported_reason
from prhs_compile.kernels.sketch import (
    SKETCH_BITS,
    SKETCH_CENTRE,
    SKETCH_SCALE,
    channel_stats,
    pack_bits,
    signs,
    sketch_scores,
)
from tiny_models import tiny_model

SKETCH = SelectPlan(policy="prhs", layer=0, budget=16, sink=2, local=4, tau=0.9, retrieval="sketch",
                    candidates=2, max_cache_len=96)


def _state(plan, B, Hq, Hkv, D):
    spec = state_spec(plan, B, Hq, Hkv, D)
    return [torch.full(shape, fill, dtype=dt) for shape, dt, fill in spec.values()]


def _named(plan, state):
    return dict(zip(state_spec(plan, 1, 1, 1, 1), state))


def _mask(n, L):
    return (torch.arange(L) < n)[None, None, None, :]


@pytest.mark.parametrize("dim", [8, 40, 64])
def test_bits_unpack_to_the_signs_around_the_centre(dim):
    k = torch.randn(2, 3, 17, dim)
    centre = torch.randn(2, 3, dim)
    expected = torch.where(k > centre[:, :, None], 1.0, -1.0)
    assert torch.equal(signs(pack_bits(k, centre), dim), expected)


def test_scores_are_the_group_logits_over_the_one_bit_keys_up_to_a_constant():
    torch.manual_seed(0)
    B, Hq, Hkv, Tq, L, D = 1, 4, 2, 2, 30, 16
    q, k = torch.randn(B, Hq, Tq, D), torch.randn(B, Hkv, L, D)
    centre, scale = channel_stats(k, torch.ones(B, L, dtype=torch.bool))
    approx = centre[:, :, None] + scale[:, :, None] * signs(pack_bits(k, centre), D)  # [B, Hkv, L, D]
    logits = torch.einsum("bhgtd,bhld->bhl", q.reshape(B, Hkv, 2, Tq, D), approx)
    score = sketch_scores(q, pack_bits(k, centre), scale)
    torch.testing.assert_close(score - score[..., :1], logits - logits[..., :1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sketch_follows_the_cache_after_prefill_and_every_step_and_rebuilds_a_new_row(dtype):
    torch.manual_seed(1)
    B, Hq, Hkv, D, L = 2, 4, 2, 8, 64
    k, v = torch.randn(B, Hkv, L, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype)
    state = _state(SKETCH, B, Hq, Hkv, D)
    prefill_reference(torch.randn(B, Hq, 30, D, dtype=dtype), k[:, :, :30], None, True, D ** -0.5, SKETCH, state)
    st = _named(SKETCH, state)
    centre, scale = channel_stats(k[:, :, :30], torch.ones(B, 30, dtype=torch.bool))
    torch.testing.assert_close(st[SKETCH_CENTRE][:B], centre)
    torch.testing.assert_close(st[SKETCH_SCALE][:B], scale)
    for n in range(31, 40):
        select_reference(torch.randn(B, Hq, 1, D, dtype=dtype), k, v, _mask(n, L).expand(B, 1, 1, L), D ** -0.5,
                         SKETCH, state)
        # decode keys are sketched against the prompt's centre
        assert torch.equal(st[SKETCH_BITS][:B, :, :n], pack_bits(k[:, :, :n], centre))
    # Row 1 gets another sequence: it is rebuilt with its new centre, row 0 keeps its own.
    k2 = k.clone()
    k2[1] = torch.randn(Hkv, L, D, dtype=dtype)
    select_reference(torch.randn(B, Hq, 1, D, dtype=dtype), k2, v, _mask(40, L).expand(B, 1, 1, L), D ** -0.5, SKETCH, state)
    fresh_centre, _ = channel_stats(k2[1:, :, :40], torch.ones(1, 40, dtype=torch.bool))
    torch.testing.assert_close(st[SKETCH_CENTRE][1:2], fresh_centre)
    torch.testing.assert_close(st[SKETCH_CENTRE][:1], centre[:1])
    assert torch.equal(st[SKETCH_BITS][1:2, :, :40], pack_bits(k2[1:, :, :40], fresh_centre))


@pytest.mark.parametrize("policy", ["prhs", "oracle"])
def test_sketch_over_every_position_picks_what_exact_retrieval_picks(policy):
    torch.manual_seed(2)
    B, Hq, Hkv, D, L = 2, 4, 2, 8, 80
    exact = SelectPlan(policy=policy, layer=0, budget=20, sink=2, local=4, tau=0.95)
    two_stage = dataclasses.replace(exact, retrieval="sketch", candidates=100, max_cache_len=L)
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    states = {plan: _state(plan, B, Hq, Hkv, D) for plan in (exact, two_stage)}
    for plan, state in states.items():
        prefill_reference(torch.randn(B, Hq, 40, D), k[:, :, :40], None, True, D ** -0.5, plan, state)
    q = torch.randn(B, Hq, 1, D)
    for n in range(41, 60):
        q = q + 0.3 * torch.randn_like(q)
        mask = _mask(n, L).expand(B, 1, 1, L)
        picks = [select_reference(q, k, v, mask, D ** -0.5, plan, state) for plan, state in states.items()]
        assert torch.equal(picks[0], picks[1])


def test_few_candidates_pick_only_among_the_best_sketch_scores():
    torch.manual_seed(3)
    B, Hq, Hkv, D, L = 1, 2, 1, 16, 128
    plan = SelectPlan(policy="oracle", layer=0, budget=12, sink=0, local=0, retrieval="sketch",
                      candidates=1, max_cache_len=L)
    k = torch.randn(B, Hkv, L, D)
    q = torch.randn(B, Hq, 1, D)
    state = _state(plan, B, Hq, Hkv, D)
    prefill_reference(torch.randn(B, Hq, L, D), k, None, True, D ** -0.5, plan, state)
    picks = select_reference(q, k, k, None, D ** -0.5, plan, state)[0, 0]
    centre, scale = channel_stats(k, torch.ones(B, L, dtype=torch.bool))
    best = set(sketch_scores(q, pack_bits(k, centre), scale)[0, 0].topk(12).indices.tolist())
    assert set(picks.tolist()) == best  # one budget of candidates: all of them are picked


def _generate(options, ids):
    prhs_compile.clear_states()
    prhs_compile.reset_stats()
    torch._dynamo.reset()
    model = tiny_model("llama")
    if options is not None:
        model.forward = torch.compile(model.forward, backend="prhs", options={**options, "inductor": False})
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False)


def test_end_to_end_sketch_runs_reports_its_memory_and_names_its_cuda_fallback():
    ids = torch.randint(0, 100, (1, 48), generator=torch.Generator().manual_seed(5))
    options = dict(policy="prhs", budget=16, sink=2, local=4, retrieval="sketch", candidates=2, max_cache_len=64)
    # the budget covers the context: exact
    assert torch.equal(_generate({**options, "budget": 4096}, ids), _generate(None, ids))
    _generate(options, ids)
    stats = prhs_compile.stats()
    assert stats.retrieval_rate > 0 and all(s.resets == 0 for s in stats.layers.values())
    # bits of 64 positions x 32 channels per KV head and layer, plus two fp32 vectors
    heads_layers = sum(1 for _ in stats.layers) * tiny_model("llama").config.num_key_value_heads
    assert stats.sketch_bytes >= heads_layers * 64 * 4
    q, k = torch.empty(1, 4, 1, 8), torch.empty(1, 2, 64, 8)
    assert "retrieval='sketch'" in unsupported_reason(SKETCH, q, k)


def test_bad_sketch_options_name_the_value():
    with pytest.raises(ValueError, match="retrieval='sketch' needs a policy"):
        prhs_compile.PrHSConfig.from_options(dict(retrieval="sketch", policy="streaming"))
    with pytest.raises(ValueError, match="delta_target=0.05"):
        prhs_compile.PrHSConfig.from_options(dict(retrieval="sketch", delta_target=0.05))


def test_stage_one_recall_script_measures_every_stage_one():
    """``scripts/stage_one_recall.py``'s per-step measure on random keys: with candidates
    covering the whole middle nothing is outside or lost; the oracle page ranking loses no
    more mass than Quest's bound."""
    import argparse
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "stage_one_recall.py")
    spec = importlib.util.spec_from_file_location("stage_one_recall", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(4)
    q, k = torch.randn(4, 80, 16), torch.randn(2, 80, 16)
    args = argparse.Namespace(budget=16, sink=2, local=4, page_size=4, candidates=[1, 8])
    result, dropped = script.step_stage_ones(q, k, 0.25, 80, 60, args)
    assert 0.0 < dropped < 1.0
    assert set(result) == {f"c{c}/{n}" for c in (1, 8) for n in ("pages_quest", "pages_mean", "pages_oracle", "sketch")}
    for name in ("pages_quest", "pages_mean", "pages_oracle", "sketch"):
        assert result[f"c8/{name}"] == pytest.approx((0.0, 0.0), abs=1e-6)  # 8 x 16 >= the 74 middle positions
    assert result["c1/pages_oracle"][1] <= result["c1/pages_quest"][1] + 1e-6
