"""The Triton path of a whole ``select`` step (policies prhs and oracle) against the torch
reference, over sequences of decode steps that share one state.

Both paths start from the same prefill and see the same steps; after every step the indices
must be the same sets and the state the same tensors (fp32 state within 1e-5). Queries drift
slowly from step to step, so the cosine gate sometimes reuses and sometimes retrieves; random
fp32 inputs keep masses distinct, so top-k ties do not occur. On CPU the kernels run under the
Triton interpreter (tiny shapes); on CUDA the same tests run compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from prhs_compile.kernels.plan import SelectPlan  # noqa: E402
from prhs_compile.kernels.select_reference import (  # noqa: E402
    TOPK_GUESS,
    _state_dict,
    prefill_reference,
    select_reference,
    state_spec,
)
from prhs_compile.kernels.select_step_triton import select_step_triton, supports  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_STATE = ("anchor", "anchor_dropped", "key_norm", "fingerprint", "score")


def _fresh_state(plan, B, Hq, Hkv, D):
    spec = state_spec(plan, B, Hq, Hkv, D)
    return [torch.full(shape, fill, dtype=dtype, device=DEVICE) for shape, dtype, fill in spec.values()]


def _mask_for(lengths, pad, L, Tq, kind):
    """Static-cache style mask [B, 1, Tq, L]: row b holds positions [pad[b], lengths[b]),
    the last Tq of them being this step's queries (causal among themselves)."""
    B = len(lengths)
    pos = torch.arange(L)
    rows = []
    for b in range(B):
        q_pos = torch.arange(lengths[b] - Tq, lengths[b])
        allowed = (pos[None, :] >= pad[b]) & (pos[None, :] <= q_pos[:, None])
        rows.append(allowed)
    mask = torch.stack(rows)[:, None].to(DEVICE)
    if kind == "float":
        return torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def _run(plan, *, B=2, Hq=4, Hkv=2, D=16, L=96, Tq=1, prompt=(60, 44), pad=(0, 5), steps=6,
         drift=0.25, mask_kind="bool", shared_from=None, seed=0, tied_heads=False):
    """Prefill, then ``steps`` decode steps through both paths; checks indices and state after
    every step and returns the reference's retrieval counter after each. ``tied_heads``:
    KV heads 0 and 1 (and their query groups) are identical, so selections overlap fully."""
    gen = torch.Generator().manual_seed(seed)
    group = Hq // Hkv
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE)
    if tied_heads:
        k[:, 1] = k[:, 0]
    v = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE)
    scale = D ** -0.5
    ref_state = _fresh_state(plan, B, Hq, Hkv, D)
    tri_state = [t.clone() for t in ref_state]
    lengths = list(prompt)
    # Prefill (reference for both: what prhs::prefill runs on every device).
    q_pre = torch.randn(B, Hq, max(lengths), D, generator=gen).to(DEVICE)
    if tied_heads:
        q_pre[:, group:2 * group] = q_pre[:, :group]
    pre_mask = torch.zeros(B, 1, max(lengths), L, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        for i in range(max(lengths)):
            last = lengths[b] - max(lengths) + i
            pre_mask[b, 0, i, pad[b]:last + 1] = last >= pad[b]
    for state in (ref_state, tri_state):
        prefill_reference(q_pre, k, pre_mask, False, scale, plan, state)
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(DEVICE)
    retrievals = []
    for _ in range(steps):
        lengths = [n + Tq for n in lengths]
        q = q + drift * torch.randn(B, Hq, Tq, D, generator=gen).to(DEVICE)
        if tied_heads:
            q[:, group:2 * group] = q[:, :group]
        mask = _mask_for(lengths, pad, L, Tq, mask_kind)
        shared = None
        if shared_from is not None:
            shared = shared_from(B, Hkv, plan.slots)
        ref = select_reference(q, k, v, mask, scale, plan, ref_state, shared)
        assert supports(plan, q, k)
        tri = select_step_triton(q, k, mask, scale, plan, _state_dict(plan, tri_state, q, k), shared)
        assert tri.shape == ref.shape and tri.dtype == ref.dtype
        assert torch.equal(tri.sort(-1).values, ref.sort(-1).values), (tri, ref)
        _assert_same_state(plan, Hq, Hkv, D, tri_state, ref_state)
        retrievals.append(int(ref_state[2][2]))
    return retrievals


def _assert_same_state(plan, Hq, Hkv, D, tri_state, ref_state):
    for name, a, b in zip(state_spec(plan, 1, Hq, Hkv, D), tri_state, ref_state):
        if name == TOPK_GUESS:  # the top-k's hint, which only the Triton path keeps
            continue
        if name in FP32_STATE:
            assert not a.isnan().any(), name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), (name, a, b)


def _from_scratch(plan, lengths, pads, *, Hq=4, Hkv=2, D=16, L=80, seed=0):
    """Decode steps from a fresh state (no prefill seen), one query, the valid prefix of row
    b ending at ``lengths[step][b]``: same indices and state after every step. Returns the
    Triton path's state."""
    B = len(pads)
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(DEVICE)
    ref_state = _fresh_state(plan, B, Hq, Hkv, D)
    tri_state = [t.clone() for t in ref_state]
    for step_lengths in lengths:
        mask = _mask_for(step_lengths, pads, L, 1, "bool")
        ref = select_reference(q, k, k, mask, D ** -0.5, plan, ref_state)
        tri = select_step_triton(q, k, mask, D ** -0.5, plan, _state_dict(plan, tri_state, q, k))
        assert torch.equal(tri.sort(-1).values, ref.sort(-1).values)
        _assert_same_state(plan, Hq, Hkv, D, tri_state, ref_state)
    return tri_state


PRHS = SelectPlan(policy="prhs", layer=2, budget=24, sink=2, local=4, tau=0.9, num_layers=4)


def test_prhs_default_selectors_reuse_and_retrieve():
    counts = _run(PRHS, steps=8, drift=0.08)
    increments = [b - a for a, b in zip([0] + counts, counts)]
    # Some steps reuse (fewer retrievals than slots) and some retrieve.
    assert max(increments) > 0 and min(increments) < 4


@pytest.mark.parametrize("plan", [
    dataclasses.replace(PRHS, dilation_m=0),  # no dilation
    dataclasses.replace(PRHS, dilation_r=2, dilation_m=3),
    dataclasses.replace(PRHS, dilation_m=30),  # more neighbours than room: top-ranked ones win
    dataclasses.replace(PRHS, tau=1.0, max_reuse=1),  # retrieve every step
    dataclasses.replace(PRHS, delta_target=0.3),
    dataclasses.replace(PRHS, psaw_start=0, psaw_phi=0.3),  # recency window bounds retrieval
    dataclasses.replace(PRHS, min_context=50),  # the short row attends to everything
], ids=["no-dilation", "r2", "m-large", "every-step", "delta-target", "psaw", "min-context"])
def test_prhs_selector_variants(plan):
    _run(plan)


@pytest.mark.parametrize("plan", [
    PRHS,
    dataclasses.replace(PRHS, delta_target=0.3),
    SelectPlan(policy="lu_kv", layer=0, budget=20, sink=3, local=5, head_budgets="14,24"),
    SelectPlan(policy="h2o", layer=0, budget=24, sink=2, local=4, kv_len=96),
    SelectPlan(policy="hshare", layer=0, budget=24, sink=2, local=4),
], ids=["cosine", "delta", "lu_kv", "h2o", "hshare"])
def test_compiled_glue_matches_the_reference(plan, monkeypatch, caplog):
    """On CUDA the torch glue between the kernels is compiled (fullgraph): same results."""
    from prhs_compile.kernels import select_step_triton as step

    monkeypatch.setattr(step, "_COMPILE_GLUE", "always")
    with caplog.at_level("WARNING"):
        _run(plan, steps=3, drift=0.08)
    # The compiled glue really ran: no function fell back to eager.
    assert not [r.message for r in caplog.records if "runs eagerly" in r.message]


def test_compiled_glue_follows_a_growing_cache_without_recompiling_per_step(monkeypatch, caplog):
    """A DynamicCache grows by one position per step: the compiled glue must turn the cache
    length symbolic instead of recompiling for every length (which, past Dynamo's recompile
    limit, would leave it eager). With the limit at 2, five lengths still run compiled."""
    import torch._dynamo

    from prhs_compile.kernels import select_step_triton as step
    from prhs_compile.kernels.select_reference import _state_dict
    from prhs_compile.state import allocate_state

    monkeypatch.setattr(step, "_COMPILE_GLUE", "always")
    plan = dataclasses.replace(PRHS, budget=24)
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 1, 4, 2, 16
    state = allocate_state(plan, B, Hq, Hkv, D, torch.device(DEVICE))
    with caplog.at_level("WARNING"), torch._dynamo.config.patch(recompile_limit=2):
        for length in range(60, 65):
            q = torch.randn(B, Hq, 1, D, generator=gen).to(DEVICE)
            k = torch.randn(B, Hkv, length, D, generator=gen).to(DEVICE)
            mask = torch.ones(B, 1, 1, length, dtype=torch.bool, device=DEVICE)
            step.select_step_triton(q, k, mask, D ** -0.5, plan, _state_dict(plan, state, q, k))
    assert not [r.message for r in caplog.records if "runs eagerly" in r.message]


def test_glue_that_fails_to_compile_runs_eagerly(monkeypatch, caplog):
    """An Inductor failure on some shape must not fail the decode step: that function runs
    eagerly for that shape from then on, with a logged reason."""
    from prhs_compile.kernels import select_step_triton as step

    def broken(*args, **kwargs):
        raise step._COMPILE_ERRORS[-1](RuntimeError("simulated compiler failure"), None)

    def fake_compile(fn, **kwargs):
        return broken

    monkeypatch.setattr(step, "_COMPILE_GLUE", "always")
    monkeypatch.setattr(step.torch, "compile", fake_compile)
    fused = step._fused(lambda x: x + 1)
    with caplog.at_level("WARNING", logger="prhs"):
        assert fused(torch.ones(1)).item() == 2.0
        assert fused(torch.ones(1)).item() == 2.0
    assert sum("runs eagerly" in r.message for r in caplog.records) == 1


def test_prhs_float_mask_and_group_of_two_query_rows():
    _run(PRHS, mask_kind="float", Tq=2, steps=4)


def test_prhs_gqa_group_four_no_padding():
    _run(dataclasses.replace(PRHS, budget=32), Hq=8, Hkv=2, pad=(0, 0), prompt=(70, 40))


def test_prhs_follower_takes_shared_selection():
    def shared(B, Hkv, slots):
        return torch.arange(slots, dtype=torch.int32, device=DEVICE).expand(B, Hkv, slots).contiguous()

    _run(dataclasses.replace(PRHS, share_from=1), shared_from=shared, steps=2)


@pytest.mark.parametrize("policy", ["sage_kv", "snapkv", "streaming"])
def test_other_policies_decode_on_the_triton_path(policy):
    _run(SelectPlan(policy=policy, layer=0, budget=20, sink=3, local=5), steps=3)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_quest_pages_on_the_triton_path(mask_kind):
    """Budget room for two pages of 16 among six: the page bounds decide which."""
    plan = SelectPlan(policy="quest", layer=2, budget=48, sink=3, local=5)
    _run(plan, steps=3, mask_kind=mask_kind)
    _run(plan, steps=2, Tq=2, Hq=8, Hkv=2, seed=5)


def test_quest_falls_back_to_the_reference_when_its_kernel_cannot_compile(monkeypatch, caplog):
    """The page kernels failing to compile must not fail the step: the reference runs, once
    logged, and the result is the reference's."""
    from prhs_compile.kernels import ops, pages_triton

    monkeypatch.setattr(pages_triton, "unavailable", "CompilationError: simulated")
    monkeypatch.setattr(ops, "_logged_fallbacks", set())
    plan = SelectPlan(policy="quest", layer=2, budget=48, sink=3, local=5)
    B, Hq, Hkv, D, L = 1, 4, 2, 16, 96
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(DEVICE)
    mask = _mask_for([90], [0], L, 1, "bool")
    state, ref_state = _fresh_state(plan, B, Hq, Hkv, D), _fresh_state(plan, B, Hq, Hkv, D)
    with caplog.at_level("WARNING", logger="prhs"):
        out = ops._select_cuda(q, k, k, mask, D ** -0.5, plan.encode(), state)
        ops._select_cuda(q, k, k, mask, D ** -0.5, plan.encode(), [t.clone() for t in state])
    ref = select_reference(q, k, k, mask, D ** -0.5, plan, ref_state)
    assert torch.equal(out, ref)
    assert sum("page kernels unavailable" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_h2o_accumulates_on_the_triton_path(mask_kind):
    """Scores seeded by the first decode step, then accumulated over the kept set: the
    state (``score``) and the selections match the reference step after step."""
    plan = SelectPlan(policy="h2o", layer=0, budget=24, sink=2, local=4, kv_len=96)
    _run(plan, steps=4, mask_kind=mask_kind)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_hshare_on_the_triton_path(mask_kind):
    """Label channels from the prefill, reuse every second step, head sharing; and a row
    whose prefill the state never saw picks its labels at decode."""
    plan = SelectPlan(policy="hshare", layer=0, budget=24, sink=2, local=4)
    _run(plan, steps=4, mask_kind=mask_kind, D=32)
    _run(plan, steps=3, Hq=8, Hkv=4, D=32, seed=7)


def test_hshare_head_sharing_on_the_triton_path():
    """Two identical KV heads: the second takes the first's set (head sharing) and its
    retrievals are not counted."""
    plan = SelectPlan(policy="hshare", layer=0, budget=24, sink=2, local=4)
    counts = _run(plan, steps=4, D=32, tied_heads=True)
    assert counts[-1] == 2 * 2  # two retrieving steps x two rows, head 1 copying head 0


def test_hshare_without_a_prefill_chooses_labels_at_decode():
    plan = SelectPlan(policy="hshare", layer=0, budget=24, sink=2, local=4)
    # 60: a jump, labels chosen again
    _from_scratch(plan, [(n, n - 3) for n in (50, 51, 52, 60)], pads=(0, 2), D=32, seed=8)


def test_one_shot_policy_retrieves_once_without_a_prefill_of_its_sequence():
    """A jump to an unrelated position: SAGE-KV makes one selection from the decode query."""
    plan = SelectPlan(policy="sage_kv", layer=0, budget=20, sink=3, local=5)
    state = _from_scratch(plan, [(50,), (51,), (52,)], pads=(0,), seed=4)
    assert int(state[2][2]) == 2  # one retrieval per KV head


@pytest.mark.parametrize("plan", [
    SelectPlan(policy="lu_kv", layer=0, budget=20, sink=3, local=5, head_budgets="14,24"),
    SelectPlan(policy="oracle", layer=0, budget=20, sink=3, local=5, head_budgets="24,12"),
    dataclasses.replace(PRHS, head_budgets="16,28"),
    dataclasses.replace(PRHS, head_budgets="16,28", delta_target=0.3),
    dataclasses.replace(PRHS, head_budgets="30,12", dilation_m=8),
], ids=["lu_kv", "oracle-caps", "prhs-caps", "prhs-caps-delta", "prhs-caps-many-neighbours"])
def test_per_head_budgets_on_the_triton_path(plan):
    _run(plan, steps=3, drift=0.08)


def test_oracle_step():
    _run(SelectPlan(policy="oracle", layer=0, budget=20, sink=3, local=5), steps=3)


def test_new_sequence_resets():
    """A position jump (new prompt) must not reuse the old selection."""
    state = _from_scratch(PRHS, [(50,), (51,), (70,)], pads=(0,), seed=3)  # 70: a jump
    assert int(state[2][3]) == 2  # resets: first call and the jump


def test_a_fallback_to_the_reference_is_logged_once_per_layer_with_its_reason(monkeypatch, caplog):
    from prhs_compile.kernels import ops

    monkeypatch.setattr(ops, "_logged_fallbacks", set())
    B, Hq, Hkv, D, L = 1, 4, 2, 16, 64
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(DEVICE)
    mask = _mask_for([60], [0], L, 1, "bool")
    with caplog.at_level("WARNING", logger="prhs"):
        for layer in (0, 0, 1):
            plan = dataclasses.replace(PRHS, layer=layer, verify=True)
            state = _fresh_state(plan, B, Hq, Hkv, D)
            ops._select_cuda(q, k, k, mask, D ** -0.5, plan.encode(), state)
    messages = [r.message for r in caplog.records if "torch reference" in r.message]
    assert len(messages) == 2 and all("verify=True" in m for m in messages)


def test_unsupported_plans_fall_back():
    q = torch.zeros(1, 2, 1, 8)
    assert not supports(dataclasses.replace(PRHS, verify=True), q, q)
    assert not supports(SelectPlan(policy="sage_kv", layer=0, budget=8, head_budgets="8,8"), q, q)
    assert not supports(SelectPlan(policy="dense", layer=0, budget=8), q, q)  # no selection to speed up
    assert not supports(SelectPlan(policy="h2o", layer=0, budget=8), q.half(), q)  # mixed dtypes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_of_the_prhs_step_at_llama_shape():
    """The registered op runs the Triton step on CUDA, at Llama-3-8B attention shape, and a
    CUDA graph of it replays the same selections (no host sync, no allocation outside the
    graph's pool)."""
    import prhs_compile  # noqa: F401  (registers the ops)

    B, Hq, Hkv, D, L = 2, 32, 8, 128, 8192
    plan = SelectPlan(policy="prhs", layer=0, budget=1024, sink=4, local=64)
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
    mask[1, ..., 6000:] = False
    state = _fresh_state(plan, B, Hq, Hkv, D)
    text = plan.encode()
    eager_state = [t.clone() for t in state]
    eager = torch.ops.prhs.select(q, k, k, mask, D ** -0.5, text, eager_state)
    ref_state = [t.clone() for t in state]
    ref = select_reference(q, k, k, mask, D ** -0.5, plan, ref_state)
    assert torch.equal(eager.sort(-1).values, ref.sort(-1).values)

    static_state = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        torch.ops.prhs.select(q, k, k, mask, D ** -0.5, text, [t.clone() for t in state])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.prhs.select(q, k, k, mask, D ** -0.5, text, static_state)
    for t, s in zip(static_state, state):
        t.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    for a, b in zip(static_state, eager_state):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_channel_abs_sums_kernel_against_torch(dtype, tol):
    """HShare's label-channel kernel: sum of |k| over the valid positions, active slots only."""
    from prhs_compile.kernels.select_hshare_triton import channel_abs_sums
    from prhs_compile.kernels.bounds_triton import mask_operand, select_bounds

    B, Hkv, L, D = 2, 3, 200, 32
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE, dtype)
    mask = _mask_for([150, 90], [0, 7], L, 1, "bool")
    active = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)
    q = torch.zeros(B, Hkv, 1, D, device=DEVICE, dtype=dtype)
    got = channel_abs_sums(k, mask_operand(mask, B, 1, L), select_bounds(q, k, mask), active, 1)
    valid = mask[:, 0, 0, :, None, None].permute(0, 2, 1, 3)  # [B, 1, L, 1]
    want = (k.float().abs() * valid).sum(2) * active[..., None]
    assert not got.isnan().any()
    assert (got - want).norm() / want.norm() < tol
