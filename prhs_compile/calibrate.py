"""Calibration of the PrHS layer axis: which layers can share an earlier layer's selection.

``calibrate(model, input_ids)`` decodes a few steps with the exact (``oracle``) selection,
measures how much each layer's selected set overlaps every earlier layer's, and pairs layers
greedily (as HShare does): a layer shares the earlier, non-sharing layer it overlaps most,
when that overlap reaches ``threshold``. It also suggests a per-layer ``tau`` from what
reuse would have cost: for every slot and pair of steps up to ``MAX_GAP`` apart, the mass the
older step's set (with the positions added since, which PrHS's local window covers) keeps
of the newer step's attention, against what the newer step's exact set keeps, beside the
two steps' query cosine (``_suggest_tau``). The result is a JSON map for
``options={"layer_share": PATH}`` and ``options={"layer_tau": PATH}``; loading it checks it
against the model.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from prhs_compile.kernels import selection_listeners
from prhs_compile.kernels.selection import indices_to_keep

FORMAT = "prhs-share-map/1"
MAX_GAP = 4  # steps a reused set may be older than the query it serves (anchor to query)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over (row, KV head) of |A & B| / |A| for index sets padded with -1."""
    length = int(max(a.max(), b.max())) + 1
    ma, mb = indices_to_keep(a, length), indices_to_keep(b, length)
    return ((ma & mb).sum(-1) / ma.sum(-1).clamp_min(1)).mean().item()


def calibrate(model, input_ids, *, steps: int = 8, budget: int = 256, sink: int = 4, local: int = 64,
              threshold: float = 0.8, slack: float = 0.02, precision: float = 0.9,
              out: str | None = None) -> dict:
    """Measure oracle-set overlap between layers and write/return a sharing map, with a
    suggested ``tau`` per layer: the lowest query cosine above which at least ``precision``
    of the observed reuses lose at most ``slack`` of the group's attention mass."""
    if steps < 2:
        raise ValueError(f"calibrate: steps={steps} is invalid: expected >= 2 (tau needs consecutive steps)")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"calibrate: threshold={threshold} is invalid: expected in [0, 1]")
    if not 0.0 <= slack <= 1.0:
        raise ValueError(f"calibrate: slack={slack} is invalid: expected in [0, 1]")
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"calibrate: precision={precision} is invalid: expected in (0, 1]")
    records: dict[int, list] = defaultdict(list)  # layer -> [(indices, queries, mass)] per step

    def record(layer, indices, queries, mass):
        records[layer].append((indices.detach().cpu(), queries.detach().float().cpu(),
                               mass.detach().float().cpu()))

    options = {"policy": "oracle", "budget": budget, "sink": sink, "local": local, "inductor": False}
    original_forward = model.forward
    model.forward = torch.compile(model.forward, backend="prhs", options=options)
    selection_listeners.append(record)
    try:
        with torch.no_grad():
            model.generate(
                input_ids, max_new_tokens=steps + 1, do_sample=False, cache_implementation="static",
                max_cache_len=input_ids.shape[1] + steps + 1, pad_token_id=0,
            )
    finally:
        selection_listeners.remove(record)
        model.forward = original_forward
    if not records:
        raise ValueError(
            f"calibrate: no attention call was rewritten (prompt length {input_ids.shape[1]} vs "
            f"budget={budget}); use a prompt longer than the budget"
        )

    layers = sorted(records)
    num_layers = layers[-1] + 1
    overlap = [[None] * num_layers for _ in range(num_layers)]
    for i in layers:
        for j in layers:
            pairs = zip(records[i], records[j])
            values = [_overlap(a[0], b[0]) for a, b in pairs]
            overlap[i][j] = sum(values) / len(values)
    share = {}
    for layer in layers:
        anchors = [a for a in layers if a < layer and a not in share]
        if anchors:
            best = max(anchors, key=lambda a: overlap[layer][a])
            if overlap[layer][best] >= threshold:
                share[layer] = best
    kv_heads = records[layers[0]][0][0].shape[1]
    result = {
        "format": FORMAT,
        "num_layers": num_layers,
        "num_kv_heads": kv_heads,
        "budget": budget,
        "threshold": threshold,
        "share": {str(f): a for f, a in share.items()},
        "overlap": overlap,
        "slack": slack,
        "precision": precision,
        "suggested_tau": {},
        # Per layer: the reuses observed (slot, step pairs up to MAX_GAP apart), the share of
        # them within the slack, and the share at or above the suggested tau.
        "reuse": {},
        # Mean overlap of consecutive steps' exact sets per layer.
        "step_overlap": {str(layer): _step_overlap(records[layer]) for layer in layers},
    }
    for layer in layers:
        tau, evidence = _suggest_tau(records[layer], kv_heads, slack, precision)
        result["suggested_tau"][str(layer)] = tau
        result["reuse"][str(layer)] = evidence
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _step_overlap(steps: list) -> float:
    values = [_overlap(b[0], a[0]) for a, b in zip(steps, steps[1:])]
    return round(sum(values) / len(values), 4) if values else 1.0


def reuse_samples(steps: list, kv_heads: int, max_gap: int = MAX_GAP):
    """``(cosine, loss)`` of every (row, KV head) slot and pair of steps ``gap <= max_gap``
    apart: the smallest cosine between the group's queries at the two steps, and the share of
    the newer step's group mass that the older step's set (plus the positions added since)
    keeps less than the newer step's own set."""
    cosines, losses = [], []
    for t in range(1, len(steps)):
        idx_b, q_b, mass_b = steps[t]
        length = mass_b.shape[-1]
        fresh = indices_to_keep(idx_b, length)
        newest_b = idx_b.amax(-1, keepdim=True)  # [B, Hkv, 1]: the composed set ends at the newest
        total = mass_b.sum(-1).clamp_min(1e-30)
        positions = torch.arange(length)
        for gap in range(1, min(max_gap, t) + 1):
            idx_a, q_a, _ = steps[t - gap]
            newest_a = idx_a.amax(-1, keepdim=True)
            added = (positions > newest_a) & (positions <= newest_b)  # the local window covers these
            stale = indices_to_keep(idx_a, length) | added
            losses.append((((mass_b * fresh).sum(-1) - (mass_b * stale).sum(-1)) / total).flatten())
            cos = torch.nn.functional.cosine_similarity(q_a, q_b, dim=-1)  # [B, Hq]
            cosines.append(cos.reshape(cos.shape[0], kv_heads, -1).amin(-1).flatten())
    if not cosines:
        return torch.empty(0), torch.empty(0)
    return torch.cat(cosines), torch.cat(losses)


def _suggest_tau(steps: list, kv_heads: int, slack: float = 0.02, precision: float = 0.9):
    """``(tau, evidence)``: the lowest query cosine such that, among the observed reuses with
    a cosine at least that high, at least ``precision`` lose no more than ``slack`` of the
    mass (1.0, no reuse, when even the most similar queries fail that)."""
    cosine, loss = reuse_samples(steps, kv_heads)
    if cosine.numel() == 0:
        return 1.0, {"samples": 0}
    order = cosine.argsort(descending=True)
    good = (loss[order] <= slack).float()
    share_good = good.cumsum(0) / torch.arange(1, len(good) + 1)
    passing = (share_good >= precision).nonzero()
    if passing.numel() == 0:
        tau = 1.0
    else:
        tau = round(float(cosine[order][int(passing.max())].clamp(0.0, 1.0)), 4)
    evidence = {"samples": int(cosine.numel()), "within_slack": round(float((loss <= slack).float().mean()), 4),
                "at_or_above_tau": round(float((cosine >= tau).float().mean()), 4)}
    return tau, evidence
