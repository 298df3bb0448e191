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

from .plan import SelectPlan


class SelectionRule:
    """Base class. Subclasses set ``name`` and override what they need."""

    name: str = ""
    #: True when ``select`` returns one slot per cache position (``dense``).
    all_positions: bool = False

    def state_spec(self, plan: SelectPlan, batch: int, q_heads: int, kv_heads: int, head_dim: int):
        """Extra state tensors: ``{name: (shape, dtype, fill)}``, in a fixed order."""
        return {}

    def choose(self, plan: SelectPlan, view, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def on_prefill(self, plan: SelectPlan, view, state: dict) -> None:
        """Forget whatever the previous sequence left behind."""

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
        middle = view.valid & ~base
        mass = view.group_mass()  # [B, Hkv, L]
        score = mass.masked_fill(~middle[:, None, :], float("-inf"))
        k = min(plan.budget - plan.sink - plan.local, score.shape[-1])
        top = score.topk(k, dim=-1).indices
        picked = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        keep = (picked & middle[:, None, :]) | base[:, None, :]
        return keep, ~view.no_retrieval()


RULES: dict[str, SelectionRule] = {r.name: r for r in (DenseRule(), StreamingRule(), OracleRule())}


def get_rule(policy: str) -> SelectionRule:
    try:
        return RULES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; available: {sorted(RULES)}") from None
