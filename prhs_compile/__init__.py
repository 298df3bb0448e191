"""prhs-compile: a ``torch.compile`` backend for sparse (select-then-attend) decode attention.

    model.forward = torch.compile(model.forward, backend="prhs", options={"budget": 1024})

The backend is found by name through the ``torch_dynamo_backends`` entry point; importing
this package is only needed for the Python API below.
"""

from prhs_compile import kernels as _kernels  # noqa: F401  (registers torch.ops.prhs)
from prhs_compile.backend import GraphReport, prhs_backend
from prhs_compile.calibrate import calibrate
from prhs_compile.config import PrHSConfig
from prhs_compile.evict import EvictionReport, evict_kv
from prhs_compile.explain import Explanation, explain
from prhs_compile.hf_compat import cache_keyword
from prhs_compile.kernels.rules import RULES as _RULES
from prhs_compile.state import clear_states
from prhs_compile.stats import LayerStats, PrHSStats, reset_stats, stats


def available_policies() -> list[str]:
    """Names accepted by ``options={"policy": ...}``."""
    return sorted(_RULES)


__all__ = [
    "EvictionReport",
    "Explanation",
    "GraphReport",
    "LayerStats",
    "PrHSConfig",
    "PrHSStats",
    "available_policies",
    "cache_keyword",
    "calibrate",
    "clear_states",
    "evict_kv",
    "explain",
    "prhs_backend",
    "reset_stats",
    "stats",
]
