"""PrHS, the default policy: pre-hoc sparsity on three axes (DESIGN.md section 4)."""

from __future__ import annotations

import torch

from .bounds import reuse_bound
from .selection import (
    SelectionRule,
    dilate_and_pick,
    keep_to_indices,
    keys_at,
    retrieval_region,
    smallest_sufficient,
    stored_and_windows,
)


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
        newest_norm = keys_at(view.k, view.newest, hkv).norm(dim=-1)  # [B, Hkv]
        key_norm.copy_(torch.where(view.continuing[:, None], torch.maximum(key_norm, newest_norm), key_norm))
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

        return stored_and_windows(kept, plan, view), retrieve
