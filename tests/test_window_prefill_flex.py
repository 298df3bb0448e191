"""Block-sparse windowed prefill (PrHS depth axis) on FlexAttention, against the masked-SDPA
reference: same output, same pairs, the BlockMask skips exactly the blocks outside the window,
same state and counters. On CPU FlexAttention runs eagerly; the `cuda` tests run the compiled
kernel through the registered op."""

import json

import pytest
import torch
from prhs_compile.kernels import SelectPlan, state_spec
from prhs_compile.kernels.select_reference import psaw_window, window_prefill_reference
from prhs_compile.kernels.window_prefill_flex import (
    block_counts,
    flex_window_attention,
    skipped_block_fraction,
    window_prefill_flex,
    window_prefill_flex_and_reset,
)

B, HQ, HKV, D = 2, 4, 2, 16
BLOCK = 8  # small blocks, so tiny shapes have blocks to skip
PAD = (0, 7)  # left padding of each batch row


def make_plan(**fields) -> SelectPlan:
    base = {"policy": "prhs", "layer": 3, "budget": 16, "sink": 2, "local": 4, "psaw_start": 1, "num_layers": 4}
    return SelectPlan(**{**base, **fields})


def new_state(plan, batch=B, q_heads=HQ, kv_heads=HKV, head_dim=D, device="cpu"):
    spec = state_spec(plan, batch, q_heads, kv_heads, head_dim)
    return [torch.full(shape, fill, dtype=dtype, device=device) for shape, dtype, fill in spec.values()]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN or inf anywhere fails."""
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def inputs(q_len, kv_len, dtype=torch.float32, q_heads=HQ, kv_heads=HKV, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, q_heads, q_len, D), (B, kv_heads, kv_len, D), (B, kv_heads, kv_len, D))
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def hf_mask(q_len, kv_len, kind="bool", window=0, filled=None, seed=1):
    """HF-style prefill mask ``[B, 1, Tq, L]``: bottom-right causal (the queries are the last
    ``q_len`` of ``filled`` tokens), left padding ``PAD``, optionally a sliding window; as
    bool, or additive float (finfo.min where masked, random finite values elsewhere)."""
    filled = kv_len if filled is None else filled
    keys = torch.arange(kv_len)
    query_pos = torch.arange(filled - q_len, filled)
    allowed = (keys[None, None, :] <= query_pos[None, :, None]) & (keys[None, None, :] >= torch.tensor(PAD)[:, None, None])
    if window:
        allowed &= query_pos[None, :, None] - keys[None, None, :] < window
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    g = torch.Generator().manual_seed(seed)
    values = 0.5 * torch.randn(allowed.shape, generator=g)
    return values.masked_fill(~allowed, torch.finfo(torch.float32).min)


def key_mask(kv_len, kind="bool"):
    """A mask shared by all query rows ``[B, 1, 1, L]`` (left padding only)."""
    allowed = (torch.arange(kv_len)[None, :] >= torch.tensor(PAD)[:, None])[:, None, None]
    if kind == "bool":
        return allowed
    return (0.3 * torch.arange(kv_len) / kv_len).expand(allowed.shape).masked_fill(~allowed, float("-inf"))


def expected_blocks(allowed: torch.Tensor, block: int) -> dict:
    """Partial / full KV blocks of the reference's allowed pairs ``[B, Tq, L]`` (the tail past
    the sequence counts as masked, as create_block_mask pads it)."""
    batch, q_len, kv_len = allowed.shape
    nq, nk = -(-q_len // block), -(-kv_len // block)
    padded = torch.zeros(batch, nq * block, nk * block, dtype=torch.bool)
    padded[:, :q_len, :kv_len] = allowed
    tiles = padded.reshape(batch, nq, block, nk, block).transpose(2, 3).reshape(batch, nq, nk, -1)
    full = tiles.all(-1)
    return {"partial": int((tiles.any(-1) & ~full).sum()), "full": int(full.sum()), "total": batch * nq * nk}


CASES = {
    # name: (q_len, kv_len, mask builder, is_causal)
    "causal": (40, 40, lambda: None, True),
    "not_causal": (24, 24, lambda: None, False),
    "bool_left_padding": (40, 40, lambda: hf_mask(40, 40), False),
    "float_additive": (40, 40, lambda: hf_mask(40, 40, "float"), False),
    "continue_cache": (16, 40, lambda: hf_mask(16, 40), False),  # Tq < L: queries after 24 cached tokens
    "static_cache_tail": (16, 48, lambda: hf_mask(16, 48, filled=40), False),  # unfilled positions
    "sliding_window": (40, 40, lambda: hf_mask(40, 40, window=24), False),  # rows are not prefixes
    "shared_bool_causal": (40, 40, lambda: key_mask(40), True),
    "shared_float_causal": (40, 40, lambda: key_mask(40, "float"), True),
    "float_rows_and_is_causal": (40, 40, lambda: hf_mask(40, 40, "float"), True),  # both at once
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_output_pairs_and_blocks(case):
    q_len, kv_len, build_mask, is_causal = CASES[case]
    mask = build_mask()
    q, k, v = inputs(q_len, kv_len)
    plan = make_plan()
    ref = window_prefill_reference(q, k, v, mask, is_causal, D**-0.5, plan, new_state(plan))
    result = flex_window_attention(q, k, v, mask, is_causal, D**-0.5, plan, block_size=BLOCK)
    assert result.out.shape == ref.shape == (B, HQ, q_len, D)
    assert rel_err(result.out, ref) < 1e-5

    allowed, valid, _ = psaw_window(q_len, kv_len, mask, is_causal, plan, B, "cpu")
    assert int(result.window.valid_pairs) == int(valid.sum())
    assert int(result.window.kept_pairs) == int(allowed.sum()) < int(valid.sum())
    # The BlockMask computes exactly the blocks holding an allowed pair, and runs the
    # mask_mod only in those that also hold a disallowed one.
    expected = expected_blocks(allowed, BLOCK)
    counts = block_counts(result.block_mask)
    assert (counts["partial"], counts["full"], counts["total"]) == (expected["partial"], expected["full"], expected["total"])
    skipped = 1 - (expected["partial"] + expected["full"]) / expected["total"]
    assert skipped_block_fraction(result.block_mask) == pytest.approx(skipped)


def test_rows_without_any_key_give_zero():
    # Row 0 of batch row 1 is padding (sees no key) and a whole batch row is padded out.
    mask = hf_mask(40, 40).clone()
    mask[0] = False
    q, k, v = inputs(40, 40)
    plan = make_plan()
    ref = window_prefill_reference(q, k, v, mask, False, D**-0.5, plan, new_state(plan))
    out = window_prefill_flex(q, k, v, mask, False, D**-0.5, plan, block_size=BLOCK)
    assert (out[0] == 0).all() and (out[1, :, : PAD[1]] == 0).all()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "fields",
    [
        {"layer": 2, "num_layers": 8, "psaw_start": 0, "psaw_phi": 0.3, "psaw_alpha": 2.0},
        {"layer": 7, "num_layers": 8, "psaw_start": 2, "psaw_phi": 0.1, "psaw_alpha": 0.5},  # deep: most cut
        {"sink": 0, "local": 0},  # no sinks, no local window: the cut starts at the first key
        {"sink": 12, "local": 2},  # early rows have fewer keys than sinks: nothing cut there
        {"local": 64, "budget": 80},  # the local window covers every row: the window cuts nothing
        {"layer": 1, "psaw_start": 1},  # the window's first layer: depth 0, nothing cut
    ],
    ids=["phi0.3_alpha2", "deep_phi0.1_alpha0.5", "no_sink_no_local", "sink_over_count", "local_covers_all", "depth0"],
)
def test_psaw_settings_and_edges(fields):
    plan = make_plan(**fields)
    q, k, v = inputs(48, 48, seed=3)
    for mask, is_causal in ((None, True), (hf_mask(48, 48), False)):
        ref = window_prefill_reference(q, k, v, mask, is_causal, D**-0.5, plan, new_state(plan))
        result = flex_window_attention(q, k, v, mask, is_causal, D**-0.5, plan, block_size=BLOCK)
        assert rel_err(result.out, ref) < 1e-5
        allowed, _, _ = psaw_window(48, 48, mask, is_causal, plan, B, "cpu")
        assert int(result.window.kept_pairs) == int(allowed.sum())


def test_gqa_group_sizes_and_bf16():
    plan = make_plan()
    for q_heads, kv_heads in ((4, 2), (4, 4), (4, 1)):
        q, k, v = inputs(40, 40, q_heads=q_heads, kv_heads=kv_heads, seed=5)
        ref = window_prefill_reference(q, k, v, None, True, D**-0.5, plan, new_state(plan, q_heads=q_heads, kv_heads=kv_heads))
        out = window_prefill_flex(q, k, v, None, True, D**-0.5, plan, block_size=BLOCK)
        assert rel_err(out, ref) < 1e-5
    # bf16 in, against the fp32 reference
    q, k, v = inputs(40, 40, seed=6)
    ref = window_prefill_reference(q, k, v, hf_mask(40, 40), False, D**-0.5, plan, new_state(plan))
    out = window_prefill_flex(*(x.bfloat16() for x in (q, k, v)), hf_mask(40, 40), False, D**-0.5, plan, block_size=BLOCK)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


def test_nan_fails_the_comparison():
    ref = torch.ones(2, 3)
    out = ref.clone()
    out[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        rel_err(out, ref)


def test_state_reset_and_counters_match_the_reference():
    plan = make_plan()
    q, k, v = inputs(40, 40, seed=7)
    for mask, is_causal in ((None, True), (hf_mask(40, 40), False)):
        ref_state, flex_state = new_state(plan), new_state(plan)
        ref = window_prefill_reference(q, k, v, mask, is_causal, D**-0.5, plan, ref_state)
        out = window_prefill_flex_and_reset(q, k, v, mask, is_causal, D**-0.5, plan, flex_state)
        assert rel_err(out, ref) < 1e-5
        for a, b in zip(ref_state, flex_state):
            assert torch.equal(a, b)


def test_the_op_has_a_cuda_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("prhs::window_prefill", "CUDA")


def test_bench_prefill_quick_smoke(tmp_path):
    from prhs_compile.bench.cli import main

    out = tmp_path / "prefill.json"
    assert main(["prefill", "--quick", "--no-progress", "--layers", "0.5,1.0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] and len(report["results"]) == 2
    for row in report["results"]:
        assert 0 < row["pair_fraction"] < 1 and 0 < row["kv_block_fraction"] <= 1
        assert row["rel_err"] < 1e-5
        assert all("ms" in row["methods"][name] for name in ("dense_causal", "flex", "masked_sdpa_kv"))


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled FlexAttention kernel, through the registered op


CUDA_CASES = {
    # name: (q_len, kv_len, mask builder); lengths off the 128 block grid
    "causal": (520, 520, lambda: None),
    "bool_left_padding": (520, 520, lambda: hf_mask(520, 520)),
    "float_additive": (520, 520, lambda: hf_mask(520, 520, "float")),
    "continue_cache": (200, 520, lambda: hf_mask(200, 520)),
    "sliding_window": (520, 520, lambda: hf_mask(520, 520, window=300)),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_op_matches_reference(dtype):
    """Every mask kind through ``torch.ops.prhs.window_prefill`` on CUDA, against the fp32
    reference on CPU. One test for all kinds, so one process compiles each kind once; the
    recompile limit must not send FlexAttention to its eager (dense) fallback."""
    plan = make_plan(layer=7, num_layers=8, psaw_start=2, sink=4, local=32, budget=64)
    errors, counters = {}, {}
    patch = {"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") else {}
    with torch._dynamo.config.patch(**patch):
        for case, (q_len, kv_len, build_mask) in CUDA_CASES.items():
            mask = build_mask()
            is_causal = mask is None
            q, k, v = inputs(q_len, kv_len, q_heads=8, kv_heads=2, seed=11)
            ref_state = new_state(plan, q_heads=8)
            ref = window_prefill_reference(q, k, v, mask, is_causal, D**-0.5, plan, ref_state)
            cuda_mask = None if mask is None else mask.cuda().to(dtype) if mask.is_floating_point() else mask.cuda()
            state = new_state(plan, q_heads=8, device="cuda")
            out = torch.ops.prhs.window_prefill(*(x.cuda().to(dtype) for x in (q, k, v)), cuda_mask, is_causal, D**-0.5, plan.encode(), state)
            errors[case] = rel_err(out.cpu(), ref)
            counters[case] = state[2].cpu().tolist() == ref_state[2].tolist()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert all(e < tolerance for e in errors.values()), errors
    assert all(counters.values()), counters


@pytest.mark.cuda
def test_cuda_block_mask_skips_blocks_at_depth():
    plan = make_plan(layer=31, num_layers=32, psaw_start=2, sink=4, local=64, budget=128)
    q, k, v = inputs(2048, 2048, dtype=torch.bfloat16, q_heads=8, kv_heads=2, device="cuda")
    result = flex_window_attention(q, k, v, None, True, D**-0.5, plan)
    causal = flex_window_attention(q, k, v, None, True, D**-0.5, make_plan(psaw_start=-1))
    kept = block_counts(result.block_mask)["computed"] / block_counts(causal.block_mask)["computed"]
    # The last layer cuts about half of the pairs; at 16 blocks per row the blocks on the cut's
    # edges stay (partial), so about 74% of the causal blocks are computed.
    assert kept < 0.8
    ref = window_prefill_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), None, True, D**-0.5, plan, new_state(plan, q_heads=8))
    assert rel_err(result.out.cpu(), ref) < 1e-2
