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
    # From a source checkout's root (``python -m``, ``python -c`` or a REPL started there) this
    # folder is also importable as a top-level "kernels", where it shadows the Hugging Face
    # `kernels` package that transformers (a dependency since 5.25) imports. Register nothing
    # (a second copy of the ops would split their state) and hand the name to the installed
    # package when there is one, so that importing transformers from the checkout works.
    __all__ = []

    def _load_installed_kernels():
        import importlib.machinery
        import importlib.util
        import os
        import sys

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None or spec.loader is None:
            return  # nothing installed: the empty placeholder answers a probe
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import system returns what sys.modules holds
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _load_installed_kernels()
    del _load_installed_kernels
