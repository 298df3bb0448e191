"""The passes over K of a retrieval (what CUDA runs): scores, log-sum-exp, group mass.

* the log-sum-exp pass over K (``_lse_kernel``, launched by ``lse_pass``), with the
  programs of the grid shared among the (row, KV head) slots that retrieve
  (``assignment``). The select engine's retrieval (``retrieve_triton``) runs it once,
  writing the scores beside it;
* ``group_mass``: that pass and a second one over K (``_mass_kernel``) giving the fp32 group
  mass of every position, for the rules that rank in torch rather than with the radix top-k
  (h2o's accumulated scores, hshare's label channels, ``delta_target``'s cumulative mass);
  ``oracle_group_mass_triton`` is its public form.

The passes split each row's valid region ``[lo, hi)`` (``bounds_triton``) evenly over their
programs, so K is never read beyond the last valid position of a static cache and rows that
fit the budget read no K at all.

GQA: a program owns one KV head of one batch row and a contiguous range of positions; the
``G * Tq`` query rows of the group are the M side of a small matmul (as in
``attend_triton``), so every K row is loaded once for all of them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .bounds_triton import (
    BLOCK_W,
    compute_bounds,
    mask_operand,
    mask_row_ptrs,
    masked_scores,
    middle_range,
    row_bounds,
    rows_share_mask,
    valid_positions,
)
from .pdl import launch_options, wait_for_inputs

__all__ = ["LOG2E", "SPLIT_CHUNK", "CONFIG", "LsePass", "Retrieval", "assignment",
           "check_inputs", "dot_f32", "group_mass", "load_q", "lse_final", "lse_pass",
           "lse_update", "num_sms", "oracle_group_mass_triton", "row_lse", "run_mass",
           "scores", "split_range", "splits_per_active"]

LOG2E = 1.4426950408889634

# H100 SXM; only used when no CUDA device is visible (interpreter runs).
_DEFAULT_NUM_SMS = 132

# Kernel configuration of the passes over K, module-level so that ``scripts/engine_sweep.py``
# can sweep it (its findings: README, "Kernel configurations"); programs_per_sm: how many
# programs per SM the splits aim for in all.
CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4}

SPLIT_CHUNK = 16  # split partials combined per iteration in pass 2


# ----------------------------------------------------------------------------------------
# the passes over K


@triton.jit
def split_range(lo, hi, split, num_splits, BLOCK_N: tl.constexpr):
    """This split's share of [lo, hi): whole blocks of BLOCK_N, the last one may be shorter."""
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    per = tl.cdiv(n_blocks, num_splits)
    start = lo + split * per * BLOCK_N
    end = tl.minimum(start + per * BLOCK_N, hi)
    return start, end


@triton.jit
def load_q(Q, b, hkv, offs_m, M, G, Tq, stride_qb, stride_qh, stride_qt, stride_qd,
           offs_d, d_ok):
    m_ok = offs_m < M
    head = hkv * G + (offs_m // Tq).to(tl.int64)
    tpos = (offs_m % Tq).to(tl.int64)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + tpos[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    return q, m_ok, tpos


@triton.jit
def scores(q, k_base, pos, col_ok, offs_d, d_ok, stride_kl, stride_kd, qk_scale_log2,
           DOT_F32: tl.constexpr):
    return _scores_and_keys(q, k_base, pos, col_ok, offs_d, d_ok, stride_kl, stride_kd,
                            qk_scale_log2, DOT_F32)[0]


@triton.jit
def _scores_and_keys(q, k_base, pos, col_ok, offs_d, d_ok, stride_kl, stride_kd, qk_scale_log2,
                     DOT_F32: tl.constexpr):
    """Log2-domain scores of a tile of keys, and the tile itself (for its norms)."""
    k = tl.load(k_base + pos[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    # "ieee" keeps fp32 inputs out of TF32; for bf16/fp16 it changes nothing.
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    return s * qk_scale_log2, k


@triton.jit
def splits_per_active(BH, num_splits, n_active):
    """How many of a launch's ``BH * num_splits`` programs each of ``n_active`` active slots
    gets (``assignment``; the top-k finds a slot's partials with it)."""
    return tl.maximum((BH * num_splits) // tl.maximum(n_active, 1), 1)


@triton.jit
def assignment(ACTIVE, pid_bh, split, BH, Hkv, num_splits, HAS_ACTIVE: tl.constexpr,
               BLOCK_BH: tl.constexpr):
    """(slot, b, hkv, split, splits, ok): which (row, KV head) slot (flat, and as batch row
    and KV head) and which of its splits this program scores. Without activity flags, slot
    ``pid_bh`` and split ``split`` of ``num_splits``. With them, the ``BH * num_splits`` programs are shared evenly among the
    active slots only (each gets ``BH * num_splits // n_active`` splits), so a step where
    few slots retrieve still fills the GPU; ``ok`` is False for programs left over."""
    if HAS_ACTIVE:
        offs = tl.arange(0, BLOCK_BH)
        flags = tl.load(ACTIVE + offs, mask=offs < BH, other=0) != 0
        fi = flags.to(tl.int32)
        n_active = tl.sum(fi, 0)
        splits = splits_per_active(BH, num_splits, n_active)
        pid = pid_bh * num_splits + split
        nth = pid // splits
        rank = tl.cumsum(fi, 0) - 1
        slot = tl.sum(tl.where(flags & (rank == nth), offs, 0), 0)
        split = pid % splits
        ok = nth < n_active
    else:
        slot, splits, ok = pid_bh, num_splits, pid_bh >= 0
    return slot, (slot // Hkv).to(tl.int64), (slot % Hkv).to(tl.int64), split, splits, ok


@triton.jit
def lse_update(m_i, l_i, s):
    """Online log-sum-exp (log2 domain): the running max ``m_i`` and sum ``l_i`` of each row
    after a tile of scores ``s`` [rows, cols]; rows with nothing allowed so far stay (-inf, 0)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)


@triton.jit
def lse_final(m_i, l_i):
    """The log-sum-exp (log2 domain) of an online pass; -inf for rows with nothing allowed."""
    return tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))


@triton.jit
def _lse_kernel(
    Q, K, MASK, BOUNDS, LSE_PART, ACTIVE, NORM_PART, SCORES,
    qk_scale_log2, mask_min,
    Hkv, G, Tq, L, num_splits, BH, lse_width,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_mt, stride_ml,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    M_PAD: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, WANT_NORM: tl.constexpr, TQ_P2: tl.constexpr,
    BLOCK_BH: tl.constexpr, WRITE_SCORES: tl.constexpr, SHARED_ROWS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    # (row, KV head) slots that reuse a selection read no K at all; the active ones share
    # every program (see assignment). With WRITE_SCORES the masked log2-domain scores of
    # every row go to SCORES [BH, M, L] (fp32), so the group mass needs no second read of K
    # (``retrieve_triton``).
    pid_bh, b, hkv, split, num_splits, ok = assignment(
        ACTIVE, tl.program_id(0), tl.program_id(1), BH, Hkv, num_splits, HAS_ACTIVE, BLOCK_BH)
    if ok == 0:  # a program left over (nothing reads its partials): done at once
        return
    pid_m = tl.program_id(2)
    M = G * Tq

    lo, hi, _, _, _, fits = row_bounds(BOUNDS, b)
    hi = tl.where(fits | (ok == 0), lo, hi)  # rows that fit the budget are not scored
    start, end = split_range(lo, hi, split, num_splits, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, m_ok, tpos = load_q(Q, b, hkv, offs_m, M, G, Tq, stride_qb, stride_qh, stride_qt,
                           stride_qd, offs_d, d_ok)
    k_base = K + b * stride_kb + hkv * stride_kh
    mask_rows = mask_row_ptrs(MASK + b * stride_mb, tpos * stride_mt, SHARED_ROWS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    norm_sq = tl.zeros([BLOCK_N], tl.float32)  # largest squared key norm seen, per lane
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + tl.arange(0, BLOCK_N)
        col_ok = pos < end
        s, kt = _scores_and_keys(q, k_base, pos, col_ok, offs_d, d_ok, stride_kl, stride_kd,
                                 qk_scale_log2, DOT_F32)
        s = masked_scores(s, mask_rows, pos, m_ok, col_ok, stride_ml, mask_min, MASK_KIND)
        if WRITE_SCORES:
            srow = (pid_bh.to(tl.int64) * M + offs_m) * L
            tl.store(SCORES + srow[:, None] + pos[None, :], s,
                     mask=((m_ok[:, None] & col_ok[None, :]) & ok) != 0)
        m_i, l_i = lse_update(m_i, l_i, s)
        if WANT_NORM:  # norms of the tile just loaded for the scores
            kf = kt.to(tl.float32)
            if TQ_P2 <= BLOCK_M:
                # Valid positions are those some query row may attend to: the masked scores
                # say so, for row tile 0 (the one that stores the norms) holds every query
                # position of the first head.
                valid = tl.max(s, 0) > float("-inf")
            else:
                valid = valid_positions(MASK, b, pos, col_ok, Tq, stride_mb, stride_mt,
                                        stride_ml, mask_min, MASK_KIND, TQ_P2)
            norm_sq = tl.maximum(norm_sq, tl.where(valid, tl.sum(kf * kf, 1), 0.0))
    lse = lse_final(m_i, l_i)
    row = pid_bh.to(tl.int64) * M_PAD + offs_m
    tl.store(LSE_PART + row * lse_width + split, lse, mask=((offs_m >= 0) & ok) != 0)
    if WANT_NORM:
        tl.store(NORM_PART + pid_bh.to(tl.int64) * lse_width + split, tl.max(norm_sq, 0),
                 mask=(ok & (pid_m == 0)) != 0)


@triton.jit
def run_mass(q, k_base, start, end, lse, mask_rows, m_ok, offs_d, d_ok, stride_kl, stride_kd,
             stride_ml, qk_scale_log2, mask_min, BLOCK_N: tl.constexpr,
             MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr):
    """Group mass of the positions [start, end) summed (a short run: a window)."""
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + tl.arange(0, BLOCK_N)
        col_ok = pos < end
        s = scores(q, k_base, pos, col_ok, offs_d, d_ok, stride_kl, stride_kd, qk_scale_log2,
                   DOT_F32)
        s = masked_scores(s, mask_rows, pos, m_ok, col_ok, stride_ml, mask_min, MASK_KIND)
        acc += tl.sum(tl.exp2(s - lse[:, None]), 0)
    return tl.sum(acc, 0)


@triton.jit
def row_lse(LSE_PART, row, lse_width, num_splits, row_ok, BLOCK_M: tl.constexpr,
            SPLIT_CHUNK: tl.constexpr):
    """[BLOCK_M] log-sum-exp (log2 domain) of each query row over the whole valid region,
    from pass 1's per-split partials; 0 for a row with nothing allowed (its scores are all
    -inf, so subtracting 0 makes every exp2 exactly 0: it adds no mass, and no NaN). One
    pass over the partials, ``SPLIT_CHUNK`` of them per load: each element of the tile keeps
    a running max and sum (an online log-sum-exp), merged after the loop. The partials were
    written by another launch, so each load waits on L2: one pass, not a pass for the max
    and another for the sum, halves those waits where a slot has hundreds of splits (one
    retrieving slot shares the whole K pass)."""
    # Accumulate elementwise and reduce after the loop: Triton 3.6's thread-locality pass
    # fails to compile a reduction carried through the loop here.
    offs_s = tl.arange(0, SPLIT_CHUNK)
    mx_t = tl.full([BLOCK_M, SPLIT_CHUNK], float("-inf"), tl.float32)
    acc_t = tl.zeros([BLOCK_M, SPLIT_CHUNK], tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        part = tl.load(LSE_PART + row[:, None] * lse_width + s0 + offs_s[None, :],
                       mask=(((s0 + offs_s[None, :]) < num_splits) & row_ok[:, None]) != 0,
                       other=float("-inf"))
        mx_new = tl.maximum(mx_t, part)
        # While an element has seen only -inf its max is -inf: subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out, and its sum stays exactly 0.
        mx_safe_t = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        acc_t = acc_t * tl.exp2(mx_t - mx_safe_t) + tl.exp2(part - mx_safe_t)
        mx_t = mx_new
    mx = tl.max(mx_t, 1)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    acc = tl.sum(acc_t * tl.exp2(mx_t - mx_safe[:, None]), 1)
    return tl.where(acc > 0.0, mx_safe + tl.log2(tl.where(acc > 0.0, acc, 1.0)), 0.0)


@triton.jit
def _mass_kernel(
    Q, K, MASK, BOUNDS, LSE_PART, MASS, ACTIVE, WMASS,
    qk_scale_log2, mask_min,
    B, Hkv, G, Tq, L, num_splits, BH, lse_width,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_mt, stride_ml,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    M_PAD: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
    TQ_P2: tl.constexpr, SPLIT_CHUNK: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, WANT_WINDOW_MASS: tl.constexpr, BLOCK_BH: tl.constexpr,
    SHARED_ROWS: tl.constexpr,
):
    # Inactive slots neither read K nor write: their mass is never looked at. The same
    # assignment as pass 1, so each program finds its slot's partials.
    pid_bh, b, hkv, split, num_splits, ok = assignment(
        ACTIVE, tl.program_id(0), tl.program_id(1), BH, Hkv, num_splits, HAS_ACTIVE, BLOCK_BH)
    if ok == 0:  # a program left over (nothing reads its partials): done at once
        return
    pid_m = tl.program_id(2)
    M = G * Tq

    bnd = BOUNDS + b * 8
    mid_lo, mid_hi = middle_range(bnd)
    mid_hi = tl.where(ok, mid_hi, mid_lo)
    fill_end = tl.where(ok, L, 0)
    start, end = split_range(mid_lo, mid_hi, split, num_splits, BLOCK_N)

    # Each row's log-sum-exp over the whole valid region, from pass 1's per-split partials.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row = pid_bh.to(tl.int64) * M_PAD + offs_m
    lse = row_lse(LSE_PART, row, lse_width, num_splits, (offs_m >= 0) & ok, BLOCK_M,
                  SPLIT_CHUNK)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, m_ok, tpos = load_q(Q, b, hkv, offs_m, M, G, Tq, stride_qb, stride_qh, stride_qt,
                           stride_qd, offs_d, d_ok)
    k_base = K + b * stride_kb + hkv * stride_kh
    mask_rows = mask_row_ptrs(MASK + b * stride_mb, tpos * stride_mt, SHARED_ROWS)
    mass_row = MASS + ((pid_m * B + b) * Hkv + hkv) * L

    for s0 in range(start, end, BLOCK_N):
        pos = s0 + tl.arange(0, BLOCK_N)
        col_ok = pos < end
        s = scores(q, k_base, pos, col_ok, offs_d, d_ok, stride_kl, stride_kd,
                   qk_scale_log2, DOT_F32)
        s = masked_scores(s, mask_rows, pos, m_ok, col_ok, stride_ml, mask_min, MASK_KIND)
        mass = tl.sum(tl.exp2(s - lse[:, None]), 0)
        # Validity from all Tq mask rows (this tile may hold only some of the group's rows).
        valid = valid_positions(MASK, b, pos, col_ok, Tq, stride_mb, stride_mt, stride_ml,
                                mask_min, MASK_KIND, TQ_P2)
        tl.store(mass_row + pos, tl.where(valid, mass, float("-inf")), mask=col_ok)

    if WANT_WINDOW_MASS:
        # The mass the sinks and the local window hold (what a selection retains besides its
        # picks): split 0 scores those few positions, [lo, sink_end) and [local_start, hi).
        lo, hi, _, sink_end, local_start, fits = row_bounds(BOUNDS, b)
        w_on = (split == 0) & (fits == 0) & ok
        sink_hi = tl.where(w_on, tl.minimum(sink_end, hi), lo)
        loc_lo = tl.maximum(local_start, lo)
        loc_hi = tl.where(w_on, hi, loc_lo)
        w_sum = run_mass(q, k_base, lo, sink_hi, lse, mask_rows, m_ok, offs_d, d_ok,
                         stride_kl, stride_kd, stride_ml, qk_scale_log2, mask_min, BLOCK_N,
                         MASK_KIND, DOT_F32)
        w_sum += run_mass(q, k_base, loc_lo, loc_hi, lse, mask_rows, m_ok, offs_d, d_ok,
                          stride_kl, stride_kd, stride_ml, qk_scale_log2, mask_min, BLOCK_N,
                          MASK_KIND, DOT_F32)
        tl.store(WMASS + pid_m * B * Hkv + pid_bh, w_sum,
                 mask=((split == 0) & ok) != 0)

    # -inf everywhere outside the scored middle (sinks, local window, unfilled cache, whole
    # rows that fit): pure stores, this split's share of [0, L).
    w_start, w_end = split_range(tl.full([], 0, tl.int32), tl.full([], 0, tl.int32) + fill_end,
                                 split, num_splits, BLOCK_W)
    for s0 in range(w_start, w_end, BLOCK_W):
        pos = s0 + tl.arange(0, BLOCK_W)
        outside = (pos < mid_lo) | (pos >= mid_hi)
        tl.store(mass_row + pos, tl.full([BLOCK_W], float("-inf"), tl.float32),
                 mask=(pos < w_end) & outside)


# ----------------------------------------------------------------------------------------
# host side


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def _pick_splits(n_blocks: int, n_base_programs: int, num_sms: int) -> int:
    """Splits of the K passes: about ``programs_per_sm`` programs per SM in all (one wave,
    several resident per SM to hide load latency), never more splits than blocks of the
    longest possible row."""
    per_sm = CONFIG["programs_per_sm"]
    return max(1, min(triton.cdiv(per_sm * num_sms, max(1, n_base_programs)), n_blocks))


def check_inputs(q, k):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("expected q [B, Hq, Tq, D] and k [B, Hkv, L, D]")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={k.shape[1]}")
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q/k must share one of fp16/bf16/fp32, got {q.dtype}/{k.dtype}")


class Retrieval(NamedTuple):
    """What the two K passes produce (see ``group_mass``)."""

    mass: torch.Tensor  # fp32 [B, Hkv, L]: group mass in the middle, -inf elsewhere
    bounds: torch.Tensor  # int32 [B, 8]
    operand: tuple  # the mask operand (tensor, kind, strides, mask_min)
    key_norm: Optional[torch.Tensor]  # fp32 [B, Hkv]: largest ||k|| over the valid positions
    window_mass: Optional[torch.Tensor]  # fp32 [B, Hkv]: group mass of sinks + local window


class LsePass(NamedTuple):
    """The log-sum-exp pass over K of one step, as launched (``lse_pass``): what the pass
    after it needs to read its partials with the same assignment of programs."""

    lse_part: torch.Tensor  # fp32 [B*Hkv*M_PAD, lse_width]: per-split log-sum-exp partials
    norm_part: Optional[torch.Tensor]  # fp32 [B*Hkv, lse_width]: squared key norms, or None
    lse_width: int
    num_splits: int
    m_blocks: int
    block_m: int
    block_n: int
    mask_t: torch.Tensor  # the mask (or a placeholder pointer when there is none)
    active_t: torch.Tensor
    qk_scale_log2: float

    def key_norm(self, batch: int, kv_heads: int) -> Optional[torch.Tensor]:
        """Largest ||k|| over the valid positions, fp32 ``[B, Hkv]`` (with want_norm)."""
        if self.norm_part is None:
            return None
        return self.norm_part.amax(-1).sqrt().view(batch, kv_heads)


def lse_pass(q, k, operand, bounds, scale, active=None, *, want_norm=False, num_splits=None,
             block_n=None, scores=None) -> LsePass:
    """Launch the log-sum-exp pass over K for the ``active`` slots (all when None), taking
    the key norms (``want_norm``) and writing the scores to ``scores`` ([B*Hkv, M, L] fp32)
    when given. With activity flags the active slots share all programs: up to every split
    of every slot may serve one slot, so the partials are as wide as the grid."""
    check_inputs(q, k)
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    M = (Hq // Hkv) * Tq
    device = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    mask_t, kind, ms, mask_min = operand
    if mask_t is None:
        mask_t = q  # unused placeholder pointer
    active_t = bounds if active is None else active.reshape(B * Hkv).to(torch.int32)
    block_n = block_n or CONFIG["block_n"]
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    m_blocks = triton.cdiv(M, block_m)
    n_blocks = max(1, triton.cdiv(L, block_n))
    if num_splits is None:
        num_splits = _pick_splits(n_blocks, B * Hkv * m_blocks, num_sms(device))
    num_splits = max(1, min(int(num_splits), n_blocks))
    lse_width = B * Hkv * num_splits if active is not None else num_splits
    lse_part = torch.empty((B * Hkv * m_blocks * block_m, lse_width), dtype=torch.float32,
                           device=device)
    # Zero-filled: a slot's unused columns must not win the max.
    norm_part = (torch.zeros((B * Hkv, lse_width), dtype=torch.float32, device=device)
                 if want_norm else None)
    qk_scale_log2 = float(scale) * LOG2E
    _lse_kernel[(B * Hkv, num_splits, m_blocks)](
        q, k, mask_t, bounds, lse_part, active_t,
        lse_part if norm_part is None else norm_part, lse_part if scores is None else scores,
        qk_scale_log2, mask_min, Hkv, Hq // Hkv, Tq, L, num_splits, B * Hkv, lse_width,
        *q.stride(), *k.stride(), *ms,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        M_PAD=m_blocks * block_m, MASK_KIND=kind, DOT_F32=dot_f32(q),
        HAS_ACTIVE=active is not None, WANT_NORM=want_norm,
        TQ_P2=triton.next_power_of_2(Tq), BLOCK_BH=triton.next_power_of_2(B * Hkv),
        WRITE_SCORES=scores is not None, SHARED_ROWS=rows_share_mask(operand, Tq),
        num_warps=CONFIG["num_warps"], num_stages=CONFIG["num_stages"], **launch_options(device),
    )
    return LsePass(lse_part, norm_part, lse_width, num_splits, m_blocks, block_m, block_n,
                   mask_t, active_t, qk_scale_log2)


def dot_f32(q) -> bool:
    """The interpreter multiplies bf16 tiles as raw bit patterns; upcasting is exact."""
    return q.device.type != "cuda" and q.dtype != torch.float32


def group_mass(q, k, mask, scale, sink, local, budget, min_context, *, num_splits=None,
               block_n=None, bounds=None, active=None, want_norm=False,
               want_window_mass=False) -> Retrieval:
    """The two K passes of the rules that rank in torch (h2o, hshare, ``delta_target``).

    ``active`` (bool/int ``[B, Hkv]``, optional): only these (row, KV head) slots are scored;
    the others read no K and their rows of ``mass``, ``key_norm`` and ``window_mass`` are
    left undefined (callers select them away). ``want_norm`` / ``want_window_mass`` add the
    largest key norm over the valid positions and the mass of the sink + local windows.
    ``bounds`` may be passed in when the caller computed them already (same arguments).
    """
    check_inputs(q, k)
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    device = q.device
    operand = mask_operand(mask, B, Tq, L)
    if bounds is None:
        bounds = compute_bounds(*operand, B, Tq, L, sink, local, budget, min_context, device)
    first = lse_pass(q, k, operand, bounds, scale, active, want_norm=want_norm,
                     num_splits=num_splits, block_n=block_n)
    _, kind, ms, mask_min = operand
    mass = torch.empty((first.m_blocks, B, Hkv, L), dtype=torch.float32, device=device)
    window_mass = (torch.empty((first.m_blocks, B, Hkv), dtype=torch.float32, device=device)
                   if want_window_mass else first.lse_part)
    _mass_kernel[(B * Hkv, first.num_splits, first.m_blocks)](
        q, k, first.mask_t, bounds, first.lse_part, mass, first.active_t, window_mass,
        first.qk_scale_log2, mask_min, B, Hkv, Hq // Hkv, Tq, L, first.num_splits, B * Hkv,
        first.lse_width, *q.stride(), *k.stride(), *ms,
        D=D, BLOCK_M=first.block_m, BLOCK_N=first.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)), M_PAD=first.m_blocks * first.block_m,
        MASK_KIND=kind, DOT_F32=dot_f32(q), TQ_P2=triton.next_power_of_2(Tq),
        SPLIT_CHUNK=SPLIT_CHUNK, BLOCK_W=BLOCK_W, HAS_ACTIVE=active is not None,
        WANT_WINDOW_MASS=want_window_mass, BLOCK_BH=triton.next_power_of_2(B * Hkv),
        SHARED_ROWS=rows_share_mask(operand, Tq),
        num_warps=CONFIG["num_warps"], num_stages=CONFIG["num_stages"],
    )
    # M > 64 query rows per group (e.g. G=8 with Tq=16): partial masses per row tile.
    mass = mass[0] if first.m_blocks == 1 else mass.sum(0)
    if want_window_mass:
        window_mass = window_mass[0] if first.m_blocks == 1 else window_mass.sum(0)
    return Retrieval(mass, bounds, operand, first.key_norm(B, Hkv),
                     window_mass if want_window_mass else None)


def oracle_group_mass_triton(q, k, mask=None, scale=None, *, num_splits=None, block_n=None):
    """The score part alone: fp32 ``[B, Hkv, L]`` group mass at the valid positions (softmax
    of ``q . k * scale + bias`` over each query row's allowed positions, summed over the
    group's query heads and rows), ``-inf`` at positions no query row may attend to."""
    return group_mass(q, k, mask, scale, 0, 0, -1, 0, num_splits=num_splits,
                      block_n=block_n).mass


