"""Two-stage retrieval on the GPU (``retrieval="pages"``; its reference is ``pages.py``).

The launches of a decode step, each gated by the slots it concerns:

    _summaries_kernel     (B*Hkv, splits)  keeps the page summaries: for a row that continues
                                           its sequence only the pages of the step's new keys
                                           are recomputed from K (one page of P keys per
                                           slot, usually); a row that does not continue is
                                           rebuilt, every stored page
    _page_scores_kernel   (blocks, B*Hkv)  stage one, retrieving slots only: Quest's bound of
                                           every page from its summary (2/P of K's bytes, one
                                           coalesced pass), as a top-k key per page (0 for
                                           pages with no retrievable position)
    _topk_kernel                           the best pages, ascending (``topk_triton`` over
                                           whole rows of page keys; ties to the lower page)
    _candidate_lse_kernel (B*Hkv, splits)  stage two, retrieving slots only: the exact scores
    _candidate_keys_kernel                 of the best pages' keys and of the sink and local
                                           windows (one read of those rows), then the group
                                           mass of each candidate as a top-k key (``Keys``
                                           of ``retrieve_triton``: mass bits + 1, 0 where
                                           nothing may be picked) in a compact row of the
                                           candidates with their positions, and the
                                           windows' mass

The radix top-k then picks from that compact row (``topk_picks(positions=...)``) as it does
after an exact retrieval, and writes positions. A retrieving slot reads the summaries plus
``candidates x budget`` rows of K plus its windows, instead of all of K; no torch top-k or
sort runs. Quest (``quest_pages``) is stage one alone: page keys and the page top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.runtime.errors
from triton.compiler.errors import CompilationError

from .pages import PAGE_MAX, PAGE_MIN, candidate_pages
from .retrieve_triton import Keys
from .bounds_triton import (
    mask_row_ptrs,
    masked_scores,
    middle_range,
    row_bounds,
    row_bounds_read,
    row_contiguous,
    rows_share_mask,
    valid_in_row,
    valid_positions,
)
from .kpass_triton import (
    LOG2E,
    SPLIT_CHUNK,
    dot_f32,
    load_q,
    lse_final,
    lse_update,
    row_lse,
    run_mass,
    scores,
)
from .topk_triton import topk_picks

__all__ = ["PagesKernelUnavailable", "candidate_keys", "maintain_summaries_triton", "page_keys",
           "page_positions", "quest_pages", "two_stage_bytes", "two_stage_keys"]

_SUB = 16  # keys loaded per iteration of the summaries kernel

# Kernel configuration; module-level so that ``scripts/pages_sweep.py`` can sweep it (README,
# "Kernel configurations"). ``pages_per_program``: the page-bound kernel's pages per program
# (at most 2048 positions' mask in registers); ``candidate_splits``: programs per slot of
# the candidate kernels.
CONFIG = {"pages_per_program": 64, "page_warps": 4, "candidate_splits": 16, "candidate_warps": 4}
_SIGN_BIT = tl.constexpr(-(2 ** 31))

# Set when one of the page kernels failed to compile on this machine: the steps that use page
# summaries then run the torch reference (the caller logs why).
unavailable: str | None = None


class PagesKernelUnavailable(RuntimeError):
    """A page kernel cannot compile here. Raised before that kernel ran; what earlier ones of
    the step did is what the reference redoes the same way (summaries of the same pages
    recomputed), so the reference may take the step over."""


_COMPILE_ERRORS = (CompilationError, RuntimeError) + tuple(
    getattr(triton.runtime.errors, name) for name in ("OutOfResources", "PTXASError")
    if hasattr(triton.runtime.errors, name))


def _launch(kernel, grid, *args, **meta) -> None:
    global unavailable
    if unavailable is not None:
        raise PagesKernelUnavailable(unavailable)
    try:
        kernel[grid](*args, **meta)
    # Compiled and loaded before it runs, so nothing is written yet: a front-end error, a
    # failing backend pass (RuntimeError), ptxas, or too few registers / shared memory.
    except _COMPILE_ERRORS as exc:
        unavailable = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise PagesKernelUnavailable(unavailable) from exc


@triton.jit
def _summaries_kernel(
    K, MASK, BOUNDS, OLD_NEWEST, REBUILD, LOW, HIGH, Hkv, Tq, L, pages, num_splits,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_mt, stride_ml, mask_min,
    stride_sb, stride_sh, stride_sp, stride_sd,
    D: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr,
    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    lo, hi, _, _, _, _ = row_bounds(BOUNDS, b)
    rebuild = tl.load(REBUILD + b) != 0
    # A continuing row recomputes the page of its oldest valid key (entry 0: a sliding window
    # drops keys there) and the pages its new keys land in (entries 1...: from the page of the
    # position after its old newest one to the page of its new newest one); a rebuilt row,
    # every page (entries 1...).
    old = tl.load(OLD_NEWEST + b).to(tl.int32)
    first = tl.where(rebuild, 0, tl.maximum(old + 1, 0) // P)
    last = tl.where(rebuild, pages - 1, tl.minimum((hi - 1) // P, pages - 1))
    lo_page = tl.minimum(lo // P, pages - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_base = K + b * stride_kb + hkv * stride_kh
    s_base = b * stride_sb + hkv * stride_sh + offs_d * stride_sd
    for entry in range(split, last - first + 2, num_splits):
        page = tl.where(entry == 0, lo_page, first + entry - 1)
        low = tl.full([BLOCK_D], float("inf"), tl.float32)
        high = tl.full([BLOCK_D], float("-inf"), tl.float32)
        for r0 in range(0, P, SUB):
            pos = page * P + r0 + tl.arange(0, SUB)
            in_range = (pos >= lo) & (pos < hi) & (r0 + tl.arange(0, SUB) < P)
            valid = valid_positions(MASK, b, pos, in_range, Tq, stride_mb, stride_mt,
                                    stride_ml, mask_min, MASK_KIND, TQ_P2)
            k = tl.load(k_base + pos[:, None].to(tl.int64) * stride_kl
                        + offs_d[None, :] * stride_kd, mask=valid[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            low = tl.minimum(low, tl.min(tl.where(valid[:, None], k, float("inf")), 0))
            high = tl.maximum(high, tl.max(tl.where(valid[:, None], k, float("-inf")), 0))
        at = s_base + page * stride_sp
        tl.store(LOW + at, low.to(LOW.dtype.element_ty), mask=d_ok)
        tl.store(HIGH + at, high.to(HIGH.dtype.element_ty), mask=d_ok)


def maintain_summaries_triton(st: dict, k, operand, bounds, old_newest, continuing, plan,
                              q_len: int) -> None:
    """``pages.maintain_summaries`` on the GPU: the pages of the step's new keys for rows
    that continue (``old_newest``: the state's newest position before this step), every page
    for the others."""
    B, Hkv, L, D = k.shape
    low, high = st[PAGE_MIN][:B], st[PAGE_MAX][:B]
    pages = low.shape[2]
    mask_t, kind, ms, mask_min = operand
    if mask_t is None:
        mask_t = bounds  # unused placeholder pointer
    rebuild = (~continuing).to(torch.int32)
    Tq = q_len
    num_splits = max(1, min(64, triton.cdiv(pages, 16)))
    _launch(_summaries_kernel, (B * Hkv, num_splits),
            k, mask_t, bounds, old_newest, rebuild, low, high, Hkv, Tq, L, pages, num_splits,
            *k.stride(), *ms, mask_min, *low.stride(),
            D=D, P=plan.page_size, BLOCK_D=max(16, triton.next_power_of_2(D)),
            SUB=min(_SUB, triton.next_power_of_2(plan.page_size)), MASK_KIND=kind,
            TQ_P2=triton.next_power_of_2(Tq), num_warps=4,
    )


@triton.jit
def _page_scores_kernel(
    Q, MASK, BOUNDS, LOW, HIGH, ACTIVE, OUT, Hkv, G, Tq, pages,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_mb, stride_mt, stride_ml, mask_min,
    stride_sb, stride_sh, stride_sp, stride_sd,
    D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    M_P2: tl.constexpr, MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
):
    # Page blocks run along the grid's x axis (2^31 - 1 programs; y stops at 65535, which one
    # row of 16-page blocks passes at 1M pages: page_size 1 past a 1M-position cache).
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    # Two waits on memory: the slot's flag and its row's bounds together, then the query
    # rows, the summaries and the mask (where the row needs one). A slot that reuses its
    # set returns after the first (``row_bounds_read``: the bounds load before the branch).
    retrieves = tl.load(ACTIVE + pid_bh)
    lo, hi, _, _, _, _ = row_bounds(BOUNDS, b)
    contiguous = row_contiguous(BOUNDS, b)
    mid_lo, mid_hi = middle_range(BOUNDS + b * 8)
    if (retrieves == 0) & row_bounds_read(BOUNDS, b):
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_m = tl.arange(0, M_P2)
    q, _, _ = load_q(Q, b, hkv, offs_m, G * Tq, G, Tq, stride_qb, stride_qh, stride_qt,
                     stride_qd, offs_d, d_ok)
    first = tl.program_id(0) * BLOCK_P
    offs_p = first + tl.arange(0, BLOCK_P)
    p_ok = offs_p < pages
    # A page may be a candidate when it holds a retrievable position (valid, in the middle):
    # the block's positions are contiguous, so the mask is read in one coalesced load, and
    # not at all for a contiguous row.
    pos = first * P + tl.arange(0, BLOCK_P * P)
    inside = (pos < pages * P) & (pos >= mid_lo) & (pos < mid_hi)
    valid = valid_in_row(MASK, b, pos, inside, lo, hi, contiguous, Tq, stride_mb, stride_mt,
                         stride_ml, mask_min, MASK_KIND, TQ_P2)
    pickable = tl.max(tl.reshape(valid.to(tl.int32), [BLOCK_P, P]), 1) != 0
    # The summaries of the pages that overlap the middle, read whatever the mask says.
    overlaps = p_ok & (offs_p * P < mid_hi) & (offs_p * P + P > mid_lo)
    at = (b * stride_sb + hkv * stride_sh + offs_p[:, None].to(tl.int64) * stride_sp
          + offs_d[None, :] * stride_sd)
    ld = (overlaps[:, None] & d_ok[None, :]) != 0  # as int1 (the interpreter needs it)
    low = tl.load(LOW + at, mask=ld, other=0.0).to(tl.float32)
    high = tl.load(HIGH + at, mask=ld, other=0.0).to(tl.float32)
    q = q.to(tl.float32)
    # sum_rows sum_d max(q*min, q*max) = max . sum_rows(q+) + min . sum_rows(q-), as
    # ``pages.page_bounds``: two multiply-adds per summary element.
    q_pos = tl.sum(tl.maximum(q, 0.0), 0)
    q_neg = tl.sum(tl.minimum(q, 0.0), 0)
    score = tl.sum(high * q_pos[None, :] + low * q_neg[None, :], 1)
    # A top-k key: the fp32 bits made to order as unsigned ints (never 0 for a finite bound),
    # 0 where no position may be picked.
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits ^ _SIGN_BIT, ~bits)
    tl.store(OUT + pid_bh.to(tl.int64) * pages + offs_p, tl.where(pickable, key, 0), mask=p_ok)


def page_keys(q, st: dict, operand, bounds, active, plan, length: int) -> torch.Tensor:
    """Stage one: int32 ``[B, Hkv, pages]`` radix top-k keys of the pages of a cache of
    ``length`` positions, ordered as their bounds (``pages.page_bounds``), for the ``active``
    slots (int32 ``[B * Hkv]``; rows of the others are undefined), 0 where no position is
    retrievable."""
    B, Hq, Tq, D = q.shape
    low, high = st[PAGE_MIN][:B], st[PAGE_MAX][:B]
    Hkv, pages = low.shape[1], triton.cdiv(length, plan.page_size)
    mask_t, kind, ms, mask_min = operand
    if mask_t is None:
        mask_t = bounds
    out = torch.empty((B, Hkv, pages), dtype=torch.int32, device=q.device)
    block_p = max(2, min(CONFIG["pages_per_program"], 2048 // plan.page_size))
    _launch(_page_scores_kernel, (triton.cdiv(pages, block_p), B * Hkv),
            q, mask_t, bounds, low, high, active, out, Hkv, Hq // Hkv, Tq, pages,
            *q.stride(), *ms, mask_min, *low.stride(),
            D=D, P=plan.page_size, BLOCK_P=block_p, BLOCK_D=max(16, triton.next_power_of_2(D)),
            M_P2=triton.next_power_of_2((Hq // Hkv) * Tq), MASK_KIND=kind, TQ_P2=triton.next_power_of_2(Tq),
            num_warps=CONFIG["page_warps"],
    )
    return out


@triton.jit
def _candidate_pages(PAGES, slot, group, n_pages, P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The page of each column of the ``group``-th block of BLOCK_N of a slot's candidates
    (the positions of its list of pages, in list order: several pages per block when
    P < BLOCK_N, part of one otherwise); -1 past the list."""
    col = group * BLOCK_N + tl.arange(0, BLOCK_N)  # column among the n_pages * P candidates
    entry = col // P
    return tl.load(PAGES + slot * n_pages + entry, mask=entry < n_pages, other=-1)


@triton.jit
def _candidate_positions(page, group, mid_lo, mid_hi, P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``group``-th block's positions (``page``: ``_candidate_pages``), their columns in
    the candidate scratch, and which may be picked."""
    col = group * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = page * P + col % P
    ok = (page >= 0) & (pos >= mid_lo) & (pos < mid_hi)
    return pos, col, ok


@triton.jit
def _tile(q, k_base, mask_rows, pos, ok, m_ok, offs_d, d_ok, stride_kl, stride_kd, stride_ml,
          qk_scale_log2, mask_min, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr):
    """Masked log2-domain scores of the group's query rows against the keys at ``pos``."""
    s = scores(q, k_base, pos, ok, offs_d, d_ok, stride_kl, stride_kd, qk_scale_log2, DOT_F32)
    return masked_scores(s, mask_rows, pos, m_ok, ok, stride_ml, mask_min, MASK_KIND)


@triton.jit
def _candidate_lse_kernel(
    Q, K, MASK, BOUNDS, PAGES, ACTIVE, LSE_PART, SCORES,
    qk_scale_log2, mask_min, Hkv, G, Tq, n_pages, num_splits,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_mt, stride_ml,
    D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
    SHARED_ROWS: tl.constexpr,
):
    slot = tl.program_id(0)
    split = tl.program_id(1)
    b = (slot // Hkv).to(tl.int64)
    hkv = (slot % Hkv).to(tl.int64)
    M = G * Tq
    width = n_pages * P
    # The slot's flag, its row's bounds and the query rows are loaded together (one wait
    # on memory). A slot that reuses its set loops over nothing rather than returning
    # early: the compiler may sink loads past a branch. (Loading each block's pages one
    # iteration ahead, as the keys kernel does, measured slower here: README, the twelfth
    # run.)
    live = tl.load(ACTIVE + slot) != 0
    lo, hi, _, sink_end, local_start, _ = row_bounds(BOUNDS, b)
    mid_lo, mid_hi = middle_range(BOUNDS + b * 8)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, m_ok, tpos = load_q(Q, b, hkv, offs_m, M, G, Tq, stride_qb, stride_qh, stride_qt,
                           stride_qd, offs_d, d_ok)
    k_base = K + b * stride_kb + hkv * stride_kh
    mask_rows = mask_row_ptrs(MASK + b * stride_mb, tpos * stride_mt, SHARED_ROWS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    groups = tl.where(live, tl.cdiv(width, BLOCK_N), 0)
    for group in range(split, groups, num_splits):
        page = _candidate_pages(PAGES, slot, group, n_pages, P, BLOCK_N)
        pos, col, ok = _candidate_positions(page, group, mid_lo, mid_hi, P, BLOCK_N)
        s = _tile(q, k_base, mask_rows, pos, ok, m_ok, offs_d, d_ok, stride_kl, stride_kd,
                  stride_ml, qk_scale_log2, mask_min, MASK_KIND, DOT_F32)
        tl.store(SCORES + (slot.to(tl.int64) * M + offs_m)[:, None] * width + col[None, :], s,
                 mask=m_ok[:, None] & (col < width)[None, :])
        m_i, l_i = lse_update(m_i, l_i, s)
    if split == 0:  # the sink and local windows are read too: the softmax is over both
        sink_hi = tl.where(live, tl.minimum(sink_end, hi), lo)
        loc_lo = tl.where(live, tl.maximum(local_start, lo), hi)
        n_sink = tl.cdiv(tl.maximum(sink_hi - lo, 0), BLOCK_N)
        n_local = tl.cdiv(tl.maximum(hi - loc_lo, 0), BLOCK_N)
        for i in range(0, n_sink + n_local):  # the sink blocks, then the local window's
            in_sink = i < n_sink
            pos = tl.where(in_sink, lo + i * BLOCK_N, loc_lo + (i - n_sink) * BLOCK_N) \
                + tl.arange(0, BLOCK_N)
            ok = pos < tl.where(in_sink, sink_hi, hi)
            s = _tile(q, k_base, mask_rows, pos, ok, m_ok, offs_d, d_ok, stride_kl, stride_kd,
                      stride_ml, qk_scale_log2, mask_min, MASK_KIND, DOT_F32)
            m_i, l_i = lse_update(m_i, l_i, s)
    lse = lse_final(m_i, l_i)
    tl.store(LSE_PART + (slot.to(tl.int64) * BLOCK_M + offs_m) * num_splits + split, lse,
             mask=((offs_m >= 0) & live) != 0)


@triton.jit
def _candidate_keys_kernel(
    Q, K, MASK, BOUNDS, PAGES, ACTIVE, LSE_PART, SCORES, KEYS, POSITIONS, WMASS,
    qk_scale_log2, mask_min, Hkv, G, Tq, n_pages, num_splits,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_mt, stride_ml,
    D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, SHARED_ROWS: tl.constexpr,
):
    slot = tl.program_id(0)
    split = tl.program_id(1)
    b = (slot // Hkv).to(tl.int64)
    hkv = (slot % Hkv).to(tl.int64)
    M = G * Tq
    width = n_pages * P
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # As in _candidate_lse_kernel: the flag, the bounds and the first block's pages and
    # scores together; a slot that reuses its set loops over nothing.
    live = tl.load(ACTIVE + slot) != 0
    lse = row_lse(LSE_PART, slot.to(tl.int64) * BLOCK_M + offs_m, num_splits, num_splits,
                  m_ok, BLOCK_M, SPLIT_CHUNK)
    mid_lo, mid_hi = middle_range(BOUNDS + b * 8)
    score_rows = SCORES + (slot.to(tl.int64) * M + offs_m)[:, None] * width
    groups = tl.where(live, tl.cdiv(width, BLOCK_N), 0)
    # A block's pages and scores are loaded one iteration ahead. Its scores are read
    # whatever its pages hold (a column that may not be picked scored -inf, and the key
    # below is 0 for it anyway), so neither load waits on the other.
    page_next = _candidate_pages(PAGES, slot, split, n_pages, P, BLOCK_N)
    col_next = split * BLOCK_N + tl.arange(0, BLOCK_N)
    s_next = tl.load(score_rows + col_next[None, :],
                     mask=(live & m_ok[:, None] & (col_next < width)[None, :]) != 0,
                     other=float("-inf"))
    for group in range(split, groups, num_splits):
        page = page_next
        s = s_next
        page_next = _candidate_pages(PAGES, slot, group + num_splits, n_pages, P, BLOCK_N)
        col_next = (group + num_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
        s_next = tl.load(score_rows + col_next[None, :],
                         mask=m_ok[:, None] & (col_next < width)[None, :], other=float("-inf"))
        pos, col, ok = _candidate_positions(page, group, mid_lo, mid_hi, P, BLOCK_N)
        s = tl.where(ok[None, :], s, float("-inf"))
        mass = tl.sum(tl.exp2(s - lse[:, None]), 0)
        allowed = ok & (tl.max(s, 0) > float("-inf"))
        key = tl.where(allowed, mass.to(tl.int32, bitcast=True) + 1, 0)
        at = slot.to(tl.int64) * width + col
        tl.store(KEYS + at, key, mask=col < width)
        tl.store(POSITIONS + at, tl.where(pos >= 0, pos, -1), mask=col < width)
    if split == 0:
        lo, hi, _, sink_end, local_start, _ = row_bounds(BOUNDS, b)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q, _, tpos = load_q(Q, b, hkv, offs_m, M, G, Tq, stride_qb, stride_qh, stride_qt,
                            stride_qd, offs_d, d_ok)
        k_base = K + b * stride_kb + hkv * stride_kh
        mask_rows = mask_row_ptrs(MASK + b * stride_mb, tpos * stride_mt, SHARED_ROWS)
        sink_hi = tl.where(live, tl.minimum(sink_end, hi), lo)  # empty runs: no slot of its
        loc_lo = tl.where(live, tl.maximum(local_start, lo), hi)  # own (its lse is unset)
        w = run_mass(q, k_base, lo, sink_hi, lse, mask_rows, m_ok, offs_d, d_ok, stride_kl,
                     stride_kd, stride_ml, qk_scale_log2, mask_min, BLOCK_N, MASK_KIND, DOT_F32)
        w += run_mass(q, k_base, loc_lo, hi, lse, mask_rows, m_ok, offs_d, d_ok, stride_kl,
                      stride_kd, stride_ml, qk_scale_log2, mask_min, BLOCK_N, MASK_KIND, DOT_F32)
        tl.store(WMASS + slot, w, mask=live)


def candidate_keys(q, k, operand, bounds, scale, pages_list, active, page_size: int) -> Keys:
    """Stage two: the top-k keys of the ``active`` slots from the exact scores of the
    positions of their ``pages_list`` (int64 ``[B, Hkv, n]``, ascending, -1 after the last),
    as a compact row of ``n * page_size`` columns per slot (int32 keys, 0 where nothing may
    be picked, and the position of each column, -1 past the pages: ``Keys.positions``), and
    each slot's window mass; the softmax runs over the candidates and the windows. The top-k
    ranks the compact rows, not the cache: its passes read 4 bytes per candidate."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    n_pages = pages_list.shape[-1]
    M = (Hq // Hkv) * Tq
    block_m = max(16, triton.next_power_of_2(M))
    block_n = max(16, min(64, page_size * max(1, 64 // page_size)))
    width = n_pages * page_size
    num_splits = max(1, min(CONFIG["candidate_splits"], triton.cdiv(width, block_n)))
    mask_t, kind, ms, mask_min = operand
    if mask_t is None:
        mask_t = bounds
    pages_list = pages_list.to(torch.int32).contiguous()
    lse_part = torch.empty((B * Hkv * block_m, num_splits), dtype=torch.float32, device=q.device)
    scores = torch.empty((B * Hkv, M, width), dtype=torch.float32, device=q.device)
    keys = torch.empty((B, Hkv, width), dtype=torch.int32, device=q.device)
    positions = torch.empty((B, Hkv, width), dtype=torch.int32, device=q.device)
    window_mass = torch.zeros((B, Hkv), dtype=torch.float32, device=q.device)
    common = dict(D=D, P=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(D)), MASK_KIND=kind, DOT_F32=dot_f32(q),
                  SHARED_ROWS=rows_share_mask(operand, Tq), num_warps=CONFIG["candidate_warps"])
    qk = float(scale) * LOG2E
    _launch(_candidate_lse_kernel, (B * Hkv, num_splits),
            q, k, mask_t, bounds, pages_list, active, lse_part, scores, qk, mask_min, Hkv,
            Hq // Hkv, Tq, n_pages, num_splits, *q.stride(), *k.stride(), *ms, **common)
    _launch(_candidate_keys_kernel, (B * Hkv, num_splits),
            q, k, mask_t, bounds, pages_list, active, lse_part, scores, keys, positions,
            window_mass, qk, mask_min, Hkv, Hq // Hkv, Tq, n_pages, num_splits, *q.stride(),
            *k.stride(), *ms, SPLIT_CHUNK=SPLIT_CHUNK, **common)
    return Keys(keys, None, window_mass, positions)


def two_stage_keys(q, k, operand, bounds, scale, st: dict, active, plan) -> Keys:
    """A two-stage retrieval of the ``active`` slots (int32 ``[B * Hkv]``): stage one's page
    bounds, the best ``candidate_pages(plan)`` pages of each slot (in page order: the top-k
    then ranks a compact row whose positions ascend), stage two's keys. A dilation radius
    wider than a page would reach across a gap between chosen pages, which the compact
    row cannot see (``topk_picks``): its keys are then spread over the cache. The pages are
    chosen by the radix top-k over their keys (retrieving slots only, ties to the lower
    page, as ``ranked_topk`` in the reference), not by a torch top-k over every slot."""
    keys = page_keys(q, st, operand, bounds, active, plan, k.shape[2])
    count = min(candidate_pages(plan), keys.shape[-1])
    chosen, _ = topk_picks(keys, bounds, count, active=active, whole_row=True)
    found = candidate_keys(q, k, operand, bounds, scale, chosen, active, plan.page_size)
    if plan.dilation_r <= plan.page_size:
        return found
    B, Hkv, L = k.shape[0], k.shape[1], k.shape[2]
    spread = torch.zeros((B, Hkv, L + 1), dtype=torch.int32, device=k.device)
    columns = torch.where((found.positions >= 0) & (found.positions < L), found.positions, L).long()
    spread.scatter_(-1, columns, found.keys)
    return Keys(spread[..., :L].contiguous(), None, found.window_mass)


def two_stage_bytes(batch: int, kv_heads: int, n_valid: int, head_dim: int, itemsize: int,
                    plan, q_rows: int = 4, key_passes: int = 3) -> int:
    """Bytes a two-stage retrieval of every slot moves: the page summaries (min and max,
    ``2 / page_size`` of K over the valid region) and the int32 page keys stage one writes
    and its top-k reads ``key_passes`` times, the candidate rows of K plus the sink and
    local windows, the fp32 candidate scores of the group's ``q_rows`` query rows written and
    read back, and the compact row of int32 keys and positions (one per candidate): written,
    then the keys read ``key_passes`` times by the top-k (a guessed threshold: a count and a
    compaction; more when it misses)."""
    slots = batch * kv_heads
    pages = -(-n_valid // plan.page_size)
    candidates = min(candidate_pages(plan), pages) * plan.page_size
    summary_bytes = slots * 2 * pages * head_dim * itemsize
    page_key_bytes = (1 + key_passes) * slots * pages * 4
    row_bytes = slots * (candidates + plan.sink + plan.local) * head_dim * itemsize
    score_bytes = 2 * slots * q_rows * candidates * 4
    key_bytes = (2 + key_passes) * slots * candidates * 4
    return summary_bytes + page_key_bytes + row_bytes + score_bytes + key_bytes


def page_positions(pages: torch.Tensor, page: int, length: int) -> torch.Tensor:
    """The positions of ``pages`` (int ``[B, Hkv, n]``, -1: none) as int32 ``[B, Hkv, n * page]``,
    -1 for pages not chosen and past the cache (the compose kernel drops positions outside
    the retrieval region)."""
    pos = pages[..., None] * page + torch.arange(page, device=pages.device)
    pos = torch.where((pages[..., None] >= 0) & (pos < length), pos, -1)
    return pos.flatten(-2).to(torch.int32)


def quest_pages(q, st: dict, operand, bounds, plan, length: int) -> torch.Tensor:
    """Quest on the GPU: every slot's best ``middle // page_size`` pages by their bounds
    (the radix top-k over the page keys: no torch top-k, no sort), ascending, -1 padded."""
    every = torch.ones(q.shape[0] * st[PAGE_MIN].shape[1], dtype=torch.int32, device=q.device)
    keys = page_keys(q, st, operand, bounds, every, plan, length)
    pages, _ = topk_picks(keys, bounds, min(plan.middle // plan.page_size, keys.shape[-1]),
                          whole_row=True)
    return pages
