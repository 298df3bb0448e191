"""LU-KV budget allocation: per-(layer, KV head) budgets from loss-vs-budget curves.

LU-KV (arXiv 2602.08585) spends a global KV budget where it buys the most accuracy: each
(layer, head) gets a curve ``loss(b)`` (here: the exact attention mass its top-``b`` drops,
averaged over calibration steps), the curves are made convex (diminishing returns) with
isotonic regression on their marginal gains (pool-adjacent-violators), and the budget is
handed out greedily, one step of the budget grid at a time, to the head whose next step
lowers the loss most per token. With convex curves the greedy allocation is optimal.

This module holds the offline side: the allocation math (tested on hand-made curves) and
``profile`` (curves measured through the backend's verify mode). At run time the table's
budgets reach ``select`` through ``options={"head_budgets": path}``.
"""

from __future__ import annotations

from prhs_compile.hf_compat import cache_keyword


def pava_non_increasing(values: list[float], weights: list[float]) -> list[float]:
    """Weighted least-squares fit of a non-increasing sequence (pool adjacent violators)."""
    if len(values) != len(weights):
        raise ValueError(f"pava: {len(values)} values but {len(weights)} weights")
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights):
        if weight <= 0:
            raise ValueError(f"pava: weight {weight} is invalid: expected > 0")
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:  # an increase: pool
            mean2, w2, n2 = blocks.pop()
            mean1, w1, n1 = blocks.pop()
            blocks.append([(mean1 * w1 + mean2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fitted = []
    for mean, _weight, count in blocks:
        fitted.extend([mean] * count)
    return fitted


def convexify(budgets: list[int], losses: list[float]) -> list[float]:
    """A non-increasing, convex version of ``losses`` sampled at increasing ``budgets``.

    The marginal gains per token ``(loss[i-1] - loss[i]) / (b[i] - b[i-1])`` are clipped at 0
    (more budget never hurts) and fitted by a non-increasing sequence (weights: the step
    widths); the curve is rebuilt from the fitted gains, starting at ``losses[0]``.
    """
    if len(budgets) != len(losses) or len(budgets) < 2:
        raise ValueError("convexify: need at least two (budget, loss) points of equal count")
    if any(b2 <= b1 for b1, b2 in zip(budgets, budgets[1:])):
        raise ValueError(f"convexify: budgets {budgets} must increase")
    widths = [b2 - b1 for b1, b2 in zip(budgets, budgets[1:])]
    gains = [max(0.0, (l1 - l2) / w) for l1, l2, w in zip(losses, losses[1:], widths)]
    fitted = pava_non_increasing(gains, widths)
    curve = [losses[0]]
    for gain, width in zip(fitted, widths):
        curve.append(curve[-1] - gain * width)
    return curve


def allocate(curves: dict, budgets: list[int], mean_budget: float) -> dict:
    """Greedy allocation of ``mean_budget * len(curves)`` tokens over the heads.

    ``curves[(layer, head)]`` are convex losses at ``budgets``; every head starts at
    ``budgets[0]``. Returns ``{(layer, head): budget}`` whose mean is at most ``mean_budget``
    (the grid may leave a remainder).
    """
    if mean_budget < budgets[0]:
        raise ValueError(f"allocate: mean budget {mean_budget} is below the smallest grid budget {budgets[0]}")
    level = {head: 0 for head in curves}
    spare = mean_budget * len(curves) - budgets[0] * len(curves)
    while True:
        best, best_gain = None, -1.0
        for head, i in level.items():
            if i + 1 < len(budgets):
                cost = budgets[i + 1] - budgets[i]
                if cost <= spare:
                    gain = (curves[head][i] - curves[head][i + 1]) / cost
                    if gain > best_gain:
                        best, best_gain = head, gain
        if best is None:
            break
        spare -= budgets[level[best] + 1] - budgets[level[best]]
        level[best] += 1
    return {head: budgets[i] for head, i in level.items()}


def profile(model, prompts, grid: list[int], mean_budgets: list[int], steps: int = 4, sink: int = 0, local: int = 0) -> dict:
    """Measure per-(layer, KV head) loss-vs-budget curves and allocate budgets.

    The loss of a head at budget ``b`` is the exact attention mass the oracle's selection of
    ``b`` positions drops, averaged over ``steps`` greedy decode steps after each prompt. With
    ``sink``/``local`` the selection holds those windows plus the top ``b - sink - local``
    of the rest, as it will at run time (a head whose budget only covers the windows
    retrieves nothing, and its curve says what that costs); without them it is the plain
    top-``b``. Returns the JSON-ready table
    ``{"table": {mean budget: {layer: [budget per KV head]}}, ...}``.
    """
    from collections import defaultdict

    import torch
    import transformers

    import prhs_compile
    from prhs_compile.kernels import dropped_mass_listeners

    grid = sorted(grid)
    if grid[0] < max(1, sink + local):
        raise ValueError(f"profile: budgets {grid} must be >= 1 and hold sink + local = {sink + local}")
    losses: dict = defaultdict(lambda: [0.0] * len(grid))
    counts: dict = defaultdict(lambda: [0] * len(grid))
    for gi, budget in enumerate(grid):
        def record(r, gi=gi):
            dropped = r["group_dropped"].mean(0)  # [Hkv], mean over batch rows
            for head, value in enumerate(dropped.tolist()):
                losses[(r["layer"], head)][gi] += value
                counts[(r["layer"], head)][gi] += 1

        torch._dynamo.reset()
        prhs_compile.clear_states()
        options = {"policy": "oracle", "budget": budget, "sink": sink, "local": local, "verify": True, "inductor": False}
        compiled = torch.compile(model, backend="prhs", options=options)
        dropped_mass_listeners.append(record)
        try:
            with torch.no_grad():
                for ids in prompts:
                    cache = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
                    logits = compiled(input_ids=ids, **{cache_keyword(model): cache}).logits[:, -1:]
                    for _ in range(steps):
                        logits = compiled(input_ids=logits.argmax(-1), **{cache_keyword(model): cache}).logits[:, -1:]
        finally:
            dropped_mass_listeners.remove(record)
    heads = sorted(losses)
    raw = {h: [total / max(1, n) for total, n in zip(losses[h], counts[h])] for h in heads}
    missing = [h for h in heads if 0 in counts[h]]
    if missing:
        raise ValueError(f"profile: budgets {grid} left heads {missing[:4]} unmeasured; use prompts longer than {grid[-1]}")
    convex = {h: convexify(grid, raw[h]) for h in heads}
    layers = sorted({layer for layer, _ in heads})
    kv_heads = 1 + max(head for _, head in heads)
    table = {}
    for mean in mean_budgets:
        allocation = allocate(convex, grid, mean)
        table[str(mean)] = {str(layer): [allocation[(layer, h)] for h in range(kv_heads)] for layer in layers}
    return {
        "format": "prhs-lukv/1",
        "num_layers": layers[-1] + 1,
        "num_kv_heads": kv_heads,
        "grid": grid,
        "sink": sink,
        "local": local,
        "curves": {f"{layer}.{head}": raw[(layer, head)] for layer, head in heads},
        "convex_curves": {f"{layer}.{head}": convex[(layer, head)] for layer, head in heads},
        "table": table,
    }
