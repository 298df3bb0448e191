"""Radix top-k over group-mass keys, with PrHS's dilation, for retrieving slots only.

``topk_picks`` turns the keys of ``retrieve_triton.retrieve_keys`` into each active (row,
KV head) slot's picks: ascending int32 positions, -1 padded, the same set as
``selection.dilate_and_pick`` (the torch reference) on the same masses, ties included.

One program per slot (an inactive slot returns at once, so a step where no slot retrieves
costs one empty launch). A select is a threshold search, not a sort:

* ``_radix_threshold``: four passes over the slot's middle, each a 256-bin histogram
  (``tl.histogram``) of one byte of the keys that match the bytes fixed so far; the bin
  holding the k-th largest key fixes the next byte. The result is the k-th largest key
  itself and how many keys equal to it still belong to the top k.
* ``_compact``: one more pass writes every position whose key is above that threshold and
  the first ones equal to it, in position order (so ties go to the lower position, as in
  the reference), and sums their masses.

Dilation (``dilation_m`` top positions pull in their +-r neighbours, which rank ahead of
every other position) is one more select: the top ``m`` are found and compacted first, the
keys of their neighbours in the middle get the top bit set (a key is a non-negative fp32's
bits + 1, so the top bit is free), and the final top-``k`` select over the flagged keys
takes the neighbours first (best first, should they not all fit), then the best of the rest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select_triton import _middle_range

__all__ = ["topk_picks"]

_BLOCK = 2048  # keys per iteration of a pass
_NEAR_BIT = tl.constexpr(-(2 ** 31))  # the top bit of an int32 key: a dilated neighbour


@triton.jit
def _radix_threshold(key_row, lo, hi, k, BLOCK: tl.constexpr):
    """(thr, need_eq) of the top ``k`` keys of ``key_row[lo:hi)`` (key 0: no candidate):
    every key > thr is in, and the first ``need_eq`` keys == thr. Fewer than k candidates:
    thr = 0 (every candidate is in); k <= 0: nothing is."""
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.uint32)
    fixed = tl.full([], 0, tl.uint32)
    remaining = tl.full([], 0, tl.int32) + k
    total = tl.full([], 0, tl.int32)
    for d in tl.static_range(4):
        shift: tl.constexpr = 24 - 8 * d
        hist = tl.zeros([256], tl.int32)
        for s0 in range(lo, hi, BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            key = tl.load(key_row + offs, mask=offs < hi, other=0).to(tl.uint32, bitcast=True)
            match = (offs < hi) & (key != 0) & ((key & fixed) == prefix)
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
        n = tl.sum(hist, 0)
        if d == 0:
            total = n
        # Keys (among the matching ones) whose byte is >= each bin.
        at_least = n - tl.cumsum(hist, 0) + hist
        best = tl.maximum(tl.max(tl.where(at_least >= remaining, bins, -1), 0), 0)
        remaining -= tl.sum(tl.where(bins > best, hist, 0), 0)
        prefix = prefix | (best.to(tl.uint32) << shift)
        fixed = fixed | (tl.full([], 255, tl.uint32) << shift)
    take_all = total <= k
    thr = tl.where(take_all, tl.full([], 0, tl.uint32), prefix)
    thr = tl.where(k <= 0, tl.full([], 0xFFFFFFFF, tl.uint32), thr)
    need_eq = tl.where(take_all | (k <= 0), 0, remaining)
    return thr, need_eq


@triton.jit
def _compact(key_row, lo, hi, thr, need_eq, out_row, width, BLOCK: tl.constexpr):
    """Write the picked positions of ``key_row[lo:hi)`` (key > thr, then the first
    ``need_eq`` equal to thr) in position order to ``out_row[0:width)``, -1 after them.
    Returns (count, summed mass of the picks)."""
    n = tl.full([], 0, tl.int32)
    eq_seen = tl.full([], 0, tl.int32)
    mass_sum = tl.full([], 0.0, tl.float32)
    for s0 in range(lo, hi, BLOCK):
        pos = s0 + tl.arange(0, BLOCK)
        inside = pos < hi
        key = tl.load(key_row + pos, mask=inside, other=0).to(tl.uint32, bitcast=True)
        cand = inside & (key != 0)
        is_eq = cand & (key == thr)
        eq_rank = eq_seen + tl.cumsum(is_eq.to(tl.int32), 0) - 1
        pick = cand & ((key > thr) | (is_eq & (eq_rank < need_eq)))
        slot = n + tl.cumsum(pick.to(tl.int32), 0) - 1
        tl.store(out_row + slot, pos, mask=pick & (slot < width))
        mass = ((key & 0x7FFFFFFF) - 1).to(tl.int32, bitcast=True).to(tl.float32, bitcast=True)
        mass_sum += tl.sum(tl.where(pick, mass, 0.0), 0)
        n += tl.sum(pick.to(tl.int32), 0)
        eq_seen += tl.sum(is_eq.to(tl.int32), 0)
    for s0 in range(0, width, BLOCK):
        slot = s0 + tl.arange(0, BLOCK)
        tl.store(out_row + slot, tl.full([BLOCK], -1, tl.int32), mask=(slot < width) & (slot >= n))
    return n, mass_sum


@triton.jit
def _topk_kernel(
    KEYS, BOUNDS, ACTIVE, CAPS, OUT, CORES, PICKED_MASS,
    Hkv, L, k, m, radius, width, core_width, stride_ob, stride_oh,
    HAS_ACTIVE: tl.constexpr, HAS_CAPS: tl.constexpr, DILATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    slot = tl.program_id(0)
    b = (slot // Hkv).to(tl.int64)
    h = slot % Hkv
    if HAS_ACTIVE:
        active = tl.load(ACTIVE + slot) != 0
    else:
        active = slot >= 0
    if active:
        mid_lo, mid_hi = _middle_range(BOUNDS + b * 8)
        key_row = KEYS + slot.to(tl.int64) * L
        cap = tl.full([], 0, tl.int32) + k
        if HAS_CAPS:
            cap = tl.minimum(tl.load(CAPS + h).to(tl.int32), cap)
        if DILATE:
            thr, need = _radix_threshold(key_row, mid_lo, mid_hi, m, BLOCK)
            core_row = CORES + slot.to(tl.int64) * core_width
            n_core, _ = _compact(key_row, mid_lo, mid_hi, thr, need, core_row, core_width, BLOCK)
            tl.debug_barrier()  # the cores are in memory before other threads read them
            for c0 in range(0, n_core, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                core = tl.load(core_row + offs, mask=offs < n_core, other=0)
                for o in range(-radius, radius + 1):
                    p = core + o
                    near = (offs < n_core) & (p >= mid_lo) & (p < mid_hi)
                    key = tl.load(key_row + p, mask=near, other=0)
                    # Idempotent: repeats of a position write the same flagged key.
                    tl.store(key_row + p, key | _NEAR_BIT, mask=near & (key != 0))
            tl.debug_barrier()  # the flags are in memory before the final select reads them
        thr, need = _radix_threshold(key_row, mid_lo, mid_hi, cap, BLOCK)
        out_row = OUT + b * stride_ob + h.to(tl.int64) * stride_oh
        _, mass_sum = _compact(key_row, mid_lo, mid_hi, thr, need, out_row, width, BLOCK)
        tl.store(PICKED_MASS + slot, mass_sum)



def topk_picks(keys, bounds, k: int, *, out=None, active=None, caps=None, dilation_m: int = 0,
               dilation_r: int = 0, width: int | None = None):
    """Picks of every active slot from ``keys`` (int32 ``[B, Hkv, L]``, modified in place
    when dilating): the top ``k`` of the middle (at most ``caps[h]`` for KV head h, when
    given), the +-``dilation_r`` neighbours of the best ``dilation_m`` first. Writes
    ascending positions, -1 padded, into ``out`` (``[B, Hkv, width]``, e.g. a view of the
    selection state: rows of inactive slots are left as they are) and returns it with the
    summed mass of each slot's picks (fp32 ``[B, Hkv]``, undefined for inactive slots)."""
    B, Hkv, L = keys.shape
    width = k if width is None else width
    if out is None:
        out = torch.full((B, Hkv, width), -1, dtype=torch.int32, device=keys.device)
    if out.stride(-1) != 1:
        raise ValueError("topk_picks writes rows of positions: out's last dim must be contiguous")
    picked_mass = torch.empty((B, Hkv), dtype=torch.float32, device=keys.device)
    dilate = dilation_m > 0 and dilation_r > 0
    core_width = max(1, dilation_m if dilate else 1)
    cores = torch.empty((B * Hkv, core_width), dtype=torch.int32, device=keys.device)
    active_t = keys if active is None else active.reshape(B * Hkv).to(torch.int32)
    caps_t = keys if caps is None else caps.to(torch.int32)
    _topk_kernel[(B * Hkv,)](
        keys, bounds, active_t, caps_t, out, cores, picked_mass,
        Hkv, L, k, dilation_m if dilate else 0, dilation_r if dilate else 0, width, core_width,
        out.stride(0), out.stride(1),
        HAS_ACTIVE=active is not None, HAS_CAPS=caps is not None, DILATE=dilate,
        BLOCK=_BLOCK, num_warps=8,
    )
    return out, picked_mass
