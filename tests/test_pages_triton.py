"""The two-stage retrieval kernels (``pages_triton``) against their torch references
(``pages``), on fresh random inputs; on CPU under the Triton interpreter (tiny shapes).

* the summaries kernel: the pages of a step's new keys for continuing rows, every page for
  the others, exactly the reference's min and max (fp32 and bf16, masks with padding);
* stage one's page bounds (relative error by norm, fp32 1e-5), -inf where no position may be
  retrieved;
* stage two's keys: the same candidate positions, their group mass within 1e-5, the
  windows' mass;
* whole select steps (prhs and oracle with ``retrieval="pages"``) give the reference's
  indices and state after every step.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from prhs_compile.kernels import pages  # noqa: E402
from prhs_compile.kernels.pages_triton import maintain_summaries_triton, two_stage_keys  # noqa: E402
from prhs_compile.kernels.plan import SelectPlan  # noqa: E402
from prhs_compile.kernels.select_reference import StepView, state_spec  # noqa: E402
from prhs_compile.kernels.bounds_triton import compute_bounds, mask_operand  # noqa: E402
from prhs_compile.kernels.selection import retrieval_region  # noqa: E402
from test_select_step_triton import DEVICE, _mask_for, _run  # noqa: E402

PLAN = SelectPlan(policy="oracle", layer=0, budget=12, sink=2, local=3, retrieval="pages",
                  page_size=4, candidates=1, max_cache_len=64)


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN never passes"
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _inputs(B=2, Hq=4, Hkv=2, D=16, L=64, Tq=1, lengths=(50, 37), pad=(0, 5), dtype=torch.float32,
            seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype).to(DEVICE)
    mask = _mask_for(list(lengths), list(pad), L, Tq, "bool")
    return q, k, mask


def _state(plan, B, Hq, Hkv, D, dtype):
    spec = state_spec(plan, B, Hq, Hkv, D, dtype)
    return {n: torch.full(s, f, dtype=dt, device=DEVICE) for n, (s, dt, f) in spec.items()}


def _operand_bounds(plan, q, k, mask, psaw_frac=-1.0):
    B, _, Tq, _ = q.shape
    L = k.shape[2]
    operand = mask_operand(mask, B, Tq, L)
    bounds = compute_bounds(*operand, B, Tq, L, plan.sink, plan.local, plan.budget, plan.min_context,
                            q.device, psaw_frac)
    return operand, bounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Tq", [1, 2])
def test_summaries_kernel_matches_the_reference(dtype, Tq):
    q, k, mask = _inputs(Tq=Tq, dtype=dtype)
    B, Hkv, L, D = k.shape
    st = _state(PLAN, B, q.shape[1], Hkv, D, dtype)
    # A state built two steps ago (summaries of then), row 1 not continuing (rebuilt).
    view_then = StepView(q, k, _mask_for([50 - 2, 37 - 2], [0, 5], L, Tq, "bool"), 0.25)
    pages.build_summaries(st, k, view_then.valid, PLAN)
    st[pages.PAGE_MIN][1].fill_(7.0)  # stale content a rebuild must replace
    ref = {n: t.clone() for n, t in st.items()}
    old_newest = torch.tensor([47, 34], device=DEVICE)
    continuing = torch.tensor([True, False], device=DEVICE)
    view = StepView(q, k, mask, 0.25)
    pages.maintain_summaries(ref, k, view.valid, old_newest, continuing, PLAN)
    operand, bounds = _operand_bounds(PLAN, q, k, mask)
    maintain_summaries_triton(st, k, operand, bounds, old_newest, continuing, PLAN, Tq)
    for name in (pages.PAGE_MIN, pages.PAGE_MAX):
        assert torch.equal(st[name], ref[name]), name


def test_summaries_kernel_follows_a_sliding_window():
    q, k, _ = _inputs(seed=3)
    B, Hkv, L, D = k.shape
    st = _state(PLAN, B, q.shape[1], Hkv, D, torch.float32)
    lengths, window = [40, 29], 9
    pages.build_summaries(st, k, _valid_window(lengths, window, L), PLAN)
    ref = {n: t.clone() for n, t in st.items()}
    for _ in range(6):
        old_newest = torch.tensor([n - 1 for n in lengths], device=DEVICE)
        lengths = [n + 1 for n in lengths]
        mask = _mask_for(lengths, [n - window for n in lengths], L, 1, "bool")
        continuing = torch.tensor([True, True], device=DEVICE)
        pages.maintain_summaries(ref, k, StepView(q, k, mask, 0.25).valid, old_newest, continuing, PLAN)
        operand, bounds = _operand_bounds(PLAN, q, k, mask)
        maintain_summaries_triton(st, k, operand, bounds, old_newest, continuing, PLAN, 1)
        for name in (pages.PAGE_MIN, pages.PAGE_MAX):
            assert torch.equal(st[name], ref[name]), name


def _valid_window(lengths, window, L):
    pos = torch.arange(L, device=DEVICE)
    return torch.stack([(pos >= n - window) & (pos < n) for n in lengths])


def _bounds_of_keys(keys):
    """The fp32 bounds a page-key row encodes (``pages_triton.page_keys``: a positive
    bound's bits with the sign bit set, a negative bound's bits inverted), -inf for 0."""
    bits = torch.where(keys < 0, keys ^ -(2 ** 31), ~keys).to(torch.int32)
    return torch.where(keys == 0, float("-inf"), bits.view(torch.float32))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_page_bounds_kernel_matches_the_reference(dtype, tol):
    from prhs_compile.kernels.pages_triton import page_keys

    q, k, mask = _inputs(Hq=8, Hkv=2, D=32, seed=1, dtype=dtype)
    B, Hkv, L, D = k.shape
    st = _state(PLAN, B, q.shape[1], Hkv, D, dtype)
    view = StepView(q, k, mask, D ** -0.5)
    pages.build_summaries(st, k, view.valid, PLAN)
    operand, bounds = _operand_bounds(PLAN, q, k, mask)
    active = torch.tensor([1, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    got = _bounds_of_keys(page_keys(q, st, operand, bounds, active, PLAN, L))
    region = retrieval_region(PLAN, view)
    n = L // PLAN.page_size
    pickable = region.unflatten(1, (n, PLAN.page_size)).any(-1)
    want = pages.page_bounds(q, st[pages.PAGE_MIN][:, :, :n], st[pages.PAGE_MAX][:, :, :n])
    want = want.masked_fill(~pickable[:, None, :], float("-inf"))
    on = active.bool().reshape(B, Hkv)
    assert torch.equal(got[on].isinf(), want[on].isinf())
    finite = ~want[on].isinf()
    assert rel_err(got[on][finite], want[on][finite]) < tol


def test_stage_one_chooses_the_pages_the_reference_ranks_best():
    """Stage one on the GPU: the page bounds as top-k keys (fp32 order kept, 0 where no
    position is retrievable) and the radix top-k over whole rows give the pages of
    ``ranked_topk`` over the bounds (ties to the lower page), ascending."""
    from prhs_compile.kernels.pages_triton import page_keys
    from prhs_compile.kernels.selection import ranked_topk
    from prhs_compile.kernels.topk_triton import topk_picks

    q, k, mask = _inputs(Hq=8, Hkv=2, D=32, seed=3)
    B, Hkv, L, D = k.shape
    st = _state(PLAN, B, q.shape[1], Hkv, D, torch.float32)
    view = StepView(q, k, mask, D ** -0.5)
    pages.build_summaries(st, k, view.valid, PLAN)
    operand, bounds = _operand_bounds(PLAN, q, k, mask)
    active = torch.ones(B * Hkv, dtype=torch.int32, device=DEVICE)
    keys = page_keys(q, st, operand, bounds, active, PLAN, L)
    score = _bounds_of_keys(keys)  # the order of the keys is that of these bounds
    assert torch.equal(keys == 0, score.isinf())
    for count in (1, 5, score.shape[-1]):
        chosen, _ = topk_picks(keys, bounds, count, active=active, whole_row=True)
        top = ranked_topk(score, count)
        want = torch.where(top.values > float("-inf"), top.indices, 10 ** 6).sort(-1).values
        want = torch.where(want < 10 ** 6, want, -1).to(torch.int32)
        assert torch.equal(chosen, want), count


def _spread(found, L):
    """A compact row of candidate keys (``Keys.positions``: ascending positions, -1 after
    the last) as one key per position of the cache, 0 elsewhere."""
    pos = found.positions.long()
    assert (pos[..., 1:] > pos[..., :-1])[pos[..., 1:] >= 0].all(), "positions ascend"
    assert (found.keys[pos >= L] == 0).all() and (found.keys[pos < 0] == 0).all()
    full = torch.zeros(*found.keys.shape[:2], L + 1, dtype=torch.int32, device=DEVICE)
    return full.scatter_(-1, torch.where((pos >= 0) & (pos < L), pos, L), found.keys)[..., :L]


@pytest.mark.parametrize("Tq,reusing", [(1, False), (2, False), (1, True)],
                         ids=["one-query", "two-queries", "some-slots-reuse"])
def test_candidate_keys_kernel_matches_the_reference_mass(Tq, reusing):
    q, k, mask = _inputs(Tq=Tq, seed=2)
    B, Hkv, L, D = k.shape
    scale = D ** -0.5
    st = _state(PLAN, B, q.shape[1], Hkv, D, torch.float32)
    view = StepView(q, k, mask, scale)
    pages.build_summaries(st, k, view.valid, PLAN)
    operand, bounds = _operand_bounds(PLAN, q, k, mask)
    active = torch.ones(B * Hkv, dtype=torch.int32, device=DEVICE)
    if reusing:  # slots that reuse their set: nothing of theirs is written
        active[1::2] = 0
    on = active.bool().reshape(B, Hkv)
    found = two_stage_keys(q, k, operand, bounds, scale, st, active, PLAN)
    mass, candidates = pages.two_stage_mass(PLAN, view, st, retrieval_region(PLAN, view))
    # The rows of reusing slots are left unwritten (whatever the buffers held).
    keys = _spread(found._replace(keys=torch.where(on[..., None], found.keys, 0),
                                  positions=torch.where(on[..., None], found.positions, -1)), L)
    picked = keys > 0
    assert torch.equal(picked[on], candidates[on])
    got = (keys - 1).view(torch.float32)
    assert rel_err(got[picked & on[..., None]], mass[picked & on[..., None]]) < 1e-5
    windows = view.windows(PLAN)[:, None, :]
    read = candidates | windows
    bias = view.row_bias[:, None, None]
    qg = q.float().reshape(B, Hkv, -1, Tq, D)
    logits = torch.einsum("bhgtd,bhld->bhgtl", qg, k.float()) * scale + bias
    probs = torch.softmax(logits.masked_fill(~read[:, :, None, None, :], float("-inf")), -1)
    window_mass = (probs * windows[:, :, None, None, :]).sum(dim=(2, 3, 4))
    assert rel_err(found.window_mass[on], window_mass[on]) < 1e-5
    assert (found.window_mass[~on] == 0).all()


PRHS_PAGES = SelectPlan(policy="prhs", layer=2, budget=24, sink=2, local=4, tau=0.9, num_layers=4,
                        retrieval="pages", page_size=8, candidates=2, max_cache_len=96)


@pytest.mark.parametrize("plan", [
    PRHS_PAGES,
    dataclasses.replace(PRHS_PAGES, psaw_start=1, page_size=4),
    dataclasses.replace(PRHS_PAGES, policy="oracle", page_size=16, candidates=1),
    # a dilation wider than a page: the keys are spread over the cache for the top-k
    dataclasses.replace(PRHS_PAGES, page_size=2, dilation_r=3, candidates=3),
], ids=["prhs", "prhs-psaw-p4", "oracle-p16", "prhs-dilation-past-a-page"])
def test_two_stage_select_step_matches_the_reference(plan):
    counts = _run(plan, steps=6, drift=0.1)
    assert counts[-1] > 0


def test_two_stage_select_step_with_two_query_rows_and_float_masks():
    _run(PRHS_PAGES, Tq=2, mask_kind="float", steps=4, drift=0.1)
