"""The published baselines as selection rules: SAGE-KV, SnapKV, LU-KV, H2O, HShare, Quest."""

from __future__ import annotations

import torch

from . import pages
from .rules_basic import OracleRule
from .selection import SelectionRule, advance_age, dilate_and_pick, keep_to_indices, stored_and_windows


class OneShotRule(SelectionRule):
    """Select once from the prompt, then decode with that set plus sinks and a rolling recent
    window; the selection is never recomputed (SAGE-KV, SnapKV). A row that reaches decode
    without a selection of its own sequence (no prefill seen, reordered beams) makes one from
    its first decode query."""

    def state_spec(self, plan, batch, q_heads, kv_heads, head_dim):
        return {
            "ready": ((batch, kv_heads), torch.int32, 0),  # 1: ``kept`` holds this sequence's set
            "kept": ((batch, kv_heads, plan.middle), torch.int32, -1),
        }

    def prompt_scores(self, plan, tail) -> tuple[torch.Tensor, object]:
        raise NotImplementedError

    def on_prefill(self, plan, view, state, tail):
        b = view.batch
        scores, scored = self.prompt_scores(plan, tail)
        region = scored.valid & ~scored.windows(plan)
        picked = dilate_and_pick(scores, region, plan, dilate=False)
        state["kept"][:b].copy_(keep_to_indices(picked, plan.middle))
        state["ready"][:b].fill_(1)

    def choose(self, plan, view, state):
        b = view.batch
        ready, kept = state["ready"][:b], state["kept"][:b]
        have = view.continuing[:, None] & (ready > 0)
        retrieve = ~have & ~view.fits[:, None]
        fresh = dilate_and_pick(view.group_mass(), view.valid & ~view.windows(plan), plan, dilate=False)
        kept.copy_(torch.where(retrieve[..., None], keep_to_indices(fresh, plan.middle), kept))
        ready.copy_(torch.where(retrieve, 1, ready).to(ready.dtype))
        return stored_and_windows(kept, plan, view), retrieve


class SageKVRule(OneShotRule):
    """SAGE-KV: one top-k per KV head from the last prompt query's group attention mass."""

    name = "sage_kv"
    cuda_step = "one_shot"

    def prompt_scores(self, plan, tail):
        last = tail(1)
        return last.group_mass(), last


class SnapKVRule(OneShotRule):
    """SnapKV: attention of the last ``SNAP_WINDOW`` prompt queries, summed over the window
    and the group, max-pooled over ``SNAP_KERNEL`` neighbouring positions, top-k."""

    name = "snapkv"
    cuda_step = "one_shot"
    SNAP_WINDOW = 32
    SNAP_KERNEL = 7

    def prompt_scores(self, plan, tail):
        window = tail(self.SNAP_WINDOW)
        mass = window.group_mass()  # [B, Hkv, L]
        pooled = torch.nn.functional.max_pool1d(mass, self.SNAP_KERNEL, stride=1, padding=self.SNAP_KERNEL // 2)
        return pooled, window


class LUKVRule(OracleRule):
    """LU-KV: per-(layer, KV head) budgets from an offline profile (``head_budgets``), the
    exact top-k picking within each head's budget. (``prhs`` with ``head_budgets`` runs PrHS
    selection within the same budgets.)"""

    name = "lu_kv"

    def validate(self, plan):
        if not plan.head_budgets and plan.layer >= 0:
            return "needs per-head budgets: options head_budgets=<JSON written by prhs-bench profile>"
        return super().validate(plan)

    def keeps_dense(self, plan):
        if not plan.head_budgets and plan.layer >= 0:
            return (f"the per-head budgets (head_budgets) name no budget for layer {plan.layer} "
                    "(the profile never saw it rewritten, e.g. a sliding-window layer)")
        return None


class H2ORule(SelectionRule):
    """H2O: heavy hitters by accumulated attention, plus sinks and the recent window.

    Every step adds the attention each position received over the kept set (so a dropped
    position stops accumulating, as if evicted) to its score, and keeps the best accumulated
    positions. The first decode step of a sequence seeds the scores with its exact attention
    (the prefill graph sees only the prompt's slice of a static cache, so it cannot size
    this state).
    """

    name = "h2o"
    cuda_step = "heavy_hitters"
    needs_static_length = True

    def state_spec(self, plan, batch, q_heads, kv_heads, head_dim):
        return {"score": ((batch, kv_heads, max(plan.kv_len, 1)), torch.float32, 0.0)}

    def choose(self, plan, view, state):
        score = state["score"][: view.batch, :, : view.kv_len]
        # A new or reordered sequence (or one whose prefill this state never saw) starts over
        # from this step's exact attention.
        fresh = ~view.continuing[:, None] | (score.sum(-1) == 0)  # [B, Hkv]
        score.copy_(torch.where(fresh[..., None], view.group_mass(), score))
        windows = view.windows(plan)
        keep = dilate_and_pick(score, view.valid & ~windows, plan, dilate=False) | windows[:, None, :]
        probs = (view.probs * keep[:, :, None, None, :]).sum(dim=(2, 3))  # mass each kept position got
        kept_total = probs.sum(-1, keepdim=True).clamp_min(1e-30)
        score.add_(probs / kept_total * view.group * view.q_len)  # renormalised over the kept set
        return keep, ~view.no_retrieval()


class HShareRule(SelectionRule):
    """HShare: approximate scores on a few label channels, sets reused every second step, and
    KV heads that share another head's set.

    * label channels: at prefill, the ``D // LABEL_FRACTION`` channels with the largest mean
      |k| of each KV head; scores are ``q[c] . k[c]`` over those channels only (a retrieval
      reads a fraction of K);
    * reuse: a set is retrieved at one step and reused at the next;
    * head sharing: at prefill, a head whose top set (from the last prompt query) overlaps an
      earlier head's by at least ``HEAD_SHARE_OVERLAP`` takes that head's set.

    Layer sharing comes from ``layer_share`` (the same map PrHS uses).
    """

    name = "hshare"
    cuda_step = "labels"
    LABEL_FRACTION = 8
    HEAD_SHARE_OVERLAP = 0.8

    def state_spec(self, plan, batch, q_heads, kv_heads, head_dim):
        labels = max(1, head_dim // self.LABEL_FRACTION)
        return {
            "labels": ((batch, kv_heads, labels), torch.int64, -1),  # -1: not chosen yet
            "head_anchor": ((batch, kv_heads), torch.int64, -1),  # head whose set this one takes
            "age": ((batch, kv_heads), torch.int32, -1),
            "kept": ((batch, kv_heads, plan.middle), torch.int32, -1),
        }

    def _labels(self, view, count):
        k_abs = view.k.float().abs().masked_fill(~view.valid[:, None, :, None], 0.0)
        return k_abs.sum(2).topk(count, dim=-1).indices  # [B, Hkv, count]

    def on_prefill(self, plan, view, state, tail):
        b = view.batch
        labels = state["labels"][:b]
        labels.copy_(self._labels(view, labels.shape[-1]))
        last = tail(1)
        picked = dilate_and_pick(last.group_mass(), last.valid & ~last.windows(plan), plan, dilate=False)
        anchor = torch.arange(view.kv_heads, device=view.q.device).expand(b, -1).clone()
        for h in range(1, view.kv_heads):
            for a in range(h):
                share = (picked[:, h] & picked[:, a]).sum(-1) / picked[:, h].sum(-1).clamp_min(1)
                take = (anchor[:, h] == h) & (anchor[:, a] == a) & (share >= self.HEAD_SHARE_OVERLAP)
                anchor[:, h] = torch.where(take, a, anchor[:, h])
        state["head_anchor"][:b].copy_(anchor)
        state["age"][:b].fill_(-1)

    def choose(self, plan, view, state):
        b, hkv = view.batch, view.kv_heads
        labels, anchor = state["labels"][:b], state["head_anchor"][:b]
        age, kept = state["age"][:b], state["kept"][:b]
        unseeded = (labels[..., 0] < 0) | ~view.continuing[:, None]  # no prefill of this sequence
        labels.copy_(torch.where(unseeded[..., None], self._labels(view, labels.shape[-1]), labels))
        own = torch.arange(hkv, device=view.q.device).expand(b, -1)
        anchor.copy_(torch.where(unseeded | (anchor < 0), own, anchor))

        # Approximate logits on the label channels, softmax per query row, group mass.
        qg = view.q.float().reshape(b, hkv, view.group * view.q_len, view.head_dim)
        q_lab = qg.gather(-1, labels[:, :, None, :].expand(-1, -1, qg.shape[2], -1))
        k_lab = view.k.float().gather(-1, labels[:, :, None, :].expand(-1, -1, view.kv_len, -1))
        logits = torch.einsum("bhrc,bhlc->bhrl", q_lab, k_lab) * view.scale
        if view.row_bias is not None:  # rows are ordered (group head, query row)
            bias = view.row_bias[:, None, None].expand(-1, hkv, view.group, -1, -1)
            logits = logits + bias.reshape(logits.shape)
        mass = torch.softmax(logits, -1).nan_to_num(0.0).sum(2)  # [B, Hkv, L]

        reuse = view.continuing[:, None] & (age == 0) & ~unseeded
        retrieve = ~reuse & ~view.fits[:, None]
        fresh = keep_to_indices(dilate_and_pick(mass, view.valid & ~view.windows(plan), plan, dilate=False), plan.middle)
        fresh = fresh.gather(1, anchor[..., None].expand(-1, -1, fresh.shape[-1]))  # shared heads copy
        kept.copy_(torch.where(retrieve[..., None], fresh, kept))
        advance_age(age, retrieve, reuse)
        own_retrieval = retrieve & (anchor == own)  # a head copying another reads no keys
        return stored_and_windows(kept, plan, view), own_retrieval


class QuestRule(SelectionRule):
    """Quest: the best pages kept whole every step, by their bound ``sum_d max(q_d * min_d,
    q_d * max_d)`` (an upper bound of any q.k in the page) from the page summaries of the
    selection state (``pages.py``: channel-wise min and max of each page of ``page_size``
    keys, kept up to date each step), so a step reads the summaries, not K. The first two
    layers stay dense."""

    name = "quest"
    cuda_step = "pages"
    selects_pages = True
    DENSE_LAYERS = 2

    def validate(self, plan):
        if plan.middle < plan.page_size:
            return (f"budget={plan.budget} minus sink and local leaves less than one page of "
                    f"{plan.page_size} keys")
        return None

    def keeps_dense(self, plan):
        if plan.layer < self.DENSE_LAYERS:
            return f"Quest keeps its first {self.DENSE_LAYERS} layers dense"
        return None

    def choose(self, plan, view, state):
        region = view.valid & ~view.windows(plan)  # [B, L]
        keep = pages.best_pages(plan, view, state, region, plan.middle // plan.page_size)
        return keep | view.windows(plan)[:, None, :], ~view.no_retrieval()
