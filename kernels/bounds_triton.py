"""Masks and per-row bounds on the device (what CUDA runs): which positions a decode step
may select, with no host synchronisation (CUDA-graph capturable).

* mask helpers: ``mask_operand`` (a mask as a kernel operand: tensor, kind, strides),
  ``valid_positions`` / ``valid_in_row`` / ``masked_scores`` (inside kernels);
* per-row bounds (``compute_bounds``; ``select_bounds`` for tests)::

    _mask_stats_kernel  (B, L/CHUNK)   valid count / first / last per chunk of the mask;
                                       the last chunk of a row to finish then writes its
                                       lo, hi, count, sink_end, local_start, fits, middle
                                       start (PSAW), contiguous (``BoundsColumn``; kernels
                                       read them through ``row_bounds``, ``row_contiguous``
                                       and ``middle_range``)
    _bounds_kernel      (B,)           the same bounds for a step without a mask

  (``chunk_stats_last`` and ``write_row_bounds`` are the two halves, for a kernel that goes
  on from a row's bounds in the same launch: ``gate_triton``);

  With a static cache K is ``[B, Hkv, Lmax, D]`` and the mask says which positions hold
  tokens: ``[lo, hi)`` spans them, so no kernel reads the unfilled cache. Where every
  position of ``[lo, hi)`` is valid (all of Hugging Face's decode masks: causal, left
  padding, sliding windows), ``contiguous`` says so and later kernels read no mask;
* ``write_valid_run``: the valid positions of a range, in order, into an index row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_options, wait_for_inputs
from .tickets import tickets

__all__ = ["BLOCK_W", "MASK_ADD", "MASK_BOOL", "MASK_NONE", "BoundsColumn", "bounds_launch",
           "chunk_stats_last", "compute_bounds", "write_row_bounds",
           "mask_load_ok", "mask_operand", "mask_row_ptrs", "masked_scores", "rows_share_mask",
           "middle_range", "row_bounds", "row_bounds_read", "row_contiguous", "select_bounds", "valid_in_row", "valid_positions", "write_valid_run"]

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADD = 2

_CHUNK = 2048  # mask positions per program of the stats kernel
BLOCK_W = 1024  # positions per iteration of write_valid_run's scans


@triton.jit
def valid_positions(MASK, b, pos, in_range, Tq, stride_mb, stride_mt, stride_ml, mask_min,
                    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr):
    """[BLOCK] int1: positions that at least one query row may attend to."""
    if MASK_KIND == 0:
        valid = in_range
    else:
        offs_t = tl.arange(0, TQ_P2)
        ptrs = (MASK + b * stride_mb + offs_t[:, None].to(tl.int64) * stride_mt
                + pos[None, :].to(tl.int64) * stride_ml)
        ld = (offs_t[:, None] < Tq) & in_range[None, :]
        if MASK_KIND == 1:
            mv = tl.load(ptrs, mask=ld, other=0)
            allowed = ld & (mv != 0)
        else:
            mv = tl.load(ptrs, mask=ld, other=0.0).to(tl.float32)
            allowed = ld & (mv > mask_min)
        valid = tl.max(allowed.to(tl.int32), 0) > 0
    return valid


@triton.jit
def valid_in_row(MASK, b, pos, in_range, lo, hi, contiguous, Tq, stride_mb, stride_mt,
                 stride_ml, mask_min, MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr):
    """``valid_positions`` for a row whose bounds (``lo``, ``hi``, ``contiguous``: column 7
    of ``compute_bounds``) are known: a contiguous row's valid positions are [lo, hi), so
    its mask is not read (the loads are predicated off)."""
    contiguous = contiguous.to(tl.int32)
    known = (in_range & (pos >= lo) & (pos < hi) & (contiguous != 0)) != 0  # int1 (interpreter)
    read = (in_range & (contiguous == 0)) != 0
    return known | valid_positions(MASK, b, pos, read, Tq, stride_mb, stride_mt, stride_ml,
                                   mask_min, MASK_KIND, TQ_P2)


@triton.jit
def mask_row_ptrs(row0, row_offsets, SHARED: tl.constexpr):
    """Pointers to the mask rows of a tile's score rows (``[rows, 1]``: ``row0`` plus each
    row's offset), or, when every row of the tile reads the same mask row (``SHARED``: one
    query position, or a mask that broadcasts over them), one pointer (``[1, 1]``) so that
    each mask column is loaded once rather than once per row (``mask_load_ok``)."""
    # One return: Triton compiles every return of a function, even past a constexpr branch.
    if SHARED:
        ptrs = row0 + tl.zeros([1, 1], tl.int64)
    else:
        ptrs = row0 + row_offsets[:, None]
    return ptrs


@triton.jit
def mask_load_ok(mask_rows, row_ok, col_ok):
    """The load mask of a ``[rows, cols]`` mask tile read through ``mask_row_ptrs``'s
    pointers: one load per column when the rows share a pointer."""
    if mask_rows.shape[0] == 1:
        ok = col_ok[None, :]
    else:
        ok = row_ok[:, None] & col_ok[None, :]
    return ok


@triton.jit
def masked_scores(s, mask_rows, pos, row_ok, col_ok, stride_ml, mask_min,
                  MASK_KIND: tl.constexpr):
    """Log2-domain scores with the mask applied; -inf where a row may not attend.
    ``mask_rows``: ``mask_row_ptrs``'s (one row pointer per score row, or one for all)."""
    ok = row_ok[:, None] & col_ok[None, :]
    load_ok = mask_load_ok(mask_rows, row_ok, col_ok)
    if MASK_KIND == 1:
        mv = tl.load(mask_rows + pos[None, :].to(tl.int64) * stride_ml, mask=load_ok, other=0)
        s = tl.where(ok & (mv != 0), s, float("-inf"))
    elif MASK_KIND == 2:
        bias = tl.load(mask_rows + pos[None, :].to(tl.int64) * stride_ml, mask=load_ok,
                       other=0.0).to(tl.float32)
        allowed = ok & (bias > mask_min)
        bias = tl.where(allowed, bias, 0.0)  # finfo.min * log2(e) would overflow
        s = tl.where(allowed, s + bias * 1.4426950408889634, float("-inf"))
    else:
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def chunk_stats_last(MASK, STATS, TICKETS, b, c, Tq, L, C, stride_mb, stride_mt, stride_ml,
                     mask_min, MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
                     CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Store the valid count, first and last valid position of chunk ``c`` of row ``b``'s
    mask, then draw the row's atomic ticket: True for the row's last chunk to finish, which
    may then write the row's bounds (``write_row_bounds``) from every chunk's stats; that
    one leaves the ticket at 0 again for the next call. One launch, not two."""
    cnt = tl.full([], 0, tl.int32)
    first = tl.full([], 0, tl.int32) + L
    last = tl.full([], -1, tl.int32)
    for sub in tl.static_range(0, CHUNK, SUB):
        pos = c * CHUNK + sub + tl.arange(0, SUB)
        v = valid_positions(MASK, b, pos, pos < L, Tq, stride_mb, stride_mt, stride_ml,
                            mask_min, MASK_KIND, TQ_P2)
        cnt += tl.sum(v.to(tl.int32), 0)
        first = tl.minimum(first, tl.min(tl.where(v, pos, L), 0))
        last = tl.maximum(last, tl.max(tl.where(v, pos, -1), 0))
    base = STATS + (b * C + c) * 3
    tl.store(base + 0, cnt)
    tl.store(base + 1, first)
    tl.store(base + 2, last)
    # Release: this chunk's stats are written before its ticket; acquire: the last chunk
    # sees every other chunk's.
    done = tl.atomic_add(TICKETS + b, 1, sem="acq_rel", scope="gpu")
    is_last = done == C - 1
    if is_last:
        tl.store(TICKETS + b, 0)
    return is_last


@triton.jit
def _mask_stats_kernel(
    MASK, STATS, TICKETS, BOUNDS, Tq, L, C, sink, local, budget, min_context, psaw_frac,
    stride_mb, stride_mt, stride_ml, mask_min,
    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
    C_P2: tl.constexpr, HAS_PSAW: tl.constexpr, PDL: tl.constexpr,
):
    """The stats of one chunk of a row's mask; the row's last chunk writes its bounds."""
    wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    if chunk_stats_last(MASK, STATS, TICKETS, b, tl.program_id(1), Tq, L, C, stride_mb,
                        stride_mt, stride_ml, mask_min, MASK_KIND, TQ_P2, CHUNK, SUB):
        write_row_bounds(MASK, STATS, BOUNDS, b, Tq, L, C, sink, local, budget, min_context,
                         psaw_frac, stride_mb, stride_mt, stride_ml, mask_min, MASK_KIND,
                         TQ_P2, CHUNK, SUB, C_P2, HAS_PSAW)


@triton.jit
def _position_of_rank(MASK, b, r, cnt, cum, offs_c, c_ok, L, Tq,
                      stride_mb, stride_mt, stride_ml, mask_min, lo, hi, contiguous,
                      MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
                      CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Position of the valid position of rank ``r`` (0-based; -1 if there is none). In a
    contiguous row (every position of [lo, hi) valid) it is lo + r: no mask is read."""
    if contiguous:
        found = tl.where(lo + r < hi, lo + r, -1)
    else:
        cstar = tl.sum(((cum <= r) & c_ok).to(tl.int32), 0)
        base = tl.sum(tl.where(offs_c < cstar, cnt, 0), 0)
        found = tl.full([], -1, tl.int32)
        running = base
        for sub in tl.static_range(0, CHUNK, SUB):
            pos = cstar * CHUNK + sub + tl.arange(0, SUB)
            v = valid_positions(MASK, b, pos, pos < L, Tq, stride_mb, stride_mt, stride_ml,
                                mask_min, MASK_KIND, TQ_P2)
            vi = v.to(tl.int32)
            rank = running + tl.cumsum(vi, 0) - 1
            found = tl.maximum(found, tl.max(tl.where(v & (rank == r), pos, -1), 0))
            running += tl.sum(vi, 0)
    return found


@triton.jit
def _psaw_excluded(count, sink, local, psaw_frac):
    """P_l(count): the oldest non-sink positions outside the layer's recency window, never
    eating into the local window (as ``SelectPlan.psaw_cut``: fp32 product, floored)."""
    excluded = tl.floor(psaw_frac * count.to(tl.float32)).to(tl.int32)
    return tl.minimum(excluded, tl.maximum(count - sink - local, 0))


@triton.jit
def _bounds_kernel(
    MASK, STATS, BOUNDS, Tq, L, C, sink, local, budget, min_context, psaw_frac,
    stride_mb, stride_mt, stride_ml, mask_min,
    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
    C_P2: tl.constexpr, HAS_PSAW: tl.constexpr, PDL: tl.constexpr,
):
    """The bounds of a row without a mask (a masked row's come from ``_mask_stats_kernel``)."""
    wait_for_inputs(PDL)
    write_row_bounds(MASK, STATS, BOUNDS, tl.program_id(0).to(tl.int64), Tq, L, C, sink,
                      local, budget, min_context, psaw_frac, stride_mb, stride_mt, stride_ml,
                      mask_min, MASK_KIND, TQ_P2, CHUNK, SUB, C_P2, HAS_PSAW)


@triton.jit
def write_row_bounds(MASK, STATS, BOUNDS, b, Tq, L, C, sink, local, budget, min_context,
                     psaw_frac, stride_mb, stride_mt, stride_ml, mask_min,
                     MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr, CHUNK: tl.constexpr,
                     SUB: tl.constexpr, C_P2: tl.constexpr, HAS_PSAW: tl.constexpr):
    """Row ``b``'s bounds (``BoundsColumn``) from its chunks' mask stats (no mask: from the
    length alone); returns the row's (hi, count, fits) for a caller that goes on with them."""
    # Runtime ints equal to 1 arrive as constexprs: make them tensors for tl.where.
    sink = tl.full([], 0, tl.int32) + sink
    local = tl.full([], 0, tl.int32) + local
    if MASK_KIND == 0:
        count = tl.full([], 0, tl.int32) + L
        lo = tl.full([], 0, tl.int32)
        hi = count
        sink_end = tl.minimum(count, sink)
        local_start = tl.where(local == 0, L, tl.maximum(count - local, 0))
        if HAS_PSAW:
            mid_start = sink + _psaw_excluded(count, sink, local, psaw_frac)
        else:
            mid_start = tl.full([], 0, tl.int32)
        contiguous = tl.full([], 1, tl.int32) != 0  # no mask: every position is valid
    else:
        offs_c = tl.arange(0, C_P2)
        c_ok = offs_c < C
        base = STATS + b * C * 3 + offs_c * 3
        # volatile: written by other programs of the launch (not from a stale cache)
        cnt = tl.load(base + 0, mask=c_ok, other=0, volatile=True)
        first = tl.load(base + 1, mask=c_ok, other=L, volatile=True)
        last = tl.load(base + 2, mask=c_ok, other=-1, volatile=True)
        count = tl.sum(cnt, 0)
        lo = tl.where(count > 0, tl.min(first, 0), 0)
        hi = tl.where(count > 0, tl.max(last, 0) + 1, 0)
        cum = tl.cumsum(cnt, 0)
        # Every position of [lo, hi) valid (causal, left padding, sliding window: all of
        # Hugging Face's decode masks): the valid position of rank r is lo + r, and the
        # kernels after this one need not read the mask to know which positions are valid.
        contiguous = count == hi - lo
        # sink_end: valid positions below it are exactly those of rank < sink.
        r_sink = tl.minimum(tl.maximum(sink - 1, 0), tl.maximum(count - 1, 0))
        p_sink = _position_of_rank(MASK, b, r_sink, cnt, cum, offs_c, c_ok, L, Tq,
                                   stride_mb, stride_mt, stride_ml, mask_min, lo, hi,
                                   contiguous, MASK_KIND, TQ_P2, CHUNK, SUB)
        sink_end = tl.where(sink == 0, 0, tl.where(sink > count, L, p_sink + 1))
        # local_start: valid positions at or above it are exactly those of rank >= count - local.
        r_local = tl.minimum(tl.maximum(count - local, 0), tl.maximum(count - 1, 0))
        p_local = _position_of_rank(MASK, b, r_local, cnt, cum, offs_c, c_ok, L, Tq,
                                    stride_mb, stride_mt, stride_ml, mask_min, lo, hi,
                                    contiguous, MASK_KIND, TQ_P2, CHUNK, SUB)
        local_start = tl.where(local == 0, L, tl.where(count - local <= 0, 0, p_local))
        if HAS_PSAW:
            # The middle starts at the valid position of rank sink + P_l(count).
            r_mid = sink + _psaw_excluded(count, sink, local, psaw_frac)
            p_mid = _position_of_rank(MASK, b, tl.minimum(r_mid, tl.maximum(count - 1, 0)),
                                      cnt, cum, offs_c, c_ok, L, Tq,
                                      stride_mb, stride_mt, stride_ml, mask_min, lo, hi,
                                      contiguous, MASK_KIND, TQ_P2, CHUNK, SUB)
            mid_start = tl.where(r_mid >= count, L, p_mid)
        else:
            mid_start = tl.full([], 0, tl.int32)
    fits = (count <= budget) | (count < min_context)
    out = BOUNDS + b * 8
    tl.store(out + 0, lo)
    tl.store(out + 1, hi)
    tl.store(out + 2, count)
    tl.store(out + 3, sink_end)
    tl.store(out + 4, local_start)
    tl.store(out + 5, fits.to(tl.int32))
    tl.store(out + 6, mid_start.to(tl.int32))
    tl.store(out + 7, contiguous.to(tl.int32))
    return hi, count, fits


@triton.jit
def write_valid_run(OUT_ROW, MASK, b, lo, hi, base, slots, Tq,
                    stride_mb, stride_mt, stride_ml, mask_min, contiguous,
                    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr, BLOCK_W: tl.constexpr):
    """Write the valid positions of [lo, hi), in order, to slots base, base + 1, ...
    (``contiguous``: [lo, hi) lies in a contiguous row, so all of it is valid and position
    p goes to slot base + p - lo, with no scan of the mask)."""
    if contiguous:
        for s0 in range(lo, hi, BLOCK_W):
            pos = s0 + tl.arange(0, BLOCK_W)
            slot = base + pos - lo
            tl.store(OUT_ROW + slot, pos, mask=(pos < hi) & (slot < slots))
    else:
        running = tl.full([], 0, tl.int32)
        for s0 in range(lo, hi, BLOCK_W):
            pos = s0 + tl.arange(0, BLOCK_W)
            v = valid_positions(MASK, b, pos, pos < hi, Tq, stride_mb, stride_mt, stride_ml,
                                mask_min, MASK_KIND, TQ_P2)
            vi = v.to(tl.int32)
            slot = base + running + tl.cumsum(vi, 0) - 1
            tl.store(OUT_ROW + slot, pos, mask=v & (slot < slots))
            running += tl.sum(vi, 0)


@triton.jit
def row_bounds(BOUNDS, b):
    """(lo, hi, count, sink_end, local_start, fits) of batch row ``b`` (see ``compute_bounds``)."""
    bnd = BOUNDS + b * 8
    return (tl.load(bnd + 0), tl.load(bnd + 1), tl.load(bnd + 2), tl.load(bnd + 3),
            tl.load(bnd + 4), tl.load(bnd + 5) != 0)


@triton.jit
def row_bounds_read(BOUNDS, b):
    """True, once every entry of batch row ``b``'s bounds is loaded (each is >= 0). A branch
    that tests it needs those loads, so the compiler issues them before the branch instead
    of sinking them into it, behind the loads its condition waits on: a program that loads
    a slot's flag with its bounds then waits on memory once, not twice."""
    bnd = BOUNDS + b * 8
    return (tl.load(bnd + 0) | tl.load(bnd + 1) | tl.load(bnd + 2) | tl.load(bnd + 3)
            | tl.load(bnd + 4) | tl.load(bnd + 5) | tl.load(bnd + 6) | tl.load(bnd + 7)) >= 0


@triton.jit
def row_contiguous(BOUNDS, b):
    """Whether every position of batch row ``b``'s [lo, hi) is valid (see ``compute_bounds``)."""
    return tl.load(BOUNDS + b * 8 + 7) != 0


@triton.jit
def middle_range(bnd):
    """[mid_lo, mid_hi): the positions a retrieval scores (empty for rows that fit): after
    the sinks and the part the recency window (PSAW) leaves out, before the local window."""
    lo = tl.load(bnd + 0)
    hi = tl.load(bnd + 1)
    sink_end = tl.load(bnd + 3)
    local_start = tl.load(bnd + 4)
    fits = tl.load(bnd + 5)
    mid_lo = tl.maximum(tl.maximum(lo, sink_end), tl.load(bnd + 6))
    mid_hi = tl.where(fits != 0, mid_lo, tl.maximum(tl.minimum(hi, local_start), mid_lo))
    return mid_lo, mid_hi


def mask_operand(mask, B: int, Tq: int, L: int):
    """(tensor, kind, [stride_b, stride_t, stride_l], mask_min) for a mask broadcastable to
    [B, 1, Tq, L] (its last dim may be longer: a static-cache mask over a shorter K view)."""
    if mask is None:
        return None, MASK_NONE, [0, 0, 0], 0.0
    m4 = mask
    while m4.dim() < 4:
        m4 = m4.unsqueeze(0)
    if m4.dim() != 4:
        raise ValueError(f"mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    if m4.shape[0] not in (1, B) or m4.shape[1] != 1 or m4.shape[2] not in (1, Tq):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"[{B}, 1, {Tq}, {L}]")
    if m4.shape[3] != 1 and m4.shape[3] < L:
        raise ValueError(f"mask last dim {m4.shape[3]} is shorter than the cache length {L}")
    if m4.dtype == torch.bool:
        kind, mask_min = MASK_BOOL, 0.0
        m4 = m4.view(torch.uint8)  # same itemsize: a free reinterpretation
    elif m4.is_floating_point():
        # HF's older additive masks use finfo.min, not -inf, for "masked" (as the reference).
        kind, mask_min = MASK_ADD, float(torch.finfo(m4.dtype).min) / 2
    else:
        raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
    strides = [0 if m4.shape[i] == 1 else m4.stride(i) for i in (0, 2, 3)]
    return m4, kind, strides, mask_min


def rows_share_mask(operand, q_len: int) -> bool:
    """Whether every query row of a step reads the same mask row (``mask_row_ptrs``'s
    ``SHARED``): one query position, or a mask broadcast over the query positions."""
    return q_len == 1 or operand[2][1] == 0


class BoundsColumn:
    """Columns of the int32 ``[B, 8]`` bounds ``compute_bounds`` writes, for torch code that reads
    them (kernels read them through ``row_bounds`` and ``middle_range``)."""

    LO, HI, COUNT, SINK_END, LOCAL_START, FITS, MIDDLE_START, CONTIGUOUS = range(8)


def bounds_launch(kind, ms, mask_min, B, Tq, L, sink, local, budget, min_context,
                  psaw_frac=-1.0):
    """(grid, runtime arguments after the four tensors, constexpr arguments) of a launch
    that writes the bounds (``_mask_stats_kernel``, ``_bounds_kernel``, or a kernel built on
    ``chunk_stats_last`` and ``write_row_bounds``): ``(B, chunks)`` programs with a mask,
    ``(B, 1)`` without."""
    tq_p2 = triton.next_power_of_2(max(Tq, 1))
    sub = min(_CHUNK, max(16, 8192 // tq_p2))
    C = triton.cdiv(max(L, 1), _CHUNK)
    args = (Tq, L, C, sink, local, budget, min_context, float(psaw_frac), *ms, mask_min)
    consts = dict(MASK_KIND=kind, TQ_P2=tq_p2, CHUNK=_CHUNK, SUB=sub,
                  C_P2=triton.next_power_of_2(C), HAS_PSAW=psaw_frac >= 0)
    return (B, 1 if kind == MASK_NONE else C), args, consts


def compute_bounds(mask_t, kind, ms, mask_min, B, Tq, L, sink, local, budget, min_context, device,
                   psaw_frac=-1.0):
    """int32 [B, 8]: lo, hi, count, sink_end, local_start, fits, middle start (the position
    of rank ``sink + P_l(count)`` when ``psaw_frac >= 0``, else 0), contiguous (1 when every
    position of [lo, hi) is valid, so later kernels need not read the mask there)."""
    bounds = torch.empty((B, 8), dtype=torch.int32, device=device)
    grid, args, consts = bounds_launch(kind, ms, mask_min, B, Tq, L, sink, local, budget,
                                       min_context, psaw_frac)
    if kind == MASK_NONE:
        _bounds_kernel[grid[:1]](bounds, bounds, bounds, *args, **consts, num_warps=4,
                                 **launch_options(bounds.device))
    else:
        stats = torch.empty((B, grid[1], 3), dtype=torch.int32, device=device)
        _mask_stats_kernel[grid](mask_t, stats, tickets(device, B), bounds, *args, **consts,
                                 num_warps=4, **launch_options(bounds.device))
    return bounds


def select_bounds(q, k, mask, budget=-1, sink=0, local=0, min_context=0) -> torch.Tensor:
    """int32 ``[B, 8]`` per-row bounds (``BoundsColumn``) of q over cache k under mask."""
    from .kpass_triton import check_inputs  # the passes over K import this module

    check_inputs(q, k)
    B, _, Tq, _ = q.shape
    L = k.shape[2]
    mask_t, kind, ms, mask_min = mask_operand(mask, B, Tq, L)
    return compute_bounds(mask_t, kind, ms, mask_min, B, Tq, L, sink, local, budget,
                          min_context, q.device)
