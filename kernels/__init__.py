"""Custom ops of prhs-compile and their implementations (torch reference, Triton on CUDA).

Importing this package registers the ``torch.ops.prhs`` ops; it never imports Triton.
"""

from . import ops  # noqa: F401  (registers torch.ops.prhs.*)
from .plan import SelectPlan, decode_plan
from .rules import RULES, get_rule
from .select_reference import COUNTER_NAMES, COUNTERS_INDEX, dropped_mass_listeners, state_spec

__all__ = [
    "COUNTER_NAMES",
    "COUNTERS_INDEX",
    "RULES",
    "SelectPlan",
    "decode_plan",
    "dropped_mass_listeners",
    "get_rule",
    "state_spec",
]
