"""Tests of the Triton oracle retrieval (``select`` with policy "oracle") against the torch
reference, and a smoke test of ``prhs-bench latency --quick``.

On a machine without CUDA the kernels run under the Triton interpreter, which must be chosen
before triton is imported. Shapes stay tiny there; the ``cuda`` tests use realistic ones.
Inputs are random fp32 (or bf16) with distinct masses, so the oracle's top-k has no near
ties at its cut-off (``_check_no_near_ties`` guards that) and the selected sets must match
exactly; on the large GPU shapes, where a few near ties are unavoidable, sets may differ only
at positions whose mass is within a tolerance of the cut-off.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from prhs_compile.kernels import bounds_triton as bt  # noqa: E402
from prhs_compile.kernels import kpass_triton as kp  # noqa: E402
from prhs_compile.kernels.plan import SelectPlan  # noqa: E402
from prhs_compile.kernels.select_reference import StepView, select_reference, state_spec  # noqa: E402
from prhs_compile.kernels.select_step_triton import oracle_select_triton  # noqa: E402
from prhs_compile.kernels.bounds_triton import select_bounds  # noqa: E402
from prhs_compile.kernels.kpass_triton import oracle_group_mass_triton  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def rand(shape, gen, dtype=torch.float32, device=DEVICE, std=1.0):
    return (std * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


def reference_select(q, k, mask, scale, budget, sink, local, min_context):
    """``select_reference`` for a fresh state of an oracle plan."""
    plan = SelectPlan(policy="oracle", layer=0, budget=budget, sink=sink, local=local,
                      min_context=min_context)
    B, Hq, _, D = q.shape
    spec = state_spec(plan, B, Hq, k.shape[1], D)
    state = [torch.full(shape, fill, dtype=dtype, device=q.device)
             for shape, dtype, fill in spec.values()]
    mask = _ref_mask(mask, k.shape[2])
    # The reference grew a ``v`` argument (for its verify mode); pass k there if it has one.
    params = inspect.signature(select_reference).parameters
    head = (q, k, k, mask) if "v" in params else (q, k, mask)
    return select_reference(*head, scale, plan, state)


def _ref_mask(mask, L):
    return None if mask is None else mask[..., :L]  # static-cache masks may be longer


def group_mass(q, k, mask, scale):
    """Reference group mass [B, Hkv, L] (fp32 from float64 math), 0 at invalid positions."""
    view = StepView(q.double(), k.double(), _ref_mask(mask, k.shape[2]), scale)
    return view.group_mass().float(), view.valid


def kept_mass(mass, idx):
    return torch.where(idx >= 0, mass.gather(-1, idx.clamp_min(0).long()), 0.0).sum(-1)


def _check_no_near_ties(mass, valid, budget, sink, local, min_context, rel=1e-4):
    """The inputs are usable for an exact comparison: no two middle masses around the
    top-k cut-off of any row that is selected closer than ``rel``."""
    count = valid.sum(-1)
    rank = valid.long().cumsum(-1) - 1
    middle = valid & (rank >= sink) & (rank < (count - local)[:, None])
    kk = budget - sink - local
    for b in range(mass.shape[0]):
        if count[b] <= budget or count[b] < min_context:
            continue
        for h in range(mass.shape[1]):
            vals = mass[b, h][middle[b]].sort(descending=True).values
            gap = (vals[kk - 1] - vals[kk]) / vals[kk - 1]
            assert gap > rel, f"test input has a near tie at the cut-off (row {b}, head {h})"


def check_select(q, k, mask, scale, budget, sink=0, local=0, min_context=0, **kw):
    out = oracle_select_triton(q, k, mask, scale, budget, sink, local, min_context, **kw)
    ref = reference_select(q, k, mask, scale, budget, sink, local, min_context)
    assert out.dtype == torch.int32 and out.shape == ref.shape
    assert out.shape[-1] == max(budget, min_context)
    mass, valid = group_mass(q, k, mask, scale)
    _check_no_near_ties(mass.to(DEVICE), valid.to(DEVICE), budget, sink, local, min_context)
    # Ascending positions, then -1 padding.
    n = (out >= 0).sum(-1, keepdim=True)
    slot = torch.arange(out.shape[-1], device=out.device)
    assert torch.equal(out >= 0, slot < n), "-1 padding must come last"
    diffs = out[..., 1:].long() - out[..., :-1].long()
    assert bool(((diffs > 0) | (out[..., 1:] < 0)).all()), "positions must be ascending"
    assert torch.equal(out, ref), f"selection differs from the reference:\n{out}\n{ref}"
    km, kr = kept_mass(mass.to(DEVICE), out), kept_mass(mass.to(DEVICE), ref)
    assert torch.allclose(km, kr, rtol=1e-5, atol=0)
    return out


def static_cache_mask(B, Tq, Lmax, lengths, starts=None, device=DEVICE):
    """Bool [B, 1, Tq, Lmax]: row b holds tokens in [starts[b], lengths[b]) (left padding
    before, unfilled cache after); with Tq > 1 query row t may not see the last Tq-1-t
    positions (causal within the step)."""
    starts = starts or [0] * B
    mask = torch.zeros(B, 1, Tq, Lmax, dtype=torch.bool)
    for b in range(B):
        for t in range(Tq):
            mask[b, 0, t, starts[b]:max(starts[b], lengths[b] - (Tq - 1 - t))] = True
    return mask.to(device)


# --- against the reference ------------------------------------------------------------------

@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("Tq", [1, 2])
def test_gqa_static_cache(G, Tq):
    # Static cache: k is a view of a longer cache (batch, heads and length sliced), the mask
    # is longer than the view, row 0 is short and fits the budget, row 1 is left padded,
    # row 2 nearly full.
    gen = torch.Generator().manual_seed(10 * G + Tq)
    B, Hkv, L, D = 3, 2, 80, 16
    cache = rand((B + 1, Hkv + 1, L + 16, D), gen)
    k = cache[1:, 1:, :L]
    assert not k.is_contiguous()
    q = rand((B, Tq, Hkv * G, D), gen).transpose(1, 2)
    mask = static_cache_mask(B, Tq, L + 16, lengths=[20, 70, 79], starts=[0, 9, 0])
    check_select(q, k, mask, 0.5, budget=24, sink=2, local=5, num_splits=3, block_n=16)


def test_float_mask():
    # Additive bias: finite values, -inf and finfo.min ("masked" in older HF masks); one query
    # row of batch row 1 may attend to nothing (it must add no mass, and no NaN).
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, Tq, L, D = 2, 2, 2, 2, 64, 16
    q = rand((B, Hkv * G, Tq, D), gen)
    k = rand((B, Hkv, L, D), gen)
    bias = rand((B, 1, Tq, L), gen, std=0.5)
    bias[0, 0, :, 50:] = float("-inf")
    bias[0, 0, 0, 45:50] = torch.finfo(torch.float32).min
    bias[1, 0, 0] = float("-inf")
    bias[1, 0, 1, :6] = torch.finfo(torch.float32).min
    check_select(q, k, bias, 0.4, budget=20, sink=3, local=4, num_splits=2, block_n=16)
    # The same bias as a [Tq, L] mask broadcast over the batch, and in bf16.
    check_select(q, k, bias[0, 0], 0.4, budget=20, sink=3, local=4, block_n=16)
    check_select(q, k, bias.to(torch.bfloat16), 0.4, budget=20, sink=3, local=4, block_n=16)


def test_mask_with_holes_across_chunks(monkeypatch):
    # Random holes, different per query row (valid = allowed for at least one row), over
    # several chunks of the bounds kernels (a small chunk so the interpreter stays fast).
    monkeypatch.setattr(bt, "_CHUNK", 16)
    gen = torch.Generator().manual_seed(4)
    B, Hkv, G, Tq, L, D = 2, 1, 4, 2, 90, 16
    q = rand((B, Hkv * G, Tq, D), gen)
    k = rand((B, Hkv, L, D), gen)
    mask = (torch.rand((B, 1, Tq, L), generator=gen) > 0.6).to(DEVICE)
    mask[1, :, :, 70:] = False
    check_select(q, k, mask, 0.5, budget=16, sink=3, local=6, num_splits=2, block_n=16)
    bounds = select_bounds(q, k, mask, budget=16, sink=3, local=6).cpu()
    _check_bounds(bounds, mask, L, budget=16, sink=3, local=6, min_context=0)
    # With a reserved ticket buffer (what allocating a GPU's selection state does), twice:
    # the last chunk of each row left its ticket at 0 for the next call.
    from prhs_compile.kernels import tickets as tk

    monkeypatch.setattr(tk, "_BUFFERS", {})  # this test's own, dropped after it
    tk.reserve_tickets(DEVICE, B)
    for _ in range(2):
        bounds = select_bounds(q, k, mask, budget=16, sink=3, local=6).cpu()
        _check_bounds(bounds, mask, L, budget=16, sink=3, local=6, min_context=0)
        assert not tk.tickets(DEVICE, B).any()


def test_no_mask_and_min_context():
    # mask=None: every position valid. Then min_context > budget: rows with fewer valid
    # positions keep them all (slots = min_context), the others select `budget` and pad.
    gen = torch.Generator().manual_seed(5)
    B, Hkv, G, Tq, L, D = 3, 2, 2, 1, 60, 16
    q = rand((B, Hkv * G, Tq, D), gen)
    k = rand((B, Hkv, L, D), gen)
    check_select(q, k, None, 0.5, budget=12, sink=1, local=3, block_n=16)
    mask = static_cache_mask(B, Tq, L, lengths=[30, 45, 60])
    out = check_select(q, k, mask, 0.5, budget=12, sink=1, local=3, min_context=40,
                       block_n=16)
    assert out.shape[-1] == 40
    assert torch.equal(out[0, :, :30].cpu(), torch.arange(30, dtype=torch.int32).expand(Hkv, -1))
    assert bool((out[1:, :, 12:] == -1).all())


def test_all_rows_fit_and_empty_rows():
    gen = torch.Generator().manual_seed(6)
    B, Hkv, G, Tq, L, D = 2, 2, 2, 1, 40, 16
    q = rand((B, Hkv * G, Tq, D), gen)
    k = rand((B, Hkv, L, D), gen)
    mask = static_cache_mask(B, Tq, L, lengths=[10, 0])  # row 1 has no valid position
    out = check_select(q, k, mask, 0.5, budget=16, sink=2, local=2, block_n=16)
    assert bool((out[1] == -1).all())


def test_bf16_inputs():
    gen = torch.Generator().manual_seed(17)
    B, Hkv, G, Tq, L, D = 2, 2, 2, 1, 64, 32
    q = rand((B, Hkv * G, Tq, D), gen, torch.bfloat16)
    k = rand((B, Hkv, L, D), gen, torch.bfloat16)
    mask = static_cache_mask(B, Tq, L, lengths=[64, 50])
    check_select(q, k, mask, 1 / math.sqrt(D), budget=20, sink=2, local=4, block_n=16)


def test_many_query_rows_per_group():
    # G * Tq = 128 rows: two row tiles of 64 whose partial masses are summed.
    gen = torch.Generator().manual_seed(8)
    B, Hkv, G, Tq, L, D = 1, 1, 16, 8, 40, 16
    q = rand((B, Hkv * G, Tq, D), gen)
    k = rand((B, Hkv, L, D), gen)
    mask = static_cache_mask(B, Tq, L, lengths=[38])
    check_select(q, k, mask, 0.5, budget=12, sink=1, local=2, num_splits=2, block_n=16)


def test_exact_ties():
    # Keys repeated: the group masses tie exactly, also at the cut-off. Any choice among the
    # tied positions is right: same count, same kept mass as the reference, each position once.
    gen = torch.Generator().manual_seed(9)
    B, Hkv, G, Tq, L, D = 2, 2, 2, 1, 48, 16
    q = rand((B, Hkv * G, Tq, D), gen)
    k = rand((B, Hkv, 5, D), gen)[:, :, torch.arange(L) % 5]
    mask = static_cache_mask(B, Tq, L, lengths=[48, 40])
    budget, sink, local = 12, 1, 2
    out = oracle_select_triton(q, k, mask, 0.5, budget, sink, local, block_n=16)
    ref = reference_select(q, k, mask, 0.5, budget, sink, local, 0)
    assert bool((out >= 0).all())
    assert bool((out[..., 1:] > out[..., :-1]).all())
    mass, _ = group_mass(q, k, mask, 0.5)
    torch.testing.assert_close(kept_mass(mass.to(DEVICE), out), kept_mass(mass.to(DEVICE), ref),
                               rtol=1e-5, atol=0)


def test_invalid_plans():
    q = torch.zeros(1, 2, 1, 16, device=DEVICE)
    k = torch.zeros(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="no room"):
        oracle_select_triton(q, k, None, 1.0, budget=8, sink=4, local=4)
    with pytest.raises(ValueError, match="broadcast"):
        oracle_select_triton(q, k, torch.ones(1, 2, 1, 8, dtype=torch.bool, device=DEVICE),
                             1.0, budget=4)


# --- the score part and the bounds -----------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_group_mass(dtype, tol):
    gen = torch.Generator().manual_seed(20)
    B, Hkv, G, Tq, L, D = 2, 2, 4, 2, 70, 32
    q = rand((B, Hkv * G, Tq, D), gen, dtype)
    k = rand((B, Hkv, L + 8, D), gen, dtype)[:, :, :L]
    mask = static_cache_mask(B, Tq, L + 8, lengths=[55, 70], starts=[0, 4])
    mask[0, :, 0] = False  # query row 0 of batch row 0 sees nothing
    out = oracle_group_mass_triton(q, k, mask, 0.3, num_splits=3, block_n=16)
    ref, valid = group_mass(q, k, mask, 0.3)
    ref, valid = ref.to(DEVICE), valid.to(DEVICE)
    assert out.shape == (B, Hkv, L) and out.dtype == torch.float32
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isinf(out), ~valid[:, None, :].expand_as(out))
    got = torch.where(valid[:, None, :], out, 0.0)
    err = (got.double() - ref.double()).norm() / ref.double().norm()
    assert err <= tol, f"relative error {err:.3e}"
    # Every query row that sees something contributes a total mass of 1.
    rows = torch.tensor([G * (Tq - 1), G * Tq], dtype=torch.float32, device=DEVICE)
    torch.testing.assert_close(got.sum(-1), rows[:, None].expand(B, Hkv), rtol=tol, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gated_k_passes_with_key_norms_and_window_mass(dtype, tol):
    """What the select step asks of the K passes: only the active (row, KV head) slots are
    scored (they share the grid), the middle's group mass, the mass of the windows and the
    largest key norm over the valid positions."""
    gen = torch.Generator().manual_seed(21)
    B, Hkv, G, Tq, L, D = 2, 3, 2, 1, 90, 32
    sink, local, budget = 3, 5, 24
    q = rand((B, Hkv * G, Tq, D), gen, dtype)
    k = rand((B, Hkv, L, D), gen, dtype)
    mask = static_cache_mask(B, Tq, L, lengths=[80, 90], starts=[0, 6])
    active = torch.tensor([[True, False, True], [False, True, True]], device=DEVICE)
    found = kp.group_mass(q, k, mask, 0.3, sink, local, budget, 0, num_splits=3, block_n=16,
                          active=active, want_norm=True, want_window_mass=True)
    ref, valid = (t.to(DEVICE) for t in group_mass(q, k, mask, 0.3))
    pos = torch.arange(L, device=DEVICE)
    sink_end, local_start = found.bounds[:, 3:4].long(), found.bounds[:, 4:5].long()
    middle = (valid & (pos >= sink_end) & (pos < local_start))[:, None, :].expand(-1, Hkv, -1)[active]
    windows = (valid & ~((pos >= sink_end) & (pos < local_start)))[:, None, :].expand(-1, Hkv, -1)[active]
    mass, ref = found.mass[active], ref[active]  # [active slots, L]
    assert not mass.isnan().any() and torch.equal(mass.isinf(), ~middle)
    got = torch.where(middle, mass, 0.0).double()
    want = torch.where(middle, ref, 0.0).double()
    assert (got - want).norm() / want.norm() <= tol
    want_window = torch.where(windows, ref, 0.0).sum(-1).double()
    assert (found.window_mass[active].double() - want_window).norm() / want_window.norm() <= tol
    norms = k.float().norm(dim=-1).masked_fill(~valid[:, None, :], 0.0).amax(-1)[active]
    assert (found.key_norm[active] - norms).norm() / norms.norm() <= tol


def _check_bounds(bounds, mask, L, budget, sink, local, min_context):
    valid = mask[..., :L].any(dim=2)[:, 0].cpu()  # [B, L]
    pos = torch.arange(L)
    for b in range(valid.shape[0]):
        p = pos[valid[b]]
        n = p.numel()
        lo, hi = (int(p[0]), int(p[-1]) + 1) if n else (0, 0)
        sink_end = 0 if sink == 0 else (L if sink > n else int(p[sink - 1]) + 1)
        local_start = L if local == 0 else (0 if n - local <= 0 else int(p[n - local]))
        fits = int(n <= budget or n < min_context)
        assert bounds[b, :6].tolist() == [lo, hi, n, sink_end, local_start, fits], b
        # contiguous: every position of [lo, hi) valid (later kernels skip the mask then)
        assert bounds[b, 7].item() == int(n == hi - lo), b


def test_bounds_static_cache():
    # hi is one past the last valid position: the K passes never read the unfilled cache.
    B, Tq, L = 4, 2, 100
    q = torch.zeros(B, 2, Tq, 16, device=DEVICE)
    k = torch.zeros(B, 1, L, 16, device=DEVICE)
    mask = static_cache_mask(B, Tq, L + 20, lengths=[37, 100, 5, 0], starts=[0, 30, 0, 0])
    bounds = select_bounds(q, k, mask, budget=10, sink=4, local=8, min_context=0).cpu()
    _check_bounds(bounds, mask, L, 10, 4, 8, 0)
    assert bounds[:, 1].tolist() == [37, 100, 5, 0]


# --- the benchmark smoke test --------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="CPU smoke test; a GPU runs the real benchmark")
def test_latency_quick_times_two_stage_and_quest_steps(tmp_path):
    import argparse

    from prhs_compile.bench.speed import latency

    out = tmp_path / "latency.json"
    parser = argparse.ArgumentParser()
    latency.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--no-progress", "--budgets", "64",
                              "--retrievals", "exact,pages,quest", "--step-rates", "0,1",
                              "--lean"])
    assert latency.run(args) == 0
    methods = json.loads(out.read_text())["results"][0]["methods"]
    for name in ("prhs@0", "prhs@1", "prhs-pages@0", "prhs-pages@1", "quest", "dense_sdpa",
                 "attend", "select_score", "topk"):
        assert methods[name]["ms"] > 0 and methods[name]["bytes"] > 0, name
    assert methods["prhs-pages@1"]["retrieval_rate"] == 1.0
    # --lean leaves out what the steps do not need
    for name in ("flex", "select", "gather_sdpa", "select_attend"):
        assert "ms" not in methods[name] and methods[name]["skipped"], name


@pytest.mark.skipif(HAS_CUDA, reason="CPU smoke test; a GPU runs the real benchmark")
def test_latency_quick(tmp_path):
    from prhs_compile.bench.speed import latency

    out = tmp_path / "latency.json"
    import argparse

    parser = argparse.ArgumentParser()
    latency.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--no-progress"])
    assert latency.run(args) == 0
    data = json.loads(out.read_text())
    assert data["device"] and data["torch"] and data["triton"]
    assert data["copy_bandwidth_gbps"] > 0 and data["read_bandwidth_gbps"] > 0
    assert data["results"], "no configuration measured"
    row = data["results"][0]
    for name in ("dense_sdpa", "dense_at_budget", "gather_sdpa", "attend", "select",
                 "select_score", "topk", "select_attend"):
        assert row["methods"][name]["ms"] > 0, name
        assert row["methods"][name]["floor_ms"] > 0, name
        assert row["methods"][name]["read_tbps"] > 0, name
    assert "skipped" in row["methods"]["flex"] or row["methods"]["flex"]["ms"] > 0
    # The whole PrHS step at each retrieval rate, with the rate it really ran at.
    for rate in (0.0, 0.1, 0.5, 1.0):
        step = row["methods"][f"prhs@{rate:g}"]
        assert step["ms"] > 0
        assert step["retrieval_rate"] == round(rate * 2) / 2  # quick mode: B=1, Hkv=2


# --- GPU only: realistic shapes -------------------------------------------------------------

def _compare_with_tolerance(out, ref, mass, rel=1e-4):
    """Sets may differ only by swapping positions whose masses are (nearly) tied: nothing
    we dropped in favour of another position may weigh noticeably more than it."""
    km, kr = kept_mass(mass, out), kept_mass(mass, ref)
    torch.testing.assert_close(km, kr, rtol=1e-5, atol=0)
    if torch.equal(out, ref):
        return

    def members(idx):
        return torch.zeros_like(mass, dtype=torch.bool).scatter_(
            -1, idx.clamp_min(0).long(), idx >= 0)

    in_out, in_ref = members(out), members(ref)
    assert torch.equal(in_out.sum(-1), in_ref.sum(-1))
    ours_only, ref_only = in_out & ~in_ref, in_ref & ~in_out
    picked_min = torch.where(ours_only, mass, float("inf")).amin(-1)
    dropped_max = torch.where(ref_only, mass, float("-inf")).amax(-1)
    assert bool((dropped_max <= picked_min * (1 + rel)).all()), "differences beyond near ties"
    assert ours_only.sum() <= 0.01 * (ref >= 0).sum() + 8


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Tq", [1, 2])
def test_cuda_llama_shapes(dtype, Tq):
    gen = torch.Generator().manual_seed(Tq)
    B, Hq, Hkv, D, Lmax = 4, 32, 8, 128, 16384
    cache = rand((B, Hkv, Lmax, D), gen, dtype)
    q = rand((B, Hq, Tq, D), gen, dtype)
    mask = static_cache_mask(B, Tq, Lmax, lengths=[16384, 9000, 3000, 1000], starts=[0, 100, 0, 0])
    scale = 1 / math.sqrt(D)
    for budget, sink, local, min_context in ((2048, 4, 64, 0), (1024, 0, 16, 4096)):
        out = oracle_select_triton(q, cache, mask, scale, budget, sink, local, min_context)
        ref = reference_select(q, cache, mask, scale, budget, sink, local, min_context)
        mass, _ = group_mass(q, cache, mask, scale)
        _compare_with_tolerance(out, ref, mass)
    # The score part alone.
    out = oracle_group_mass_triton(q, cache, mask, scale)
    ref, valid = group_mass(q, cache, mask, scale)
    assert not torch.isnan(out).any()
    got = torch.where(valid[:, None, :], out, 0.0)
    err = (got.double() - ref.double()).norm() / ref.double().norm()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_capture():
    # No host synchronisation anywhere: the whole selection captures into a CUDA graph, and
    # replays follow new query values and a cache that grew.
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, Lmax = 2, 32, 8, 128, 8192
    k = rand((B, Hkv, Lmax, D), gen, torch.bfloat16)
    q = rand((B, Hq, 1, D), gen, torch.bfloat16)
    mask = static_cache_mask(B, 1, Lmax, lengths=[5000, 8000])
    args = (q, k, mask, 1 / math.sqrt(D), 1024, 4, 64, 0)
    oracle_select_triton(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = oracle_select_triton(*args)
    q.copy_(rand((B, Hq, 1, D), gen, torch.bfloat16))
    mask[:, :, :, 5000:6000] = True
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_select(*args)
    mass, _ = group_mass(q, k, mask, 1 / math.sqrt(D))
    _compare_with_tolerance(out, ref, mass)


@pytest.mark.skipif(HAS_CUDA, reason="CPU smoke test; a GPU runs the real benchmark")
def test_latency_grid_goes_on_past_a_rate_it_cannot_set_up(tmp_path, monkeypatch):
    """A retrieval rate whose state set-up fails is recorded with its error (which says what
    the torch reference does from the same state), and the grid goes on."""
    import argparse

    from prhs_compile.bench.speed import latency

    set_rate = latency._PrHSStep.set_rate

    def fingerprint_broken_at_half(self, rate):
        if rate != 0.5:
            return set_rate(self, rate)
        fingerprint = dict(zip(self.names, self.snapshot))["fingerprint"]
        kept = fingerprint.clone()
        fingerprint.add_(1.0)  # every row looks like a new sequence: every slot retrieves
        try:
            return set_rate(self, rate)
        finally:
            fingerprint.copy_(kept)

    monkeypatch.setattr(latency._PrHSStep, "set_rate", fingerprint_broken_at_half)
    out = tmp_path / "latency.json"
    parser = argparse.ArgumentParser()
    latency.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--no-progress", "--budgets", "64",
                              "--step-rates", "0,0.5,0.1", "--lean"])
    assert latency.run(args) == 0
    methods = json.loads(out.read_text())["results"][0]["methods"]
    assert methods["prhs@0"]["ms"] > 0 and methods["prhs@0.1"]["ms"] > 0  # the grid went on
    # the retrieving slots whose top-k guess was rewritten (none here: the CPU step is the
    # torch reference, which keeps no guess)
    assert methods["prhs@0.1"]["guess_misses"] == 0
    error = methods["prhs@0.5"]["error"]
    assert "state set up for" in error and "the torch reference from the same state ran" in error
    # the snapshot's host copy shows what changed it since the set-up (here: the test)
    assert "the set-up snapshot CHANGED since it was taken: fingerprint[0]" in error
    assert "snapshot_changed" not in methods["prhs@0.1"]
    # and which condition of a reuse failed: here the stored key differs in every row
    import re

    found = re.search(r"(\d+) of (\d+) rows do not follow the stored position, (\d+) hold "
                      r"another key there, (\d+) slots .* (\d+) have queries too far from their anchor",
                      error)
    assert found, error
    following, rows, differ, aged, dissimilar = (int(x) for x in found.groups())
    assert (following, differ, aged) == (0, rows, 0) and rows >= 1
    assert "mask unchanged and newest keys unchanged" in error
