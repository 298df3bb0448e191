"""Calibration of the PrHS layer axis: which layers can share an earlier layer's selection.

``calibrate(model, input_ids)`` decodes a few steps with the exact (``oracle``) selection,
measures how much each layer's selected set overlaps every earlier layer's, and pairs layers
greedily (as HShare does): a layer shares the earlier, non-sharing layer it overlaps most,
when that overlap reaches ``threshold``. It also suggests a per-layer ``tau``. The result is a
JSON map for ``options={"layer_share": PATH}``; loading it checks it against the model.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from prhs_compile.kernels import selection_listeners

FORMAT = "prhs-share-map/1"


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over (row, KV head) of |A & B| / |A| for index sets padded with -1."""
    length = int(max(a.max(), b.max())) + 2
    def as_mask(idx):
        m = torch.zeros(*idx.shape[:-1], length, dtype=torch.bool)
        return m.scatter_(-1, torch.where(idx >= 0, idx, length - 1).long(), True)[..., :-1]
    ma, mb = as_mask(a), as_mask(b)
    return ((ma & mb).sum(-1) / ma.sum(-1).clamp_min(1)).mean().item()


def calibrate(model, input_ids, *, steps: int = 8, budget: int = 256, sink: int = 4, local: int = 64,
              threshold: float = 0.8, out: str | None = None) -> dict:
    """Measure oracle-set overlap between layers and write/return a sharing map."""
    if steps < 2:
        raise ValueError(f"calibrate: steps={steps} is invalid: expected >= 2 (tau needs consecutive steps)")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"calibrate: threshold={threshold} is invalid: expected in [0, 1]")
    records: dict[int, list] = defaultdict(list)  # layer -> [(indices, queries)] per step

    def record(layer, indices, queries):
        records[layer].append((indices.detach().cpu(), queries.detach().float().cpu()))

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
            values = [_overlap(a, b) for (a, _), (b, _) in pairs]
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
        "suggested_tau": {str(layer): _suggest_tau(records[layer], kv_heads) for layer in layers},
        # Mean overlap of consecutive steps' exact sets per layer: below the 0.9 that
        # _suggest_tau calls stable, it suggests no reuse (1.0).
        "step_overlap": {str(layer): _step_overlap(records[layer]) for layer in layers},
    }
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _step_overlap(steps: list) -> float:
    values = [_overlap(idx_b, idx_a) for (idx_a, _), (idx_b, _) in zip(steps, steps[1:])]
    return round(sum(values) / len(values), 4) if values else 1.0


def _suggest_tau(steps: list, kv_heads: int, stable: float = 0.9) -> float:
    """The 10th percentile of the group's smallest query cosine between consecutive steps,
    over the transitions where the exact set barely changed (overlap >= ``stable``): a tau
    that would have allowed most of the reuse the data supports. 1.0 (no reuse) when none."""
    cosines = []
    for (idx_a, q_a), (idx_b, q_b) in zip(steps, steps[1:]):
        if _overlap(idx_b, idx_a) < stable:
            continue
        cos = torch.nn.functional.cosine_similarity(q_a, q_b, dim=-1)  # [B, Hq]
        cosines.append(cos.reshape(cos.shape[0], kv_heads, -1).amin(-1).flatten())
    if not cosines:
        return 1.0
    return round(float(torch.cat(cosines).quantile(0.1).clamp(0.0, 1.0)), 4)
