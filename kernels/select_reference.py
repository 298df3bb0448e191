"""Pure-torch reference of ``prhs::select`` and ``prhs::prefill``.

This is the oracle the Triton kernels are tested against and the implementation CPU runs
use. It favours clarity over speed: it materialises scores over the whole cache.

State layout (one list of tensors per attention call, shared by the prefill and decode graphs
of a model):

* ``pos``         int64 ``[Bc]``       newest valid position seen at the last call (-1: none)
* ``fingerprint`` fp32  ``[Bc, D]``    key of KV head 0 at ``pos``: detects a cache that no
                                       longer holds the sequence the state was built on
                                       (new prompt, reordered beams)
* ``counters``    int64 ``[6]``        decode calls, (row, KV head) slots, retrievals, resets,
                                       and the (query, key) pairs of windowed prefill attention:
                                       causal ones and those the window kept
* then whatever the policy's rule declares;
* ``topk_guess``  int32 ``[Bc, Hkv]``  (rules whose CUDA step retrieves with the radix top-k
                                       every time a gate says so) the threshold of each
                                       slot's last retrieval, the next one's first guess
                                       (``topk_triton``); the reference never reads it.
* ``page_min``, ``page_max``  ``[Bc, Hkv, pages, D]`` in the cache's dtype (``retrieval="pages"``):
                                       the page summaries of ``pages.py``.
* ``sketch_bits`` int32 ``[Bc, Hkv, positions, D/32]``, ``sketch_centre``, ``sketch_scale``
  fp32 ``[Bc, Hkv, D]`` (``retrieval="sketch"``): the key sketch of ``sketch.py``.

``Bc`` may exceed the batch size (a graph with a symbolic batch allocates for the largest);
only the first ``B`` rows are used.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from . import pages, sketch
from .bounds import output_error_bound
from .plan import SelectPlan
from .rules import get_rule
from .selection import indices_to_keep, keep_to_indices, keys_at

COUNTER_NAMES = ("decode_calls", "slots", "retrievals", "resets", "prefill_pairs", "prefill_pairs_kept")
CALLS, SLOTS, RETRIEVALS, RESETS, PREFILL_PAIRS, PREFILL_KEPT = range(len(COUNTER_NAMES))
COUNTERS_INDEX = 2  # position of ``counters`` in every state list (see state_spec)
TOPK_GUESS = "topk_guess"
TOPK_GUESS_STEPS = ("gated", "exact")  # engine steps that keep a top-k guess per slot

# Called with a verify record (a dict, see ``_verify_record``) when a plan has verify=True.
# The public package installs its stats recorder here; kernels never import it.
dropped_mass_listeners: list[Callable[[dict], None]] = []
# Called with (layer, indices [B, Hkv, S], newest queries [B, Hq, D], group attention mass
# [B, Hkv, L] of the step over the whole cache) after every selection; calibration records
# oracle selections and measures what an older set would have kept through it. Empty (free)
# otherwise: the mass is the step's exact attention, computed only while a listener listens.
selection_listeners: list[Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]] = []


def state_spec(plan: SelectPlan, batch: int, q_heads: int, kv_heads: int, head_dim: int,
               key_dtype=torch.float32, cache_len: int = 0):
    """``{name: (shape, dtype, fill)}`` of every state tensor, in the order the ops take them
    (``key_dtype``: the cache's, which the page summaries keep; ``cache_len``: a cache length
    known when the state is made, which the summaries cover even past ``max_cache_len``)."""
    spec = {
        "pos": ((batch,), torch.int64, -1),
        "fingerprint": ((batch, head_dim), torch.float32, 0.0),
        "counters": ((len(COUNTER_NAMES),), torch.int64, 0),
    }
    rule = get_rule(plan.policy)
    spec.update(rule.state_spec(plan, batch, q_heads, kv_heads, head_dim))
    if rule.cuda_step in TOPK_GUESS_STEPS:
        spec[TOPK_GUESS] = ((batch, kv_heads), torch.int32, 0)
    if pages.uses_pages(plan):
        spec.update(pages.summary_spec(plan, batch, kv_heads, head_dim, key_dtype, cache_len))
    if sketch.uses_sketch(plan):
        spec.update(sketch.sketch_spec(plan, batch, kv_heads, head_dim, cache_len))
    return spec


def _state_dict(plan: SelectPlan, state: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor):
    names = list(state_spec(plan, 1, q.shape[1], k.shape[1], k.shape[-1]))
    if len(names) != len(state):
        raise ValueError(f"policy {plan.policy!r} expects {len(names)} state tensors, got {len(state)}")
    rows = state[0].shape[0]
    if q.shape[0] > rows:
        raise ValueError(
            f"batch size {q.shape[0]} exceeds the {rows} rows of selection state of layer {plan.layer}; "
            "raise options max_batch_size (state is sized by it when the batch dimension is symbolic)"
        )
    return dict(zip(names, state))


class StepView:
    """Everything a selection rule may look at during one call, computed on demand."""

    def __init__(self, q, k, mask, scale: float, is_causal: bool = False):
        self.q, self.k, self.scale = q, k, scale
        self.batch, self.q_heads, self.q_len, self.head_dim = q.shape
        self.kv_heads, self.kv_len = k.shape[1], k.shape[2]
        self.group = self.q_heads // self.kv_heads
        self.row_bias = _row_bias(mask, is_causal, self.batch, self.q_len, self.kv_len, q.device)
        # A position may be selected when at least one query row may attend to it.
        if self.row_bias is None:
            self.valid = torch.ones(self.batch, self.kv_len, dtype=torch.bool, device=q.device)
        else:
            self.valid = (self.row_bias > float("-inf")).any(dim=1)
        self.rank = self.valid.long().cumsum(-1) - 1  # order among valid positions
        self.count = self.valid.sum(-1)  # [B]
        positions = torch.arange(self.kv_len, device=q.device)
        self.newest = torch.where(self.valid, positions, -1).amax(-1)  # [B], -1 if none

    def windows(self, plan: SelectPlan) -> torch.Tensor:
        """``[B, L]``: the first ``sink`` and last ``local`` valid positions of each row."""
        sinks = self.rank < plan.sink
        recent = self.rank >= (self.count[:, None] - plan.local)
        return self.valid & (sinks | recent)

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        """Exact attention ``[B, Hkv, G, Tq, L]`` (fp32) over the valid positions."""
        qg = self.q.reshape(self.batch, self.kv_heads, self.group, self.q_len, self.head_dim)
        logits = torch.einsum("bhgtd,bhld->bhgtl", qg.float(), self.k.float()) * self.scale
        if self.row_bias is not None:
            logits = logits + self.row_bias[:, None, None]
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def no_retrieval(self) -> torch.Tensor:
        return torch.zeros(self.batch, self.kv_heads, dtype=torch.bool, device=self.q.device)

    def group_mass(self) -> torch.Tensor:
        """``[B, Hkv, L]``: attention mass per position summed over the group's query rows."""
        return self.probs.sum(dim=(2, 3))


def tail_view(q, k, mask, scale: float, is_causal: bool, rows: int) -> StepView:
    """A view of only the last ``rows`` query rows of a prefill (what SAGE-KV and SnapKV
    score), with the causal alignment of the full call kept."""
    q_len, kv_len = q.shape[2], k.shape[2]
    rows = min(rows, q_len)
    tail_mask = None if mask is None else mask[..., -rows:, :] if mask.shape[-2] > 1 else mask
    if is_causal:  # top-left aligned: query row i sees positions <= i
        seen = torch.arange(kv_len, device=q.device)[None, :] <= torch.arange(q_len - rows, q_len, device=q.device)[:, None]
        causal = seen[None, None]
        if tail_mask is None:
            tail_mask = causal
        elif tail_mask.dtype == torch.bool:
            tail_mask = tail_mask & causal
        else:
            tail_mask = tail_mask.masked_fill(~causal, float("-inf"))
    return StepView(q[:, :, -rows:], k, tail_mask, scale)


def _row_bias(mask, is_causal, batch, q_len, kv_len, device):
    """Additive fp32 bias ``[B, Tq, L]`` (0 or finite bias where allowed, -inf elsewhere)."""
    bias = None
    if mask is not None:
        m = mask.expand(batch, 1, q_len, kv_len)[:, 0]
        if m.dtype == torch.bool:
            bias = torch.zeros(m.shape, device=device).masked_fill(~m, float("-inf"))
        else:
            # Additive float masks: HF's older masks use finfo.min, not -inf, for "masked".
            allowed = m > torch.finfo(m.dtype).min / 2
            bias = m.float().masked_fill(~allowed, float("-inf"))
    if is_causal:  # SDPA's is_causal is top-left aligned
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        causal_bias = torch.zeros(q_len, kv_len, device=device).masked_fill(~causal, float("-inf"))
        bias = causal_bias.expand(batch, -1, -1) if bias is None else bias + causal_bias
    return bias


def _key_at(k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The fingerprint key: ``k[b, 0, pos[b]]`` as fp32 ``[B, D]``."""
    return keys_at(k, pos)[:, 0]


def continuing_rows(pos, fingerprint, k, newest, q_len: int) -> torch.Tensor:
    """``[B]``: whether each row continues the sequence the state was built on (its newest
    valid position follows the one stored, and the cache still holds the key it ended with).
    Rules that reuse a selection must not reuse it otherwise."""
    return follows_stored(pos, newest, q_len, k.shape[2]) & holds_stored_key(pos, fingerprint, k)


def follows_stored(pos, newest, q_len: int, kv_len: int) -> torch.Tensor:
    """``[B]``: the row's newest valid position follows the stored one."""
    return (pos >= 0) & (newest == pos + q_len) & (pos < kv_len)


def holds_stored_key(pos, fingerprint, k) -> torch.Tensor:
    """``[B]``: the cache still holds, at the stored position, the key the row ended with."""
    return (_key_at(k, pos) == fingerprint).all(-1)


def step_bookkeeping(counters, pos, fingerprint, k, newest, continuing, retrieved) -> None:
    """After a decode step: count it (slots, resets, retrievals ``[B, Hkv]``) and remember
    where each row's sequence ends (``newest``) and the key it ends with."""
    counters[CALLS] += 1
    counters[SLOTS] += retrieved.numel()
    counters[RESETS] += (~continuing).sum()
    counters[RETRIEVALS] += retrieved.sum()
    pos.copy_(newest)
    fingerprint.copy_(_key_at(k, newest))


def select_reference(q, k, v, mask, scale: float, plan: SelectPlan, state: list[torch.Tensor], shared=None):
    """One decode step of selection. Mutates ``state`` in place; returns int32 positions.

    ``shared`` is the selection an earlier layer made this step (cross-layer sharing): when
    given, it is used as is and nothing is retrieved.
    """
    view = StepView(q, k, mask, scale)
    batch = view.batch
    st = _state_dict(plan, state, q, k)
    pos, fingerprint = st["pos"][:batch], st["fingerprint"][:batch]

    view.continuing = continuing_rows(pos, fingerprint, k, view.newest, view.q_len)
    if pages.uses_pages(plan):
        pages.maintain_summaries(st, k, view.valid, pos, view.continuing, plan)
    if sketch.uses_sketch(plan):
        sketch.maintain_sketch(st, k, view.valid, pos, view.continuing, plan)

    rule = get_rule(plan.policy)
    # Rows that fit attend to everything: no selection, no retrieval.
    view.fits = (view.count <= plan.budget) | (view.count < plan.min_context)
    if shared is not None:
        indices = shared.clone()
        keep = indices_to_keep(indices, view.kv_len)
        retrieved = view.no_retrieval()
    else:
        keep, retrieved = rule.choose(plan, view, st)
        if not rule.all_positions:
            keep = torch.where(view.fits[:, None, None], view.valid[:, None, :], keep)
            retrieved = retrieved & ~view.fits[:, None]
        slots = view.kv_len if rule.all_positions else plan.slots
        indices = keep_to_indices(keep, slots)

    step_bookkeeping(st["counters"], pos, fingerprint, k, view.newest, view.continuing, retrieved)

    if selection_listeners:
        mass = view.group_mass()
        for listener in selection_listeners:
            listener(plan.layer, indices, q[:, :, -1], mass)
    if plan.verify and dropped_mass_listeners:
        record = _verify_record(plan, view, keep, retrieved, v)
        for listener in dropped_mass_listeners:
            listener(record)
    return indices


def _verify_record(plan, view, keep, retrieved, v) -> dict:
    """Exact dropped mass of this step's selection, with the bounds it must satisfy.

    * ``dropped`` [B, Hq, Tq]: attention mass outside the selection, per query row;
    * ``output_bound`` [B, Hq, Tq]: ``2 * dropped * max ||v_j||`` bounds the L2 error of the
      renormalised sparse output against dense attention;
    * ``reused`` [B, Hkv] and ``reuse_bound`` [B, Hkv] (policies that reuse, else None):
      which groups reused a set, and the dropped mass predicted for them;
    * ``exact_group_dropped`` and ``outside_candidates`` [B, Hkv] (two-stage retrieval, else
      None): the group's dropped mass had the exact retrieval picked on this step, and the
      share of the exact picks that stage one left out of the candidates.
    """
    kept_mass = (view.probs * keep[:, :, None, None, :]).sum(-1)  # [B, Hkv, G, Tq]
    dropped = (1.0 - kept_mass).clamp_min(0.0)
    v_norm = v.float().norm(dim=-1).masked_fill(~view.valid[:, None, :], 0.0).amax(-1)  # [B, Hkv]
    output_bound = output_error_bound(dropped, v_norm[:, :, None, None])
    shape = (view.batch, view.q_heads, view.q_len)
    two_stage = getattr(view, "two_stage", None)
    exact_dropped = outside = None
    if two_stage is not None:  # what the exact retrieval would have dropped, on this same step
        exact = two_stage["exact"]
        exact_kept = (view.probs * (exact | view.windows(plan)[:, None, :])[:, :, None, None, :]).sum(-1)
        exact_dropped = (1.0 - exact_kept).clamp_min(0.0).mean(dim=(2, 3))  # [B, Hkv]
        missed = (exact & ~two_stage["candidates"]).sum(-1)
        outside = missed / exact.sum(-1).clamp_min(1)  # [B, Hkv] share of its picks not among the candidates
    return {
        "layer": plan.layer,
        "dropped": dropped.reshape(shape),
        "output_bound": output_bound.reshape(shape),
        "group_dropped": dropped.mean(dim=(2, 3)),
        "retrieved": retrieved,
        "reused": getattr(view, "reused", None),
        "reuse_bound": getattr(view, "reuse_bound", None),
        "exact_group_dropped": exact_dropped,  # two-stage retrieval only, else None
        "outside_candidates": outside,
    }


def prefill_reference(q, k, mask, is_causal: bool, scale: float, plan: SelectPlan, state):
    """A new sequence starts: remember where it ends, let the rule forget the old one.

    Only the last query row matters here (it sees every position the sequence holds), so the
    view covers that row: O(L) work, not the O(Tq * L) of the prefill's full mask.
    """
    view = tail_view(q, k, mask, scale, is_causal, 1)
    st = _state_dict(plan, state, q, k)
    batch = view.batch
    st["pos"][:batch].copy_(view.newest)
    st["fingerprint"][:batch].copy_(_key_at(k, view.newest))
    if pages.uses_pages(plan):
        pages.build_summaries(st, k, view.valid, plan)
    if sketch.uses_sketch(plan):
        sketch.build_sketch(st, k, view.valid, plan)
    get_rule(plan.policy).on_prefill(plan, view, st, lambda rows: tail_view(q, k, mask, scale, is_causal, rows))


def psaw_window(q_len: int, kv_len: int, mask, is_causal: bool, plan: SelectPlan, batch: int, device):
    """Which (query row, key) pairs a prefill attends to under the PrHS depth axis (PSAW).

    Query row i sees ``t_i`` valid tokens; its layer's progressive window leaves out the
    oldest ``P_l(t_i)`` non-sink ones (never eating into the last ``local``). Returns the
    allowed pairs ``[B, Tq, L]``, the valid (causal / masked) pairs, and the additive bias.
    """
    bias = _row_bias(mask, is_causal, batch, q_len, kv_len, device)
    valid = torch.ones(batch, q_len, kv_len, dtype=torch.bool, device=device) if bias is None else bias > float("-inf")
    rank = valid.long().cumsum(-1) - 1
    count = valid.sum(-1)  # [B, Tq]
    excluded = plan.psaw_cut(count)
    allowed = valid & ((rank < plan.sink) | (rank >= (plan.sink + excluded)[..., None]))
    return allowed, valid, bias


def window_prefill_reference(q, k, v, mask, is_causal: bool, scale: float, plan: SelectPlan, state):
    """Prefill attention restricted to the layer's recency window, and the state reset.

    The reference masks a dense SDPA (no FLOPs saved on its own); the counters record how
    many (query, key) pairs a block-sparse kernel would compute against causal attention.
    """
    batch, _, q_len, _ = q.shape
    allowed, valid, bias = psaw_window(q_len, k.shape[2], mask, is_causal, plan, batch, q.device)
    attn_bias = torch.zeros(allowed.shape, device=q.device) if bias is None else bias.clone()
    attn_bias = attn_bias.masked_fill(~allowed, float("-inf"))[:, None].to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale, enable_gqa=True)
    reset_and_count(q, k, mask, is_causal, scale, plan, state, valid.sum(), allowed.sum())
    return out.nan_to_num(0.0)


def reset_and_count(q, k, mask, is_causal: bool, scale: float, plan: SelectPlan, state, valid_pairs, kept_pairs) -> None:
    """A windowed prefill's bookkeeping: a new sequence starts (``prefill_reference``), and the
    (query, key) pairs attention without the window computes (causal / masked) and those the
    window kept are counted, per KV head."""
    prefill_reference(q, k, mask, is_causal, scale, plan, state)
    counters = state[COUNTERS_INDEX]
    counters[PREFILL_PAIRS] += valid_pairs * k.shape[1]
    counters[PREFILL_KEPT] += kept_pairs * k.shape[1]
