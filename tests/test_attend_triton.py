"""Tests of the Triton split-K attend kernel against a naive torch reference.

On a machine without CUDA the kernels run under the Triton interpreter, which must be
selected before the kernel module is imported (``triton.jit`` decides at decoration time),
hence the environment tweak before any kernel import. Shapes stay tiny there.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

try:  # installed package layout
    from prhs_compile.kernels.attend_triton import _pick_splits, attend_triton  # noqa: E402
except ImportError:  # source checkout, run from the repository root
    from kernels.attend_triton import _pick_splits, attend_triton  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def attend_naive(q, k, v, idx, mask=None, scale=None):
    """Reference: gather the selected rows, masked softmax in float64, zeros for empty rows."""
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    S = idx.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    valid = (idx >= 0).repeat_interleave(G, dim=1)[:, :, None, :]  # [B, Hq, 1, S]
    safe = idx.clamp_min(0).long()
    kg = torch.gather(k.double(), 2, safe[..., None].expand(-1, -1, -1, k.shape[-1]))
    vg = torch.gather(v.double(), 2, safe[..., None].expand(-1, -1, -1, v.shape[-1]))
    kg = kg.repeat_interleave(G, dim=1)
    vg = vg.repeat_interleave(G, dim=1)
    s = (q.double() @ kg.transpose(-1, -2)) * scale  # [B, Hq, Tq, S]
    allowed = valid.expand(B, Hq, Tq, S)
    if mask is not None:
        m4 = mask
        while m4.dim() < 4:
            m4 = m4.unsqueeze(0)
        m4 = m4.expand(B, Hq, Tq, m4.shape[-1])
        pos = safe.repeat_interleave(G, dim=1)[:, :, None, :].expand(B, Hq, Tq, S)
        mg = torch.gather(m4, 3, pos)
        if mg.dtype == torch.bool:
            allowed = allowed & mg
        else:
            s = s + mg.double()
    s = s.masked_fill(~allowed, float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(s - row_max)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return (p @ vg).to(q.dtype)


def make_idx(B, Hkv, S, L, counts, gen, device=DEVICE):
    """Unique random positions, shuffled, with ``counts[b][h]`` valid slots scattered among
    the S slots (the rest -1)."""
    idx = torch.full((B, Hkv, S), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            n = counts[b][h]
            pos = torch.randperm(L, generator=gen)[:n].to(torch.int32)
            slots = torch.randperm(S, generator=gen)[:n]
            idx[b, h, slots] = pos
    return idx.to(device)


def rand(shape, dtype, gen, device=DEVICE):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "NaN in output"
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    assert err <= TOL[dtype], f"relative error {err.item():.3e} > {TOL[dtype]}"


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("Tq", [1, 2])
def test_gqa_groups(G, Tq):
    gen = torch.Generator().manual_seed(100 * G + Tq)
    B, Hkv, L, D, S = 2, 2, 40, 16, 21
    q = rand((B, Hkv * G, Tq, D), torch.float32, gen)
    k = rand((B, Hkv, L, D), torch.float32, gen)
    v = rand((B, Hkv, L, D), torch.float32, gen)
    idx = make_idx(B, Hkv, S, L, [[S, S - 3], [S - 5, 7]], gen)
    out = attend_triton(q, k, v, idx, block_n=16)  # S=21 -> two blocks, split heuristics
    check(out, attend_naive(q, k, v, idx), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_empty_slots(dtype):
    # S larger than the valid counts, counts differing per batch row and head, one row with
    # every slot -1 (must give zeros, not NaN), dims that are not powers of two.
    gen = torch.Generator().manual_seed(7)
    B, Hkv, G, Tq, L, D, S = 3, 2, 2, 1, 50, 24, 37
    q = rand((B, Hkv * G, Tq, D), dtype, gen)
    k = rand((B, Hkv, L, D), dtype, gen)
    v = rand((B, Hkv, L, D), dtype, gen)
    idx = make_idx(B, Hkv, S, L, [[30, 5], [0, 12], [37, 1]], gen)
    out = attend_triton(q, k, v, idx, block_n=16, num_splits=3)
    check(out, attend_naive(q, k, v, idx), dtype)
    assert torch.all(out[1, 0:G] == 0), "row with no valid slot must be zero"


def test_all_slots_empty():
    gen = torch.Generator().manual_seed(8)
    q = rand((1, 2, 2, 16), torch.float32, gen)
    k = rand((1, 1, 20, 16), torch.float32, gen)
    v = rand((1, 1, 20, 16), torch.float32, gen)
    idx = torch.full((1, 1, 19), -1, dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        out = attend_triton(q, k, v, idx, block_n=16, num_splits=splits)
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("prefetch_idx", [False, True])
def test_splits_agree(prefetch_idx, monkeypatch):
    # The same problem through the direct (one split) path and through several splits,
    # including splits whose slots are all -1 (they must contribute nothing); with the
    # positions loaded one block ahead or not.
    module = sys.modules[attend_triton.__module__]
    monkeypatch.setitem(module.CONFIG, "prefetch_idx", prefetch_idx)
    gen = torch.Generator().manual_seed(9)
    B, Hkv, G, Tq, L, D, S = 1, 2, 2, 2, 64, 16, 70
    q = rand((B, Hkv * G, Tq, D), torch.float32, gen)
    k = rand((B, Hkv, L, D), torch.float32, gen)
    v = rand((B, Hkv, L, D), torch.float32, gen)
    idx = torch.full((B, Hkv, S), -1, dtype=torch.int32)
    idx[0, 0, :20] = torch.randperm(L, generator=gen)[:20].to(torch.int32)  # later splits empty
    idx[0, 1, 50:] = torch.randperm(L, generator=gen)[:20].to(torch.int32)  # early splits empty
    idx = idx.to(DEVICE)
    ref = attend_naive(q, k, v, idx)
    for splits in (1, 2, 5):
        check(attend_triton(q, k, v, idx, block_n=16, num_splits=splits), ref, torch.float32)


def test_merge_of_many_splits_and_row_blocks(monkeypatch):
    # The last split of each (KV head, row block) merges them all: two row blocks of a
    # 72-row group (G=8, Tq=9), 19 splits, and merge tiles made small enough that the
    # merge walks its rows and splits in several steps; its tickets are left at zero.
    from prhs_compile.kernels import tickets

    module = sys.modules[attend_triton.__module__]
    monkeypatch.setattr(module, "MERGE_TILE", 256)
    tickets.reserve_tickets(DEVICE, 64)
    gen = torch.Generator().manual_seed(19)
    B, Hkv, G, Tq, L, D, S = 1, 1, 8, 9, 400, 16, 300
    q = rand((B, Hkv * G, Tq, D), torch.float32, gen)
    k = rand((B, Hkv, L, D), torch.float32, gen)
    v = rand((B, Hkv, L, D), torch.float32, gen)
    idx = make_idx(B, Hkv, S, L, [[S - 30]], gen)
    for _ in range(2):  # the second call finds the tickets as the first left them
        out = attend_triton(q, k, v, idx, block_n=16, num_splits=19)
        check(out, attend_naive(q, k, v, idx), torch.float32)
        assert not tickets.tickets(DEVICE, 64).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bool_mask(dtype):
    # Mask some selected positions (per batch row and query position); query position 0 of
    # batch row 1 has everything masked and must produce zeros.
    gen = torch.Generator().manual_seed(11)
    B, Hkv, G, Tq, L, D, S = 2, 2, 2, 2, 48, 16, 20
    q = rand((B, Hkv * G, Tq, D), dtype, gen)
    k = rand((B, Hkv, L, D), dtype, gen)
    v = rand((B, Hkv, L, D), dtype, gen)
    idx = make_idx(B, Hkv, S, L, [[20, 15], [18, 9]], gen)
    mask = torch.rand((B, 1, Tq, L), generator=gen) > 0.4
    mask[1, 0, 0] = False
    mask = mask.to(DEVICE)
    out = attend_triton(q, k, v, idx, mask, num_splits=2, block_n=16)
    ref = attend_naive(q, k, v, idx, mask)
    check(out, ref, dtype)
    assert torch.all(out[1, :, 0] == 0)
    # The mask must actually matter at the selected positions.
    assert (ref - attend_naive(q, k, v, idx)).abs().max() > 1e-3


def test_float_mask_broadcast():
    # Additive bias with -inf entries, given as [1, 1, Tq, L] (broadcast over the batch) and
    # as a plain [Tq, L]; also a non-default scale.
    gen = torch.Generator().manual_seed(12)
    B, Hkv, G, Tq, L, D, S = 2, 1, 4, 2, 40, 16, 19
    q = rand((B, Hkv * G, Tq, D), torch.float32, gen)
    k = rand((B, Hkv, L, D), torch.float32, gen)
    v = rand((B, Hkv, L, D), torch.float32, gen)
    idx = make_idx(B, Hkv, S, L, [[19], [11]], gen)
    bias = torch.randn((1, 1, Tq, L), generator=gen)
    bias[torch.rand((1, 1, Tq, L), generator=gen) > 0.7] = float("-inf")
    bias = bias.to(DEVICE)
    ref = attend_naive(q, k, v, idx, bias, scale=0.3)
    check(attend_triton(q, k, v, idx, bias, scale=0.3, block_n=16), ref, torch.float32)
    check(attend_triton(q, k, v, idx, bias[0, 0], scale=0.3, block_n=16), ref, torch.float32)


def test_float_mask_bf16_per_batch():
    gen = torch.Generator().manual_seed(13)
    B, Hkv, G, Tq, L, D, S = 2, 2, 1, 1, 32, 16, 24
    q = rand((B, Hkv * G, Tq, D), torch.bfloat16, gen)
    k = rand((B, Hkv, L, D), torch.bfloat16, gen)
    v = rand((B, Hkv, L, D), torch.bfloat16, gen)
    idx = make_idx(B, Hkv, S, L, [[24, 10], [3, 17]], gen)
    bias = (2 * torch.randn((B, 1, Tq, L), generator=gen)).to(DEVICE, torch.bfloat16)
    check(attend_triton(q, k, v, idx, bias), attend_naive(q, k, v, idx, bias), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noncontiguous_cache_and_dv(dtype):
    # k and v are slices of a bigger static cache (batch, head and length all sliced, v with a
    # transposed storage), q is a transposed view, and Dv != D.
    gen = torch.Generator().manual_seed(14)
    B, Hkv, G, Tq, L, D, Dv, S = 2, 2, 2, 2, 30, 24, 16, 25
    big_k = rand((B + 1, Hkv + 2, L + 10, D), dtype, gen)
    big_v = rand((B + 1, Hkv + 2, Dv, L + 10), dtype, gen)
    k = big_k[1:, 1:1 + Hkv, 3:3 + L]
    v = big_v[1:, 1:1 + Hkv, :, 3:3 + L].transpose(-1, -2)
    q = rand((B, Tq, Hkv * G, D), dtype, gen).transpose(1, 2)
    assert not k.is_contiguous() and not v.is_contiguous() and not q.is_contiguous()
    idx = make_idx(B, Hkv, S, L, [[25, 4], [13, 20]], gen)
    mask = torch.ones((B, 1, Tq, L + 10), dtype=torch.bool)  # static-cache length > L
    mask[:, :, 1, : L // 2] = False
    mask = mask.to(DEVICE)
    out = attend_triton(q, k, v, idx, mask, block_n=16, num_splits=2)
    assert out.shape == (B, Hkv * G, Tq, Dv)
    check(out, attend_naive(q, k, v, idx, mask), dtype)


def test_int64_idx_and_noncontiguous_idx():
    gen = torch.Generator().manual_seed(15)
    B, Hkv, G, Tq, L, D, S = 1, 2, 2, 1, 24, 16, 17
    q = rand((B, Hkv * G, Tq, D), torch.float32, gen)
    k = rand((B, Hkv, L, D), torch.float32, gen)
    v = rand((B, Hkv, L, D), torch.float32, gen)
    idx = make_idx(B, Hkv, S + 3, L, [[17, 9]], gen)[:, :, :S].long()
    ref = attend_naive(q, k, v, idx)
    check(attend_triton(q, k, v, idx, block_n=16), ref, torch.float32)


def test_pick_splits():
    # Small batch: split until ~4 programs per SM, never more splits than blocks, none empty.
    assert _pick_splits(32, 8, 132) == (32, 1)
    # B=16, Hkv=8: 128 programs already; a few splits reach ~4 per SM.
    n, per = _pick_splits(32, 128, 132)
    assert 2 <= n <= 5 and (n - 1) * per < 32 <= n * per
    # Very large batch: a single split (nothing to merge).
    assert _pick_splits(32, 1024, 132) == (1, 32)
    for n_blocks in range(1, 40):
        for base in (1, 3, 16, 100, 600):
            n, per = _pick_splits(n_blocks, base, 132)
            assert 1 <= n <= n_blocks and (n - 1) * per < n_blocks <= n * per


# --- GPU only: realistic decode shapes ------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("Tq", [1, 2])
def test_cuda_large(D, Tq):
    gen = torch.Generator().manual_seed(D + Tq)
    B, Hq, Hkv, L, S = 16, 32, 8, 8192, 2048
    dtype = torch.bfloat16
    q = rand((B, Hq, Tq, D), dtype, gen)
    cache_k = rand((B, Hkv, L + 512, D), dtype, gen)
    cache_v = rand((B, Hkv, L + 512, D), dtype, gen)
    k, v = cache_k[:, :, :L], cache_v[:, :, :L]
    # Selections straight on the GPU (no per-row Python loop at this size): a random
    # permutation per row, the last slots emptied in some rows.
    idx = torch.argsort(torch.rand((B, Hkv, L), device="cuda"), dim=-1)[..., :S].to(torch.int32)
    idx[1::3, :, S - 300:] = -1
    idx[0, 0] = -1
    mask = torch.rand((B, 1, Tq, L), device="cuda") > 0.1
    for m in (None, mask):
        out = attend_triton(q, k, v, idx, m)
        check(out, attend_naive(q, k, v, idx, m), dtype)
        assert torch.all(out[0, :4] == 0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("B", [1, 64])
def test_cuda_split_paths(B):
    # B=1 takes many splits, B=64 a single split (direct write); both against the reference.
    gen = torch.Generator().manual_seed(B)
    Hq, Hkv, L, S, D, dtype = 32, 8, 4096, 1000, 128, torch.float16
    q = rand((B, Hq, 1, D), dtype, gen)
    k = rand((B, Hkv, L, D), dtype, gen)
    v = rand((B, Hkv, L, D), dtype, gen)
    idx = torch.argsort(torch.rand((B, Hkv, L), device="cuda"), dim=-1)[..., :S].to(torch.int32)
    check(attend_triton(q, k, v, idx), attend_naive(q, k, v, idx), dtype)
