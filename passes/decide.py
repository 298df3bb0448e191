"""Decide, for each attention call, whether it is rewritten and why not when it is not.

A decision is one of
* ``decode``  -> ``prhs.select`` + ``prhs.attend`` replace the SDPA call;
* ``prefill`` -> SDPA stays, and ``prhs.prefill`` resets the layer's selection state;
* ``dense``   -> SDPA stays untouched, with a reason that is logged and shown by ``explain()``.

Every check names what it saw, so a user can tell why a layer stays dense.
"""

from __future__ import annotations

import dataclasses

import torch

from prhs_compile.kernels.rules import get_rule

from .match import AttentionCall

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
# A rolling window cache (see ``match.rolled_in_place``) moves every key each step, so a
# selection cannot be reused there and every step retrieves over the whole window. A step in
# which every slot retrieves is slower than dense SDPA at every shape measured (0.1-0.6x on an
# H200, README "Latency"), so rolling caches of any length stay dense.


@dataclasses.dataclass
class Decision:
    layer: int
    kind: str  # "decode" | "prefill" | "dense"
    reason: str
    module_path: str = ""

    def __str__(self) -> str:
        return f"layer {self.layer}: {self.kind} ({self.reason})"


def decide(call: AttentionCall, config, autograd: bool) -> Decision:
    """``config`` is a ``PrHSConfig`` (its policy, budget and max_decode_query_len matter)."""
    max_decode_query_len = config.max_decode_query_len
    def dense(reason: str) -> Decision:
        return Decision(call.layer, "dense", reason, call.module_path)

    if autograd:
        return dense("autograd is recording (grad mode on and inputs require grad): the select/attend ops have no backward; use torch.no_grad() or inference_mode() for decoding")
    dropout = call.args["dropout_p"]
    if not isinstance(dropout, (int, float)) or dropout != 0:
        return dense(f"dropout_p={dropout}: only dropout-free attention is rewritten")
    scale = call.args["scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        # Dynamo turns a float attribute into a graph input once it has recompiled the same
        # code for a second value (e.g. two models of different head dims in one process).
        return dense(f"scale is a value computed in the graph ({scale}), not a constant: only "
                     "constant scales are rewritten (torch._dynamo.config.specialize_float = True "
                     "keeps float attributes constant)")
    if not isinstance(call.args["is_causal"], bool):
        return dense(f"is_causal={call.args['is_causal']} is not a constant")

    q, k, v = call.meta("query"), call.meta("key_source"), call.meta("value_source")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return dense("query/key/value have no tensor metadata in the graph")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return dense(f"expected 4-D [B, H, T, D] query/key/value, got {q.dim()}-D/{k.dim()}-D/{v.dim()}-D")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return dense(f"dtypes query={q.dtype} key={k.dtype} value={v.dtype}: supported are float32, float16, bfloat16 (all equal)")
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    q_heads, kv_heads = q.shape[1], k.shape[1]
    symbolic = [name for name, size in (("head dim", head_dim), ("value dim", value_dim),
                                        ("query heads", q_heads), ("key/value heads", kv_heads))
                if not isinstance(size, int)]
    if symbolic:
        return dense(f"symbolic {', '.join(symbolic)} (Dynamo made them dynamic after a "
                     "recompile): the kernels need them static")
    if head_dim > MAX_HEAD_DIM or value_dim > MAX_HEAD_DIM:
        return dense(f"head dim {head_dim} / value dim {value_dim}: supported up to {MAX_HEAD_DIM}")
    if q_heads % kv_heads:
        return dense(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    # One key/value head broadcast over every query head (multi-query attention without
    # enable_gqa, e.g. Falcon's multi_query) is GQA with a single group.
    if kv_heads not in (q_heads, 1) and not call.args["enable_gqa"] and not call.peeled_repeat_kv:
        return dense(f"key has {kv_heads} heads for {q_heads} query heads without enable_gqa "
                     "(only 1 head, broadcast, or as many as the query is attention)")
    if any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(k.shape[:3], v.shape[:3])):
        return dense(f"key shape {tuple(k.shape)} and value shape {tuple(v.shape)} disagree")

    mask = call.meta("attn_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            return dense(f"attn_mask of type {type(mask).__name__} is not a tensor")
        if mask.dim() != 4 or not _is_one(mask.shape[1]):
            return dense(f"attn_mask shape {tuple(mask.shape)}: only [B or 1, 1, Tq, L] masks (shared by all heads) are interpreted")
        if mask.dtype != torch.bool and mask.dtype not in SUPPORTED_DTYPES:
            return dense(f"attn_mask dtype {mask.dtype}: only bool or float additive masks are interpreted")

    q_len = q.shape[2]
    is_decode = isinstance(q_len, int) and q_len <= max_decode_query_len
    if not is_decode:
        what = "symbolic" if not isinstance(q_len, int) else str(q_len)
        windowed = config.policy == "prhs" and 0 <= config.psaw_start_layer < call.layer
        how = "attention inside the layer's recency window (PSAW)" if windowed else "dense attention"
        return Decision(call.layer, "prefill", f"query length {what} > max_decode_query_len={max_decode_query_len}: {how}, selection state reset", call.module_path)
    if call.args["is_causal"]:
        return dense(f"is_causal=True with query length {q_len}: a top-left causal mask in a decode step is not a KV-cache decode")
    rule = get_rule(config.policy)
    rule_reason = rule.keeps_dense(config.select_plan(call.layer))
    if rule_reason:
        return dense(rule_reason)
    kv_len, slots = k.shape[2], max(config.budget, config.min_context)
    if rule.needs_static_length and not isinstance(kv_len, int):
        return dense(f"policy {config.policy!r} keeps per-position state and needs a static cache length (cache_implementation='static'); the key length here is symbolic")
    if isinstance(kv_len, int) and kv_len <= slots and not get_rule(config.policy).all_positions:
        # Sliding-window layers (a cache as long as the window) and short static caches:
        # every position would be selected, so SDPA is already the exact, cheapest answer.
        return dense(f"key length {kv_len} <= max(budget, min_context)={slots}: selection would keep every position")
    if call.rolled_cache and not rule.all_positions:
        return dense(f"rolling sliding-window cache of {kv_len} keys: the cache shifts every step, so a selection "
                     "cannot be reused and every step would retrieve over all its keys, which is slower than dense attention")
    return Decision(call.layer, "decode", f"query length {q_len}: select-then-attend", call.module_path)


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1
