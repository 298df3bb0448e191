"""Block-sparse prefill attention inside the PrHS recency window (PSAW), on FlexAttention.

``window_prefill_reference`` masks a dense SDPA, so the window saves no FLOPs. Here the same
allowed (query, key) pairs become a FlexAttention ``BlockMask``: KV blocks wholly outside a
query block's window are neither loaded nor multiplied, blocks wholly inside run without a
mask, and only blocks on the window's edges evaluate the ``mask_mod``.

The window of query row i (``psaw_window``): of its ``t_i`` valid keys, those of rank
``[sink, sink + P_l(t_i))`` are left out. Ranks grow with the position, so these are exactly
the valid keys in the position range ``[lo_i, hi_i)``, where ``lo_i`` is the position of the
valid key of rank ``sink`` and ``hi_i`` that of rank ``sink + P_l(t_i)``. The mask_mod is
``valid(b, i, j) and not lo_i <= j < hi_i``: two int32 ``[B, Tq]`` tensors carry the window of
any layer, so one compiled kernel serves every layer.

Validity comes in two forms:

* **shared by all query rows** (no mask, or a mask ``[B|1, 1, 1, L]``; causal or not): a key
  validity ``[B, L]`` and the causal bound ``j <= i``. Row i sees a prefix (in position order)
  of the valid keys, so a key has the same rank in every row: ``lo``/``hi`` come from one
  cumulative count ``[B, L]`` and a binary search per row, O(B*L + B*Tq*log L), and nothing of
  size ``[B, Tq, L]`` is built.
* **per query row** (a mask ``[B|1, 1, Tq, L]``: HF's padded prefill mask, sliding windows,
  anything): the mask_mod reads the caller's mask in place, and ranks are counted row by row in
  chunks of rows (O(Tq*L) light work, bounded memory), so every mask gives exactly the
  reference's pairs.

Float (additive) masks also add their finite values to the scores, through a ``score_mod``.

On CUDA, FlexAttention and ``create_block_mask`` are compiled once per process (lazily):
uncompiled, FlexAttention materialises the whole score matrix and ``create_block_mask`` the
whole mask. Elsewhere (CPU tests) both run eagerly, which computes the same pairs densely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch

from .plan import SelectPlan
from .select_reference import reset_and_count

BLOCK_SIZE = 128  # FlexAttention's sparse block (query and KV) on CUDA
# Per-row rank counting of per-row masks works on [B, rows, L] chunks of about this many
# elements (an int32 cumulative count of 64 MiB), whatever the prompt length.
_RANK_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass
class PrefillWindow:
    """The allowed (query, key) pairs of one windowed prefill call, as small tensors."""

    count: torch.Tensor  # int64 [B, Tq]: valid keys of each query row (t_i)
    excluded: torch.Tensor  # int64 [B, Tq]: of them, left out by the window
    lo: torch.Tensor  # int32 [B, Tq]: first position left out (valid key of rank ``sink``)
    hi: torch.Tensor  # int32 [B, Tq]: first position kept after the cut
    causal: bool  # row i also sees only positions j <= i (SDPA's top-left is_causal)
    key_valid: torch.Tensor | None = None  # bool [B, L]: a mask shared by all query rows
    key_bias: torch.Tensor | None = None  # fp32 [B, L]: its finite values (float masks)
    mask_rows: torch.Tensor | None = None  # [B, Tq, L] view of a per-row mask, read in place
    threshold: float | None = None  # float mask_rows: values above it are allowed

    @property
    def valid_pairs(self) -> torch.Tensor:
        """(query, key) pairs attention without the window computes (per query head group)."""
        return self.count.sum()

    @property
    def kept_pairs(self) -> torch.Tensor:
        """(query, key) pairs inside the window."""
        return (self.count - self.excluded).sum()

    def mask_mod(self) -> Callable:
        """FlexAttention mask_mod: is key ``kv_idx`` inside row ``q_idx``'s window?

        Which checks it makes is fixed when it is built (one function for every mask kind, so
        the compiled kernel is specialised per kind, never per layer or per call).
        """
        lo, hi, causal = self.lo, self.hi, self.causal
        key_valid, rows, threshold = self.key_valid, self.mask_rows, self.threshold

        def psaw_window_mask(b, h, q_idx, kv_idx):
            keep = (kv_idx < lo[b, q_idx]) | (kv_idx >= hi[b, q_idx])
            if causal:
                keep = keep & (kv_idx <= q_idx)
            if key_valid is not None:
                keep = keep & key_valid[b, kv_idx]
            if rows is not None:
                allowed = rows[b, q_idx, kv_idx]
                keep = keep & (allowed if threshold is None else allowed > threshold)
            return keep

        return psaw_window_mask

    def score_mod(self) -> Callable | None:
        """Adds a float mask's values to the scores (None for bool masks and no mask).

        Disallowed pairs may add -inf or a huge negative value here: the mask_mod removes
        them anyway, and blocks the BlockMask marks full hold none.
        """
        if self.key_bias is not None:
            key_bias = self.key_bias

            def add_key_bias(score, b, h, q_idx, kv_idx):
                return score + key_bias[b, kv_idx].to(score.dtype)

            return add_key_bias
        if self.mask_rows is not None and self.threshold is not None:
            rows = self.mask_rows

            def add_mask_bias(score, b, h, q_idx, kv_idx):
                return score + rows[b, q_idx, kv_idx].to(score.dtype)

            return add_mask_bias
        return None


class FlexWindowResult(NamedTuple):
    """The output of one windowed prefill, with the window and BlockMask that made it."""

    out: torch.Tensor  # [B, Hq, Tq, Dv]
    window: PrefillWindow
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask


def prefill_window(q_len: int, kv_len: int, mask, is_causal: bool, plan: SelectPlan, batch: int, device) -> PrefillWindow:
    """The same pairs as ``psaw_window`` (select_reference.py), without its ``[B, Tq, L]``
    tensors: see the module docstring for the two forms of validity."""
    threshold = None
    if mask is not None and mask.dtype != torch.bool:
        # HF's older additive masks use finfo.min, not -inf, for "masked" (as _row_bias).
        threshold = torch.finfo(mask.dtype).min / 2
    mask_rows = None if mask is None else mask.expand(batch, 1, q_len, kv_len)[:, 0]
    if mask_rows is not None and q_len > 1 and mask_rows.stride(1) != 0:  # rows may differ
        return _per_row_window(mask_rows, threshold, is_causal, plan)

    key_valid = key_bias = None
    if mask_rows is not None:
        key_row = mask_rows[:, 0]  # [B, L], the same for every query row
        key_valid = key_row if threshold is None else key_row > threshold
        key_valid = key_valid.contiguous()
        if threshold is not None:
            key_bias = key_row.float().masked_fill(~key_valid, 0.0)
    # Row i sees the valid keys up to position i (causal) or all of them: a prefix of the
    # valid keys, so a key's rank (its inclusive count minus one) is the same in every row.
    if key_valid is None:
        seen = torch.arange(1, kv_len + 1, dtype=torch.int32, device=device).expand(batch, kv_len).contiguous()
    else:
        seen = key_valid.cumsum(-1, dtype=torch.int32)  # [B, L] valid keys at or before j
    if is_causal:
        last = torch.arange(q_len, device=device).clamp_max(kv_len - 1)
        count = seen[:, last].long()
    else:
        count = seen[:, -1:].expand(batch, q_len).long()
    excluded, lo, hi = _cut(seen[:, None, :], count[:, None, :], plan)
    return PrefillWindow(count, excluded[:, 0], lo[:, 0], hi[:, 0], is_causal, key_valid=key_valid, key_bias=key_bias)


def _per_row_window(mask_rows, threshold, is_causal: bool, plan: SelectPlan) -> PrefillWindow:
    """Window of a mask that differs between query rows: ranks counted per row, in chunks."""
    batch, q_len, kv_len = mask_rows.shape
    positions = torch.arange(kv_len, device=mask_rows.device)
    step = max(1, _RANK_CHUNK_ELEMENTS // max(1, batch * kv_len))
    parts = []
    for start in range(0, q_len, step):
        rows = mask_rows[:, start : start + step]
        valid = rows if threshold is None else rows > threshold
        if is_causal:
            row_index = torch.arange(start, start + rows.shape[1], device=mask_rows.device)
            valid = valid & (positions <= row_index[:, None])
        seen = valid.cumsum(-1, dtype=torch.int32)  # [B, rows, L]
        count = seen[..., -1].long()
        excluded, lo, hi = _cut(seen, count[..., None], plan)
        parts.append((count, excluded[..., 0], lo[..., 0], hi[..., 0]))
    count, excluded, lo, hi = (torch.cat(p, dim=1) for p in zip(*parts))
    return PrefillWindow(count, excluded, lo, hi, is_causal, mask_rows=mask_rows, threshold=threshold)


def _cut(seen: torch.Tensor, count: torch.Tensor, plan: SelectPlan):
    """``(excluded, lo, hi)`` from inclusive counts ``seen [..., L]`` of valid keys and the
    rows' valid-key counts ``count`` (same leading dims as ``seen``, last dim the rows)."""
    # As psaw_window: P_l(t) oldest non-sink keys, never eating into the last ``local``.
    excluded = plan.psaw_cut(count)
    # The valid key of rank r is the first position whose inclusive count reaches r + 1;
    # none (rows with fewer keys) gives L, past every position.
    first_cut = torch.full_like(count, plan.sink + 1, dtype=torch.int32)
    lo = torch.searchsorted(seen, first_cut, out_int32=True)
    hi = torch.searchsorted(seen, (first_cut + excluded).to(torch.int32), out_int32=True)
    return excluded, lo, hi


# ---------------------------------------------------------------------------------------------
# FlexAttention

_COMPILED: dict[str, Callable] = {}


def flex_functions(device: torch.device):
    """``(create_block_mask, flex_attention)``: compiled on CUDA (once per process), eager
    elsewhere."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device.type != "cuda":
        return create_block_mask, flex_attention
    if not _COMPILED:
        # Compiled, create_block_mask evaluates the mask_mod block by block instead of
        # materialising [B, Tq, L], and flex_attention becomes one fused block-sparse kernel.
        _COMPILED["create_block_mask"] = torch.compile(create_block_mask)
        _COMPILED["flex_attention"] = torch.compile(flex_attention)
    return _COMPILED["create_block_mask"], _COMPILED["flex_attention"]


def window_block_mask(window: PrefillWindow, q_len: int, kv_len: int, device, block_size: int = BLOCK_SIZE):
    """The FlexAttention ``BlockMask`` of ``window`` (shared by all heads)."""
    create_block_mask, _ = flex_functions(torch.device(device))
    batch = window.count.shape[0]
    return create_block_mask(window.mask_mod(), batch, None, q_len, kv_len, device=device, BLOCK_SIZE=block_size)


def flex_window_attention(q, k, v, mask, is_causal: bool, scale: float, plan: SelectPlan, block_size: int = BLOCK_SIZE) -> FlexWindowResult:
    """Windowed prefill attention, with the window and BlockMask it used (for counters and
    reports)."""
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    window = prefill_window(q_len, kv_len, mask, is_causal, plan, batch, q.device)
    block_mask = window_block_mask(window, q_len, kv_len, q.device, block_size)
    _, flex_attention = flex_functions(q.device)
    # Rows without any allowed key come out as 0 (FlexAttention's convention), as the
    # reference's nan_to_num gives.
    out = flex_attention(q, k, v, score_mod=window.score_mod(), block_mask=block_mask, scale=scale, enable_gqa=True)
    return FlexWindowResult(out, window, block_mask)


def window_prefill_flex(q, k, v, mask, is_causal: bool, scale: float, plan: SelectPlan, *, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Prefill attention restricted to the layer's recency window: ``[B, Hq, Tq, Dv]``.

    ``q`` is ``[B, Hq, Tq, D]``, ``k``/``v`` the raw cache ``[B, Hkv, L, D]`` (GQA inside the
    kernel). Computes the pairs of ``window_prefill_reference``, skipping whole KV blocks
    outside the window. No state is touched (see :func:`window_prefill_flex_and_reset`).
    """
    return flex_window_attention(q, k, v, mask, is_causal, scale, plan, block_size).out


def window_prefill_flex_and_reset(q, k, v, mask, is_causal: bool, scale: float, plan: SelectPlan, state) -> torch.Tensor:
    """What ``prhs::window_prefill`` runs on CUDA: the block-sparse attention, then the state
    reset and the pair counters, as ``window_prefill_reference`` does them."""
    result = flex_window_attention(q, k, v, mask, is_causal, scale, plan)
    reset_and_count(q, k, mask, is_causal, scale, plan, state, result.window.valid_pairs,
                    result.window.kept_pairs)
    return result.out


# ---------------------------------------------------------------------------------------------
# reports


def block_counts(block_mask) -> dict[str, int]:
    """Computed KV blocks of a BlockMask (``partial``: the mask_mod runs in them; ``full``:
    no mask), and all blocks of its [B, H, Tq/blk, L/blk] grid. Syncs the host."""
    partial = int(block_mask.kv_num_blocks.sum())
    full = 0 if block_mask.full_kv_num_blocks is None else int(block_mask.full_kv_num_blocks.sum())
    batch, heads, q_len, kv_len = block_mask.shape
    q_block, kv_block = block_mask.BLOCK_SIZE
    total = batch * heads * -(-q_len // q_block) * -(-kv_len // kv_block)
    return {"partial": partial, "full": full, "computed": partial + full, "total": total}


def skipped_block_fraction(block_mask) -> float:
    """Share of the BlockMask's KV blocks that are never computed."""
    counts = block_counts(block_mask)
    return 1.0 - counts["computed"] / counts["total"]
