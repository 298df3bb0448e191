"""The select engine's retrieval kernels against their torch references: the one-pass
group-mass keys (``retrieve_triton``) and the radix top-k with dilation (``topk_triton``).

The top-k must give exactly the reference's set (``selection.dilate_and_pick``) on the same
masses, ties included (both break them by the lower position): the masses are drawn afresh
for every case, some of them quantised so that ties are common. On CPU the kernels run
under the Triton interpreter (tiny shapes).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from prhs_compile.kernels.plan import SelectPlan  # noqa: E402
from prhs_compile.kernels.retrieve_triton import retrieve_keys  # noqa: E402
from prhs_compile.kernels.select_reference import StepView  # noqa: E402
from prhs_compile.kernels.bounds_triton import mask_operand, select_bounds  # noqa: E402
from prhs_compile.kernels.selection import dilate_and_pick, keep_to_indices  # noqa: E402
from prhs_compile.kernels.topk_triton import topk_picks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _middle_bounds(mid_lo, mid_hi, L):
    """Bounds [B, 8] whose middle is [mid_lo[b], mid_hi[b]) (see bounds_triton.compute_bounds)."""
    rows = [[0, L, L, lo, hi, 0, 0, 0] for lo, hi in zip(mid_lo, mid_hi)]
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def _keys_of(mass, region):
    return torch.where(region[:, None, :], mass.view(torch.int32) + 1, 0).to(torch.int32)


def _assert_picked_mass(picked, mass, ref):
    """The summed mass the top-k reports is that of the reference's picks."""
    want = torch.where(ref >= 0, mass.gather(-1, ref.clamp_min(0).long()), 0.0).sum(-1)
    torch.testing.assert_close(picked, want, rtol=1e-5, atol=1e-6)


def _guess_problem(seed, B, L, hole, tied, k, m, r, H=2):
    """Masses (cubed uniforms; 16 levels, so ties everywhere, when ``tied``) over rows whose
    middle is [3, L - 2), with the positions ``hole`` masked: (mass, keys, the middle's
    valid region, bounds, the reference's picks with dilation m, r)."""
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(B, H, L, generator=gen) ** 3
    if tied:
        mass = (mass * 16).floor() / 16
    mass = mass.to(DEVICE)
    region = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    region[:, hole[0]:hole[1]] = False
    keys = _keys_of(mass, region)
    bounds = _middle_bounds([3] * B, [L - 2] * B, L)
    region &= (torch.arange(L, device=DEVICE) >= 3) & (torch.arange(L, device=DEVICE) < L - 2)
    plan = SelectPlan(policy="prhs", layer=0, budget=k, dilation_m=m, dilation_r=r)
    ref = keep_to_indices(dilate_and_pick(mass, region, plan, dilate=m > 0), k)
    return mass, keys, region, bounds, ref


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k,m,r", [(40, 13, 1), (40, 0, 0), (40, 30, 2), (500, 5, 1), (1, 1, 1)])
def test_topk_is_the_references_set(tied, k, m, r):
    """(k=40, m=30, r=2: the neighbours alone fill the budget.)"""
    gen = torch.Generator().manual_seed(k * 7 + m + r + tied)
    B, H, L = 2, 3, 300
    mass = torch.rand(B, H, L, generator=gen)
    if tied:
        mass = (mass * 8).floor() / 8  # eight distinct values: ties at every cut-off
    mass = mass.to(DEVICE)
    mid_lo, mid_hi = [5, 11], [280, 200]
    region = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        region[b, mid_lo[b]:mid_hi[b]] = True
    region[:, 50:60] = False  # masked positions inside the middle
    plan = SelectPlan(policy="prhs", layer=0, budget=k, dilation_m=m, dilation_r=r)
    ref = keep_to_indices(dilate_and_pick(mass, region, plan, dilate=m > 0), k)
    out, picked = topk_picks(_keys_of(mass, region), _middle_bounds(mid_lo, mid_hi, L),
                             min(k, L), dilation_m=m, dilation_r=r, width=k)
    assert torch.equal(out, ref)
    _assert_picked_mass(picked, mass, ref)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("max_parties", [None, 1, 3])
@pytest.mark.parametrize("tags_from_share", [None, 0])
def test_topk_over_a_long_row(tied, max_parties, tags_from_share, monkeypatch):
    """Rows of several blocks (on a GPU several programs share a slot and meet at barriers;
    ``CONFIG["max_parties"]`` caps how many, which leaves the set as it is; the interpreter
    gives each slot one program). The dilating case runs the final compaction both ways:
    each program counting its share's picks (the default at these short shares) and, with
    ``tags_from_share=0``, from the candidates' tags."""
    import prhs_compile.kernels.topk_triton as tk

    if max_parties is not None:
        monkeypatch.setitem(tk.CONFIG, "max_parties", max_parties)
    if tags_from_share is not None:
        monkeypatch.setitem(tk.CONFIG, "tags_from_share", tags_from_share)
    gen = torch.Generator().manual_seed(11 + tied)
    B, H, L, k = 1, 2, 9000, 300
    mass = torch.rand(B, H, L, generator=gen) ** 4
    if tied:
        mass = (mass * 64).floor() / 64
    mass = mass.to(DEVICE)
    region = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    region[:, :7] = False
    region[:, 5000:5100] = False
    for m, r in [(0, 0), (100, 1)]:
        plan = SelectPlan(policy="prhs", layer=0, budget=k, dilation_m=m, dilation_r=r)
        out, picked = topk_picks(_keys_of(mass, region), _middle_bounds([7], [L - 3], L), k,
                                 dilation_m=m, dilation_r=r, width=k)
        ref = keep_to_indices(dilate_and_pick(mass, region & (torch.arange(L, device=DEVICE) < L - 3),
                                              plan, dilate=m > 0), k)
        assert torch.equal(out, ref)
        _assert_picked_mass(picked, mass, ref)


@pytest.mark.parametrize("m,r", [(0, 0), (20, 1)])
def test_topk_of_short_middles_in_a_long_row(m, r):
    """A row of five blocks whose middles are far shorter: on a GPU the slot's row is still
    split among five programs, most of whose shares are empty, and they meet at the same
    barriers (the interpreter gives each slot one program)."""
    gen = torch.Generator().manual_seed(23 + m)
    B, H, L, k = 2, 2, 5 * 2048, 60
    mass = (torch.rand(B, H, L, generator=gen) ** 4).to(DEVICE)
    mid_lo, mid_hi = [100, 6000], [2500, 6150]
    region = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        region[b, mid_lo[b]:mid_hi[b]] = True
    plan = SelectPlan(policy="prhs", layer=0, budget=k, dilation_m=m, dilation_r=r)
    ref = keep_to_indices(dilate_and_pick(mass, region, plan, dilate=m > 0), k)
    out, picked = topk_picks(_keys_of(mass, region), _middle_bounds(mid_lo, mid_hi, L), k,
                             dilation_m=m, dilation_r=r, width=k)
    assert torch.equal(out, ref)
    _assert_picked_mass(picked, mass, ref)


def test_topk_refuses_a_party_cap_out_of_range(monkeypatch):
    import prhs_compile.kernels.topk_triton as tk

    keys = torch.ones(1, 1, 16, dtype=torch.int32, device=DEVICE)
    monkeypatch.setitem(tk.CONFIG, "max_parties", 0)
    with pytest.raises(ValueError, match=r"max_parties=0: must be in \[1, 256\]"):
        topk_picks(keys, _middle_bounds([0], [16], 16), 4)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("m,r", [(0, 0), (13, 1)])
def test_a_guessed_threshold_gives_the_same_set_whether_it_holds_or_not(tied, m, r):
    """The guess (a threshold per slot carried between calls) only changes how the set is
    found: a guess that holds the needed keys, one too high, one too low (too many keys at
    or above it), none, and the guess a call leaves behind all give the reference's set."""
    B, H, L, k = 2, 2, 700, 40
    mass, keys, region, bounds, ref = _guess_problem(5 + 2 * tied + m, B, L, (300, 320), tied,
                                                     k, m, r)
    middle_keys = torch.where(region[:, None, :], keys, 0)
    ranked = middle_keys.sort(-1, descending=True).values  # [B, H, L]

    def at_rank(rank):  # a guess with ``rank`` keys at or above it (fewer with ties)
        return ranked[..., rank - 1].contiguous()

    top = max(k, m)
    guesses = {"none": torch.zeros(B, H, dtype=torch.int32, device=DEVICE),
               "holds": at_rank(top + top // 2), "exact": at_rank(top),
               "too high": at_rank(top // 2), "too low": at_rank(min(5 * top, L - 30))}
    for name, given in guesses.items():
        guess = given.clone()
        out, picked = topk_picks(keys.clone(), bounds, k, dilation_m=m, dilation_r=r, width=k,
                                 guess=guess)
        assert torch.equal(out, ref), name
        if name in ("holds", "exact") and not tied:
            assert torch.equal(guess, given)  # it held: taken, and kept for the next call
        _assert_picked_mass(picked, mass, ref)
        # what the call leaves: a guess the next call takes (the keys at or above it hold
        # the needed ones and fit twice their number)
        n_ge = (middle_keys.long() >= guess.long()[..., None]).sum(-1)  # keys are positive
        assert ((n_ge >= top) & (n_ge <= 2 * top)).all(), (name, n_ge)
        again, _ = topk_picks(keys.clone(), bounds, k, dilation_m=m, dilation_r=r, width=k, guess=guess)
        assert torch.equal(again, ref), name


@pytest.mark.parametrize("config", [{"tags_from_share": 0}])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("m,r", [(0, 0), (13, 1)])
def test_topk_configurations_pick_the_references_set(config, tied, m, r, monkeypatch):
    """The choices of ``CONFIG`` that change how the candidates are thresholded (tagging
    them whatever the share's length, where the default counts each party's picks in the
    row) change only the time: the
    reference's set and mass, with the guess missing (first call) and holding (second)."""
    import prhs_compile.kernels.topk_triton as tk

    for name, value in config.items():
        monkeypatch.setitem(tk.CONFIG, name, value)
    B, H, L, k = 1, 2, 500, 40
    mass, keys, _, bounds, ref = _guess_problem(41 + 2 * tied + m, B, L, (200, 220), tied, k,
                                                m, r)
    guess = torch.zeros(B, H, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        out, picked = topk_picks(keys.clone(), bounds, k, dilation_m=m, dilation_r=r, width=k,
                                 guess=guess)
        assert torch.equal(out, ref)
        _assert_picked_mass(picked, mass, ref)


@pytest.mark.parametrize("spread", ["narrow", "equal"])
@pytest.mark.parametrize("m,r", [(0, 0), (13, 1)])
@pytest.mark.parametrize("guessed", [False, True])
def test_topk_of_keys_that_share_their_leading_digits(spread, m, r, guessed):
    """Candidates whose keys agree in their leading digits (masses within a few thousandths
    of each other, or all equal: ties everywhere) take those digits from the largest key
    without a histogram round: still the reference's set. (Without dilation or guess the
    row's radix select runs instead, on the same keys.)"""
    gen = torch.Generator().manual_seed(17 + m + guessed)
    B, H, L, k = 1, 3, 400, 40
    if spread == "narrow":
        mass = 0.25 + torch.rand(B, H, L, generator=gen) * 1e-3
    else:
        mass = torch.full((B, H, L), 0.125)
    mass = mass.to(DEVICE)
    region = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    region[:, 100:130] = False
    bounds = _middle_bounds([2], [L - 2], L)
    region &= (torch.arange(L, device=DEVICE) >= 2) & (torch.arange(L, device=DEVICE) < L - 2)
    plan = SelectPlan(policy="prhs", layer=0, budget=k, dilation_m=m, dilation_r=r)
    ref = keep_to_indices(dilate_and_pick(mass, region, plan, dilate=m > 0), k)
    guess = torch.zeros(B, H, dtype=torch.int32, device=DEVICE) if guessed else None
    for _ in range(2 if guessed else 1):  # with a guess: the second call takes the first's
        out, picked = topk_picks(_keys_of(mass, region), bounds, k, dilation_m=m,
                                 dilation_r=r, width=k, guess=guess)
        assert torch.equal(out, ref)
        _assert_picked_mass(picked, mass, ref)


def test_topk_skips_inactive_slots_and_caps_each_head():
    gen = torch.Generator().manual_seed(3)
    B, H, L, k = 2, 2, 128, 20
    mass = torch.rand(B, H, L, generator=gen).to(DEVICE)
    region = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    active = torch.tensor([[True, False], [False, True]], device=DEVICE)
    caps = torch.tensor([12, 20], device=DEVICE)
    out = torch.full((B, H, k), -7, dtype=torch.int32, device=DEVICE)
    topk_picks(_keys_of(mass, region), _middle_bounds([0, 0], [L, L], L), k, out=out,
               active=active, caps=caps, width=k)
    plan = SelectPlan(policy="lu_kv", layer=0, budget=k, head_budgets="12,20")
    ref = keep_to_indices(dilate_and_pick(mass, region, plan, dilate=False), k)
    assert torch.equal(out[active], ref[active])
    assert (out[~active] == -7).all()  # an inactive slot's row is left as it was


def _compact_rows(keys, pages, page):
    """The keys of the positions of ``pages`` (ascending per slot, -1 after the last) as a
    compact row, and the positions of its columns (``topk_picks(positions=...)``)."""
    pos = pages[..., None] * page + torch.arange(page, device=DEVICE)
    pos = torch.where(pages[..., None] >= 0, pos, -1).flatten(-2)
    L = keys.shape[-1]
    ok = (pos >= 0) & (pos < L)
    compact = torch.where(ok, keys.gather(-1, pos.clamp(0, L - 1).long()), 0)
    return compact.to(torch.int32).contiguous(), pos.to(torch.int32).contiguous()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("m,r,page,guessed", [(0, 0, 8, False), (13, 1, 8, False), (9, 2, 2, False),
                                              (13, 1, 8, True), (11, 4, 4, True)])
def test_topk_over_a_compact_row_of_candidates_is_the_references_set(tied, m, r, page, guessed):
    """A two-stage retrieval's keys: a compact row of the chosen pages' positions (gaps of
    whole pages between them; the last page past the cache). The picks, written as
    positions, are the reference's over those candidates, dilation (which must not reach
    across a gap) and ties included; with or without a guessed threshold."""
    gen = torch.Generator().manual_seed(31 * page + m + r + tied)
    B, H, L, k = 2, 2, 203, 30
    mass = torch.rand(B, H, L, generator=gen) ** 2
    if tied:
        mass = (mass * 8).floor() / 8
    mass = mass.to(DEVICE)
    mid_lo, mid_hi = [4, 9], [L - 5, 180]
    region = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        region[b, mid_lo[b]:mid_hi[b]] = True
    region[:, 60:63] = False
    n_pages = -(-L // page)
    chosen = torch.stack([torch.randperm(n_pages, generator=gen)[: n_pages // 2]
                          for _ in range(B * H)]).reshape(B, H, -1).sort(-1).values
    chosen[0, 1, -3:] = -1  # a slot with fewer pages
    chosen[1, 0, -1] = n_pages - 1  # the page that runs past the cache
    chosen[1, 0] = chosen[1, 0].sort().values
    candidates = torch.zeros(B, H, L + page, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        for h in range(H):
            for p in chosen[b, h].tolist():
                if p >= 0:
                    candidates[b, h, p * page:(p + 1) * page] = True
    pickable = candidates[..., :L] & region[:, None, :]
    plan = SelectPlan(policy="prhs", layer=0, budget=k, dilation_m=m, dilation_r=r)
    ref = keep_to_indices(dilate_and_pick(mass, pickable, plan, dilate=m > 0), k)
    full = torch.where(pickable, mass.view(torch.int32) + 1, 0).to(torch.int32)
    compact, positions = _compact_rows(full, chosen.to(DEVICE), page)
    guess = torch.zeros(B * H, dtype=torch.int32, device=DEVICE) if guessed else None
    for call in range(2 if guessed else 1):  # the second call starts from the guess the first left
        out, picked = topk_picks(compact.clone(), _middle_bounds(mid_lo, mid_hi, L), k,
                                 dilation_m=m, dilation_r=r, width=k, guess=guess,
                                 positions=positions)
        assert torch.equal(out, ref), f"call {call}"
        _assert_picked_mass(picked, mass, ref)


def test_topk_refuses_positions_of_another_shape():
    keys = torch.ones(1, 1, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="positions"):
        topk_picks(keys, _middle_bounds([0], [8], 8), 2, positions=keys[..., :4])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("G,Tq", [(2, 1), (4, 3)])
def test_one_pass_keys_are_the_group_mass(dtype, tol, G, Tq):
    """One read of K gives the middle's group mass (as keys), the windows' mass and the
    largest key norm, for the active slots only."""
    gen = torch.Generator().manual_seed(G * 10 + Tq)
    B, Hkv, L, D = 2, 3, 90, 32
    sink, local, budget = 3, 5, 24
    q = torch.randn(B, Hkv * G, Tq, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE, dtype)
    mask = torch.zeros(B, 1, Tq, L, dtype=torch.bool)
    for b, (start, length) in enumerate([(0, 80), (6, 90)]):
        for t in range(Tq):
            mask[b, 0, t, start:length - (Tq - 1 - t)] = True
    mask = mask.to(DEVICE)
    active = torch.tensor([[True, False, True], [False, True, True]], device=DEVICE)
    bounds = select_bounds(q, k, mask, budget=budget, sink=sink, local=local)
    found = retrieve_keys(q, k, mask_operand(mask, B, Tq, L), bounds, 0.3, active,
                          want_norm=True, want_window_mass=True, num_splits=3)
    view = StepView(q.double(), k.double(), mask, 0.3)
    ref = view.group_mass().float()
    pos = torch.arange(L, device=DEVICE)
    inside = (pos >= bounds[:, 3:4].long()) & (pos < bounds[:, 4:5].long())
    middle = (view.valid & inside)[:, None, :].expand(-1, Hkv, -1)
    windows = (view.valid & ~inside)[:, None, :].expand(-1, Hkv, -1)
    # Only the middle's span [max(lo, sink_end), min(hi, local_start)) is written.
    lo, hi = bounds[:, 0:1].long(), bounds[:, 1:2].long()
    span = (pos >= torch.maximum(lo, bounds[:, 3:4].long())) & (pos < torch.minimum(hi, bounds[:, 4:5].long()))
    span = span[:, None, :].expand(-1, Hkv, -1)[active]
    keys = torch.where(span, found.keys[active], 0)
    assert torch.equal(keys != 0, middle[active])  # candidates: exactly the valid middle
    got = torch.where(keys != 0, keys - 1, 0).view(torch.float32).double()
    assert not got.isnan().any()
    want = torch.where(middle, ref, 0.0)[active].double()
    assert (got - want).norm() / want.norm() <= tol
    want_window = torch.where(windows, ref, 0.0).sum(-1)[active].double()
    assert (found.window_mass[active].double() - want_window).norm() / want_window.norm() <= tol
    norms = k.float().norm(dim=-1).masked_fill(~view.valid[:, None, :], 0.0).amax(-1)[active]
    assert (found.key_norm[active] - norms).norm() / norms.norm() <= tol


@pytest.mark.parametrize("dilate", [False, True])
def test_pending_keys_pick_what_the_keys_pick(dilate):
    """``topk_picks(pending=...)`` forms the keys from the K pass's scores itself (no keys
    launch): the same picks, picked mass and window mass as ranking the keys of
    ``retrieve_keys`` (the two-kernel path), for active slots of rows with left padding."""
    gen = torch.Generator().manual_seed(11 + dilate)
    B, Hkv, G, L, D = 2, 3, 4, 120, 32
    sink, local, budget = 2, 6, 40
    q = torch.randn(B, Hkv * G, 1, D, generator=gen).to(DEVICE)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE)
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., :100] = True
    mask[1, ..., 9:] = True
    mask = mask.to(DEVICE)
    active = torch.tensor([[True, True, False], [False, True, True]], device=DEVICE)
    bounds = select_bounds(q, k, mask, budget=budget, sink=sink, local=local)
    operand = mask_operand(mask, B, 1, L)
    middle = budget - sink - local
    options = dict(active=active, width=middle, dilation_m=8 if dilate else 0,
                   dilation_r=1 if dilate else 0)
    plain = retrieve_keys(q, k, operand, bounds, 0.3, active, want_window_mass=True, num_splits=3)
    want, want_mass = topk_picks(plain.keys, bounds, middle, **options)
    deferred = retrieve_keys(q, k, operand, bounds, 0.3, active, want_window_mass=True,
                             num_splits=3, defer=True)
    got, got_mass = topk_picks(deferred.keys, bounds, middle, pending=deferred.pending, **options)
    assert torch.equal(got[active], want[active])
    assert torch.allclose(got_mass[active], want_mass[active], rtol=1e-5)
    assert torch.allclose(deferred.window_mass[active], plain.window_mass[active], rtol=1e-5)


def test_pending_keys_refuse_compact_rows():
    """Pending keys are one per cached position: no compact candidate rows, no whole rows."""
    q = torch.randn(1, 2, 1, 16).to(DEVICE)
    k = torch.randn(1, 1, 32, 16).to(DEVICE)
    mask = torch.ones(1, 1, 1, 32, dtype=torch.bool, device=DEVICE)
    bounds = select_bounds(q, k, mask, budget=8, sink=1, local=2)
    found = retrieve_keys(q, k, mask_operand(mask, 1, 1, 32), bounds, 0.3, defer=True)
    with pytest.raises(ValueError, match="pending"):
        topk_picks(found.keys, bounds, 4, pending=found.pending, whole_row=True)
    with pytest.raises(ValueError, match="pending"):
        topk_picks(found.keys, bounds, 4, pending=found.pending,
                   positions=torch.zeros_like(found.keys))


def test_topk_writes_the_dropped_mass_of_active_slots_only():
    """``dropped=(out, window_mass, rows)``: 1 - (window + picked mass) / rows, clamped at
    0, for active slots; other slots' entries stay; a bad tensor is refused by name."""
    gen = torch.Generator().manual_seed(21)
    B, H, L, k = 2, 2, 64, 8
    mass = torch.rand(B, H, L, generator=gen).to(DEVICE)
    region = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    bounds = _middle_bounds([0, 0], [L, L], L)
    active = torch.tensor([[1, 0], [1, 1]], dtype=torch.int32, device=DEVICE)
    window = torch.tensor([[0.5, 0.1], [9.0, 0.25]], device=DEVICE)
    out = torch.full((B, H), -7.0, device=DEVICE)
    _, picked = topk_picks(_keys_of(mass, region), bounds, k, active=active,
                           dropped=(out, window, 4))
    want = (1.0 - (window + picked) / 4).clamp_min(0.0)
    on = active.bool()
    torch.testing.assert_close(out[on], want[on], rtol=0, atol=0)
    assert out[1, 0] == 0.0  # window mass 9 of 4 rows: clamped
    assert out[0, 1] == -7.0  # inactive: untouched
    with pytest.raises(ValueError, match="dropped: window_mass must be contiguous fp32"):
        topk_picks(_keys_of(mass, region), bounds, k, dropped=(out, window.double(), 4))
    with pytest.raises(ValueError, match="rows=0"):
        topk_picks(_keys_of(mass, region), bounds, k, dropped=(out, window, 0))


def test_topk_timeline_needs_a_cuda_buffer_of_one_row_per_program():
    """``timeline=`` takes ``timeline_buffer``'s int64 rows (one per program, CUDA only)."""
    keys = torch.ones(1, 1, 16, dtype=torch.int32, device=DEVICE)
    wrong = torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="timeline must be an int64 CUDA tensor of shape"):
        topk_picks(keys, _middle_bounds([0], [16], 16), 4, timeline=wrong)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the global timer is the GPU's")
def test_topk_timeline_stamps_in_order_and_leaves_the_picks_as_they_are():
    """With a timeline, every program that takes a slot stamps its checkpoints in order, and
    the picks are those of the launch without it."""
    from prhs_compile.kernels.topk_triton import timeline_buffer

    gen = torch.Generator().manual_seed(5)
    B, H, L, k = 1, 2, 9000, 300
    mass = (torch.rand(B, H, L, generator=gen) ** 4).to(DEVICE)
    region = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    bounds = _middle_bounds([7], [L - 3], L)
    want, _ = topk_picks(_keys_of(mass, region), bounds, k, dilation_m=100, dilation_r=1, width=k)
    stamps = timeline_buffer(mass.device)
    got, _ = topk_picks(_keys_of(mass, region), bounds, k, dilation_m=100, dilation_r=1, width=k,
                        timeline=stamps)
    assert torch.equal(got, want)
    worked = stamps[stamps[:, 2] > 0].cpu()
    checked = worked[:, :8]  # every party: 0-7 in order
    assert bool((checked[:, 1:] >= checked[:, :-1]).all())
    party0 = worked[worked[:, 8] > 0]  # party 0 of each slot also stamps 8-11, within 3 -> 4
    assert len(party0) == H
    checked = party0[:, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7]]
    assert bool((checked[:, 1:] >= checked[:, :-1]).all())
