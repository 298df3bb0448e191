"""Find the attention calls of a Dynamo-level FX graph and describe them.

Dynamo records every ``F.scaled_dot_product_attention`` call of an HF decoder as one
``torch._C._nn.scaled_dot_product_attention`` node. This module normalises each call's
arguments, finds which layer it belongs to, and looks through HF's ``repeat_kv`` (GQA
expansion by ``x[:, :, None].expand(...).reshape(...)``), which Inductor would otherwise turn
into a full copy of the KV cache on every decode step.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.fx as fx

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclasses.dataclass
class AttentionCall:
    """One SDPA node and what the rewrite needs to know about it."""

    node: fx.Node
    args: dict  # normalised SDPA arguments (fx.Node or Python values)
    layer: int  # decoder layer index (from the module path), or call order as a fallback
    module_path: str  # e.g. "L['self'].model.layers.3.self_attn" ("" when unknown)
    module_key: str  # identifies the attention module object across graphs of one model
    key_source: fx.Node  # raw KV-head key tensor (repeat_kv peeled) or the SDPA key itself
    value_source: fx.Node
    peeled_repeat_kv: bool
    rolled_cache: bool = False  # the key cache is overwritten by a roll of itself in this graph
    cache_len: int = 0  # longest static length of the key cache behind key_source (0: symbolic)

    def meta(self, name: str):
        """Example value (usually a FakeTensor) of an argument, or None."""
        value = {"key_source": self.key_source, "value_source": self.value_source}.get(name, self.args.get(name))
        return value.meta.get("example_value") if isinstance(value, fx.Node) else value


def normalise_sdpa_args(node: fx.Node) -> dict:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def find_attention_calls(gm: fx.GraphModule) -> list[AttentionCall]:
    calls = []
    for order, node in enumerate(n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS):
        args = normalise_sdpa_args(node)
        path, key = _attention_module(node)
        layer = _layer_index(path)
        k_src, k_peeled = peel_repeat_kv(args["key"])
        v_src, v_peeled = peel_repeat_kv(args["value"])
        peeled = k_peeled and v_peeled
        calls.append(
            AttentionCall(
                node=node,
                args=args,
                layer=order if layer is None else layer,
                module_path=path,
                module_key=key or f"{gm.__class__.__name__}:{path or order}",
                key_source=k_src if peeled else args["key"],
                value_source=v_src if peeled else args["value"],
                peeled_repeat_kv=peeled,
                rolled_cache=rolled_in_place(k_src if peeled else args["key"]),
                cache_len=cache_length(k_src if peeled else args["key"]),
            )
        )
    return calls


def cache_length(key) -> int:
    """The longest static length (dim 2) of the key tensor and of what it was sliced from.

    HF's ``sdpa_attention_forward`` slices an empty static cache down to the prompt for the
    prefill (``key[:, :, :q_length]``); the whole cache's length is what selection state sized
    at the prefill must cover. 0 when no length is static."""
    longest, node = 0, key
    while isinstance(node, fx.Node):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dim() == 4 and isinstance(value.shape[2], int):
            longest = max(longest, value.shape[2])
        index = node.args[1] if node.op == "call_function" and node.target is operator.getitem else None
        if not (isinstance(index, tuple) and all(isinstance(i, slice) for i in index)):
            break
        node = node.args[0]
    return longest


def rolled_in_place(cache) -> bool:
    """Whether the graph writes ``cache.roll(...)`` back into ``cache`` (``cache.copy_(roll)``).

    HF's static sliding-window layer (``StaticSlidingWindowLayer``) does this at every decode
    step once its window is full: every key moves one slot to the left, so a position's cache
    index changes from step to step and no selection keyed by index survives a step."""
    if not isinstance(cache, fx.Node):
        return False
    for user in cache.users:
        if _is_method_or_fn(user, "copy_", None) and user.args and user.args[0] is cache and len(user.args) > 1:
            source = user.args[1]
            if isinstance(source, fx.Node) and _is_method_or_fn(source, "roll", torch.roll) and source.args[0] is cache:
                return True
    return False


def _attention_module(node: fx.Node) -> tuple[str, str]:
    """Path and key of the innermost module that made this call (Dynamo's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    key, (path, _cls) = list(stack.items())[-1]
    return str(path), str(key)


def _layer_index(path: str) -> int | None:
    """The last integer component of a module path: ``...layers.12.self_attn`` -> 12."""
    numbers = re.findall(r"[.\[](\d+)[.\]]", path + ".")
    return int(numbers[-1]) if numbers else None


def peel_repeat_kv(node) -> tuple[object, bool]:
    """Return (raw KV tensor node, True) when ``node`` is HF's ``repeat_kv`` of it.

    Matches ``x[:, :, None, :, :].expand(B, Hkv, n_rep, L, D).reshape(B, Hkv*n_rep, L, D)``
    (``unsqueeze(2)`` in place of the indexing works too), checking shapes on the example
    values so a different reshape is never mistaken for GQA expansion.
    """
    if not isinstance(node, fx.Node) or not _is_method_or_fn(node, "reshape", torch.reshape):
        return node, False
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or not _is_method_or_fn(expand, "expand", None):
        return node, False
    unsq = expand.args[0]
    if not isinstance(unsq, fx.Node):
        return node, False
    if unsq.op == "call_function" and unsq.target is operator.getitem:
        index = unsq.args[1]
        full = slice(None, None, None)
        if not (isinstance(index, tuple) and index == (full, full, None, full, full)):
            return node, False
    elif not (_is_method_or_fn(unsq, "unsqueeze", torch.unsqueeze) and tuple(unsq.args[1:]) in ((2,), (-3,))):
        return node, False
    source = unsq.args[0]
    src_val = source.meta.get("example_value") if isinstance(source, fx.Node) else None
    out_val = node.meta.get("example_value")
    if src_val is None or out_val is None or src_val.dim() != 4 or out_val.dim() != 4:
        return node, False
    b, hkv, length, dim = src_val.shape
    ob, oh, olen, odim = out_val.shape
    same = all(_same(x, y) for x, y in ((b, ob), (length, olen), (dim, odim)))
    if not same or not isinstance(hkv, int) or not isinstance(oh, int) or oh % hkv:
        return node, False
    return source, True


def _is_method_or_fn(node: fx.Node, method: str, fn) -> bool:
    if node.op == "call_method":
        return node.target == method
    return fn is not None and node.op == "call_function" and node.target is fn


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an undecidable symbolic comparison is not a match
        return False


