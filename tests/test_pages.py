"""Page summaries and two-stage retrieval (``retrieval="pages"``).

* the summaries in the selection state equal a from-scratch computation over the cache's
  valid keys after the prefill and after every decode step (static-cache masks with left
  padding, growing dynamic caches, bf16), and are rebuilt for a row whose sequence does not
  continue (new prompt, position jump);
* with every page a candidate, two-stage retrieval picks what exact retrieval picks;
* verify mode reports the exact retrieval's dropped mass beside the two-stage one, and how
  many exact picks fell outside the candidates;
* the options reject what cannot work, naming the value and what is valid.
"""

import dataclasses
import logging

import pytest
import torch

import prhs_compile
from prhs_compile.kernels import SelectPlan, state_spec
from prhs_compile.kernels.pages import PAGE_MAX, PAGE_MIN, capacity, summaries_of
from prhs_compile.kernels.select_reference import prefill_reference, select_reference
from tiny_models import tiny_model

EAGER = {"inductor": False}


def _state(plan, B, Hq, Hkv, D, dtype=torch.float32):
    spec = state_spec(plan, B, Hq, Hkv, D, dtype)
    return [torch.full(shape, fill, dtype=dt) for shape, dt, fill in spec.values()]


def _named(plan, state):
    return dict(zip(state_spec(plan, 1, 1, 1, 1), state))


def _mask(lengths, pads, L, Tq=1):
    """[B, 1, Tq, L] bool: row b holds positions [pads[b], lengths[b]), causal for its queries."""
    pos = torch.arange(L)
    rows = []
    for n, p in zip(lengths, pads):
        q_pos = torch.arange(n - Tq, n)
        rows.append((pos[None, :] >= p) & (pos[None, :] <= q_pos[:, None]))
    return torch.stack(rows)[:, None]


def _valid(lengths, pads, L):
    pos = torch.arange(L)
    return torch.stack([(pos >= p) & (pos < n) for n, p in zip(lengths, pads)])


def _assert_summaries(plan, state, k, valid):
    st = _named(plan, state)
    B = k.shape[0]
    low, high = summaries_of(k, valid, plan.page_size, capacity(plan))
    assert torch.equal(st[PAGE_MIN][:B], low)
    assert torch.equal(st[PAGE_MAX][:B], high)


PAGES = SelectPlan(policy="prhs", layer=0, budget=16, sink=2, local=4, tau=0.9, retrieval="pages",
                   page_size=4, candidates=2, max_cache_len=96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Tq", [1, 2])
def test_summaries_follow_the_cache_after_prefill_and_every_step(dtype, Tq):
    torch.manual_seed(0)
    B, Hq, Hkv, D, L = 2, 4, 2, 8, 96
    k = torch.randn(B, Hkv, L, D).to(dtype)
    state = _state(PAGES, B, Hq, Hkv, D, dtype)
    lengths, pads = [50, 37], [0, 5]  # row 1 is left-padded
    q_pre = torch.randn(B, Hq, max(lengths), D).to(dtype)
    pre_mask = torch.zeros(B, 1, max(lengths), L, dtype=torch.bool)
    for b in range(B):
        for i in range(max(lengths)):
            last = lengths[b] - max(lengths) + i
            pre_mask[b, 0, i, pads[b]:last + 1] = last >= pads[b]
    prefill_reference(q_pre, k, pre_mask, False, D ** -0.5, PAGES, state)
    _assert_summaries(PAGES, state, k, _valid(lengths, pads, L))
    for _ in range(12):
        lengths = [n + Tq for n in lengths]
        q = torch.randn(B, Hq, Tq, D).to(dtype)
        select_reference(q, k, k, _mask(lengths, pads, L, Tq), D ** -0.5, PAGES, state)
        _assert_summaries(PAGES, state, k, _valid(lengths, pads, L))


def test_summaries_follow_a_sliding_window():
    """Keys leave the window at its old end: every page holding a valid key equals its
    from-scratch summary (pages wholly behind the window are never candidates)."""
    torch.manual_seed(4)
    B, Hq, Hkv, D, L, window = 1, 2, 1, 8, 96, 10
    k = torch.randn(B, Hkv, L, D)
    state = _state(PAGES, B, Hq, Hkv, D)
    n = 30
    prefill_reference(torch.randn(B, Hq, 1, D), k, _mask([n], [n - window], L), False, D ** -0.5, PAGES, state)
    for _ in range(15):
        n += 1
        select_reference(torch.randn(B, Hq, 1, D), k, k, _mask([n], [n - window], L), D ** -0.5, PAGES, state)
        valid = _valid([n], [n - window], L)
        low, high = summaries_of(k, valid, PAGES.page_size, capacity(PAGES))
        held = valid.unflatten(1, (-1, PAGES.page_size)).any(-1)[:, None, :capacity(PAGES)]  # pages with a valid key
        st = _named(PAGES, state)
        assert torch.equal(st[PAGE_MIN][held], low[held]) and torch.equal(st[PAGE_MAX][held], high[held])


def test_summaries_are_rebuilt_for_a_row_that_does_not_continue():
    torch.manual_seed(1)
    B, Hq, Hkv, D, L = 2, 2, 1, 8, 64
    k = torch.randn(B, Hkv, L, D)
    state = _state(PAGES, B, Hq, Hkv, D)
    q = torch.randn(B, Hq, 1, D)
    lengths = [30, 30]
    prefill_reference(torch.randn(B, Hq, 30, D), k, None, True, D ** -0.5, PAGES, state)
    # Row 0 continues; row 1 jumps ahead by 10 positions, and its cache changed meanwhile.
    k[1, :, 20:40] = torch.randn(Hkv, 20, D)
    lengths = [31, 41]
    select_reference(q, k, k, _mask(lengths, [0, 0], L), D ** -0.5, PAGES, state)
    _assert_summaries(PAGES, state, k, _valid(lengths, [0, 0], L))
    # A new, shorter prompt empties every page past it.
    prefill_reference(torch.randn(B, Hq, 9, D), k[:, :, :9], None, True, D ** -0.5, PAGES, state)
    _assert_summaries(PAGES, state, k[:, :, :9], torch.ones(B, 9, dtype=torch.bool))
    assert _named(PAGES, state)[PAGE_MIN][:, :, 3:].isinf().all()


def test_page_bounds_are_quests_bound():
    """``page_bounds`` sums the summaries against the group's rows split by sign; that is
    Quest's bound sum_rows sum_d max(q_d * min_d, q_d * max_d), on fresh random inputs."""
    from prhs_compile.kernels.pages import page_bounds

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 2, 16, generator=gen)
    a, b = torch.randn(2, 2, 2, 9, 16, generator=gen)
    low, high = torch.minimum(a, b), torch.maximum(a, b)
    rows = q.reshape(2, 2, 6, 1, 16)  # [B, Hkv, group rows, 1, D]
    want = torch.maximum(rows * low[:, :, None], rows * high[:, :, None]).sum(-1).sum(2)
    got = page_bounds(q, low, high)
    assert ((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("policy", ["oracle", "prhs"])
def test_two_stage_over_every_page_picks_what_exact_retrieval_picks(policy):
    torch.manual_seed(2)
    B, Hq, Hkv, D, L = 2, 4, 2, 8, 80
    exact = SelectPlan(policy=policy, layer=0, budget=20, sink=2, local=4, tau=0.95)
    two_stage = dataclasses.replace(exact, retrieval="pages", page_size=4, candidates=100, max_cache_len=L)
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    states = {plan: _state(plan, B, Hq, Hkv, D) for plan in (exact, two_stage)}
    for plan, state in states.items():
        prefill_reference(torch.randn(B, Hq, 40, D), k[:, :, :40], None, True, D ** -0.5, plan, state)
    q = torch.randn(B, Hq, 1, D)
    for n in range(41, 60):
        q = q + 0.3 * torch.randn_like(q)
        mask = _mask([n, n], [0, 3], L)
        picks = [select_reference(q, k, v, mask, D ** -0.5, plan, state) for plan, state in states.items()]
        assert torch.equal(picks[0], picks[1])


def test_small_candidates_pick_only_from_the_best_pages():
    torch.manual_seed(3)
    B, Hq, Hkv, D, L = 1, 2, 1, 8, 128
    plan = SelectPlan(policy="oracle", layer=0, budget=12, sink=0, local=0, retrieval="pages",
                      page_size=8, candidates=1, max_cache_len=L)
    k = torch.randn(B, Hkv, L, D)
    q = torch.randn(B, Hq, 1, D)
    state = _state(plan, B, Hq, Hkv, D)
    prefill_reference(torch.randn(B, Hq, L, D), k, None, True, D ** -0.5, plan, state)
    picks = select_reference(q, k, k, None, D ** -0.5, plan, state)[0, 0]
    # Stage one: the pages with the highest bound, as many as hold one budget (2 pages of 8).
    low, high = summaries_of(k, torch.ones(B, L, dtype=torch.bool), 8, L // 8)
    bound = torch.maximum(q[0, :, 0, None] * low[0, 0], q[0, :, 0, None] * high[0, 0]).sum(-1).sum(0)
    best = set(bound.topk(2).indices.tolist())
    assert picks.ge(0).sum() == 12
    assert {int(p) // 8 for p in picks if p >= 0} <= best


def _generate(arch, options, ids, **kwargs):
    prhs_compile.clear_states()
    prhs_compile.reset_stats()
    torch._dynamo.reset()
    model = tiny_model(arch)
    model.forward = torch.compile(model.forward, backend="prhs", options={**options, **EAGER})
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, **kwargs)
    return model, out


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_end_to_end_two_stage_with_every_page_is_exact_retrieval(cache):
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    base = dict(policy="oracle", budget=16, sink=2, local=4)
    kwargs = dict(attention_mask=mask, cache_implementation="static" if cache == "static" else None)
    _, exact = _generate("llama", base, ids, **kwargs)
    _, paged = _generate("llama", {**base, "retrieval": "pages", "page_size": 4, "candidates": 64,
                                   "max_cache_len": 64}, ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(exact, paged.sequences)
    # The summaries the run left equal a from-scratch computation over the cache's valid keys
    # (the last token generated is not in the cache).
    fed = exact.shape[1] - 1
    valid = torch.nn.functional.pad(mask.bool(), (0, fed - mask.shape[1]), value=True)
    for (plan, state), layer in zip(sorted(prhs_compile.state.all_states(), key=lambda s: s[0].layer),
                                    paged.past_key_values.layers):
        keys = layer.keys
        valid_here = torch.nn.functional.pad(valid, (0, keys.shape[2] - fed), value=False)
        _assert_summaries(plan, state, keys, valid_here)
    stats = prhs_compile.stats()
    assert stats.page_summary_bytes == 2 * 2 * 2 * 2 * (64 // 4) * 16 * 4  # layers, min+max, rows, heads, pages, D, fp32
    assert all(s.resets == 0 for s in stats.layers.values())


def test_verify_reports_the_exact_retrievals_dropped_mass_and_misses():
    ids = torch.randint(0, 100, (1, 48), generator=torch.Generator().manual_seed(5))
    options = dict(policy="prhs", budget=16, sink=2, local=4, retrieval="pages", page_size=4, candidates=1,
                   verify=True)
    _generate("llama", options, ids)
    records = [r for s in prhs_compile.stats().layers.values() for r in s.dropped_mass]
    assert records and all(r.exact_retrieved_max is not None for r in records if r.retrieved_max is not None)
    assert any(r.missed_retrievals for r in records)
    assert all(0.0 <= r.outside_candidates <= 1.0 for r in records if r.outside_candidates is not None)
    # Over every page the exact picks are all candidates and both drop the same mass.
    _generate("llama", {**options, "candidates": 100}, ids)
    records = [r for s in prhs_compile.stats().layers.values() for r in s.dropped_mass]
    assert all(r.missed_retrievals == 0 for r in records)
    for r in records:
        if r.retrieved_max is not None:
            assert r.exact_retrieved_max == pytest.approx(r.retrieved_max, abs=1e-6)


def test_verify_measures_a_two_stage_retrievals_dropped_mass_over_the_whole_context():
    """The reuse bound starts from the mass a retrieval dropped; two-stage retrieval ranks by
    a softmax over the keys it read, which would understate it. In verify mode the state keeps
    the dropped mass over the whole context: the record's on the retrieval step."""
    from prhs_compile.kernels import dropped_mass_listeners

    torch.manual_seed(7)
    B, Hq, Hkv, D, L = 1, 4, 2, 8, 96
    plan = dataclasses.replace(PAGES, candidates=1, verify=True)
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    state = _state(plan, B, Hq, Hkv, D)
    prefill_reference(torch.randn(B, Hq, 80, D), k[:, :, :80], None, True, D ** -0.5, plan, state)
    records = []
    dropped_mass_listeners.append(records.append)
    try:
        select_reference(torch.randn(B, Hq, 1, D), k, v, _mask([81], [0], L), D ** -0.5, plan, state)
    finally:
        dropped_mass_listeners.remove(records.append)
    (record,) = records
    assert record["retrieved"].all()
    anchor_dropped = _named(plan, state)["anchor_dropped"][:B]
    torch.testing.assert_close(anchor_dropped, record["group_dropped"], rtol=1e-5, atol=1e-6)
    assert (anchor_dropped > 0.05).all()  # one candidate page of 4 keys leaves real mass out


def test_a_cache_past_max_cache_len_is_summarised_from_the_cache(caplog):
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(6))
    options = dict(policy="oracle", budget=16, sink=2, local=4, retrieval="pages", page_size=4, candidates=2)
    _, roomy = _generate("llama", {**options, "max_cache_len": 64}, ids)
    with caplog.at_level(logging.WARNING, logger="prhs"):
        _, tight = _generate("llama", {**options, "max_cache_len": 16}, ids)
    assert torch.equal(roomy, tight)
    # The summaries cover the prompt the prefill saw (40 positions); decode outgrows them.
    assert "more than the 40 its page summaries cover" in caplog.text
    assert "max_cache_len, now 16" in caplog.text


def test_a_static_cache_longer_than_max_cache_len_is_covered_by_the_summaries(caplog):
    from prhs_compile.state import all_states

    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(6))
    options = dict(policy="oracle", budget=16, sink=2, local=4, retrieval="pages", page_size=4, candidates=2)
    _, roomy = _generate("llama", {**options, "max_cache_len": 128}, ids, cache_implementation="static")
    with caplog.at_level(logging.WARNING, logger="prhs"):
        _, tight = _generate("llama", {**options, "max_cache_len": 16}, ids, cache_implementation="static")
    assert torch.equal(roomy, tight)
    assert "page summaries cover" not in caplog.text
    states = all_states()  # those of the second run: max_cache_len 16, a cache of 40 + 6 or more
    assert states and all(_named(plan, t)[PAGE_MIN].shape[2] * 4 >= 46 for plan, t in states)


@pytest.mark.parametrize("options, message", [
    (dict(retrieval="page"), "retrieval='page'"),
    (dict(retrieval="pages", page_size=12), "page_size=12"),
    (dict(retrieval="pages", candidates=0), "candidates=0"),
    (dict(retrieval="pages", policy="streaming"), "policy='streaming'"),
    (dict(retrieval="pages", delta_target=0.05), "delta_target=0.05"),
    (dict(retrieval="pages", page_size=16, max_cache_len=8), "max_cache_len=8"),
])
def test_bad_page_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        prhs_compile.PrHSConfig.from_options(options)
