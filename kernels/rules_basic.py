"""The reference policies: every position, sinks + recent window, and the exact top-k."""

from __future__ import annotations

from . import pages
from .selection import SelectionRule, dilate_and_pick


class DenseRule(SelectionRule):
    """Every valid position: the reference the sparse policies are measured against."""

    name = "dense"
    all_positions = True

    def choose(self, plan, view, state):
        return view.valid[:, None, :].expand(-1, view.kv_heads, -1), view.no_retrieval()


class StreamingRule(SelectionRule):
    """StreamingLLM: the first ``sink`` positions plus the most recent ``budget - sink``."""

    name = "streaming"
    cuda_step = "windows"
    retrieves = False

    def local_window(self, plan):
        return plan.budget - plan.sink  # everything after the sinks

    def choose(self, plan, view, state):
        recent = view.rank >= (view.count[:, None] - self.local_window(plan))
        keep = view.valid & ((view.rank < plan.sink) | recent)
        return keep[:, None, :].expand(-1, view.kv_heads, -1), view.no_retrieval()


class OracleRule(SelectionRule):
    """Exact top-k of the group's attention mass every step (sinks and local window kept).

    The best any selector of this budget can do on one step, and the yardstick for the others.
    """

    name = "oracle"
    cuda_step = "exact"
    cuda_head_budgets = True
    two_stage = True  # "an oracle within candidates" with retrieval="pages"

    def choose(self, plan, view, state):
        base = view.windows(plan)  # [B, L] sinks and local window
        picked, _ = pages.retrieve(plan, view, state, view.valid & ~base,
                                   lambda mass, pickable: dilate_and_pick(mass, pickable, plan, dilate=False))
        return picked | base[:, None, :], ~view.no_retrieval()
