"""LU-KV budget allocation: per-(layer, KV head) budgets from loss-vs-budget curves.

LU-KV (arXiv 2602.08585) spends a global KV budget where it buys the most accuracy: each
(layer, head) gets a curve ``loss(b)`` (here: the exact attention mass its top-``b`` drops,
averaged over calibration steps), the curves are made convex (diminishing returns) with
isotonic regression on their marginal gains (pool-adjacent-violators), and the budget is
handed out greedily, one step of the budget grid at a time, to the head whose next step
lowers the loss most per token. With convex curves the greedy allocation is optimal.

This module is the offline math (pure Python, tested on hand-made curves). The run-time side
(per-head budgets in ``select``) is still to come.
"""

from __future__ import annotations


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
