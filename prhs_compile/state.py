"""Per-layer selection state, shared by every graph compiled for the same model.

Dynamo compiles a model's prefill and decode into different graphs (and DynamicCache decode
into a few more as shapes become symbolic). They must see the same state tensors, or a
prefill could not reset what decode reads. This registry hands out one list of tensors per
attention module (``nn_module_stack`` key) and plan; the rewritten graphs hold them as
buffers and mutate them in place.
"""

from __future__ import annotations

import torch

from prhs_compile.kernels import state_spec
from prhs_compile.kernels.plan import SelectPlan
from prhs_compile.passes.match import AttentionCall

_STATES: dict[tuple, tuple[SelectPlan, list[torch.Tensor]]] = {}


def state_for(call: AttentionCall, plan: SelectPlan, capacity: int) -> list[torch.Tensor]:
    q, k = call.meta("query"), call.meta("key_source")
    q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], k.shape[-1]
    device = q.device
    key = (call.module_key, plan.encode(), capacity, q_heads, kv_heads, head_dim, str(device), k.dtype)
    if key not in _STATES:
        # The first graph of a layer is its prefill: the page summaries cover the cache length
        # it shows even past max_cache_len (a static cache's whole length, a dynamic cache's
        # prompt).
        _STATES[key] = (plan, allocate_state(plan, capacity, q_heads, kv_heads, head_dim, device, k.dtype,
                                             call.cache_len))
    return _STATES[key][1]


def allocate_state(plan: SelectPlan, batch: int, q_heads: int, kv_heads: int, head_dim: int, device,
                   key_dtype=torch.float32, cache_len: int = 0) -> list[torch.Tensor]:
    """Fresh state tensors of one layer for ``batch`` rows, in the order the ops take them
    (``key_dtype``: the cache's dtype, which page summaries keep; ``cache_len``: a cache length
    the summaries must cover, see ``state_spec``)."""
    spec = state_spec(plan, batch, q_heads, kv_heads, head_dim, key_dtype, cache_len)
    if torch.device(device).type == "cuda":
        # Device tensors the CUDA step keeps between calls are made here, outside any CUDA
        # graph: one first made inside a graph tree's recording run would be an allocation of
        # its memory pool that no output tracks, which torch refuses. The tickets of the
        # bounds kernel (one per row) and of attend's merge (one per row and KV head at
        # decode; kernels.tickets), and the per-head budgets as a tensor
        # (SelectPlan.head_middles).
        from prhs_compile.kernels.tickets import reserve_tickets

        reserve_tickets(device, batch * max(kv_heads, 1))
        plan.head_middles(torch.device(device))
    return [torch.full(shape, fill, dtype=dtype, device=device) for shape, dtype, fill in spec.values()]


def all_states() -> list[tuple[SelectPlan, list[torch.Tensor]]]:
    return list(_STATES.values())


def clear_states() -> None:
    """Drop every registered state (compiled graphs keep their own references)."""
    _STATES.clear()
