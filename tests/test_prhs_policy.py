"""The PrHS policy: each selector on and off, its exact special cases, and its bounds."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from tiny_models import tiny_model

import prhs_compile
from prhs_compile.kernels import SelectPlan, state_spec
from prhs_compile.kernels.bounds import output_error_bound, reuse_bound
from prhs_compile.kernels.select_reference import COUNTER_NAMES, COUNTERS_INDEX, prefill_reference, select_reference

B, HQ, HKV, D, L = 2, 4, 2, 8, 48
SCALE = D ** -0.5


def new_state(plan):
    return [torch.full(s, f, dtype=d) for s, d, f in state_spec(plan, B, HQ, HKV, D).values()]


def counters(state):
    return dict(zip(COUNTER_NAMES, state[COUNTERS_INDEX].tolist()))


def decode_run(plan, steps=8, start=24, drift=0.05, seed=0, k=None, queries=None):
    """A sequence of decode steps over one cache: slowly drifting queries, one new token each."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, L, D, generator=g) if k is None else k
    state = new_state(plan)
    prefill_reference(torch.randn(B, HQ, start, D, generator=g), k[:, :, :start], None, True, SCALE, plan, state)
    q = torch.randn(B, HQ, 1, D, generator=g)
    out = []
    for t in range(start, start + steps):
        q = q + drift * torch.randn(q.shape, generator=g) if queries is None else queries[t - start]
        mask = (torch.arange(L) <= t).reshape(1, 1, 1, L)
        out.append(select_reference(q, k, k, mask, SCALE, plan, state))
    return out, state


def test_no_reuse_no_dilation_no_sharing_is_exactly_oracle():
    prhs = SelectPlan(policy="prhs", layer=0, budget=12, sink=1, local=2, tau=1.0, max_reuse=1, dilation_m=0)
    oracle = SelectPlan(policy="oracle", layer=0, budget=12, sink=1, local=2)
    got, state = decode_run(prhs)
    want, _ = decode_run(oracle)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert counters(state)["retrievals"] == 8 * B * HKV


def test_dilation_adds_exactly_the_neighbours():
    plan = SelectPlan(policy="prhs", layer=0, budget=6, sink=1, local=1, dilation_m=1, dilation_r=1, max_reuse=1)
    k = torch.zeros(1, 1, 32, 4)
    k[0, 0, 10, 0] = 5.0  # the single best middle position
    k[0, 0, 20, 0] = 4.0  # second best: not a core (m = 1), picked only after the neighbours
    k[0, 0, 25, 0] = 3.0
    q = torch.zeros(1, 1, 1, 4)
    q[..., 0] = 1.0
    state = [torch.full(s, f, dtype=d) for s, d, f in state_spec(plan, 1, 1, 1, 4).values()]
    idx = select_reference(q, k, k, None, 1.0, plan, state)
    middle = sorted(p for p in idx[0, 0].tolist() if p not in (-1, 0, 31))
    # 4 retrieved: the core 10, its neighbours 9 and 11, then the next best, 20
    assert middle == [9, 10, 11, 20]


def test_time_axis_reuses_until_max_reuse():
    plan = SelectPlan(policy="prhs", layer=0, budget=12, sink=1, local=2, tau=0.0, max_reuse=4)
    _, state = decode_run(plan, steps=8)
    # tau = 0 accepts any query: a retrieval every 4th step per (row, KV head)
    assert counters(state)["retrievals"] == 2 * B * HKV
    assert counters(state)["slots"] == 8 * B * HKV


def test_time_axis_cosine_gate_triggers_a_retrieval():
    plan = SelectPlan(policy="prhs", layer=0, budget=12, sink=1, local=2, tau=0.9, max_reuse=100)
    q = torch.randn(B, HQ, 1, D)
    queries = [q, q * 1.1, q.flip(-1), q.flip(-1)]  # same direction, then a very different one
    _, state = decode_run(plan, steps=4, queries=queries)
    assert counters(state)["retrievals"] == 2 * B * HKV


def test_reused_selection_keeps_the_local_window_sliding():
    plan = SelectPlan(policy="prhs", layer=0, budget=12, sink=1, local=2, tau=0.0, max_reuse=100)
    out, _ = decode_run(plan, steps=3)
    for step, idx in enumerate(out):
        newest = 24 + step
        assert {newest - 1, newest} <= set(idx[0, 0].tolist())


def test_depth_axis_excludes_the_oldest_positions_from_retrieval():
    plan = SelectPlan(policy="prhs", layer=3, budget=12, sink=1, local=2, psaw_start=1, psaw_phi=0.5, psaw_alpha=1.0, num_layers=4, max_reuse=1)
    out, _ = decode_run(plan, steps=1, start=40)
    excluded = int((1 - 0.5 ** (1.0 * (3 - 1) / (4 - 1))) * 41)  # 41 valid tokens
    picked = [p for p in out[0].flatten().tolist() if p > 0]  # everything but the sink
    assert min(picked) >= 1 + excluded


def test_delta_target_keeps_the_smallest_sufficient_set_at_retrieval():
    plan = SelectPlan(policy="prhs", layer=0, budget=30, sink=1, local=2, delta_target=0.1, max_reuse=1, verify=True)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(B, HKV, L, D, generator=g) * 3  # peaked attention: a few positions hold the mass
    records = []
    from prhs_compile.kernels import dropped_mass_listeners

    dropped_mass_listeners.append(records.append)
    try:
        out, _ = decode_run(plan, k=k, steps=3)
    finally:
        dropped_mass_listeners.remove(records.append)
    for record, idx in zip(records, out):
        assert (record["group_dropped"] <= 0.1 + 1e-6).all()
        assert ((idx >= 0).sum(-1) < 30).any()  # fewer than the budget where that suffices


def test_layer_axis_shares_the_anchor_selection_end_to_end():
    model = tiny_model("llama")
    options = {"policy": "prhs", "budget": 16, "sink": 2, "local": 4, "layer_share": {1: 0}, "inductor": False}
    ids = torch.randint(0, 128, (1, 40))
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static", max_cache_len=64)
    stats = prhs_compile.stats()
    assert stats.layers[0].retrievals > 0 and stats.layers[1].retrievals == 0
    assert stats.retrieval_rate == pytest.approx(stats.layers[0].retrievals / (2 * stats.layers[0].slots))


def test_bad_sharing_maps_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="the anchor must be an earlier layer"):
        prhs_compile.PrHSConfig.from_options({"layer_share": {0: 1}})
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="prhs", options={"layer_share": {5: 0}, "inductor": False})
    with torch.no_grad(), pytest.raises(Exception, match="names layer 5, but the model has 2 layers"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_new_sequence_starts_without_the_old_selection():
    plan = SelectPlan(policy="prhs", layer=0, budget=12, sink=1, local=2, tau=0.0, max_reuse=100)
    _, state = decode_run(plan, steps=3)
    before = counters(state)["retrievals"]
    k = torch.randn(B, HKV, L, D)
    prefill_reference(torch.randn(B, HQ, 30, D), k[:, :, :30], None, True, SCALE, plan, state)
    mask = (torch.arange(L) <= 30).reshape(1, 1, 1, L)
    select_reference(torch.randn(B, HQ, 1, D), k, k, mask, SCALE, plan, state)
    assert counters(state)["retrievals"] == before + B * HKV


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.integers(4, 64),
    keep=st.floats(0.05, 0.95),
    shift=st.floats(0.0, 2.0),
)
def test_bounds_hold_on_random_inputs(seed, length, keep, shift):
    g = torch.Generator().manual_seed(seed)
    d = 16
    scale = d ** -0.5
    keys = torch.randn(length, d, generator=g, dtype=torch.float64) * 2
    values = torch.randn(length, d, generator=g, dtype=torch.float64)
    q_anchor = torch.randn(d, generator=g, dtype=torch.float64)
    q_now = q_anchor + shift * torch.randn(d, generator=g, dtype=torch.float64)
    subset = torch.rand(length, generator=g) < keep
    subset[0] = True

    def dropped(q):
        p = torch.softmax(scale * keys @ q, dim=0)
        return p[~subset].sum(), p

    d_anchor, _ = dropped(q_anchor)
    d_now, p = dropped(q_now)
    bound = reuse_bound(d_anchor, scale, keys.norm(dim=-1).max(), (q_now - q_anchor).norm())
    assert d_now <= bound + 1e-12
    sparse = torch.softmax((scale * keys @ q_now).masked_fill(~subset, float("-inf")), 0) @ values
    dense = p @ values
    assert (sparse - dense).norm() <= output_error_bound(d_now, values.norm(dim=-1).max()) + 1e-12
    # total variation between the sparse and dense distributions is exactly the dropped mass
    p_sparse = torch.where(subset, p / p[subset].sum(), torch.zeros_like(p))
    assert torch.isclose(0.5 * (p_sparse - p).abs().sum(), d_now)


def _calibration_step(indices, query, heavy, length=20):
    """One recorded step: its composed set, both query heads' query, a mass on ``heavy``."""
    mass = torch.zeros(1, 1, length)
    mass[0, 0, heavy] = 2.0 / len(heavy)  # two query rows' worth, as the group mass sums
    q = torch.tensor(query, dtype=torch.float32)
    return torch.tensor([[indices]]), torch.stack([q, q])[None], mass


def test_calibration_suggests_the_lowest_cosine_at_which_reuse_keeps_the_mass():
    """Steps 0-1 attend to the same positions with the same query; step 2 turns to other
    positions with an orthogonal query; step 3 keeps step 2's positions at cosine 0.8 to it
    (0.6 to the older steps). The reuses that keep the mass are those at cosine 1 and 0.8,
    so 0.8 is the suggested tau; a set older than the query loses what moved."""
    from prhs_compile.calibrate import _suggest_tau, reuse_samples

    steps = [_calibration_step([0, 1, 2, 10], [1.0, 0.0], [1, 2]),
             _calibration_step([0, 1, 2, 11], [1.0, 0.0], [1, 2, 11]),
             _calibration_step([0, 5, 6, 12], [0.0, 1.0], [5, 6]),
             _calibration_step([0, 5, 6, 13], [0.6, 0.8], [5, 6, 13])]
    cosine, loss = reuse_samples(steps, kv_heads=1)
    assert cosine.numel() == 6  # pairs (1,0), (2,1), (2,0), (3,2), (3,1), (3,0)
    assert torch.allclose(loss[cosine > 0.99], torch.zeros(1))  # the positions added since are kept
    tau, evidence = _suggest_tau(steps, kv_heads=1, slack=0.02, precision=0.9)
    assert tau == pytest.approx(0.8, abs=1e-4)
    assert evidence["samples"] == 6 and evidence["within_slack"] == pytest.approx(2 / 6, abs=1e-4)
    # No reuse keeps the mass: no reuse (tau 1.0).
    moving = [steps[1], steps[2]]
    assert _suggest_tau(moving, kv_heads=1)[0] == 1.0


def test_calibrate_refuses_bad_slack_and_precision():
    from prhs_compile.calibrate import calibrate

    with pytest.raises(ValueError, match=r"slack=1.5 is invalid: expected in \[0, 1\]"):
        calibrate(None, None, slack=1.5)
    with pytest.raises(ValueError, match=r"precision=0 is invalid"):
        calibrate(None, None, precision=0)


def test_calibrate_writes_a_map_that_loads_and_checks_the_model(tmp_path):
    import json
    import subprocess
    import sys

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "map.json"
    cmd = [sys.executable, "-m", "prhs_compile.bench.cli", "calibrate", "--model", str(tmp_path / "model"),
           "--prompt-len", "48", "--steps", "4", "--budget", "16", "--sink", "2", "--local", "4",
           "--threshold", "0.0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["num_layers"] == 2 and data["num_kv_heads"] == 2
    assert data["share"] == {"1": 0}  # threshold 0: layer 1 shares layer 0
    assert 0.0 <= data["overlap"][1][0] <= 1.0 and set(data["suggested_tau"]) == {"0", "1"}
    config = prhs_compile.PrHSConfig.from_options({"layer_share": str(out)})
    assert config.layer_share.get(1) == 0
    # a map made for another model is refused when compiling
    data["num_layers"] = 32
    out.write_text(json.dumps(data))
    compiled = torch.compile(model, backend="prhs", options={"layer_share": str(out), "inductor": False})
    with torch.no_grad(), pytest.raises(Exception, match="calibrated for 32 layers, but this model has 2"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_depth_axis_window_at_prefill_keeps_sinks_and_the_recent_part():
    from prhs_compile.kernels.select_reference import psaw_window

    plan = SelectPlan(policy="prhs", layer=2, budget=16, sink=1, local=2, psaw_start=0, num_layers=2, psaw_phi=0.5, psaw_alpha=1.0)
    allowed, valid, _ = psaw_window(12, 12, None, True, plan, 1, "cpu")
    # row 9 sees t = 10 tokens: P = floor(0.5 * 10) = 5 non-sink tokens left out -> {0, 6, 7, 8, 9}
    assert allowed[0, 9].nonzero().flatten().tolist() == [0, 6, 7, 8, 9]
    # row 2 sees 3 tokens: the sink and the local window are never cut
    assert allowed[0, 2].nonzero().flatten().tolist() == [0, 1, 2]
    assert allowed.sum() < valid.sum() == 12 * 13 // 2


def test_windowed_prefill_attends_only_inside_the_window_and_reports_the_pairs():
    from prhs_compile.kernels.select_reference import psaw_window, window_prefill_reference

    plan = SelectPlan(policy="prhs", layer=3, budget=16, sink=2, local=4, psaw_start=1, num_layers=4)
    q, k, v = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    state = [torch.full(s, f, dtype=d) for s, d, f in state_spec(plan, 2, 4, 2, 8).values()]
    out = window_prefill_reference(q, k, v, None, True, SCALE, plan, state)
    allowed, valid, _ = psaw_window(20, 20, None, True, plan, 2, "cpu")
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * SCALE
    expected = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    c = counters(state)
    assert c["prefill_pairs"] == valid.sum() * 2 and c["prefill_pairs_kept"] == allowed.sum() * 2


def test_windowed_prefill_end_to_end_rewrites_later_layers_and_reports_savings():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 48))
    options = {"policy": "prhs", "budget": 16, "sink": 2, "local": 4, "psaw_start_layer": 0}
    with torch.no_grad():
        explained = prhs_compile.explain(model, input_ids=ids, options=options)
        dense = model(input_ids=ids).logits
    assert [("window_prefill" in line) for line in explained.after[0].splitlines() if "torch.ops.prhs" in line] == [False, True]
    assert "recency window (PSAW)" in explained.decisions[1].reason
    assert (explained.output.logits - dense).abs().max() > 1e-4  # layer 1 saw less
    fraction = prhs_compile.stats().prefill_attention_fraction
    assert 0.5 < fraction < 1.0
