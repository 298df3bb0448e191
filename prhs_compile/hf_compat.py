"""What differs between the transformers releases the project supports (5.x)."""

from __future__ import annotations

import functools
import inspect


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.24
    on (``past_key_values`` still works there, deprecated until 5.40), ``past_key_values``
    before. ``model`` may be a module, a compiled module or its forward."""
    forward = getattr(getattr(model, "_orig_mod", model), "forward", model)
    return _cache_keyword(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"
