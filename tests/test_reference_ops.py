"""The torch reference ops on hand-made and random inputs."""

import pytest
import torch

from prhs_compile.kernels import SelectPlan, state_spec
from prhs_compile.kernels.attend_reference import attend_reference
from prhs_compile.kernels.select_reference import (
    COUNTER_NAMES,
    COUNTERS_INDEX,
    keep_to_indices,
    prefill_reference,
    select_reference,
)


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN never passes"
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def new_state(plan, batch, q_heads, kv_heads, head_dim):
    spec = state_spec(plan, batch, q_heads, kv_heads, head_dim)
    return [torch.full(shape, fill, dtype=dtype) for shape, dtype, fill in spec.values()]


def counters(state):
    return dict(zip(COUNTER_NAMES, state[COUNTERS_INDEX].tolist()))


def make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=1, kv_len=24, dim=8, dv=None, dtype=torch.float32):
    q = torch.randn(batch, q_heads, q_len, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dv or dim, dtype=dtype)
    return q, k, v


def sdpa(q, k, v, mask=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_attend_over_every_position_equals_sdpa(dtype, tol):
    q, k, v = make_qkv(dtype=dtype, q_len=2)
    idx = torch.arange(24, dtype=torch.int32).flip(0).expand(2, 2, 24)  # order does not matter
    out = attend_reference(q, k, v, idx, None, q.shape[-1] ** -0.5)
    assert rel_err(out, sdpa(q, k, v)) < tol


def test_attend_over_a_subset_equals_sdpa_with_a_mask():
    q, k, v = make_qkv(dv=12)
    idx = torch.tensor([[[0, 3, 5, -1], [1, 2, 7, 9]], [[4, -1, -1, 6], [10, 11, 12, 13]]], dtype=torch.int32)
    allowed = torch.zeros(2, 2, 24, dtype=torch.bool)
    for b, h, p in (idx >= 0).nonzero().tolist():
        allowed[b, h, idx[b, h, p]] = True
    # query head h reads KV head h // 2: expand the per-KV-head mask to the query heads
    mask = allowed.repeat_interleave(2, dim=1)[:, :, None, :]
    out = attend_reference(q, k, v, idx, None, q.shape[-1] ** -0.5)
    assert rel_err(out, sdpa(q, k, v, mask)) < 1e-5


def test_attend_gathers_bool_and_float_masks_at_the_selected_positions():
    q, k, v = make_qkv(batch=1)
    idx = torch.arange(24, dtype=torch.int32).expand(1, 2, 24)
    bool_mask = torch.rand(1, 1, 1, 24) > 0.3
    bias = torch.randn(1, 1, 1, 24)
    scale = q.shape[-1] ** -0.5
    assert rel_err(attend_reference(q, k, v, idx, bool_mask, scale), sdpa(q, k, v, bool_mask)) < 1e-5
    assert rel_err(attend_reference(q, k, v, idx, bias, scale), sdpa(q, k, v, bias)) < 1e-5


def test_attend_row_with_nothing_to_attend_is_zero_not_nan():
    q, k, v = make_qkv(batch=1)
    idx = torch.full((1, 2, 4), -1, dtype=torch.int32)
    out = attend_reference(q, k, v, idx, None, 0.3)
    assert torch.equal(out, torch.zeros_like(out))


def test_keep_to_indices_is_ascending_and_padded():
    keep = torch.tensor([[[False, True, False, True, True]]])
    assert keep_to_indices(keep, 4).tolist() == [[[1, 3, 4, -1]]]
    assert keep_to_indices(keep, 7).tolist() == [[[1, 3, 4, -1, -1, -1, -1]]]


def run_select(plan, q, k, mask=None, state=None, v=None):
    state = state if state is not None else new_state(plan, q.shape[0], q.shape[1], k.shape[1], k.shape[-1])
    v = k if v is None else v
    idx = select_reference(q, k, v, mask, q.shape[-1] ** -0.5, plan, state)
    return idx, state


def positions(idx):
    return [[sorted(p for p in head if p >= 0) for head in row] for row in idx.tolist()]


def test_streaming_keeps_sinks_and_the_recent_window():
    plan = SelectPlan(policy="streaming", layer=0, budget=6, sink=2)
    q, k, _ = make_qkv(batch=1, kv_len=20)
    idx, _ = run_select(plan, q, k)
    assert positions(idx) == [[[0, 1, 16, 17, 18, 19]] * 2]


def test_windows_follow_valid_positions_of_a_left_padded_row():
    plan = SelectPlan(policy="streaming", layer=0, budget=5, sink=2)
    q, k, _ = make_qkv(batch=2, kv_len=12)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., :4] = False  # row 1 is left-padded by 4
    idx, _ = run_select(plan, q, k, mask)
    assert positions(idx)[0][0] == [0, 1, 9, 10, 11]
    assert positions(idx)[1][0] == [4, 5, 9, 10, 11]


def test_oracle_picks_the_highest_mass_middle_positions_per_kv_head():
    plan = SelectPlan(policy="oracle", layer=0, budget=5, sink=1, local=1)
    q, k, _ = make_qkv(batch=1, q_heads=2, kv_heads=2, kv_len=16, dim=4)
    q.zero_()
    q[0, :, 0, 0] = 10.0  # both heads look along the first channel
    k.zero_()
    k[0, 0, [3, 7, 9], 0] = torch.tensor([3.0, 2.0, 1.0])  # head 0's best middle positions
    k[0, 1, [4, 5, 11], 0] = torch.tensor([1.0, 3.0, 2.0])  # head 1's
    idx, state = run_select(plan, q, k)
    assert positions(idx) == [[[0, 3, 7, 9, 15], [0, 4, 5, 11, 15]]]
    assert counters(state)["retrievals"] == 2


def test_rows_that_fit_the_budget_keep_everything_without_retrieval():
    plan = SelectPlan(policy="oracle", layer=0, budget=8, sink=1, local=1)
    q, k, _ = make_qkv(batch=2, kv_len=12)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., 7:] = False  # row 0 has 7 valid positions: fits
    idx, state = run_select(plan, q, k, mask)
    assert positions(idx)[0] == [list(range(7))] * 2
    assert len(positions(idx)[1][0]) == 8
    assert counters(state)["retrievals"] == 2  # only row 1's two KV heads


def test_min_context_keeps_short_rows_whole_in_the_extra_slots():
    plan = SelectPlan(policy="oracle", layer=0, budget=4, sink=1, local=1, min_context=10)
    q, k, _ = make_qkv(batch=1, kv_len=9)
    idx, _ = run_select(plan, q, k)
    assert idx.shape[-1] == 10
    assert positions(idx)[0][0] == list(range(9))


def test_dense_select_returns_one_slot_per_position_with_invalid_ones_empty():
    plan = SelectPlan(policy="dense", layer=0, budget=4)
    q, k, _ = make_qkv(batch=1, kv_len=6)
    mask = torch.tensor([True, True, False, True, False, False]).reshape(1, 1, 1, 6)
    idx, _ = run_select(plan, q, k, mask)
    assert idx.tolist() == [[[0, 1, 3, -1, -1, -1]] * 2]


def test_state_recognises_the_next_step_and_rejects_new_or_reordered_sequences():
    plan = SelectPlan(policy="oracle", layer=0, budget=4, sink=1, local=1)
    q, k, _ = make_qkv(batch=2, kv_len=16)
    mask = torch.zeros(2, 1, 1, 16, dtype=torch.bool)
    mask[..., :10] = True
    state = new_state(plan, 2, 4, 2, 8)
    # Prefill over the first 9 positions, then one decode step at position 9: continues.
    prefill_reference(torch.randn(2, 4, 9, 8), k[:, :, :9], None, True, 0.3, plan, state)
    run_select(plan, q, k, mask, state)
    assert counters(state)["resets"] == 0
    # Next step at position 10 after the batch rows were swapped (beam reorder): both reset.
    mask[..., 10] = True
    run_select(plan, q, k.flip(0), mask, state)
    assert counters(state)["resets"] == 2
    # A position that does not follow the last one (a new prompt) resets too.
    mask[..., 11:14] = True
    run_select(plan, q, k.flip(0), mask, state)
    assert counters(state)["resets"] == 4


def test_verify_reports_exact_dropped_mass():
    from prhs_compile.kernels import dropped_mass_listeners

    seen = []
    dropped_mass_listeners.append(seen.append)
    try:
        plan = SelectPlan(policy="oracle", layer=3, budget=6, sink=1, local=1, verify=True)
        q, k, v = make_qkv(batch=1, kv_len=20)
        idx, _ = run_select(plan, q, k)
        probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5, -1)
        kept = torch.zeros(1, 4, 20)
        kept.scatter_(-1, idx.repeat_interleave(2, 1).long(), 1.0)
        expected = 1 - (probs[:, :, 0] * kept).sum(-1)
        record = seen[-1]
        assert record["layer"] == 3
        torch.testing.assert_close(record["dropped"][:, :, 0], expected, rtol=0, atol=1e-6)
    finally:
        dropped_mass_listeners.pop()


def test_batch_larger_than_the_state_is_a_clear_error():
    plan = SelectPlan(policy="oracle", layer=2, budget=6, sink=1, local=1)
    q, k, _ = make_qkv(batch=3, kv_len=20)
    state = new_state(plan, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="batch size 3 exceeds the 2 rows of selection state of layer 2; raise options max_batch_size"):
        run_select(plan, q, k, state=state)
