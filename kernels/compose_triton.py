"""The output of a select step: sinks ++ stored picks ++ local window, as index slots.

``compose`` writes each (row, KV head)'s indices from its stored picks in ``O(slots)``, with
no sort over the cache: picks are kept in position order and lie between the sinks and the
local window, so concatenating the three runs is already ascending.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .plan import SelectPlan
from .bounds_triton import BLOCK_W, row_bounds, row_bounds_read, row_contiguous, valid_in_row, write_valid_run

__all__ = ["Composition", "SLOT_BLOCK", "compose", "compose_row", "compose_windows", "composition"]

# Stored picks handled per iteration of the compose kernel: a budget of 2048 in one (each
# iteration waits on its loads: the kernel is latency-bound, one program per slot).
SLOT_BLOCK = 2048


@triton.jit
def compose_row(MASK, BOUNDS, kept_row, out_row, b, Tq, middle, slots, sink, local,
                stride_mb, stride_mt, stride_ml, mask_min, RETRIEVES, MASK_KIND: tl.constexpr,
                TQ_P2: tl.constexpr, BLOCK_W: tl.constexpr, SLOT_BLOCK: tl.constexpr,
                HAS_RETRIEVES: tl.constexpr):
    """Indices of one (row, KV head) into ``out_row``: sinks ++ the picks of ``kept_row``
    still in the middle ++ local window, ascending, -1 padded; a row that fits the budget
    keeps all its valid positions. With ``HAS_RETRIEVES``, nothing is written when the int32
    at ``RETRIEVES`` is nonzero (the slot retrieves in this launch, which writes its output
    itself). That flag, the row's bounds and the first block of picks are loaded before
    any of them is used, so the program waits on memory once for all three (the chain of a
    step where no slot retrieves). The picks are loaded ``volatile``: a kernel that composes
    right after other programs wrote them must not read them from a stale cache."""
    lo, hi, count, sink_end, local_start, fits = row_bounds(BOUNDS, b)
    contiguous = row_contiguous(BOUNDS, b)  # then no mask is read
    first = tl.load(kept_row + tl.arange(0, SLOT_BLOCK), mask=tl.arange(0, SLOT_BLOCK) < middle,
                    other=-1, volatile=True)
    retrieves = tl.full([], 0, tl.int32)
    if HAS_RETRIEVES:
        retrieves = tl.load(RETRIEVES)
    if (retrieves == 0) & row_bounds_read(BOUNDS, b):  # the bounds load before the branch
        sink = tl.full([], 0, tl.int32) + sink  # runtime ints equal to 1 arrive as constexprs
        # Picks stored at a retrieval stay while they lie between the sinks and the local
        # window (the window slides over the newest of them) and are still valid positions.
        n_kept = tl.full([], 0, tl.int32)
        for s0 in range(0, middle, SLOT_BLOCK):
            offs = s0 + tl.arange(0, SLOT_BLOCK)
            if s0 == 0:
                p = first
            else:
                p = tl.load(kept_row + offs, mask=offs < middle, other=-1, volatile=True)
            inside = (p >= 0) & (p >= sink_end) & (p < local_start) & (p < hi)
            inside = inside & valid_in_row(MASK, b, p, inside, lo, hi, contiguous, Tq,
                                           stride_mb, stride_mt, stride_ml, mask_min,
                                           MASK_KIND, TQ_P2)
            inside = (inside & (fits == 0)) != 0  # as int1 (the interpreter needs it)
            slot = sink + n_kept + tl.cumsum(inside.to(tl.int32), 0) - 1
            tl.store(out_row + slot, p, mask=inside & (slot < slots))
            n_kept += tl.sum(inside.to(tl.int32), 0)

        # The row's bounds as loaded above: after the stores, a reload would wait on memory
        # again (the compiler cannot tell that they write elsewhere).
        compose_windows(MASK, out_row, b, n_kept, lo, hi, count, sink_end, local_start, fits,
                        contiguous, Tq, slots, sink, local, stride_mb, stride_mt, stride_ml,
                        mask_min, MASK_KIND, TQ_P2, BLOCK_W, SLOT_BLOCK)


@triton.jit
def compose_windows(MASK, out_row, b, n_kept, lo, hi, count, sink_end, local_start, fits,
                    contiguous, Tq, slots, sink, local, stride_mb, stride_mt, stride_ml,
                    mask_min, MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
                    BLOCK_W: tl.constexpr, SLOT_BLOCK: tl.constexpr):
    """The rest of one (row, KV head)'s indices once its ``n_kept`` picks stand at slots
    ``sink`` on: the valid positions of the sinks before them, of the local window after
    them, -1 after that (a row that fits the budget: all its valid positions, no picks).
    ``lo`` .. ``fits``: the row's ``row_bounds``, ``contiguous`` its ``row_contiguous`` (then
    no mask is read)."""
    sink = tl.full([], 0, tl.int32) + sink  # runtime ints equal to 1 arrive as constexprs
    local = tl.full([], 0, tl.int32) + local
    n_kept = tl.where(fits, 0, n_kept)
    n_local = tl.minimum(local, count)
    total = tl.where(fits, count, tl.minimum(sink, count) + n_kept + n_local)
    for s0 in range(0, slots, SLOT_BLOCK):
        slot = s0 + tl.arange(0, SLOT_BLOCK)
        tl.store(out_row + slot, tl.full([SLOT_BLOCK], -1, tl.int32),
                 mask=(slot < slots) & (slot >= total))
    a_end = tl.where(fits, hi, tl.maximum(tl.minimum(sink_end, hi), lo))
    write_valid_run(out_row, MASK, b, lo, a_end, 0, slots, Tq, stride_mb, stride_mt,
                    stride_ml, mask_min, contiguous, MASK_KIND, TQ_P2, BLOCK_W)
    b_start = tl.maximum(tl.minimum(local_start, hi), lo)
    b_end = tl.where(fits, b_start, hi)
    write_valid_run(out_row, MASK, b, b_start, b_end, sink + n_kept, slots, Tq, stride_mb,
                    stride_mt, stride_ml, mask_min, contiguous, MASK_KIND, TQ_P2, BLOCK_W)


@triton.jit
def _compose_kernel(
    MASK, BOUNDS, KEPT, OUT, Hkv, Tq, middle, slots, sink, local,
    stride_mb, stride_mt, stride_ml, mask_min,
    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr, BLOCK_W: tl.constexpr,
    SLOT_BLOCK: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    compose_row(MASK, BOUNDS, KEPT + pid_bh.to(tl.int64) * middle,
                OUT + pid_bh.to(tl.int64) * slots, (pid_bh // Hkv).to(tl.int64), Tq, middle,
                slots, sink, local, stride_mb, stride_mt, stride_ml, mask_min, KEPT, MASK_KIND,
                TQ_P2, BLOCK_W, SLOT_BLOCK, False)


class Composition(NamedTuple):
    """What composing a step's output takes besides the picks: the mask operand
    (``bounds_triton.mask_operand``), the per-row bounds, the output (int32
    ``[B, Hkv, slots]``, written), the sink and local window, and the query length. A kernel
    that writes picks can compose in the same launch (``topk_picks(compose=...)``)."""

    operand: tuple
    bounds: torch.Tensor
    out: torch.Tensor
    sink: int
    local: int
    q_len: int

    def launch_args(self):
        """(mask tensor, mask kind, the mask's three strides, mask_min) for a kernel."""
        mask_t, kind, ms, mask_min = self.operand
        return (self.bounds if mask_t is None else mask_t), kind, ms, mask_min


def composition(operand, bounds, plan: SelectPlan, batch: int, kv_heads: int, q_len: int,
                local: int | None = None) -> Composition:
    """A step's ``Composition``, its output allocated; ``local`` overrides the plan's
    window (streaming keeps ``budget - sink``)."""
    out = torch.empty((batch, kv_heads, plan.slots), dtype=torch.int32, device=bounds.device)
    return Composition(operand, bounds, out, plan.sink, plan.local if local is None else local,
                       q_len)


def compose(operand, bounds, kept, plan: SelectPlan, batch: int, kv_heads: int, q_len: int,
            local: int | None = None):
    """Indices from the stored picks ``kept`` (``None``: none, only sinks and window) and the
    windows; ``local`` overrides the plan's window (streaming keeps ``budget - sink``)."""
    target = composition(operand, bounds, plan, batch, kv_heads, q_len, local)
    mask_t, kind, ms, mask_min = target.launch_args()
    middle = 0 if kept is None else kept.shape[-1]
    if kept is not None and not kept.is_contiguous():
        kept = kept.contiguous()
    kept = bounds if kept is None else kept
    _compose_kernel[(batch * kv_heads,)](
        mask_t, bounds, kept, target.out, kv_heads, q_len, middle, plan.slots, target.sink,
        target.local, *ms, mask_min, MASK_KIND=kind,
        TQ_P2=triton.next_power_of_2(q_len),
        BLOCK_W=BLOCK_W, SLOT_BLOCK=SLOT_BLOCK, num_warps=4,
    )
    return target.out
