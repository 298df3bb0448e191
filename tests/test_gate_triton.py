"""PrHS's cosine gate kernel (``kernels/gate_triton.py``) against its torch reference (the
step's own functions) on fresh random states: the flags, every state tensor it writes and the
counters must be the same (fp32 within 1e-5), and the top-k's scratch zero in the rows of the
retrieving slots. Under the Triton interpreter on CPU, compiled on CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from prhs_compile.kernels.gate_triton import prhs_gate_reference, prhs_gate_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAU, MAX_REUSE = 0.8, 5


def _problem(B, Hq, Hkv, D, Tq, L, dtype, seed):
    """Rows that continue their sequence, rows whose cache no longer holds the stored key,
    rows with no stored position, an empty row and rows that fit the budget; anchors near the
    newest query (cosine about 0.99) or unrelated to it (about 0); ages from none to past
    ``MAX_REUSE``; a query laid out [B, Tq, Hq, D] in memory (strided)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    q = torch.randn(B, Tq, Hq, D, generator=gen).to(dtype).transpose(1, 2)
    bounds = torch.zeros(B, 8, dtype=torch.int32)
    pos = torch.full((B,), -1, dtype=torch.int64)
    fingerprint = torch.randn(B, D, generator=gen)
    for b in range(B):
        kind = b % 5
        lo = int(torch.randint(0, 4, (), generator=gen))
        count = 0 if kind == 3 else int(torch.randint(Tq + 2, L - lo + 1, (), generator=gen))
        bounds[b, 0], bounds[b, 1], bounds[b, 2] = lo, lo + count, count
        bounds[b, 5] = int(kind == 4)
        newest = lo + count - 1
        if kind in (0, 1, 4) and count:
            pos[b] = newest - Tq
            fingerprint[b] = k[b, 0, pos[b]].float()
        if kind == 1:
            fingerprint[b, 0] += 1.0  # the cache holds another key there: a new sequence
    last = q[:, :, -1].float()
    near = torch.rand(B, Hq, generator=gen) < 0.7
    anchor = torch.where(near[..., None], last + 0.05 * torch.randn(B, Hq, D, generator=gen),
                         torch.randn(B, Hq, D, generator=gen))
    age = torch.randint(-1, MAX_REUSE + 1, (B, Hkv), generator=gen, dtype=torch.int32)
    key_norm = torch.rand(B, Hkv, generator=gen) * 2 * D ** 0.5
    counters = torch.randint(0, 100, (6,), generator=gen, dtype=torch.int64)
    state = dict(pos=pos, fingerprint=fingerprint, age=age, anchor=anchor, key_norm=key_norm,
                 counters=counters)
    to = {name: t.to(DEVICE) for name, t in state.items()}
    return bounds.to(DEVICE), q.to(DEVICE), k.to(DEVICE), to


@pytest.mark.parametrize("B,Hq,Hkv,D,Tq,dtype", [
    (5, 4, 2, 16, 1, torch.float32),
    (5, 6, 2, 24, 2, torch.bfloat16),  # a group of three, a head dim that is no power of two
    (10, 8, 8, 16, 1, torch.float16),  # one query head per KV head
    (5, 4, 1, 32, 1, torch.bfloat16),  # one KV head (Gemma 3 270M's layout)
])
def test_gate_kernel_against_the_reference(B, Hq, Hkv, D, Tq, dtype):
    for seed in range(2):
        bounds, q, k, state = _problem(B, Hq, Hkv, D, Tq, 40, dtype, seed)
        ref = {name: t.clone() for name, t in state.items()}
        flags, scratch = prhs_gate_triton(bounds, q, k, *state.values(), TAU, MAX_REUSE, 37)
        expected = prhs_gate_reference(bounds, q, k, *ref.values(), TAU, MAX_REUSE)
        assert torch.equal(flags, expected), (flags, expected)
        assert 0 < int(expected.sum()) < expected.numel()  # both decisions occur
        for name in state:
            if state[name].dtype == torch.float32:
                assert not state[name].isnan().any(), name
                torch.testing.assert_close(state[name], ref[name], rtol=1e-5, atol=1e-5,
                                           msg=name)
            else:
                assert torch.equal(state[name], ref[name]), (name, state[name], ref[name])
        assert scratch.shape == (B * Hkv, 37)
        assert not scratch[flags != 0].any()


def test_gate_kernel_names_a_state_of_the_wrong_shape():
    bounds, q, k, state = _problem(2, 4, 2, 16, 1, 40, torch.float32, 0)
    state["age"] = state["age"][:, :1]
    with pytest.raises(ValueError, match=r"age must be contiguous torch.int32 of shape \(2, 2\)"):
        prhs_gate_triton(bounds, q, k, *state.values(), TAU, MAX_REUSE, 8)
