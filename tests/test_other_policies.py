"""SAGE-KV, SnapKV, Quest, H2O and HShare on hand-made inputs where the right selection is known."""

import pytest
import torch
import torch.nn.functional as F

import prhs_compile
from prhs_compile.kernels import SelectPlan, state_spec
from prhs_compile.kernels.select_reference import COUNTER_NAMES, COUNTERS_INDEX, prefill_reference, select_reference

D = 4


def state_for(plan, batch=1, q_heads=1, kv_heads=1):
    return [torch.full(s, f, dtype=d) for s, d, f in state_spec(plan, batch, q_heads, kv_heads, D).values()]


def retrievals(state):
    return dict(zip(COUNTER_NAMES, state[COUNTERS_INDEX].tolist()))["retrievals"]


def spike_keys(length, spikes):
    k = torch.zeros(1, 1, length, D)
    for position, value in spikes.items():
        k[0, 0, position, 0] = value
    return k


def along(channel, scale=10.0, rows=1):
    q = torch.zeros(1, 1, rows, D)
    q[..., channel] = scale
    return q


def kept_middle(idx, sink, local_positions):
    return sorted(p for p in idx[0, 0].tolist() if p >= sink and p not in local_positions)


def test_sage_kv_selects_once_from_the_last_prompt_query_and_never_again():
    plan = SelectPlan(policy="sage_kv", layer=0, budget=5, sink=1, local=2)
    k = spike_keys(40, {7: 5.0, 19: 4.0, 30: 3.0})
    state = state_for(plan)
    prompt_q = torch.zeros(1, 1, 32, D)
    prompt_q[0, 0, -1, 0] = 10.0  # only the last prompt query looks along channel 0
    prefill_reference(prompt_q, k[:, :, :32], None, True, 1.0, plan, state)
    for t in range(32, 36):
        mask = (torch.arange(40) <= t).reshape(1, 1, 1, 40)
        idx = select_reference(along(1), k, k, mask, 1.0, plan, state)  # queries look elsewhere now
        assert kept_middle(idx, 1, {t - 1, t}) == [7, 19]  # top-2 middle of the prompt query
    assert retrievals(state) == 0


def test_a_stored_selection_outliving_a_shorter_cache_is_not_read_past_its_end():
    plan = SelectPlan(policy="sage_kv", layer=0, budget=5, sink=1, local=2)
    k = spike_keys(40, {3: 2.0, 7: 5.0, 19: 4.0, 30: 3.0})
    state = state_for(plan)
    prompt_q = torch.zeros(1, 1, 40, D)
    prompt_q[0, 0, -1, 0] = 10.0
    prefill_reference(prompt_q, k, None, True, 1.0, plan, state)  # stores picks 7 and 19
    # A new, shorter sequence decodes without a prefill through the rule (an evicted cache,
    # or a prompt that ran elsewhere): fitting rows keep everything, others select afresh.
    idx = select_reference(along(0), k[:, :, :5], k[:, :, :5], None, 1.0, plan, state)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 4]
    idx = select_reference(along(0), k[:, :, :12], k[:, :, :12], None, 1.0, plan, state)
    assert kept_middle(idx, 1, {10, 11}) == [3, 7]
    assert retrievals(state) == 1


def test_snapkv_pools_the_observation_window_scores():
    plan = SelectPlan(policy="snapkv", layer=0, budget=3 + 7, sink=1, local=2)
    k = spike_keys(64, {20: 6.0})
    state = state_for(plan)
    prefill_reference(along(0, rows=48), k[:, :, :48], None, True, 1.0, plan, state)
    mask = (torch.arange(64) <= 48).reshape(1, 1, 1, 64)
    idx = select_reference(along(1), k, k, mask, 1.0, plan, state)
    # the max-pool (kernel 7) spreads position 20's score over 17..23: those 7 are kept
    assert kept_middle(idx, 1, {47, 48}) == list(range(17, 24))


def test_quest_keeps_whole_pages_with_the_best_upper_bound():
    plan = SelectPlan(policy="quest", layer=2, budget=16 + 3, sink=1, local=2)
    k = spike_keys(64, {37: 4.0})  # page 2 (positions 32..47) holds the best key
    state = state_for(plan)
    idx = select_reference(along(0), k, k, None, 1.0, plan, state)
    assert kept_middle(idx, 1, {62, 63}) == list(range(32, 48))


def test_quest_leaves_the_first_two_layers_dense():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 64, 16)
    fn = lambda q, k: F.scaled_dot_product_attention(q, k, k, enable_gqa=True)  # noqa: E731
    with torch.no_grad():
        explained = prhs_compile.explain(fn, q, k, options={"policy": "quest", "budget": 32, "sink": 1, "local": 2})
    (decision,) = explained.decisions
    assert decision.kind == "dense" and "Quest keeps its first 2 layers dense" in decision.reason


def test_h2o_keeps_the_accumulated_heavy_hitters():
    plan = SelectPlan(policy="h2o", layer=0, budget=4, sink=1, local=1, kv_len=32)
    k = spike_keys(32, {9: 3.0, 14: 2.0})
    state = state_for(plan)
    prefill_reference(along(0, rows=20), k[:, :, :20], None, True, 1.0, plan, state)
    # First step: heavy hitters from its exact attention; later queries look elsewhere, but the
    # accumulated score keeps 9 and 14.
    for t, q in ((20, along(0)), (21, along(1)), (22, along(1))):
        mask = (torch.arange(32) <= t).reshape(1, 1, 1, 32)
        idx = select_reference(q, k, k, mask, 1.0, plan, state)
        assert kept_middle(idx, 1, {t}) == [9, 14]


def test_h2o_needs_a_static_cache_length():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        explained = prhs_compile.explain(model, input_ids=torch.randint(0, 128, (1, 40)),
                                         options={"policy": "h2o", "budget": 16, "sink": 2, "local": 4}, use_cache=True)
    assert explained.decisions[0].kind == "prefill"
    out = explained.output
    token = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        step = prhs_compile.explain(model, input_ids=token, past_key_values=out.past_key_values,
                                    options={"policy": "h2o", "budget": 16, "sink": 2, "local": 4})
    # DynamicCache decode (first step has a static length 41 > budget: rewritten; H2O sized it)
    assert step.decisions[0].kind == "decode"


def test_hshare_label_channels_reuse_every_second_step_and_head_sharing():
    d = 8  # one label channel (d // 8)
    plan = SelectPlan(policy="hshare", layer=0, budget=4, sink=1, local=1)
    k = torch.zeros(1, 2, 40, d)
    k[0, :, :, 3] = 0.1  # channel 3 carries the most key energy: the label channel
    k[0, :, 11, 3] = 4.0
    k[0, :, 25, 3] = 3.0
    state = [torch.full(s, f, dtype=dt) for s, dt, f in state_spec(plan, 1, 2, 2, d).values()]
    q_prompt = torch.zeros(1, 2, 30, d)
    q_prompt[..., 3] = 5.0
    prefill_reference(q_prompt, k[:, :, :30], None, True, 1.0, plan, state)
    q = torch.zeros(1, 2, 1, d)
    q[..., 3] = 5.0
    q[..., 0] = 1.0  # a non-label channel: ignored by the approximate scores
    for t in range(30, 34):
        mask = (torch.arange(40) <= t).reshape(1, 1, 1, 40)
        idx = select_reference(q, k, k, mask, 1.0, plan, state)
        assert kept_middle(idx, 1, {t}) == [11, 25]
        assert torch.equal(idx[0, 0], idx[0, 1])  # head 1 takes head 0's set
    # 4 steps: retrievals at steps 1 and 3, by head 0 only (head 1 shares it)
    assert retrievals(state) == 2


@pytest.mark.parametrize("policy", ["sage_kv", "snapkv", "quest", "h2o", "hshare", "streaming", "oracle", "prhs"])
def test_every_policy_generates_through_the_backend(policy):
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.forward = torch.compile(model.forward, backend="prhs",
                                  options={"policy": policy, "budget": 24, "sink": 2, "local": 4, "inductor": False})
    with torch.no_grad():
        out = model.generate(torch.randint(0, 128, (2, 40)), max_new_tokens=4, do_sample=False,
                             cache_implementation="static", max_cache_len=64, pad_token_id=0)
    assert out.shape == (2, 44)
    stats = prhs_compile.stats()
    if policy != "quest":  # Quest keeps the first two layers (all of this model) dense
        assert stats.decode_steps == 3 and all(s.slots == 3 * 2 * 2 for s in stats.layers.values())
