"""The bounds-and-gate launch (``kernels/gate_triton.py``) against its references on fresh
random states: the bounds must be ``compute_bounds``'s, and the flags, every state tensor
the gate writes and the counters those of the step's own torch functions
(``prhs_gate_reference``; fp32 within 1e-5), and the top-k's scratch zero in the rows of the
retrieving slots. Under the Triton interpreter on CPU, compiled on CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from prhs_compile.kernels import gate_triton  # noqa: E402
from prhs_compile.kernels.bounds_triton import compute_bounds, mask_operand  # noqa: E402
from prhs_compile.kernels.gate_triton import (  # noqa: E402
    GateState,
    bounds_and_gate,
    prhs_gate_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAU, MAX_REUSE, SINK, LOCAL, BUDGET = 0.8, 5, 2, 4, 24


def _problem(B, Hq, Hkv, D, Tq, L, dtype, mask_kind, seed):
    """Row b holds positions [pad, pad + count) of a static cache of L: rows that continue
    their sequence, rows whose cache no longer holds the stored key, rows with no stored
    position, an empty row, rows short enough to fit the budget and rows whose newest
    position jumped past the one after the stored one; anchors near the newest
    query (cosine about 0.99) or unrelated to it (about 0); ages from none to past
    ``MAX_REUSE``; a query laid out [B, Tq, Hq, D] in memory (strided)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    q = torch.randn(B, Tq, Hq, D, generator=gen).to(dtype).transpose(1, 2)
    allowed = torch.zeros(B, 1, Tq, L, dtype=torch.bool)
    pos = torch.full((B,), -1, dtype=torch.int64)
    fingerprint = torch.randn(B, D, generator=gen)
    for b in range(B):
        kind = b % 6
        pad = int(torch.randint(0, 4, (), generator=gen))
        if kind == 3:
            count = 0
        elif kind == 4:
            count = int(torch.randint(Tq + 1, BUDGET + 1, (), generator=gen))
        else:
            count = int(torch.randint(BUDGET + 1, L - pad + 1, (), generator=gen))
        newest = pad + count - 1
        for t in range(Tq):  # causal among this step's queries
            allowed[b, 0, t, pad:newest - (Tq - 1 - t) + 1] = True
        if kind in (0, 1, 4) and count:
            pos[b] = newest - Tq
            fingerprint[b] = k[b, 0, pos[b]].float()
        if kind == 1:
            fingerprint[b, 0] += 1.0  # the cache holds another key there: a new sequence
        if kind == 5:  # the stored position lies three before the one the row continues from
            pos[b] = newest - Tq - 3
            fingerprint[b] = k[b, 0, pos[b]].float()
    mask = allowed
    if mask_kind == "float":
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    elif mask_kind is None:
        mask = None
        pos[:] = torch.where(pos >= 0, L - 1 - Tq, -1)
        fingerprint[pos >= 0] = k[pos >= 0, 0, L - 1 - Tq].float()
    last = q[:, :, -1].float()
    near = torch.rand(B, Hq, generator=gen) < 0.7
    anchor = torch.where(near[..., None], last + 0.05 * torch.randn(B, Hq, D, generator=gen),
                         torch.randn(B, Hq, D, generator=gen))
    age = torch.randint(-1, MAX_REUSE + 1, (B, Hkv), generator=gen, dtype=torch.int32)
    key_norm = torch.rand(B, Hkv, generator=gen) * 2 * D ** 0.5
    counters = torch.randint(0, 100, (6,), generator=gen, dtype=torch.int64)
    state = GateState(*(t.to(DEVICE) for t in (pos, fingerprint, age, anchor, key_norm,
                                               counters)))
    return None if mask is None else mask.to(DEVICE), q.to(DEVICE), k.to(DEVICE), state


def _settle(B, Hq, Hkv, D, Tq, dtype, mask_kind, seed, psaw=-1.0, L=40):
    mask, q, k, state = _problem(B, Hq, Hkv, D, Tq, L, dtype, mask_kind, seed)
    operand = mask_operand(mask, B, Tq, L)
    ref = GateState(*(t.clone() for t in state))
    bounds, flags, scratch = bounds_and_gate(operand, q, k, SINK, LOCAL, BUDGET, 0, psaw, state,
                                             TAU, MAX_REUSE, 37)
    expected_bounds = compute_bounds(*operand, B, Tq, L, SINK, LOCAL, BUDGET, 0, q.device, psaw)
    assert torch.equal(bounds, expected_bounds), (bounds, expected_bounds)
    expected = prhs_gate_reference(expected_bounds, q, k, ref, TAU, MAX_REUSE)
    assert torch.equal(flags, expected), (flags, expected)
    for name, got, want in zip(GateState._fields, state, ref):
        if got.dtype == torch.float32:
            assert not got.isnan().any(), name
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(got, want), (name, got, want)
    assert scratch.shape == (B * Hkv, 37)
    assert not scratch[flags != 0].any()
    return expected


@pytest.mark.parametrize("B,Hq,Hkv,D,Tq,dtype,mask_kind", [
    (6, 4, 2, 16, 1, torch.float32, "bool"),
    (6, 6, 2, 24, 2, torch.bfloat16, "float"),  # a group of three, a head dim no power of two
    (12, 8, 8, 16, 1, torch.float16, "bool"),  # one query head per KV head
    (6, 4, 1, 32, 1, torch.bfloat16, "bool"),  # one KV head (Gemma 3 270M's layout)
    (6, 4, 2, 16, 1, torch.float32, None),  # no mask: every row holds the whole cache
])
def test_bounds_and_gate_against_the_references(B, Hq, Hkv, D, Tq, dtype, mask_kind):
    decided = torch.cat([_settle(B, Hq, Hkv, D, Tq, dtype, mask_kind, seed) for seed in range(2)])
    assert 0 < int(decided.sum()) < decided.numel()  # both decisions occur


def test_bounds_and_gate_with_a_recency_window_over_long_masks():
    # Masks of several chunks (the row's last chunk to finish runs the gate) and PSAW's
    # middle start.
    _settle(3, 4, 2, 16, 1, torch.float32, "bool", 3, psaw=0.25, L=5000)


@pytest.mark.parametrize("mask_kind,L", [("bool", None), (None, None), ("bool", 5000)])
def test_bounds_and_gate_with_the_inputs_loaded_after_the_bounds(monkeypatch, mask_kind, L):
    # A large launch: only the program that writes a row's bounds loads the gate's inputs,
    # after them (EARLY_LOADS_PER_SM).
    monkeypatch.setattr(gate_triton, "EARLY_LOADS_PER_SM", 0)
    extra = {} if L is None else {"psaw": 0.25, "L": L}
    _settle(3, 4, 2, 16, 1, torch.float32, mask_kind, 4, **extra)


def test_bounds_and_gate_names_a_state_of_the_wrong_shape():
    mask, q, k, state = _problem(2, 4, 2, 16, 1, 40, torch.float32, "bool", 0)
    state = state._replace(age=state.age[:, :1])
    with pytest.raises(ValueError, match=r"age must be contiguous torch.int32 of shape \(2, 2\)"):
        bounds_and_gate(mask_operand(mask, 2, 1, 40), q, k, SINK, LOCAL, BUDGET, 0, -1.0, state,
                        TAU, MAX_REUSE, 8)
