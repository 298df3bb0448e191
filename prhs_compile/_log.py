"""The ``prhs`` logger: ``TORCH_LOGS="+prhs"`` or ``options={"debug": True}`` turn it on."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("prhs")

try:  # let torch._logging.set_logs / TORCH_LOGS treat "prhs" as a known log
    from torch._logging._internal import register_log

    register_log("prhs", "prhs")
except ImportError:  # private API moved: TORCH_LOGS="+prhs" still works through the module name
    pass

_debug_handler: logging.Handler | None = None


def enable_debug() -> None:
    """Show the log on stderr at DEBUG level (what ``debug=True`` asks for)."""
    global _debug_handler
    log.setLevel(logging.DEBUG)
    if _debug_handler is None and not _has_handler(log):
        _debug_handler = logging.StreamHandler(sys.stderr)
        _debug_handler.setFormatter(logging.Formatter("[prhs] %(message)s"))
        log.addHandler(_debug_handler)


def _has_handler(logger: logging.Logger) -> bool:
    while logger is not None:
        if logger.handlers:
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False
