"""Rewrite eligible SDPA calls into ``prhs.select`` + ``prhs.attend``.

Decode call (before -> after)::

    key = repeat_kv(k_cache); value = repeat_kv(v_cache)
    out = scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=s)
  ->
    idx = torch.ops.prhs.select(q, k_cache, v_cache, mask, s, plan, [state...], shared)
    out = torch.ops.prhs.attend(q, k_cache, v_cache, idx, mask, s)

Prefill call: SDPA stays, followed by ``torch.ops.prhs.prefill(q, k_cache, mask, is_causal,
s, plan, [state...])``, which resets the layer's state for the new sequence.

The state tensors are registered as buffers of the graph module (``get_attr`` nodes); the same
tensor objects are shared by every graph compiled for the same attention module, so the
prefill graph can reset what the decode graph reads.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx

from .decide import Decision
from .match import AttentionCall

# (call, plan, batch capacity) -> the layer's state tensors, in the ops' order
StateProvider = Callable[[AttentionCall, object, int], list]


def rewrite_calls(
    gm: fx.GraphModule,
    calls: list[AttentionCall],
    decisions: list[Decision],
    make_plan: Callable[[AttentionCall], object],
    state_for: StateProvider,
    max_batch_size: int,
) -> None:
    graph = gm.graph
    selections: dict[int, fx.Node] = {}  # layer -> its select node in this graph (for sharing)
    for index, (call, decision) in enumerate(zip(calls, decisions)):
        if decision.kind == "dense":
            continue
        plan = make_plan(call)
        q_val = call.meta("query")
        batch = q_val.shape[0]
        capacity = batch if isinstance(batch, int) else max_batch_size
        state = state_for(call, plan, capacity)
        scale = call.args["scale"]
        if scale is None:
            scale = 1.0 / math.sqrt(q_val.shape[-1])
        node = call.node
        with graph.inserting_before(node):
            state_nodes = []
            for i, tensor in enumerate(state):
                name = f"_prhs_state_{index}_{i}"
                _register_state_buffer(gm, name, tensor)
                state_nodes.append(graph.get_attr(name))
        q, k, v, mask = call.args["query"], call.key_source, call.value_source, call.args["attn_mask"]
        plan_text = plan.encode()
        if decision.kind == "decode":
            # Cross-layer sharing: the anchor layer's selection of this step, when it was
            # rewritten earlier in this graph (otherwise this layer retrieves for itself).
            shared = selections.get(getattr(plan, "share_from", -1))
            with graph.inserting_before(node):
                idx = graph.call_function(
                    torch.ops.prhs.select.default, (q, k, v, mask, float(scale), plan_text, state_nodes, shared)
                )
                out = graph.call_function(torch.ops.prhs.attend.default, (q, k, v, idx, mask, float(scale)))
            selections[call.layer] = idx
            _replace_sdpa(graph, call, out)
        elif _windowed_prefill(plan):  # PrHS depth axis: prefill inside the recency window
            with graph.inserting_before(node):
                out = graph.call_function(
                    torch.ops.prhs.window_prefill.default,
                    (q, k, v, mask, bool(call.args["is_causal"]), float(scale), plan_text, state_nodes),
                )
            _replace_sdpa(graph, call, out)
        else:  # prefill: keep dense attention, reset the selection state
            with graph.inserting_after(node):
                graph.call_function(
                    torch.ops.prhs.prefill.default,
                    (q, k, mask, bool(call.args["is_causal"]), float(scale), plan_text, state_nodes),
                )
    graph.lint()
    gm.recompile()


def _replace_sdpa(graph: fx.Graph, call: AttentionCall, out: fx.Node) -> None:
    """Route the SDPA node's users to ``out``, then drop it and the repeat_kv it read."""
    node = call.node
    out.meta.update({key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta})
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    _erase_if_unused(graph, call.args["key"])
    _erase_if_unused(graph, call.args["value"])


def _windowed_prefill(plan) -> bool:
    """PrHS layers past the first of the progressive window attend inside it at prefill."""
    return plan.policy == "prhs" and 0 <= plan.psaw_start < plan.layer and plan.num_layers > plan.psaw_start


def _register_state_buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> None:
    """Attach a state tensor to a Dynamo graph so AOTAutograd lifts it as a static input.

    AOTAutograd expects every parameter/buffer of a Dynamo graph to have a Dynamo source
    (it uses them to dedup inputs and to mark static inputs for CUDA graphs). A constant
    source names ours; being static is what lets CUDA graphs update the state in place.
    """
    gm.register_buffer(name, tensor, persistent=False)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"__prhs_state_{id(tensor)}")


def _erase_if_unused(graph: fx.Graph, node) -> None:
    """Remove the peeled ``repeat_kv`` chain (reshape <- expand <- getitem) once unused."""
    while isinstance(node, fx.Node) and not node.users and node.op in ("call_method", "call_function"):
        parent = node.args[0] if node.args else None
        graph.erase_node(node)
        node = parent
