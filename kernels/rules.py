"""Selection rules: what makes one policy differ from another.

A policy is *data plus a selection rule*: the rule declares the per-layer state it needs
(``state_spec``), says which positions to keep at a decode step (``choose``), and how to
(re)start at a prefill (``on_prefill``). Everything the rules share (the valid region, the
sink and local windows, state validity across steps, the index layout, the counters) lives in
``select_reference.py`` so a new policy is a small class here, not a fork of the pipeline.

Rules see a :class:`~kernels.select_reference.StepView` and return a boolean keep-mask
``[B, Hkv, L]`` plus a boolean ``[B, Hkv]`` saying which (row, KV head) slots ran a retrieval
(read the keys to score them) this step. They only have to be right for rows with more valid
positions than the budget; rows that fit entirely are kept whole by the caller.
"""

from __future__ import annotations

import torch

from .bounds import reuse_bound
from .plan import SelectPlan


class SelectionRule:
    """Base class. Subclasses set ``name`` and override what they need."""

    name: str = ""
    #: True when ``select`` returns one slot per cache position (``dense``).
    all_positions: bool = False
    #: True when the rule keeps per-position state, sized by a static cache length.
    needs_static_length: bool = False

    def state_spec(self, plan: SelectPlan, batch: int, q_heads: int, kv_heads: int, head_dim: int):
        """Extra state tensors: ``{name: (shape, dtype, fill)}``, in a fixed order."""
        return {}

    def choose(self, plan: SelectPlan, view, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def on_prefill(self, plan: SelectPlan, view, state: dict, tail) -> None:
        """Forget whatever the previous sequence left behind. ``tail(rows)`` gives a view of
        the prompt's last ``rows`` queries, for rules that select once from the prompt."""

    def keeps_dense(self, plan: SelectPlan) -> str | None:
        """A reason this rule leaves the layer dense (checked when the graph is rewritten)."""
        return None

    def validate(self, plan: SelectPlan) -> str | None:
        """A reason why ``plan`` cannot work with this rule, or None."""
        return None


class DenseRule(SelectionRule):
    """Every valid position: the reference the sparse policies are measured against."""

    name = "dense"
    all_positions = True

    def choose(self, plan, view, state):
        return view.valid[:, None, :].expand(-1, view.kv_heads, -1), view.no_retrieval()


class StreamingRule(SelectionRule):
    """StreamingLLM: the first ``sink`` positions plus the most recent ``budget - sink``."""

    name = "streaming"

    def choose(self, plan, view, state):
        recent = view.rank >= (view.count[:, None] - (plan.budget - plan.sink))
        keep = view.valid & ((view.rank < plan.sink) | recent)
        return keep[:, None, :].expand(-1, view.kv_heads, -1), view.no_retrieval()


class OracleRule(SelectionRule):
    """Exact top-k of the group's attention mass every step (sinks and local window kept).

    The best any selector of this budget can do on one step, and the yardstick for the others.
    """

    name = "oracle"

    def validate(self, plan):
        if plan.sink + plan.local >= plan.budget:
            return (
                f"sink + local = {plan.sink + plan.local} leaves no room for retrieved "
                f"positions in budget={plan.budget}"
            )
        return None

    def choose(self, plan, view, state):
        base = view.windows(plan)  # [B, L] sinks and local window
        picked = dilate_and_pick(view.group_mass(), view.valid & ~base, plan, dilate=False)
        return picked | base[:, None, :], ~view.no_retrieval()


def retrieval_region(plan: SelectPlan, view) -> torch.Tensor:
    """``[B, L]`` positions a retrieval may pick: valid, outside the windows, and inside the
    layer's progressive recency window (PSAW) when that selector is on."""
    region = view.valid & ~view.windows(plan)
    excluded = plan.psaw_excluded(view.count)  # [B] oldest non-sink positions left out
    if plan.psaw_start >= 0:
        region = region & ((view.rank < plan.sink) | (view.rank >= (plan.sink + excluded)[:, None]))
    return region


def dilate_and_pick(mass: torch.Tensor, region: torch.Tensor, plan: SelectPlan, dilate: bool = True) -> torch.Tensor:
    """Top positions by group mass, each of the best ``m`` pulling in its +-r neighbours.

    ``mass`` [B, Hkv, L], ``region`` [B, L]. Returns a keep-mask [B, Hkv, L] of at most
    ``plan.middle`` positions: first the top ``m`` and their neighbours, then the next best.
    With ``dilate=False``, ``dilation_m == 0`` or ``dilation_r == 0`` this is exactly the top-k.
    """
    length = mass.shape[-1]
    k = min(plan.middle, length)
    score = mass.masked_fill(~region[:, None, :], float("-inf"))
    radius = plan.dilation_r
    m = plan.dilation_m if plan.dilation_m >= 0 else k // (2 * radius + 1)
    priority = score
    if dilate and m > 0 and radius > 0:
        cores = score.topk(min(m, length), dim=-1)
        offsets = torch.arange(-radius, radius + 1, device=mass.device)
        neighbours = (cores.indices[..., None] + offsets).clamp(0, length - 1).flatten(-2)
        core_ok = (cores.values > float("-inf"))[..., None].expand(-1, -1, -1, offsets.numel()).flatten(-2)
        dilated = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, neighbours, core_ok)
        # Dilated positions first (mass is a probability sum, so +1e6 puts them ahead).
        priority = torch.where(dilated & region[:, None, :], score + 1e6, score)
    top = priority.topk(k, dim=-1)
    take = (top.values > float("-inf")) & within_head_budget(plan, k, mass.device)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, take)


def within_head_budget(plan: SelectPlan, k: int, device) -> torch.Tensor:
    """``[1, Hkv, k]`` (or ``[1, 1, k]``): which of the k best picks each KV head may keep
    under its own budget (LU-KV per-head budgets); all of them without per-head budgets."""
    caps = plan.head_middles(device)
    rank = torch.arange(k, device=device)
    return rank[None, None, :] < (caps[None, :, None] if caps is not None else k)


def smallest_sufficient(mass: torch.Tensor, region: torch.Tensor, windows: torch.Tensor, rows: int, plan: SelectPlan):
    """``delta_target`` mode: the fewest top positions whose retained mass reaches
    ``1 - delta_target`` (windows included), capped by the budget. ``mass`` sums ``rows``
    query rows, so the retained share is ``mass / rows``."""
    share = mass / rows
    base = (share * windows[:, None, :]).sum(-1)  # [B, Hkv] mass of sinks + local window
    score = share.masked_fill(~region[:, None, :], float("-inf"))
    k = min(plan.middle, score.shape[-1])
    top = score.topk(k, dim=-1)
    gained = base[..., None] + top.values.clamp_min(0).cumsum(-1)  # retained after n+1 picks
    need = (gained < 1.0 - plan.delta_target).sum(-1, keepdim=True) + 1  # picks to reach target
    take = (torch.arange(k, device=mass.device) < need) & (top.values > float("-inf"))
    take = take & within_head_budget(plan, k, mass.device)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, take)
    return keep


class PrHSRule(SelectionRule):
    """PrHS: pre-hoc sparsity on three axes (DESIGN.md section 4).

    * time (CIS): a retrieval scores the group's exact attention mass over the retrieval
      region, keeps the top positions with dilation, and stores them with the anchor queries;
      later steps reuse the set while every query head of the group stays within cosine
      ``tau`` of its anchor (or, with ``delta_target``, while the reuse bound stays within the
      slack the retrieval left), for at most ``max_reuse`` steps. Sinks and the local window
      always slide with the sequence.
    * depth (PSAW): from ``psaw_start`` on, the oldest non-sink positions are outside the
      layer's recency window and never retrieved.
    * layer: a layer with ``share_from`` takes that layer's selection (see ``select_reference``).
    """

    name = "prhs"

    def validate(self, plan):
        if plan.middle <= 0:
            return f"sink + local = {plan.sink + plan.local} leaves no room for retrieved positions in budget={plan.budget}"
        return None

    def state_spec(self, plan, batch, q_heads, kv_heads, head_dim):
        return {
            "age": ((batch, kv_heads), torch.int32, -1),  # steps since retrieval; -1: no set
            "kept": ((batch, kv_heads, plan.middle), torch.int32, -1),  # retrieved positions
            "anchor": ((batch, q_heads, head_dim), torch.float32, 0.0),  # queries at retrieval
            "anchor_dropped": ((batch, kv_heads), torch.float32, 0.0),  # group's dropped mass at retrieval
            "key_norm": ((batch, kv_heads), torch.float32, 0.0),  # max key norm seen
        }

    def on_prefill(self, plan, view, state, tail):
        state["age"][: view.batch].fill_(-1)

    def choose(self, plan, view, state):
        b, hkv, group = view.batch, view.kv_heads, view.group
        age, kept, anchor = state["age"][:b], state["kept"][:b], state["anchor"][:b]
        anchor_dropped, key_norm = state["anchor_dropped"][:b], state["key_norm"][:b]
        query = view.q[:, :, -1].float()  # [B, Hq, D] newest query row

        # Largest key norm, kept up to date with the newest key (for the reuse bound).
        newest_key = view.k.float().gather(2, view.newest.clamp_min(0)[:, None, None, None].expand(-1, hkv, 1, view.head_dim))
        key_norm.copy_(torch.where(view.continuing[:, None], torch.maximum(key_norm, newest_key.norm(dim=-1)[..., 0]), key_norm))
        shift = (query - anchor).norm(dim=-1).reshape(b, hkv, group).amax(-1)  # [B, Hkv]
        view.reuse_bound = reuse_bound(anchor_dropped, view.scale, key_norm, shift)

        if plan.delta_target > 0:
            similar = view.reuse_bound <= plan.delta_target
        else:
            cosine = torch.nn.functional.cosine_similarity(query, anchor, dim=-1)  # [B, Hq]
            similar = (cosine >= plan.tau).reshape(b, hkv, group).all(-1)
        reuse = view.continuing[:, None] & (age >= 0) & (age + 1 < plan.max_reuse) & similar
        retrieve = ~reuse & ~view.fits[:, None]
        view.reused = reuse & ~view.fits[:, None]

        region = retrieval_region(plan, view)
        windows = view.windows(plan)
        mass = view.group_mass()  # a kernel computes this only for retrieving heads
        rows = group * view.q_len
        if plan.delta_target > 0:
            fresh = smallest_sufficient(mass, region, windows, rows, plan)
        else:
            fresh = dilate_and_pick(mass, region, plan)
        retained = ((mass / rows) * (fresh | windows[:, None, :])).sum(-1)
        anchor_dropped.copy_(torch.where(retrieve, (1.0 - retained).clamp_min(0.0), anchor_dropped))
        fresh_idx = keep_to_indices(fresh, plan.middle)

        kept.copy_(torch.where(retrieve[..., None], fresh_idx, kept))
        anchor.copy_(torch.where(retrieve.repeat_interleave(group, 1)[..., None], query, anchor))
        fresh_norm = view.k.float().norm(dim=-1).masked_fill(~view.valid[:, None, :], 0.0).amax(-1)
        key_norm.copy_(torch.where(retrieve, fresh_norm, key_norm))
        age.copy_(torch.where(retrieve, 0, torch.where(reuse, age + 1, -1)).to(age.dtype))

        stored = torch.zeros(b, hkv, view.kv_len + 1, dtype=torch.bool, device=view.q.device)
        stored.scatter_(-1, torch.where(kept >= 0, kept, view.kv_len).long(), True)
        keep = stored[..., :-1] & view.valid[:, None, :] | windows[:, None, :]
        return keep, retrieve


def keep_to_indices(keep: torch.Tensor, slots: int) -> torch.Tensor:
    """Boolean keep-mask [B, Hkv, L] -> ascending int32 positions [B, Hkv, slots], -1 padded."""
    length = keep.shape[-1]
    positions = torch.arange(length, device=keep.device)
    order = torch.where(keep, positions, positions + length)
    if length < slots:
        order = torch.nn.functional.pad(order, (0, slots - length), value=2 * length)
    chosen = order.sort(dim=-1).values[..., :slots]
    return torch.where(chosen < length, chosen, -1).to(torch.int32)


class OneShotRule(SelectionRule):
    """Select once from the prompt, then decode with that set plus sinks and a rolling recent
    window; the selection is never recomputed (SAGE-KV, SnapKV). A row that reaches decode
    without a selection of its own sequence (no prefill seen, reordered beams) makes one from
    its first decode query."""

    def validate(self, plan):
        return None if plan.middle > 0 else f"sink + local leaves no room for selected positions in budget={plan.budget}"

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
        stored = torch.zeros(b, view.kv_heads, view.kv_len + 1, dtype=torch.bool, device=view.q.device)
        stored.scatter_(-1, torch.where(kept >= 0, kept, view.kv_len).long(), True)
        return stored[..., :-1] & view.valid[:, None, :] | view.windows(plan)[:, None, :], retrieve


class SageKVRule(OneShotRule):
    """SAGE-KV: one top-k per KV head from the last prompt query's group attention mass."""

    name = "sage_kv"

    def prompt_scores(self, plan, tail):
        last = tail(1)
        return last.group_mass(), last


class SnapKVRule(OneShotRule):
    """SnapKV: attention of the last ``SNAP_WINDOW`` prompt queries, summed over the window
    and the group, max-pooled over ``SNAP_KERNEL`` neighbouring positions, top-k."""

    name = "snapkv"
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


class H2ORule(SelectionRule):
    """H2O: heavy hitters by accumulated attention, plus sinks and the recent window.

    Every step adds the attention each position received over the kept set (so a dropped
    position stops accumulating, as if evicted) to its score, and keeps the best accumulated
    positions. The first decode step of a sequence seeds the scores with its exact attention
    (the prefill graph sees only the prompt's slice of a static cache, so it cannot size
    this state).
    """

    name = "h2o"
    needs_static_length = True

    def validate(self, plan):
        return None if plan.middle > 0 else f"sink + local leaves no room for heavy hitters in budget={plan.budget}"

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
    LABEL_FRACTION = 8
    HEAD_SHARE_OVERLAP = 0.8

    def validate(self, plan):
        return None if plan.middle > 0 else f"sink + local leaves no room for selected positions in budget={plan.budget}"

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
        age.copy_(torch.where(retrieve, 0, torch.where(reuse, age + 1, -1)).to(age.dtype))
        stored = torch.zeros(b, hkv, view.kv_len + 1, dtype=torch.bool, device=view.q.device)
        stored.scatter_(-1, torch.where(kept >= 0, kept, view.kv_len).long(), True)
        own_retrieval = retrieve & (anchor == own)  # a head copying another reads no keys
        return stored[..., :-1] & view.valid[:, None, :] | view.windows(plan)[:, None, :], own_retrieval


class QuestRule(SelectionRule):
    """Quest: pages of ``PAGE`` keys keep their elementwise min and max; a page's score for a
    query is ``sum_d max(q_d * min_d, q_d * max_d)`` (an upper bound of any q.k in it); the
    best pages are kept whole every step. The first two layers stay dense."""

    name = "quest"
    PAGE = 16
    DENSE_LAYERS = 2

    def validate(self, plan):
        if plan.middle < self.PAGE:
            return f"budget={plan.budget} minus sink and local leaves less than one page of {self.PAGE} keys"
        return None

    def keeps_dense(self, plan):
        if plan.layer < self.DENSE_LAYERS:
            return f"Quest keeps its first {self.DENSE_LAYERS} layers dense"
        return None

    def choose(self, plan, view, state):
        b, hkv, length = view.batch, view.kv_heads, view.kv_len
        pages = -(-length // self.PAGE)
        region = view.valid & ~view.windows(plan)  # [B, L]
        pad = pages * self.PAGE - length
        k = torch.nn.functional.pad(view.k.float(), (0, 0, 0, pad))
        inside = torch.nn.functional.pad(region, (0, pad))[:, None, :, None]  # [B, 1, L', 1]
        k_min = k.masked_fill(~inside, float("inf")).unflatten(2, (pages, self.PAGE)).amin(3)
        k_max = k.masked_fill(~inside, float("-inf")).unflatten(2, (pages, self.PAGE)).amax(3)
        q = view.q.float().reshape(b, hkv, view.group * view.q_len, 1, view.head_dim)
        bound = torch.maximum(q * k_min[:, :, None], q * k_max[:, :, None]).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        page_score = bound.sum(-1).sum(2)  # [B, Hkv, pages], summed over the group's queries
        has_any = inside.unflatten(2, (pages, self.PAGE)).any(3)[:, :, :, 0]  # [B, 1, pages]
        page_score = page_score.masked_fill(~has_any, float("-inf"))
        top = page_score.topk(min(plan.middle // self.PAGE, pages), dim=-1)
        chosen = torch.zeros_like(page_score, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
        keep = chosen.repeat_interleave(self.PAGE, dim=-1)[..., :length] & region[:, None, :]
        return keep | view.windows(plan)[:, None, :], ~view.no_retrieval()


RULES: dict[str, SelectionRule] = {
    r.name: r
    for r in (
        DenseRule(), StreamingRule(), OracleRule(), PrHSRule(), SageKVRule(), SnapKVRule(), QuestRule(), LUKVRule(),
        H2ORule(), HShareRule(),
    )
}


def get_rule(policy: str) -> SelectionRule:
    try:
        return RULES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; available: {sorted(RULES)}") from None
