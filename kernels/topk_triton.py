"""Radix top-k over group-mass keys, with PrHS's dilation, for retrieving slots only.

``topk_picks`` turns the keys of ``retrieve_triton.retrieve_keys`` (or, with ``pending=``,
the scores of its pass over K, which each program turns into the keys of its own share of a
row first) into each active (row, KV head) slot's picks: ascending int32 positions, -1
padded, the same set as ``selection.dilate_and_pick`` (the torch reference) on the same
masses, ties included (both give a tie to the lower position). A key is a non-negative fp32
mass's bits + 1 (so keys order like masses), 0 for a position that cannot be picked.

One launch, no sort over the cache. The programs are shared among the active slots (as the
K pass shares its grid): with few retrieving slots, each gets many programs ("parties"),
which split its row into chunks and meet at a barrier in global memory (an atomic counter
per slot; every party of a slot is resident, since the grid never exceeds what the GPU holds
at once). Slots that reuse their set cost nothing but the launch. Under the Triton
interpreter (CPU tests) each slot gets one program and no barrier.

* ``_select``: the threshold of the top k, found digit by digit: eight rounds, each a 16-bin
  histogram (``tl.histogram``) of one 4-bit digit of the keys that match the digits fixed so
  far, summed over the parties; the bin holding the k-th largest key fixes the next digit,
  and a round whose bin holds exactly the keys still needed ends the search early. Result:
  every key above ``thr`` is in, and the first ``need`` keys equal to it.
* ``_compact``: the picks in position order. Each party counts its chunk's keys above and
  at the threshold, the counts of the parties before it give its output offset, and it
  writes its picks there (so ties go to the lower positions), summing their masses.
* candidates: with a dilation or a guess, the top keys of the row are first gathered, in
  column order, into a candidate list that one program (party 0) holds in its registers.
  It finds the final threshold there and, from the same registers, how many picks each
  party's chunk holds and their mass, so the final compaction is one writing pass with no
  counting pass before it (``_final_threshold``, ``_write_picks``).
* dilation: the top ``max(k, m)`` of the row are the candidates; party 0 finds among them
  the top ``m`` (the cores), sets the top bit of the keys of their +-r neighbours in the
  middle (a flagged key ranks above every other), and finds the threshold of the rest: the
  neighbours plus the best ``k - |neighbours|`` others (or the best ``k`` neighbours, should
  they not all fit) are all among the candidates and the neighbours, so those few thousand
  keys are all it looks at.
* guess (``guess=``, a threshold per slot kept between calls): a slot that retrieves again
  and again sees masses of much the same spread, so the last call's threshold predicts this
  one's. With a guess ``g``, the first pass over the row (the one that forms the keys from
  the K pass's scores, with ``pending=``) also lists, per party, the columns whose keys are
  ``>= g``; when together they hold the keys needed and fit the candidate buffer (at most
  ``_GUESS_SLACK`` times as many), they are the candidates and the radix rounds are skipped.
  A guess that holds costs two passes over the row: the first, and the final writing one.
  Otherwise the radix select runs as without a guess, and its threshold (of the top 5/4 x
  the needed count) becomes the next guess. Either way the set is the same.
* compact rows (``positions=``): a two-stage retrieval hands over only its candidates' keys,
  a row per slot in ascending position order with each column's position beside it; the
  passes run over that row (4 bytes per candidate, not per cached position), the picks are
  written as positions, and the dilation finds a neighbour's column by its position.
  ``whole_row=True`` ranks every column and writes columns (stage one's choice of pages).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .retrieve_triton import _window_mass, block_keys
from .bounds_triton import BLOCK_W, middle_range, row_bounds, row_contiguous
from .compose_triton import SLOT_BLOCK, Composition, compose_row, compose_windows
from .kpass_triton import num_sms, row_lse, splits_per_active
from .pdl import launch_options, wait_for_inputs


__all__ = ["SCRATCH_WIDTH", "TIMELINE_PHASES", "TIMELINE_STAMPS", "timeline_buffer", "topk_picks"]

# block: keys per iteration of a pass. programs_per_sm: programs per SM of the grid; every
# party of a slot must be resident while the others wait at its barrier, which holds for one
# program per SM, and for more while programs_per_sm * num_warps <= 8 (at most 256 threads
# of at most 255 registers each per SM); ``scripts/engine_sweep.py`` and
# ``scripts/topk_probe.py`` time the choices.
# max_parties: most programs one slot's row is split among (fewer: cheaper barriers, longer
# passes; ``scripts/topk_probe.py`` times the choices).
# tags_from_share: the length of a party's share of the row (keys) from which the program
# that thresholds the candidates also tags them with their class, so that the final
# compaction is one writing pass. Below it, that program passes the threshold on at once
# and every party counts its share's picks before writing them: a pass and a barrier more
# for each party, less work in the chain the others wait for. Few retrieving slots split
# their rows into short shares, where that wins; with many, each party's share is long and
# a count pass over it costs more than the tags (README, "Kernel configurations"). 0:
# always tags.
CONFIG = {"block": 2048, "num_warps": 8, "programs_per_sm": 1, "max_parties": 256,
          "tags_from_share": 16384}
_NEAR_BIT = tl.constexpr(-(2 ** 31))  # the top bit of an int32 key: a dilated neighbour
_C_MAX = 256  # most parties of one slot (their counts live in the scratch row)
# A guess is taken while the keys at or above it are between the needed count and
# _GUESS_SLACK times it (the candidate buffer); the next guess aims at _GUESS_AHEAD times it.
_GUESS_SLACK = 2
# Candidates a guess may leave for the one program that thresholds them (its registers hold
# them all): past this the guess is not used (more spill, and ran slower than no guess).
_GUESS_MAX_CANDIDATES = 8192
_GUESS_AHEAD_NUM = tl.constexpr(5)
_GUESS_AHEAD_DEN = tl.constexpr(4)
# Scratch row per slot (int32): digit histograms, the barrier counter, the threshold the
# dilation found, and per-party counts and mass partials of the two compactions.
# Digits of 4 bits: eight rounds of 16-bin histograms. A histogram's cost grows with its
# bins, and on long rows a pass is bound by the histogram instructions rather than by the
# rounds, so fewer, wider digits lose there (README, "Kernel configurations").
_DIGIT_BITS = 4
_DIGIT = tl.constexpr(_DIGIT_BITS)
_BINS = tl.constexpr(2 ** _DIGIT_BITS)
_ROUNDS = tl.constexpr(32 // _DIGIT_BITS)
_HIST_WIDTH = (32 // _DIGIT_BITS) * 2 ** _DIGIT_BITS
SCRATCH_WIDTH = _HIST_WIDTH + 4 + 5 * _C_MAX
_HIST = tl.constexpr(0)
_BAR = tl.constexpr(_HIST_WIDTH)
_THR = tl.constexpr(_HIST_WIDTH + 1)
_TOTAL = tl.constexpr(_HIST_WIDTH + 3)  # the slot's pick count (final compaction)
_CNT1 = tl.constexpr(_HIST_WIDTH + 4)
_CNT2 = tl.constexpr(_HIST_WIDTH + 4 + 2 * _C_MAX)
_MASSP = tl.constexpr(_HIST_WIDTH + 4 + 4 * _C_MAX)
_SCRATCH = tl.constexpr(SCRATCH_WIDTH)
# Checkpoints of ``topk_picks(timeline=...)``, per program: 0 is its start; then, in the
# order a program passes them, each with the phase that ends there. Party 0 alone stamps
# 8-11, within 3 -> 4 (without dilation, 11 alone). 2-11 are those of the last slot a
# program worked on.
TIMELINE_PHASES = (
    (1, "compose reusing"),  # the slots that keep their picks composed
    (2, "first pass"),  # over its share of the row: keys formed, the guess's list
    (3, "candidates"),  # radix rounds or guess (without candidates: the threshold)
    (8, "cores selected"),  # the dilation's cores
    (9, "cores listed"),
    (10, "neighbours flagged"),
    (11, "threshold of the picks"),
    (4, "tags and counts"),  # party 0: the candidates tagged (with tags only)
    (5, "broadcast + counts"),  # threshold received (with tags: the picks before its share counted)
    (6, "write picks"),  # (without tags: its share's picks counted, then written)
    (7, "windows + dropped"),  # the end
)
TIMELINE_STAMPS = tl.constexpr(12)


@triton.jit
def _stamp(times_row, i, TIMED: tl.constexpr):
    """With ``TIMED``, store the GPU's global timer (ns) as checkpoint ``i`` of this program
    (``topk_picks(timeline=...)``: where a launch's time goes, phase by phase)."""
    if TIMED:
        tl.debug_barrier()  # the phase ends when every warp of the program has finished it
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                        is_pure=False, pack=1)
        tl.store(times_row + i, now)


@triton.jit
def _keys_of_block(key_row, cols, end):
    """The keys of a block of columns (0 from ``end`` on) as uint32, read past the L1 cache
    (other programs of the launch write them)."""
    return tl.load(key_row + cols, mask=cols < end, other=0,
                   cache_modifier=".cg").to(tl.uint32, bitcast=True)


@triton.jit
def _barrier(BAR, parties, phase):
    """Wait until every party of this slot has arrived ``phase + 1`` times; returns the new
    phase. A CTA barrier first, so that all of this program's writes precede its arrival."""
    tl.debug_barrier()
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    target = parties * (phase + 1)
    seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    return phase + 1


@triton.jit
def _digit_round(hist, shift, remaining, prefix, fixed):
    """Fix the digit at bit ``shift`` (``_DIGIT`` bits; most significant first) from its
    histogram among the keys matching the digits fixed so far: returns (remaining, prefix,
    fixed, the bin held exactly the keys still needed)."""
    bins = tl.arange(0, _BINS)
    n = tl.sum(hist, 0)
    at_least = n - tl.cumsum(hist, 0) + hist  # matching keys whose digit is >= each bin
    best = tl.maximum(tl.max(tl.where(at_least >= remaining, bins, -1), 0), 0)
    in_best = tl.sum(tl.where(bins == best, hist, 0), 0)
    remaining = remaining - tl.sum(tl.where(bins > best, hist, 0), 0)
    prefix = prefix | (best.to(tl.uint32) << shift)
    fixed = fixed | (tl.full([], _BINS - 1, tl.uint32) << shift)
    return remaining, prefix, fixed, remaining == in_best


@triton.jit
def _select(key_row, start, end, k, SCR, parties, phase, MULTI: tl.constexpr,
            BLOCK: tl.constexpr):
    """(thr, need, phase): the top ``k`` keys of the slot's middle (this party holds
    ``[start, end)`` of it) are those above ``thr`` and the first ``need`` equal to it.
    Fewer than k candidates: thr = 0 (all of them); k <= 0: none."""
    bins = tl.arange(0, _BINS)
    prefix = tl.full([], 0, tl.uint32)
    fixed = tl.full([], 0, tl.uint32)
    remaining = tl.full([], 0, tl.int32) + k
    total = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    d = tl.full([], 0, tl.int32)
    while (done == 0) & (d < _ROUNDS):  # a loop, not unrolled (see _select_registers)
        shift = (32 - (d + 1) * _DIGIT).to(tl.uint32)
        hist = tl.zeros([_BINS], tl.int32)
        for s0 in range(start, end, BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            key = _keys_of_block(key_row, offs, end)
            match = (offs < end) & (key != 0) & ((key & fixed) == prefix)
            digit = (key >> shift) & (_BINS - 1)
            hist += tl.histogram(digit.to(tl.int32), _BINS, mask=match)
        if MULTI:
            tl.atomic_add(SCR + _HIST + d * _BINS + bins, hist)
            phase = _barrier(SCR + _BAR, parties, phase)
            hist = tl.load(SCR + _HIST + d * _BINS + bins, volatile=True)
        if d == 0:
            total = tl.sum(hist, 0)
        remaining, prefix, fixed, exact = _digit_round(hist, shift, remaining, prefix, fixed)
        done = (exact | (total <= k) | (k <= 0)).to(tl.int32)
        d += 1
    # Ended early: every key from the bin's lower bound up is in.
    thr = prefix
    need = remaining
    early = (done != 0) & (remaining > 0)
    thr = tl.where(early, tl.maximum(prefix, 1) - 1, thr)
    need = tl.where(early, 0, need)
    thr = tl.where(total <= k, tl.full([], 0, tl.uint32), thr)
    need = tl.where(total <= k, 0, need)
    thr = tl.where(k <= 0, tl.full([], 0xFFFFFFFF, tl.uint32), thr)
    need = tl.where(k <= 0, 0, need)
    return thr, need, phase


@triton.jit
def _taken_ties(is_eq, need):
    """Which of a block's keys equal to the threshold are picks: the first ``need`` of them
    in column order. Ranking them takes a scan over the block, which costs far more than
    the count that shows it is not needed: when the cut falls between distinct keys (or
    below every tie of the block), all of them are in."""
    n_eq = tl.sum(is_eq.to(tl.int32), 0)
    if n_eq <= need:
        taken = is_eq
    else:
        eq_rank = tl.cumsum(is_eq.to(tl.int32), 0) - 1
        taken = is_eq & (eq_rank < need)
    return taken


@triton.jit
def _write_picks(key_row, start, end, thr, need, out_row, width, n_out, eq_seen, total, c,
                 parties, BLOCK: tl.constexpr, map_row, MAP: tl.constexpr, comp_row,
                 COMP: tl.constexpr):
    """Write this party's picks of ``[start, end)`` (keys above ``thr``, and keys equal to
    it while their rank among the row's equal keys, counted from ``eq_seen`` on, is below
    ``need``) in column order from slot ``n_out`` on, and -1 in the slots from ``total`` to
    ``width`` (shared among the parties). A column is written as itself, or as
    ``map_row[column]`` (its position) with ``MAP``; with ``COMP``, also to the same slots
    of ``comp_row`` (the step's output, after its sinks). Returns the summed mass of the
    picks."""
    mass_sum = tl.full([], 0.0, tl.float32)
    for s0 in range(start, end, BLOCK):
        pos = s0 + tl.arange(0, BLOCK)
        key = _keys_of_block(key_row, pos, end)
        cand = (pos < end) & (key != 0)
        is_eq = cand & (key == thr)
        pick = cand & ((key > thr) | _taken_ties(is_eq, need - eq_seen))
        slot = n_out + tl.cumsum(pick.to(tl.int32), 0) - 1
        if MAP:
            written = tl.load(map_row + pos, mask=pick, other=-1)
        else:
            written = pos
        tl.store(out_row + slot, written, mask=pick & (slot < width))
        if COMP:
            tl.store(comp_row + slot, written, mask=pick & (slot < width))
        mass_sum += tl.sum(tl.where(pick, _mass_of(key), 0.0), 0)
        n_out += tl.sum(pick.to(tl.int32), 0)
        eq_seen += tl.sum(is_eq.to(tl.int32), 0)
    for s0 in range(total + c * BLOCK, width, parties * BLOCK):
        slot = s0 + tl.arange(0, BLOCK)
        tl.store(out_row + slot, tl.full([BLOCK], -1, tl.int32), mask=slot < width)
    return mass_sum


@triton.jit
def _mass_of(key):
    """The fp32 mass a key (dilation flag or not) stands for."""
    return ((key & 0x7FFFFFFF) - 1).to(tl.int32, bitcast=True).to(tl.float32, bitcast=True)


@triton.jit
def _compact(key_row, start, end, thr, need, out_row, width, SCR, CNT: tl.constexpr, c,
             parties, phase, MULTI: tl.constexpr, BLOCK: tl.constexpr, C_P2: tl.constexpr,
             map_row, MAP: tl.constexpr, comp_row, COMP: tl.constexpr):
    """Write the slot's picks (keys above ``thr``, then the first ``need`` equal to it) in
    column order to ``out_row[0:width)`` and -1 after them; this party writes those of
    ``[start, end)``, after counting the keys of every party before it. Returns (count,
    summed mass of the picks, phase)."""
    n_gt = tl.full([], 0, tl.int32)
    n_eq = tl.full([], 0, tl.int32)
    for s0 in range(start, end, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        key = _keys_of_block(key_row, offs, end)
        cand = (offs < end) & (key != 0)
        n_gt += tl.sum((cand & (key > thr)).to(tl.int32), 0)
        n_eq += tl.sum((cand & (key == thr)).to(tl.int32), 0)
    gt_before = tl.full([], 0, tl.int32)
    eq_before = tl.full([], 0, tl.int32)
    total_gt = n_gt
    total_eq = n_eq
    if MULTI:
        tl.store(SCR + CNT + 2 * c, n_gt)
        tl.store(SCR + CNT + 2 * c + 1, n_eq)
        phase = _barrier(SCR + _BAR, parties, phase)
        offs_c = tl.arange(0, C_P2)
        gts = tl.load(SCR + CNT + 2 * offs_c, mask=offs_c < parties, other=0, volatile=True)
        eqs = tl.load(SCR + CNT + 2 * offs_c + 1, mask=offs_c < parties, other=0, volatile=True)
        gt_before = tl.sum(tl.where(offs_c < c, gts, 0), 0)
        eq_before = tl.sum(tl.where(offs_c < c, eqs, 0), 0)
        total_gt = tl.sum(gts, 0)
        total_eq = tl.sum(eqs, 0)
    total = total_gt + tl.minimum(total_eq, need)
    mass_sum = _write_picks(key_row, start, end, thr, need, out_row, width,
                            gt_before + tl.minimum(eq_before, need), eq_before, total, c,
                            parties, BLOCK, map_row, MAP, comp_row, COMP)
    if MULTI:
        tl.store(SCR + _MASSP + c, mass_sum.to(tl.int32, bitcast=True))
        phase = _barrier(SCR + _BAR, parties, phase)
        offs_c = tl.arange(0, C_P2)
        parts = tl.load(SCR + _MASSP + offs_c, mask=offs_c < parties, other=0, volatile=True)
        mass_sum = tl.sum(parts.to(tl.float32, bitcast=True), 0)
    return total, mass_sum, phase


@triton.jit
def _collect(key, pos, ok, g, tmp_row, n, tmp_width):
    """Append the columns of one block's keys ``>= g`` to ``tmp_row`` (in order, the first
    ``tmp_width`` of them kept); returns the new count."""
    take = ok & (key >= g)
    slot = n + tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(tmp_row + slot, pos, mask=take & (slot < tmp_width))
    return n + tl.sum(take.to(tl.int32), 0)


@triton.jit
def _form_keys(score_rows, key_row, start, end, lse, r_ok, g, tmp_row, tmp_width,
               COLLECT: tl.constexpr, BLOCK: tl.constexpr):
    """This party's share ``[start, end)`` of the slot's keys, formed from the pass over K's
    scores and stored; with ``COLLECT``, the columns of those ``>= g`` listed on the way
    (``_collect``). Returns how many keys are ``>= g``."""
    n = tl.full([], 0, tl.int32)
    for s0 in range(start, end, BLOCK):
        pos = s0 + tl.arange(0, BLOCK)
        ok = pos < end
        key = block_keys(score_rows, pos, ok, lse, r_ok)
        tl.store(key_row + pos, key, mask=ok)
        if COLLECT:
            n = _collect(key.to(tl.uint32, bitcast=True), pos, ok, g, tmp_row, n, tmp_width)
    return n


@triton.jit
def _collect_pass(key_row, start, end, g, tmp_row, tmp_width, BLOCK: tl.constexpr):
    """``_collect`` over this party's share of keys already written; returns the count."""
    n = tl.full([], 0, tl.int32)
    for s0 in range(start, end, BLOCK):
        pos = s0 + tl.arange(0, BLOCK)
        n = _collect(_keys_of_block(key_row, pos, end), pos, pos < end, g, tmp_row, n,
                     tmp_width)
    return n


@triton.jit
def _guessed_candidates(n_mine, g, top, tmp_row, cand_row, cand_width, scr, c, parties,
                        phase, MULTI: tl.constexpr, BLOCK: tl.constexpr, C_P2: tl.constexpr):
    """(hit, n_cand, phase). Each party's first pass listed its keys ``>= g`` (``n_mine`` of
    them, in ``tmp_row``). When they hold the ``top`` needed and fit the candidate buffer,
    they are the candidates: each party copies its list after those of the parties before
    it, so the candidates are in column order."""
    before = tl.full([], 0, tl.int32)
    total = n_mine
    if MULTI:
        tl.store(scr + _CNT1 + 2 * c, n_mine)
        phase = _barrier(scr + _BAR, parties, phase)
        offs_c = tl.arange(0, C_P2)
        counts = tl.load(scr + _CNT1 + 2 * offs_c, mask=offs_c < parties, other=0,
                         volatile=True)
        before = tl.sum(tl.where(offs_c < c, counts, 0), 0)
        total = tl.sum(counts, 0)
    hit = (g != 0) & (total >= top) & (total <= cand_width)
    if hit:
        tl.debug_barrier()  # this program's list, written by other threads of it
        for s0 in range(0, n_mine, BLOCK):
            i = s0 + tl.arange(0, BLOCK)
            col = tl.load(tmp_row + i, mask=i < n_mine, other=0, volatile=True)
            tl.store(cand_row + before + i, col, mask=i < n_mine)
        if MULTI:
            phase = _barrier(scr + _BAR, parties, phase)
        else:
            tl.debug_barrier()
    return hit.to(tl.int32), total, phase


@triton.jit
def _candidate_keys(key_row, cand_row, n_cand, CAND_P2: tl.constexpr):
    """(columns, keys) of the candidates, keys without a dilation flag, 0 past ``n_cand``."""
    offs = tl.arange(0, CAND_P2)
    in_list = offs < n_cand
    cpos = tl.load(cand_row + offs, mask=in_list, other=0, volatile=True)
    ckey = tl.load(key_row + cpos, mask=in_list, other=0, volatile=True).to(tl.uint32, bitcast=True)
    return cpos, tl.where(in_list, ckey & 0x7FFFFFFF, 0)


@triton.jit
def _select_registers(key, k):
    """(thr, need) of the top ``k`` of a block of keys held in registers (0: no candidate),
    exact even when all of them are in (thr = the smallest, need = how many equal it), so
    that a compaction over the whole row takes no key outside the block. The digit rounds
    stop once a bin holds exactly the keys still needed; that bin's smallest key is then
    the threshold. The leading digits that every key shares (those of the largest key and
    the smallest agree: masses of one row's top keys span few binades) are taken from the
    largest key without a round: their histogram would hold every key in that one bin."""
    prefix = tl.full([], 0, tl.uint32)
    fixed = tl.full([], 0, tl.uint32)
    remaining = tl.full([], 0, tl.int32) + k
    cand = key != 0
    done = tl.full([], 0, tl.int32)
    top_key = tl.max(tl.where(cand, key, tl.full(key.shape, 0, tl.uint32)), 0)
    bottom_key = tl.min(tl.where(cand, key, tl.full(key.shape, 0xFFFFFFFF, tl.uint32)), 0)
    differ = top_key ^ bottom_key  # all ones without a candidate: no digit is shared
    # A loop, not unrolled rounds: one program runs this code once per call, so unrolled it
    # would be thousands of instructions fetched once each (the instruction cache holds a
    # loop's body after its first round).
    d = tl.full([], 0, tl.int32)
    while (done == 0) & (d < _ROUNDS):
        shift = (32 - (d + 1) * _DIGIT).to(tl.uint32)
        digit_bits = tl.full([], _BINS - 1, tl.uint32) << shift
        if (differ >> shift) == 0:  # this digit and those above it: every key's alike
            prefix = prefix | (top_key & digit_bits)
            fixed = fixed | digit_bits
        else:
            match = cand & ((key & fixed) == prefix)
            digit = (key >> shift) & (_BINS - 1)
            hist = tl.histogram(digit.to(tl.int32), _BINS, mask=match)
            remaining, prefix, fixed, exact = _digit_round(hist, shift, remaining, prefix, fixed)
            done = exact.to(tl.int32)
        d += 1
    total = tl.sum(cand.to(tl.int32), 0)
    # Ended early (or all in): the smallest key taken, and all the keys equal to it.
    low = total <= k
    low = low | (done != 0)
    taken = cand & (((key & fixed) == prefix) | (total <= k))
    smallest = tl.min(tl.where(taken, key, tl.full(key.shape, 0xFFFFFFFF, tl.uint32)), 0)
    n_smallest = tl.sum((taken & (key == smallest)).to(tl.int32), 0)
    thr = tl.where(low, smallest, prefix)
    need = tl.where(low, n_smallest, remaining)
    return thr, need


@triton.jit
def _list_neighbours(key_row, cpos, core, core_row, radius, mid_lo, mid_hi, M_P2: tl.constexpr,
                     R_P2: tl.constexpr, map_row, n_cols, MAP: tl.constexpr, times_row,
                     TIMED: tl.constexpr):
    """Flag the +-radius neighbours of the cores (a mask over the candidates ``cpos``, in
    column order): the cores are listed first, so that each neighbour is taken once.
    Returns (how many neighbours, their columns and flagged keys, in column order; 0:
    none). Flagging a key that holds the flag already leaves it as it is."""
    core_slot = tl.cumsum(core.to(tl.int32), 0) - 1
    n_core = tl.sum(core.to(tl.int32), 0)
    tl.store(core_row + core_slot, cpos, mask=core)
    tl.debug_barrier()
    _stamp(times_row, 9, TIMED)

    # Neighbours c_i + o, i-major: skipping those the previous core already covers leaves
    # each position once, in ascending order.
    i = tl.arange(0, M_P2)
    o = tl.arange(0, R_P2) - radius
    core_col = tl.load(core_row + i, mask=i < n_core, other=0, volatile=True)
    prev_col = tl.load(core_row + i - 1, mask=(i >= 1) & (i < n_core), other=0, volatile=True)
    if MAP:
        core_pos = tl.load(map_row + core_col, mask=i < n_core, other=0)
        prev = tl.load(map_row + prev_col, mask=(i >= 1) & (i < n_core), other=0)
    else:
        core_pos = core_col
        prev = prev_col
    prev = tl.where(i >= 1, prev, -(2 ** 30))
    p = core_pos[:, None] + o[None, :]
    col = core_col[:, None] + o[None, :]
    near = ((i < n_core)[:, None] & (o <= radius)[None, :] & (p >= mid_lo) & (p < mid_hi)
            & (p > prev[:, None] + radius))
    if MAP:  # the neighbour's column holds it, or it is no candidate
        near = near & (col >= 0) & (col < n_cols)
        near = near & (tl.load(map_row + col, mask=near, other=-1) == p)
    nkey = tl.load(key_row + col, mask=near, other=0, volatile=True)
    near = near & (nkey != 0)
    tl.store(key_row + col, nkey | _NEAR_BIT, mask=near)
    n_near = tl.sum(tl.sum(near.to(tl.int32), 1), 0)
    flagged = tl.reshape(tl.where(near, nkey | _NEAR_BIT, 0).to(tl.uint32, bitcast=True),
                         [M_P2 * R_P2])
    near_col = tl.reshape(tl.where(near, col, 0), [M_P2 * R_P2])
    tl.debug_barrier()
    return n_near, near_col, flagged


@triton.jit
def _dilate(key_row, cand_row, n_cand, core_row, m, radius, k, mid_lo, mid_hi,
            CAND_P2: tl.constexpr, M_P2: tl.constexpr, R_P2: tl.constexpr, map_row, n_cols,
            MAP: tl.constexpr, times_row, TIMED: tl.constexpr):
    """One program, over the candidates (the top max(k, m) keys, in column order): flag
    the +-radius neighbours of the top ``m``; returns (thr, need) of the final top ``k``
    over the flagged keys, the candidates' columns and their unflagged keys (0 for a
    flagged one: "the rest"), and the neighbours' columns and flagged keys (0: none), each
    list in column order. With ``MAP`` the columns are ascending positions ``map_row``
    (runs of consecutive positions, at least ``radius`` apart), so the neighbour at position
    ``p + o`` of a core at column ``c`` is column ``c + o`` when that column holds it."""
    offs = tl.arange(0, CAND_P2)
    in_list = offs < n_cand
    cpos = tl.load(cand_row + offs, mask=in_list, other=0, volatile=True)
    ckey = tl.load(key_row + cpos, mask=in_list, other=0, volatile=True).to(tl.uint32, bitcast=True)
    thr_m, need_m = _select_registers(ckey, m)
    _stamp(times_row, 8, TIMED)
    is_eq = in_list & (ckey == thr_m) & (ckey != 0)
    core = in_list & (ckey != 0) & ((ckey > thr_m) | _taken_ties(is_eq, need_m))
    n_near, near_col, flagged = _list_neighbours(
        key_row, cpos, core, core_row, radius, mid_lo, mid_hi, M_P2, R_P2, map_row, n_cols,
        MAP, times_row, TIMED)
    _stamp(times_row, 10, TIMED)

    # Every candidate's key after the flagging: the unflagged ones are "the rest".
    rkey = tl.load(key_row + cpos, mask=in_list, other=0, volatile=True).to(tl.uint32, bitcast=True)
    rest = tl.where(in_list & ((rkey & 0x80000000) == 0), rkey, 0)
    if n_near >= k:  # the neighbours alone fill the budget: their best k
        thr, need = _select_registers(flagged, k)
    else:  # every neighbour, then the best of the other candidates
        thr, need = _select_registers(rest, k - n_near)
        none_left = tl.sum((rest != 0).to(tl.int32), 0) == 0
        # No other key to take: a threshold above every unflagged key, below every flagged.
        thr = tl.where(none_left | (k - n_near <= 0), tl.full([], 0x7FFFFFFF, tl.uint32), thr)
        need = tl.where(none_left | (k - n_near <= 0), 0, need)
    _stamp(times_row, 11, TIMED)
    return thr, need, cpos, rest, near_col, flagged


@triton.jit
def _tag(col, key, thr, need):
    """Over one list of keys in column order (0: none): each entry's column tagged with its
    class (``col * 4 + class``; 1: above ``thr``, 2: equal to it, 0: neither) and the
    summed mass of the picks (those above, and the first ``need`` equal ones)."""
    ok = key != 0
    is_gt = ok & (key > thr)
    is_eq = ok & (key == thr)
    pick = is_gt | _taken_ties(is_eq, need)
    tagged = col * 4 + tl.where(is_gt, 1, tl.where(is_eq, 2, 0))
    return tagged, tl.sum(tl.where(pick, _mass_of(key), 0.0), 0)


@triton.jit
def _counts_before(tag_row, n, start, N_P2: tl.constexpr):
    """(above, equal): how many of a tagged list's first ``n`` entries lie before column
    ``start`` in each class."""
    offs = tl.arange(0, N_P2)
    tagged = tl.load(tag_row + offs, mask=offs < n, other=0, volatile=True)
    before = (offs < n) & ((tagged >> 2) < start)
    return (tl.sum((before & ((tagged & 3) == 1)).to(tl.int32), 0),
            tl.sum((before & ((tagged & 3) == 2)).to(tl.int32), 0))


@triton.jit
def _final_threshold(key_row, cand_row, n_cand, near_row, cap, m, radius, mid_lo, mid_hi,
                     core_row, scr, mass_ptr, start, c, parties, phase, DILATE: tl.constexpr,
                     MULTI: tl.constexpr, CAND_P2: tl.constexpr, M_P2: tl.constexpr,
                     R_P2: tl.constexpr, map_row, n_cols, MAP: tl.constexpr, use_tags,
                     times_row, TIMED: tl.constexpr):
    """Party 0 finds the threshold of the slot's picks among the candidates (the top keys
    of the row, in column order; flagging their dilation neighbours first with ``DILATE``).
    With ``use_tags`` it also sums the picks' mass (stored at ``mass_ptr``) and tags the
    candidates (and neighbours, in ``near_row``) with their class, so that every party
    counts the picks before its share from those few thousand entries: the final
    compaction needs no counting pass. Every party gets (thr, need, its first output slot,
    the equal keys before its share, the slot's pick count, phase); without, only
    (thr, need) and phase hold (the caller's ``_compact`` counts)."""
    thr = tl.full([], 0, tl.uint32)
    need = tl.full([], 0, tl.int32)
    if c == 0:
        if DILATE:
            thr, need, cpos, rkey, near_col, near_key = _dilate(
                key_row, cand_row, n_cand, core_row, m, radius, cap, mid_lo, mid_hi, CAND_P2,
                M_P2, R_P2, map_row, n_cols, MAP, times_row, TIMED)
        else:
            cpos, rkey = _candidate_keys(key_row, cand_row, n_cand, CAND_P2)
            thr, need = _select_registers(rkey, cap)
            _stamp(times_row, 11, TIMED)
        thr = tl.where(cap <= 0, tl.full([], 0xFFFFFFFF, tl.uint32), thr)
        need = tl.where(cap <= 0, 0, need)
        if use_tags:
            # A key equal to thr is either flagged or not, so the ties lie in one list alone.
            tagged, mass = _tag(cpos, rkey, thr, need)
            offs = tl.arange(0, CAND_P2)
            tl.store(cand_row + offs, tagged, mask=offs < n_cand)
            if DILATE:
                near_tagged, near_mass = _tag(near_col, near_key, thr, need)
                tl.store(near_row + tl.arange(0, M_P2 * R_P2), near_tagged)
                mass += near_mass
            n_gt = tl.sum(((tagged & 3) == 1).to(tl.int32), 0)
            n_eq = tl.sum(((tagged & 3) == 2).to(tl.int32), 0)
            if DILATE:
                n_gt += tl.sum(((near_tagged & 3) == 1).to(tl.int32), 0)
                n_eq += tl.sum(((near_tagged & 3) == 2).to(tl.int32), 0)
            tl.store(scr + _TOTAL, n_gt + tl.minimum(n_eq, need))
            tl.store(mass_ptr, mass)
    _stamp(times_row, 4, TIMED)
    thr, need, phase = _broadcast_threshold(scr, thr, need, c, parties, phase, MULTI)
    n_out = tl.full([], 0, tl.int32)
    eq_before = tl.full([], 0, tl.int32)
    total = tl.full([], 0, tl.int32)
    if use_tags:
        gt_before, eq_before = _counts_before(cand_row, n_cand, start, CAND_P2)
        if DILATE:
            near_gt, near_eq = _counts_before(near_row, M_P2 * R_P2, start, M_P2 * R_P2)
            gt_before += near_gt
            eq_before += near_eq
        total = tl.load(scr + _TOTAL, volatile=True)
        n_out = gt_before + tl.minimum(eq_before, need)
    return thr, need, n_out, eq_before, total, phase


@triton.jit
def _broadcast_threshold(scr, thr, need, c, parties, phase, MULTI: tl.constexpr):
    """Every party of the slot gets the (thr, need) its party 0 found (party 0 passes the
    real values, the others anything); returns (thr, need, phase)."""
    if c == 0:
        tl.store(scr + _THR, thr.to(tl.int32, bitcast=True))
        tl.store(scr + _THR + 1, need)
    if MULTI:
        phase = _barrier(scr + _BAR, parties, phase)
    else:
        tl.debug_barrier()
    thr = tl.load(scr + _THR, volatile=True).to(tl.uint32, bitcast=True)
    need = tl.load(scr + _THR + 1, volatile=True)
    return thr, need, phase


@triton.jit
def _topk_kernel(
    KEYS, BOUNDS, ACTIVE, CAPS, OUT, CAND, CORES, NEAR, SCRATCH, PICKED_MASS, GUESS, POSITIONS,
    SCORES, LSE_PART, WMASS, TMP, COMP_MASK, COMP_OUT, DROPPED, WINDOW, TIMES, mass_rows,
    BH, Hkv, L, k, m, radius, width, cand_width, stride_ob, stride_oh, num_programs,
    rows, lse_width, lse_splits, max_parties,
    Tq, slots, sink, local, stride_mb, stride_mt, stride_ml, mask_min,
    HAS_ACTIVE: tl.constexpr, HAS_CAPS: tl.constexpr, DILATE: tl.constexpr, HAS_GUESS: tl.constexpr,
    MULTI: tl.constexpr, BLOCK: tl.constexpr, BLOCK_BH: tl.constexpr, C_P2: tl.constexpr,
    CAND_P2: tl.constexpr, M_P2: tl.constexpr, R_P2: tl.constexpr, MAP: tl.constexpr,
    WHOLE: tl.constexpr, PENDING: tl.constexpr, WANT_WMASS: tl.constexpr,
    ROWS_P2: tl.constexpr, M_PAD: tl.constexpr, KEY_BLOCK: tl.constexpr, LSE_CHUNK: tl.constexpr,
    COMPOSE: tl.constexpr, MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
    BLOCK_W: tl.constexpr, SLOT_BLOCK: tl.constexpr, HAS_DROPPED: tl.constexpr,
    tags_from_share, TIMED: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    times_row = TIMES + pid.to(tl.int64) * TIMELINE_STAMPS
    _stamp(times_row, 0, TIMED)
    offs_bh = tl.arange(0, BLOCK_BH)
    if HAS_ACTIVE:
        flags = tl.load(ACTIVE + offs_bh, mask=offs_bh < BH, other=0) != 0
    else:
        flags = offs_bh < BH
    n_active = tl.sum(flags.to(tl.int32), 0)
    rank = tl.cumsum(flags.to(tl.int32), 0) - 1
    if MULTI:
        parties = tl.minimum(tl.maximum(num_programs // tl.maximum(n_active, 1), 1), max_parties)
        # A party's share of a row is a whole number of blocks, so parties past the row's
        # block count would hold nothing and only slow the barriers down.
        parties = tl.minimum(parties, tl.maximum(tl.cdiv(L, BLOCK), 1))
    else:
        parties = tl.full([], 1, tl.int32)
    groups = num_programs // parties
    c = pid % parties
    if COMPOSE and HAS_ACTIVE:  # the output of the slots that keep their picks, at once
        # Counted from the last program: party 0 of each active slot (the first programs)
        # has the slot's threshold to find while its other parties wait for it. compose_row
        # reads the slot's flag itself, with its bounds and picks (one wait on memory).
        for s in range(num_programs - 1 - pid, BH, num_programs):
            s64 = tl.full([], 0, tl.int64) + s  # the interpreter's loop index is an int
            b_s = s64 // Hkv
            compose_row(COMP_MASK, BOUNDS, OUT + b_s * stride_ob + (s64 % Hkv) * stride_oh,
                        COMP_OUT + s64 * slots, b_s, Tq, width, slots, sink, local,
                        stride_mb, stride_mt, stride_ml, mask_min, ACTIVE + s64, MASK_KIND,
                        TQ_P2, BLOCK_W, SLOT_BLOCK, True)
    _stamp(times_row, 1, TIMED)
    for j in range(pid // parties, n_active, groups):
        slot = tl.sum(tl.where(flags & (rank == j), offs_bh, 0), 0)
        b = (slot // Hkv).to(tl.int64)
        h = slot % Hkv
        mid_lo, mid_hi = middle_range(BOUNDS + b * 8)
        if WHOLE:  # a row of L candidate columns, whatever positions they hold
            scan_lo = mid_lo * 0
            scan_hi = scan_lo + L
        else:
            scan_lo = mid_lo
            scan_hi = mid_hi
        per = tl.cdiv(tl.cdiv(tl.maximum(scan_hi - scan_lo, 0), parties), BLOCK) * BLOCK
        start = tl.minimum(scan_lo + c * per, scan_hi)
        end = tl.minimum(start + per, scan_hi)
        # The same for every party of the slot, so they all meet the same barriers.
        use_tags = per >= tags_from_share
        key_row = KEYS + slot.to(tl.int64) * L
        map_row = POSITIONS + slot.to(tl.int64) * L
        scr = SCRATCH + slot.to(tl.int64) * _SCRATCH
        # The first pass over this party's share of the row: with PENDING it forms the keys
        # from the pass over K's scores (as retrieve_triton's _keys_kernel does; the passes
        # below read only this share until a barrier, so no other party need wait for it);
        # with a guess it lists the keys at or above it on the way (a guess of 0, none,
        # lists nothing: no key reaches 0xFFFFFFFF).
        tmp_row = TMP + pid.to(tl.int64) * cand_width
        g = tl.full([], 0, tl.uint32)
        if HAS_GUESS:
            g = tl.load(GUESS + slot).to(tl.uint32, bitcast=True)
        g_first = tl.where(g != 0, g, tl.full([], 0xFFFFFFFF, tl.uint32))
        n_mine = tl.full([], 0, tl.int32)
        if PENDING:
            offs_r = tl.arange(0, ROWS_P2)
            r_ok = offs_r < rows
            splits_of = tl.full([], 0, tl.int32) + lse_splits
            if HAS_ACTIVE:  # the pass over K shared its programs among the active slots
                splits_of = splits_per_active(BH, lse_splits, n_active)
            lse = row_lse(LSE_PART, slot.to(tl.int64) * M_PAD + offs_r, lse_width, splits_of,
                          r_ok, ROWS_P2, LSE_CHUNK)
            score_rows = SCORES + (slot.to(tl.int64) * rows + offs_r)[:, None] * L
            n_mine = _form_keys(score_rows, key_row, start, end, lse, r_ok, g_first, tmp_row,
                                cand_width, HAS_GUESS, KEY_BLOCK)
            if WANT_WMASS:  # party 0 sums the mass of the sinks and the local window
                if c == 0:
                    w_sum = _window_mass(score_rows, BOUNDS, b, lse, r_ok, c == 0, KEY_BLOCK,
                                         ROWS_P2, L)
                    tl.store(WMASS + slot, w_sum)
            tl.debug_barrier()
        elif HAS_GUESS:
            n_mine = _collect_pass(key_row, start, end, g_first, tmp_row, cand_width, BLOCK)
        _stamp(times_row, 2, TIMED)
        cap = tl.full([], 0, tl.int32) + k
        if HAS_CAPS:
            cap = tl.minimum(tl.load(CAPS + h).to(tl.int32), cap)
        phase = tl.full([], 0, tl.int32)
        out_row = OUT + b * stride_ob + h.to(tl.int64) * stride_oh
        comp_row = COMP_OUT + slot.to(tl.int64) * slots
        if HAS_GUESS or DILATE:
            # Candidates (the top keys, in column order) for one program to threshold: the
            # keys at or above the guess when it holds, else the radix select's top ``ahead``
            # (with a guess: 5/4 x the needed, whose threshold is the next guess).
            top = cap
            if DILATE:
                top = tl.maximum(cap, tl.full([], 0, tl.int32) + m)
            cand_row = CAND + slot.to(tl.int64) * cand_width
            hit = tl.full([], 0, tl.int32)
            n_cand = tl.full([], 0, tl.int32)
            ahead = top
            if HAS_GUESS:
                hit, n_cand, phase = _guessed_candidates(n_mine, g, top, tmp_row, cand_row,
                                                         cand_width, scr, c, parties, phase,
                                                         MULTI, BLOCK, C_P2)
                ahead = tl.minimum((top * _GUESS_AHEAD_NUM) // _GUESS_AHEAD_DEN, cand_width)
            if hit == 0:
                thr_a, need_a, phase = _select(key_row, start, end, ahead, scr, parties, phase,
                                               MULTI, BLOCK)
                n_cand, _, phase = _compact(key_row, start, end, thr_a, need_a, cand_row,
                                            cand_width, scr, _CNT1, c, parties, phase, MULTI,
                                            BLOCK, C_P2, map_row, False, cand_row, False)
                if HAS_GUESS:
                    if c == 0:  # the next guess: every key >= it makes ``ahead`` (0: too few)
                        tl.store(GUESS + slot, thr_a.to(tl.int32, bitcast=True))
            _stamp(times_row, 3, TIMED)
            thr, need, n_out, eq_seen, total, phase = _final_threshold(
                key_row, cand_row, n_cand, NEAR + slot.to(tl.int64) * (M_P2 * R_P2), cap, m,
                radius, mid_lo, mid_hi, CORES + slot.to(tl.int64) * M_P2, scr,
                PICKED_MASS + slot, start, c, parties, phase, DILATE, MULTI, CAND_P2, M_P2,
                R_P2, map_row, L, MAP, use_tags, times_row, TIMED)
            _stamp(times_row, 5, TIMED)
            if use_tags:
                _write_picks(key_row, start, end, thr, need, out_row, width, n_out, eq_seen,
                             total, c, parties, BLOCK, map_row, MAP, comp_row + sink, COMPOSE)
            else:  # count this party's picks, then write them (the flags are in the keys)
                total, mass_sum, phase = _compact(key_row, start, end, thr, need, out_row,
                                                  width, scr, _CNT2, c, parties, phase, MULTI,
                                                  BLOCK, C_P2, map_row, MAP, comp_row + sink,
                                                  COMPOSE)
                if c == 0:
                    tl.store(PICKED_MASS + slot, mass_sum)
        else:
            thr, need, phase = _select(key_row, start, end, cap, scr, parties, phase, MULTI, BLOCK)
            _stamp(times_row, 3, TIMED)
            total, mass_sum, phase = _compact(key_row, start, end, thr, need, out_row, width,
                                              scr, _CNT2, c, parties, phase, MULTI, BLOCK, C_P2,
                                              map_row, MAP, comp_row + sink, COMPOSE)
            if c == 0:
                tl.store(PICKED_MASS + slot, mass_sum)
        _stamp(times_row, 6, TIMED)
        if COMPOSE:  # the rest of the slot's output (each party wrote its picks into it)
            if c == 0:
                lo_r, hi_r, count_r, sink_end_r, local_start_r, fits_r = row_bounds(BOUNDS, b)
                compose_windows(COMP_MASK, comp_row, b, total, lo_r, hi_r, count_r, sink_end_r,
                                local_start_r, fits_r, row_contiguous(BOUNDS, b), Tq, slots,
                                sink, local, stride_mb, stride_mt, stride_ml, mask_min,
                                MASK_KIND, TQ_P2, BLOCK_W, SLOT_BLOCK)
        if HAS_DROPPED:  # the mass the slot's set drops: 1 - (windows + picks) / rows
            if c == 0:
                tl.debug_barrier()  # the picks' mass, stored by other threads of this program
                picked = tl.load(PICKED_MASS + slot, volatile=True)
                window = tl.load(WINDOW + slot, volatile=True)
                rows_f = (tl.full([], 0, tl.int32) + mass_rows).to(tl.float32)  # 1: a constexpr
                retained = tl.math.div_rn(window + picked, rows_f)
                tl.store(DROPPED + slot, tl.maximum(1.0 - retained, 0.0))
    _stamp(times_row, 7, TIMED)


def _resident_programs(device: torch.device) -> int:
    """How many programs of the top-k kernel may run at once with certainty (each party of
    a slot must be resident while the others wait at its barrier): ``programs_per_sm`` per
    SM, allowed only where the register file holds them all whatever the compiler
    allocates. One program per SM is always resident once it launches (a program too large
    for an SM fails to launch), so it may have up to 32 warps."""
    per_sm, warps = CONFIG["programs_per_sm"], CONFIG["num_warps"]
    if per_sm < 1 or (per_sm > 1 and per_sm * warps > 8) or warps > 32:
        raise ValueError(f"top-k programs_per_sm={per_sm} with num_warps={warps}: need one "
                         "program per SM (num_warps <= 32) or programs_per_sm * num_warps "
                         "<= 8 for every party to be resident")
    return per_sm * num_sms(device)


def timeline_buffer(device: torch.device) -> torch.Tensor:
    """Zeros for ``topk_picks(timeline=...)``: one row of checkpoints per program."""
    return torch.zeros((_resident_programs(device), TIMELINE_STAMPS.value), dtype=torch.int64,
                       device=device)


def topk_picks(keys, bounds, k: int, *, out=None, active=None, caps=None, dilation_m: int = 0,
               dilation_r: int = 0, width: int | None = None, guess=None, positions=None,
               whole_row: bool = False, pending=None, compose: Composition | None = None,
               scratch=None, dropped=None, timeline=None):
    """Picks of every active slot from ``keys`` (int32 ``[B, Hkv, L]``, modified in place
    when dilating): the top ``k`` of the middle (at most ``caps[h]`` for KV head h, when
    given), the +-``dilation_r`` neighbours of the best ``dilation_m`` first. Writes
    ascending positions, -1 padded, into ``out`` (``[B, Hkv, width]``, e.g. a view of the
    selection state: rows of inactive slots are left as they are) and returns it with the
    summed mass of each slot's picks (fp32 ``[B, Hkv]``, undefined for inactive slots).
    ``guess`` (int32 ``[B, Hkv]``, 0: none) seeds each active slot's threshold and receives
    the next call's; the picks are the same with or without it.

    ``positions`` (int32 ``[B, Hkv, C]``, same shape as ``keys``): the keys are a compact row
    of C candidates rather than one per position (a two-stage retrieval's), column j holding
    the key of position ``positions[..., j]``: ascending along the row, in runs of
    consecutive positions with gaps of at least ``dilation_r`` positions between them (whole
    pages, when ``dilation_r <= page_size``), -1 past the last. The whole row is ranked (keys outside the middle are 0) and the picks are
    written as positions.

    ``whole_row``: rank every column of the rows, not only the middle ``bounds`` give, and
    write the columns themselves (stage one's choice of pages from their keys).

    ``pending`` (``retrieve_triton.PendingKeys``, from ``retrieve_keys(defer=True)`` with the
    same ``active``): ``keys`` is still to be written; the kernel forms each active slot's
    keys from the pass over K's scores first (and its window mass, when the pending keys
    carry a tensor for it).

    ``compose`` (``compose_triton.Composition``): also write the step's output (sinks ++
    picks ++ local window) of every slot into ``compose.out``, in the same launch: a slot
    that keeps its picks at once, a retrieving one once its picks are written. ``out`` must
    then hold every slot's picks (the stored set) or every slot must be active.

    ``scratch``: int32 zeros ``[B * Hkv, SCRATCH_WIDTH]`` for the kernel's barriers and
    counts, made by the caller (a compiled glue graph makes it without a launch of its
    own); by default allocated here.

    ``dropped`` (``(out, window_mass, rows)``, fp32 ``[B, Hkv]`` tensors and an int): also
    write, for every active slot, ``max(1 - (window_mass + picked mass) / rows, 0)`` into
    ``out`` (PrHS's dropped mass at retrieval, ``rule_prhs.prhs_keep``; ``window_mass`` as
    the retrieval left it, or as the pending keys' pass writes it), so that no launch after
    the top-k is needed for it.

    ``timeline`` (CUDA only; int64 zeros from ``timeline_buffer``): each program of the
    launch stores the GPU's global timer (ns) at the checkpoints ``TIMELINE_STAMPS`` lists
    (``scripts/topk_probe.py --timeline``), to see which phase of a slot's chain holds the
    others at its barriers."""
    B, Hkv, L = keys.shape
    if pending is not None and (positions is not None or whole_row):
        raise ValueError("pending keys are one per cached position: no positions or whole_row")
    if positions is not None and positions.shape != keys.shape:
        raise ValueError(f"positions {tuple(positions.shape)} must match the keys {tuple(keys.shape)}")
    BH = B * Hkv
    width = k if width is None else width
    device = keys.device
    if out is None and active is None:  # every row is written whole (picks, then -1)
        out = torch.empty((B, Hkv, width), dtype=torch.int32, device=device)
    elif out is None:
        out = torch.full((B, Hkv, width), -1, dtype=torch.int32, device=device)
    if out.stride(-1) != 1:
        raise ValueError("topk_picks writes rows of positions: out's last dim must be contiguous")
    picked_mass = torch.empty((B, Hkv), dtype=torch.float32, device=device)
    dilate = dilation_m > 0 and dilation_r > 0
    multi = device.type == "cuda"  # the interpreter runs programs one after the other
    # On the GPU never more programs than are resident at once (parties wait for each
    # other); with more active slots than programs, each program takes several in turn.
    num_programs = _resident_programs(device) if multi else BH
    max_parties = CONFIG["max_parties"]
    if not 1 <= max_parties <= _C_MAX:
        raise ValueError(f"top-k max_parties={max_parties}: must be in [1, {_C_MAX}] (the "
                         "scratch row holds the counts of that many parties)")
    if scratch is not None and (scratch.shape != (BH, SCRATCH_WIDTH)
                                or scratch.dtype != torch.int32):
        raise ValueError(f"scratch must be int32 zeros of shape ({BH}, {SCRATCH_WIDTH}), got "
                         f"{scratch.dtype} {tuple(scratch.shape)}")
    if scratch is None:
        scratch = (torch.zeros((BH, SCRATCH_WIDTH), dtype=torch.int32, device=device) if multi
                   else torch.empty((BH, SCRATCH_WIDTH), dtype=torch.int32, device=device))
    m = dilation_m if dilate else 0
    if guess is not None and (guess.dtype != torch.int32 or guess.numel() != BH):
        raise ValueError(f"guess must be int32 with one entry per (row, KV head) slot ({BH}), "
                         f"got {guess.dtype} of {guess.numel()}")
    if guess is not None and _GUESS_SLACK * max(k, m, 1) > _GUESS_MAX_CANDIDATES:
        guess = None  # too many candidates for one program's registers
    cand_width = max(k, m, 1) * (_GUESS_SLACK if guess is not None else 1)
    cand = (torch.empty((BH, cand_width), dtype=torch.int32, device=device)
            if dilate or guess is not None else scratch)
    # Each program's list of the keys at or above the guess, from its first pass.
    tmp = (torch.empty((num_programs, cand_width), dtype=torch.int32, device=device)
           if guess is not None else scratch)
    m_p2 = triton.next_power_of_2(max(m, 1))
    cores = torch.empty((BH, m_p2), dtype=torch.int32, device=device) if dilate else scratch
    r_p2 = triton.next_power_of_2(2 * max(dilation_r, 0) + 1)
    # The dilation's neighbours, tagged with their class (see _final_threshold).
    near = torch.empty((BH, m_p2 * r_p2), dtype=torch.int32, device=device) if dilate else scratch
    active_t = keys if active is None else active.reshape(BH).to(torch.int32)
    caps_t = keys if caps is None else caps.to(torch.int32)
    rows_p2 = triton.next_power_of_2(pending.rows) if pending is not None else 1
    if compose is None:
        comp_mask, comp_kind, comp_ms, comp_mask_min = keys, 0, (0, 0, 0), 0.0
        q_len, comp_slots, comp_sink, comp_local = 1, 1, 0, 0
    else:
        if compose.out.shape[:2] != (B, Hkv) or not compose.out.is_contiguous():
            raise ValueError(f"compose.out {tuple(compose.out.shape)} must be a contiguous "
                             f"[{B}, {Hkv}, slots] tensor")
        comp_mask, comp_kind, comp_ms, comp_mask_min = compose.launch_args()
        q_len, comp_slots = compose.q_len, compose.out.shape[-1]
        comp_sink, comp_local = compose.sink, compose.local
    want_wmass = pending is not None and pending.window_mass is not None
    if dropped is not None:
        dropped_t, window_t, mass_rows = dropped
        for name, t in (("dropped", dropped_t), ("window_mass", window_t)):
            if t.dtype != torch.float32 or t.numel() != BH or not t.is_contiguous():
                raise ValueError(f"dropped: {name} must be contiguous fp32 with one entry per "
                                 f"(row, KV head) slot ({BH}), got {t.dtype} {tuple(t.shape)}")
        if mass_rows < 1:
            raise ValueError(f"dropped: rows={mass_rows} must be >= 1")
    else:
        dropped_t, window_t, mass_rows = keys, keys, 1
    if timeline is not None:
        expected = (num_programs, TIMELINE_STAMPS.value)
        if not multi or timeline.dtype != torch.int64 or tuple(timeline.shape) != expected:
            raise ValueError(f"timeline must be an int64 CUDA tensor of shape {expected} "
                             f"(timeline_buffer), got {timeline.dtype} "
                             f"{tuple(timeline.shape)} on {timeline.device}")
    _topk_kernel[(num_programs,)](
        keys, bounds, active_t, caps_t, out, cand, cores, near, scratch, picked_mass,
        keys if guess is None else guess, keys if positions is None else positions.to(torch.int32),
        keys if pending is None else pending.scores, keys if pending is None else pending.lse_part,
        pending.window_mass if want_wmass else keys, tmp, comp_mask,
        keys if compose is None else compose.out, dropped_t, window_t,
        keys if timeline is None else timeline, mass_rows,
        BH, Hkv, L, k, m, dilation_r if dilate else 0, width, cand_width,
        out.stride(0), out.stride(1), num_programs,
        pending.rows if pending is not None else 1, pending.lse_width if pending is not None else 1,
        pending.num_splits if pending is not None else 1, max_parties,
        q_len, comp_slots, comp_sink, comp_local, *comp_ms, comp_mask_min,
        HAS_ACTIVE=active is not None, HAS_CAPS=caps is not None, DILATE=dilate,
        HAS_GUESS=guess is not None, MULTI=multi,
        BLOCK=CONFIG["block"], BLOCK_BH=triton.next_power_of_2(BH),
        C_P2=_C_MAX, CAND_P2=triton.next_power_of_2(cand_width), M_P2=m_p2,
        R_P2=r_p2, MAP=positions is not None,
        WHOLE=whole_row or positions is not None, PENDING=pending is not None,
        WANT_WMASS=want_wmass, ROWS_P2=rows_p2, M_PAD=pending.m_pad if pending is not None else 1,
        KEY_BLOCK=max(16, min(1024, 4096 // rows_p2)),
        # The K pass's partials merged per load as a slot's keys are formed: one retrieving
        # slot has hundreds of splits (the whole K pass's programs), so wide loads mean few
        # waits on L2; fewer as the rows' tile grows (1024 values per load, at least 16
        # partials).
        LSE_CHUNK=max(16, min(64, 1024 // rows_p2)), COMPOSE=compose is not None,
        MASK_KIND=comp_kind, TQ_P2=triton.next_power_of_2(q_len), BLOCK_W=BLOCK_W,
        SLOT_BLOCK=SLOT_BLOCK, HAS_DROPPED=dropped is not None,
        tags_from_share=CONFIG["tags_from_share"], TIMED=timeline is not None,
        num_warps=CONFIG["num_warps"], **launch_options(keys.device),
    )
    return out, picked_mass
