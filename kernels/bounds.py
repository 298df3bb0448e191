"""The accuracy bounds PrHS reports beside the measured dropped mass (arXiv 2602.08329).

Notation: attention p = softmax(scale * q.K) over the valid positions, a selection S, and the
dropped mass delta = sum_{j not in S} p_j.
"""

from __future__ import annotations

import torch


def output_error_bound(dropped: torch.Tensor, max_value_norm: torch.Tensor) -> torch.Tensor:
    """L2 distance between attention renormalised over S and dense attention.

    ``o_S - o = delta * (mean of v over S, weighted) - delta * (mean of v over the rest)``,
    both means of vectors of norm at most ``max ||v||``: at most ``2 * delta * max ||v||``.
    """
    return 2.0 * dropped * max_value_norm


def reuse_bound(anchor_dropped: torch.Tensor, scale: float, max_key_norm: torch.Tensor, query_shift: torch.Tensor) -> torch.Tensor:
    """Dropped mass of a set chosen for query ``q_a`` when reused for ``q_t``.

    Every logit moves by at most ``eps = scale * max||k|| * ||q_t - q_a||``; a softmax whose
    logits move by at most eps changes the mass of any set by at most ``tanh(eps)`` (<= eps;
    with unit queries and cosine tau, ``||q_t - q_a|| = sqrt(2 - 2 tau)``, the form in the
    paper). So the reused set drops at most ``anchor_dropped + tanh(eps)``, for the same
    positions; the local window that slides in the meantime is not covered.
    """
    return anchor_dropped + torch.tanh(scale * max_key_norm * query_shift)
