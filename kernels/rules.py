"""The registry of selection rules: ``policy`` name -> rule (see ``selection.py``)."""

from __future__ import annotations

from .rule_prhs import PrHSRule
from .rules_baselines import H2ORule, HShareRule, LUKVRule, QuestRule, SageKVRule, SnapKVRule
from .rules_basic import DenseRule, OracleRule, StreamingRule
from .selection import SelectionRule, keep_to_indices  # noqa: F401  (re-exported)

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
