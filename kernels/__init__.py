"""Custom ops of prhs-compile and their implementations (torch reference, Triton on CUDA).

Importing this package registers the ``torch.ops.prhs`` ops; it never imports Triton.
"""

if __name__ == "prhs_compile.kernels":
    from . import ops  # noqa: F401  (registers torch.ops.prhs.*)
    from .plan import SelectPlan, decode_plan
    from .rules import RULES, get_rule
    from .select_reference import (
        COUNTER_NAMES,
        COUNTERS_INDEX,
        dropped_mass_listeners,
        selection_listeners,
        state_spec,
    )

    __all__ = [
        "COUNTER_NAMES",
        "COUNTERS_INDEX",
        "RULES",
        "SelectPlan",
        "decode_plan",
        "dropped_mass_listeners",
        "get_rule",
        "selection_listeners",
        "state_spec",
    ]
else:
    # From a source checkout's root this folder is also importable as a top-level "kernels",
    # and libraries probing for the unrelated `kernels` package (transformers does) import
    # it. Register nothing then: a second copy of the ops would split their state.
    __all__ = []
