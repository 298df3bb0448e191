"""A retrieval's one pass over K: group-mass *keys* for the top-k (what CUDA runs).

``retrieve_keys`` scores the (row, KV head) slots that retrieve, and nothing else:

    _lse_kernel (WRITE_SCORES)  (B*Hkv, splits, Mb)  the only read of K: masked log2-domain
                                scores of the group's M = G * Tq query rows go to an fp32
                                scratch [B*Hkv, M, L], per-split log-sum-exp partials beside
                                them, and the largest key norm
    _keys_kernel                (B*Hkv, splits)      reads the scores back (M * 4 bytes per
                                position, against D * itemsize of K), forms the group mass
                                sum_r exp2(s_r - lse_r) of every middle position and writes
                                it as an int32 *key* for the radix top-k (``picks_triton``);
                                split 0 also sums the mass of the sinks and local window

With ``defer=True`` only the first kernel runs here: the radix top-k (``topk_triton``) forms
the keys from the scores itself, each of its programs over its own share of the row, before
its passes (one launch fewer, which matters most on steps where few slots retrieve).

A key is the fp32 mass's bit pattern plus one (masses are >= 0, so their bits order like
the masses), 0 for a position that cannot be picked (outside the middle, masked). Only the
middle ``[mid_lo, mid_hi)`` of an active slot is written: the top-k reads nothing else.

Both kernels share the whole grid among the active slots (``kpass_triton.assignment``):
a step where few slots retrieve still fills the GPU, and slots that reuse their set read
nothing. Bytes per retrieving (slot, position), Llama-3-8B shape (D=128 bf16, M=4): K once
(256) + scores written and read (32) + the key (4) + the top-k's passes over the keys
(``picks_triton``): about 1.2x one read of K, against 2x for the former two K passes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .bounds_triton import middle_range, row_bounds
from .kpass_triton import SPLIT_CHUNK, assignment, lse_pass, row_lse

__all__ = ["Keys", "PendingKeys", "retrieve_keys", "retrieval_bytes"]


@triton.jit
def _run_mass_from_scores(score_rows, start, end, lse, m_ok, BLOCK_N: tl.constexpr,
                          M_P2: tl.constexpr, L):
    """Group mass of the positions [start, end) summed, from the stored scores."""
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + tl.arange(0, BLOCK_N)
        s = tl.load(score_rows + pos[None, :], mask=m_ok[:, None] & (pos < end)[None, :],
                    other=float("-inf"))
        acc += tl.sum(tl.exp2(s - lse[:, None]), 0)
    return tl.sum(acc, 0)


@triton.jit
def block_keys(score_rows, pos, col_ok, lse, m_ok):
    """The keys (int32) of one block of positions from the stored scores of the group's
    rows (``score_rows``: [M_P2] row pointers) and the rows' log-sum-exp: the group mass's
    fp32 bits + 1, 0 where no query row may attend."""
    s = tl.load(score_rows + pos[None, :], mask=m_ok[:, None] & col_ok[None, :],
                other=float("-inf"))
    mass = tl.sum(tl.exp2(s - lse[:, None]), 0)
    # A position no query row may attend to has only -inf scores: not a candidate.
    allowed = tl.max(s, 0) > float("-inf")
    return tl.where(allowed, mass.to(tl.int32, bitcast=True) + 1, 0)


@triton.jit
def _write_keys(score_rows, key_row, start, end, lse, m_ok, BLOCK_N: tl.constexpr):
    """The keys of positions [start, end) (``block_keys``), stored."""
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + tl.arange(0, BLOCK_N)
        col_ok = pos < end
        tl.store(key_row + pos, block_keys(score_rows, pos, col_ok, lse, m_ok), mask=col_ok)


@triton.jit
def _window_mass(score_rows, BOUNDS, b, lse, m_ok, on, BLOCK_N: tl.constexpr,
                 M_P2: tl.constexpr, L):
    """The group mass of the sinks and the local window of batch row ``b`` (0 unless ``on``,
    and for a row that fits the budget), from the stored scores."""
    lo, hi, _, sink_end, local_start, fits = row_bounds(BOUNDS, b)
    w_on = on & (fits == 0)
    sink_hi = tl.where(w_on, tl.minimum(sink_end, hi), lo)
    loc_lo = tl.maximum(local_start, lo)
    loc_hi = tl.where(w_on, hi, loc_lo)
    w_sum = _run_mass_from_scores(score_rows, lo, sink_hi, lse, m_ok, BLOCK_N, M_P2, L)
    return w_sum + _run_mass_from_scores(score_rows, loc_lo, loc_hi, lse, m_ok, BLOCK_N, M_P2, L)


@triton.jit
def _keys_kernel(
    SCORES, BOUNDS, LSE_PART, KEYS, ACTIVE, WMASS,
    Hkv, M, L, num_splits, BH, lse_width,
    M_PAD: tl.constexpr, M_P2: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_ACTIVE: tl.constexpr, WANT_WINDOW_MASS: tl.constexpr,
    BLOCK_BH: tl.constexpr,
):
    # The same assignment of programs to active slots as the score pass, so each program
    # finds its slot's partials (the per-slot split count is what the score pass used).
    pid_bh, b, hkv, split, num_splits, ok = assignment(
        ACTIVE, tl.program_id(0), tl.program_id(1), BH, Hkv, num_splits, HAS_ACTIVE, BLOCK_BH)
    if ok == 0:  # a program left over: no slot of its own (a step where no slot retrieves)
        return
    offs_m = tl.arange(0, M_P2)
    m_ok = ((offs_m < M) & ok) != 0  # as int1 (the interpreter needs it)
    lse = row_lse(LSE_PART, pid_bh.to(tl.int64) * M_PAD + offs_m, lse_width, num_splits,
                  m_ok, M_P2, SPLIT_CHUNK)

    mid_lo, mid_hi = middle_range(BOUNDS + b * 8)
    mid_hi = tl.where(ok, mid_hi, mid_lo)
    n_blocks = tl.cdiv(tl.maximum(mid_hi - mid_lo, 0), BLOCK_N)
    per = tl.cdiv(n_blocks, num_splits)
    start = mid_lo + split * per * BLOCK_N
    end = tl.minimum(start + per * BLOCK_N, mid_hi)

    score_rows = SCORES + (pid_bh.to(tl.int64) * M + offs_m)[:, None] * L
    _write_keys(score_rows, KEYS + pid_bh.to(tl.int64) * L, start, end, lse, m_ok, BLOCK_N)
    if WANT_WINDOW_MASS:
        w_sum = _window_mass(score_rows, BOUNDS, b, lse, m_ok, (split == 0) & ok, BLOCK_N,
                             M_P2, L)
        tl.store(WMASS + pid_bh, w_sum, mask=((split == 0) & ok) != 0)


class PendingKeys(NamedTuple):
    """The pass over K's scores and log-sum-exp partials, for a top-k that forms the keys
    itself (``topk_picks(pending=...)``) rather than a launch of ``_keys_kernel``."""

    scores: torch.Tensor  # fp32 [B*Hkv, M, L]: masked log2-domain scores of active slots
    lse_part: torch.Tensor  # fp32 per-split log-sum-exp partials (``kpass_triton.LsePass``)
    lse_width: int
    num_splits: int  # the pass's splits per slot before sharing among active slots
    m_pad: int  # rows of a slot in lse_part
    rows: int  # M, query rows of a group
    window_mass: Optional[torch.Tensor]  # fp32 [B, Hkv] to fill, or None


class Keys(NamedTuple):
    """What a retrieval's pass over K leaves for the top-k."""

    keys: torch.Tensor  # int32 [B, Hkv, L]: mass bits + 1 in the middle of active slots
    key_norm: Optional[torch.Tensor]  # fp32 [B, Hkv]: largest ||k|| over the valid positions
    window_mass: Optional[torch.Tensor]  # fp32 [B, Hkv]: group mass of sinks + local window
    # int32 [B, Hkv, C]: the position of each key column when the keys are a compact row of
    # candidates (two-stage retrieval, ``pages_triton.candidate_keys``); None: column = position
    positions: Optional[torch.Tensor] = None
    # With ``retrieve_keys(defer=True)``: ``keys`` (and ``window_mass``) are still to be
    # written, by the top-k that is handed this.
    pending: Optional[PendingKeys] = None


def retrieve_keys(q, k, operand, bounds, scale, active=None, *, want_norm=False,
                  want_window_mass=False, num_splits=None, block_n=None,
                  defer=False) -> Keys:
    """Group-mass keys of the middle of every ``active`` (row, KV head) slot (all slots when
    ``active`` is None), from one read of K. ``operand`` is ``bounds_triton.mask_operand``'s
    and ``bounds`` ``bounds_triton.compute_bounds``'s for the same step. Rows of inactive slots are
    left undefined (callers select them away). ``defer``: launch only the pass over K; the
    keys and window masses are formed by ``topk_picks(pending=found.pending)`` (one launch
    fewer: the top-k's programs turn their own share of the scores into keys first)."""
    B, Hq, Tq, _ = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    M = (Hq // Hkv) * Tq
    scores = torch.empty((B * Hkv, M, L), dtype=torch.float32, device=q.device)
    first = lse_pass(q, k, operand, bounds, scale, active, want_norm=want_norm,
                     num_splits=num_splits, block_n=block_n, scores=scores)
    keys = torch.empty((B, Hkv, L), dtype=torch.int32, device=q.device)
    window_mass = (torch.empty((B, Hkv), dtype=torch.float32, device=q.device)
                   if want_window_mass else first.lse_part)
    if defer:
        pending = PendingKeys(scores, first.lse_part, first.lse_width, first.num_splits,
                              first.m_blocks * first.block_m, M,
                              window_mass if want_window_mass else None)
        return Keys(keys, first.key_norm(B, Hkv), pending.window_mass, pending=pending)
    m_p2 = triton.next_power_of_2(M)
    _keys_kernel[(B * Hkv, first.num_splits)](
        scores, bounds, first.lse_part, keys, first.active_t, window_mass,
        Hkv, M, L, first.num_splits, B * Hkv, first.lse_width,
        M_PAD=first.m_blocks * first.block_m, M_P2=m_p2, SPLIT_CHUNK=SPLIT_CHUNK,
        BLOCK_N=max(16, min(256, 4096 // m_p2)), HAS_ACTIVE=active is not None,
        WANT_WINDOW_MASS=want_window_mass, BLOCK_BH=triton.next_power_of_2(B * Hkv),
        num_warps=4,
    )
    return Keys(keys, first.key_norm(B, Hkv), window_mass if want_window_mass else None)


def retrieval_bytes(batch: int, kv_heads: int, n_valid: int, head_dim: int, itemsize: int,
                    q_rows: int = 4, kv_len: int | None = None, mask_bytes: int = 1,
                    key_passes: int = 10) -> int:
    """Bytes one retrieval of every slot moves with this design: K over the valid region
    once, the fp32 scores of the group's ``q_rows`` query rows written and read back, the
    int32 keys written once and read ``key_passes`` times by the top-k (two radix selects
    of four passes and a compaction each, with dilation), and the mask (read by the bounds
    kernels)."""
    kv_len = n_valid if kv_len is None else kv_len
    slots = batch * kv_heads
    k_bytes = slots * n_valid * head_dim * itemsize
    score_bytes = 2 * slots * q_rows * n_valid * 4
    key_bytes = (1 + key_passes) * slots * n_valid * 4
    return k_bytes + score_bytes + key_bytes + batch * kv_len * mask_bytes
