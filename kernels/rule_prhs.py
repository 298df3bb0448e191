"""PrHS, the default policy: pre-hoc sparsity on three axes (arXiv 2602.08329)."""

from __future__ import annotations

import torch

from . import pages
from .bounds import reuse_bound
from .selection import (
    SelectionRule,
    advance_age,
    dilate_and_pick,
    keep_to_indices,
    keys_at,
    retrieval_region,
    smallest_sufficient,
    stored_and_windows,
)


class PrHSRule(SelectionRule):
    """PrHS: pre-hoc sparsity on three axes: time, depth and layer.

    * time (CIS): a retrieval scores the group's exact attention mass over the retrieval
      region, keeps the top positions with dilation, and stores them with the anchor queries;
      later steps reuse the set while every query head of the group stays within cosine
      ``tau`` of its anchor (or, with ``delta_target``, while the reuse bound stays within the
      slack the retrieval left), for at most ``max_reuse`` steps. Sinks and the local window
      always slide with the sequence.
    * depth (PSAW): from ``psaw_start`` on, the oldest non-sink positions are outside the
      layer's recency window and never retrieved.
    * layer: a layer with ``share_from`` takes that layer's selection (see ``select_reference``).

    A retrieval scores every retrievable key (``retrieval="exact"``) or, two-stage, only the
    keys of the pages whose summaries bound the highest (``retrieval="pages"``, ``pages.py``).
    """

    name = "prhs"
    cuda_step = "gated"
    cuda_head_budgets = True
    recency_window = True
    two_stage = True

    def state_spec(self, plan, batch, q_heads, kv_heads, head_dim):
        return {
            "age": ((batch, kv_heads), torch.int32, -1),  # steps since retrieval; -1: no set
            "kept": ((batch, kv_heads, plan.middle), torch.int32, -1),  # retrieved positions
            "anchor": ((batch, q_heads, head_dim), torch.float32, 0.0),  # queries at retrieval
            "anchor_dropped": ((batch, kv_heads), torch.float32, 0.0),  # group's dropped mass at retrieval
            # largest key norm seen: over every valid key at a retrieval when the reuse bound
            # is used (needs_key_norms), else over the newest keys only
            "key_norm": ((batch, kv_heads), torch.float32, 0.0),
        }

    def on_prefill(self, plan, view, state, tail):
        state["age"][: view.batch].fill_(-1)

    def choose(self, plan, view, state):
        b, group = view.batch, view.group
        age, kept, anchor = state["age"][:b], state["kept"][:b], state["anchor"][:b]
        anchor_dropped, key_norm = state["anchor_dropped"][:b], state["key_norm"][:b]

        retrieve, reuse, view.reuse_bound = prhs_gate(
            view.q, view.k, view.newest, view.continuing, view.fits, age, anchor, anchor_dropped,
            key_norm, view.scale, plan.tau, plan.delta_target, plan.max_reuse)
        view.reused = reuse & ~view.fits[:, None]

        region = retrieval_region(plan, view)
        windows = view.windows(plan)
        rows = group * view.q_len
        if plan.delta_target > 0:  # exact retrieval only (the options refuse pages with it)
            mass = view.group_mass()
            fresh = smallest_sufficient(mass, region, windows, rows, plan)
        else:  # a kernel scores only for retrieving heads
            fresh, mass = pages.retrieve(plan, view, state, region,
                                         lambda m, pickable: dilate_and_pick(m, pickable, plan))
        retained = ((mass / rows) * (fresh | windows[:, None, :])).sum(-1)
        if needs_key_norms(plan):
            fresh_norm = view.k.float().norm(dim=-1).masked_fill(~view.valid[:, None, :], 0.0).amax(-1)
        else:  # nothing reads them: the newest keys' norms (the gate's) are all it keeps
            fresh_norm = key_norm
        prhs_store(view.q, keep_to_indices(fresh, plan.middle), retained, fresh_norm, retrieve,
                   reuse, age, kept, anchor, anchor_dropped, key_norm)

        return stored_and_windows(kept, plan, view), retrieve


def needs_key_norms(plan) -> bool:
    """Whether a retrieval must measure the largest key norm over the whole cache: only the
    reuse bound reads it (the ``delta_target`` gate, and verify mode's report). With the
    cosine gate it is not read, so a retrieval skips that work (on the GPU it halves the
    rate of the pass over K)."""
    return plan.delta_target > 0 or plan.verify


# The gate and the state update as functions of tensors, shared with the Triton step
# (``select_step_triton``, which compiles them into its fused glue).


def prhs_gate(q, k, newest, continuing, fits, age, anchor, anchor_dropped, key_norm,
              scale: float, tau: float, delta_target: float, max_reuse: int):
    """PrHS's time axis: which (row, KV head) slots reuse their stored set this step and
    which retrieve. Keeps the largest key norm up to date with the newest key (for the reuse
    bound). Returns ``(retrieve, reuse, bound)``, each ``[B, Hkv]``: ``bound`` is the reuse
    bound on the dropped mass of a reused set."""
    kv_heads = k.shape[1]
    query = q[:, :, -1].float()  # [B, Hq, D] newest query row
    newest_norm = keys_at(k, newest, kv_heads).norm(dim=-1)  # [B, Hkv]
    key_norm.copy_(torch.where(continuing[:, None], torch.maximum(key_norm, newest_norm), key_norm))
    bound = anchor_reuse_bound(query, anchor, anchor_dropped, key_norm, scale, kv_heads)
    similar = near_anchor(query, anchor, bound, tau, delta_target, kv_heads)
    reuse = continuing[:, None] & age_allows_reuse(age, max_reuse) & similar
    retrieve = ~reuse & ~fits[:, None]
    return retrieve, reuse, bound


def anchor_reuse_bound(query, anchor, anchor_dropped, key_norm, scale: float, kv_heads: int):
    """``[B, Hkv]``: the reuse bound on the dropped mass of each slot's stored set for the
    query rows ``query`` (``[B, Hq, D]``), whose group moved by at most its largest shift
    from the anchor (``bounds.reuse_bound``)."""
    batch, q_heads = query.shape[:2]
    shift = (query - anchor).norm(dim=-1).reshape(batch, kv_heads, q_heads // kv_heads).amax(-1)
    return reuse_bound(anchor_dropped, scale, key_norm, shift)


def near_anchor(query, anchor, bound, tau: float, delta_target: float, kv_heads: int):
    """``[B, Hkv]``: whether the slot's query rows are close enough to its anchor to reuse
    its set: the reuse bound within ``delta_target`` when that is set, else a cosine of at
    least ``tau`` for every query row of the group."""
    if delta_target > 0:
        return bound <= delta_target
    batch, q_heads = query.shape[:2]
    cosine = torch.nn.functional.cosine_similarity(query, anchor, dim=-1)  # [B, Hq]
    return (cosine >= tau).reshape(batch, kv_heads, q_heads // kv_heads).all(-1)


def age_allows_reuse(age, max_reuse: int):
    """``[B, Hkv]``: slots holding a set (age >= 0) that may serve one more step."""
    return (age >= 0) & (age + 1 < max_reuse)


def prhs_store(q, picks, retained, fresh_key_norm, retrieve, reuse, age, kept, anchor,
               anchor_dropped, key_norm) -> None:
    """The state a step leaves for later ones: what its retrievals found (``prhs_keep``) and
    what the gate's decision alone sets (``prhs_advance``)."""
    prhs_keep(picks, retained, retrieve, kept, anchor_dropped)
    prhs_advance(q, fresh_key_norm, retrieve, reuse, age, anchor, key_norm)


def prhs_keep(picks, retained, retrieve, kept, anchor_dropped) -> None:
    """Where a slot retrieved: its ``picks`` (``[B, Hkv, middle]`` positions; None: already
    written into ``kept``, as the Triton top-k does) and the mass it dropped, ``1 -
    retained`` (the Triton top-k writes that too when handed ``dropped=``)."""
    anchor_dropped.copy_(torch.where(retrieve, (1.0 - retained).clamp_min(0.0), anchor_dropped))
    if picks is not None:
        kept.copy_(torch.where(retrieve[..., None], picks, kept))


def prhs_advance(q, fresh_key_norm, retrieve, reuse, age, anchor, key_norm) -> None:
    """What a step leaves once the gate has decided, whatever the retrievals find: the
    newest queries as the anchors of retrieving slots, their largest key norm
    ``fresh_key_norm`` (None: no retrieval measured one, the norms stay), and the age of
    every slot."""
    group = q.shape[1] // retrieve.shape[1]
    anchor.copy_(torch.where(retrieve.repeat_interleave(group, 1)[..., None], q[:, :, -1].float(), anchor))
    if fresh_key_norm is not None:
        key_norm.copy_(torch.where(retrieve, fresh_key_norm, key_norm))
    advance_age(age, retrieve, reuse)
