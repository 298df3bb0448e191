"""Physical eviction for the one-shot policies (``sage_kv``, ``snapkv``).

A one-shot policy chooses its positions once, from the prompt, and never looks at the other
positions again: every later decode step attends to the sinks, that selection and the most
recent ``local`` positions. The rest of the KV cache is dead weight, and ``evict_kv`` frees
it: it compacts each layer of a Hugging Face ``DynamicCache`` to exactly those positions,
per KV head, in place (the same cache object goes on being passed to the model).

    compiled = torch.compile(model, backend="prhs", options={"policy": "sage_kv", "budget": 256})
    cache = transformers.DynamicCache(config=model.config)
    compiled(input_ids=prompt, past_key_values=cache)        # prefill: SAGE-KV selects
    report = prhs_compile.evict_kv(cache)                     # budget positions per layer left
    compiled(input_ids=next_token, past_key_values=cache)    # decode goes on as before

After eviction each layer holds ``budget`` positions; the recent window keeps rolling (each
update drops the oldest window entry that left it), so the cache stays that size. Decoding
over it is exactly the policy's decode attention: the eager model (dense SDPA) and the
compiled one (the layer now fits the budget, so every position is attended) both give it.

Positions are preserved: keys were rotated at their true positions before they were cached,
the cache reports the true sequence length (so models derive the right ``cache_position``
and rotary angles), and it hands HF's mask builder an offset that maps the stored window to
its true positions (so causal and padding masks stay right). For a chunk of ``q > 1`` new
tokens the window keeps ``local + q - 1`` entries, so no query of the chunk loses any of its
own window (earlier queries of the chunk also see up to ``q - 1`` older positions).

The selection comes from the layer's selection state (``prhs_compile.state``); which state
belongs to which cache layer is checked, not assumed: the state remembers the key of the
newest position it saw, and it must equal that key in the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

log = logging.getLogger("prhs_compile.evict")

# Policies whose decode attention never leaves the prompt selection + sinks + window: only
# for them is dropping the other positions lossless.
ONE_SHOT_POLICIES = ("sage_kv", "snapkv")


@dataclasses.dataclass
class EvictionReport:
    """What ``evict_kv`` did. Bytes count the keys and values the cache holds (all layers)."""

    policy: str
    budget: int
    layers: list[int]
    positions_before: int  # per row and KV head, every layer alike
    positions_after: int
    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        return (f"{self.policy} budget {self.budget}: {len(self.layers)} layers cut from {self.positions_before} "
                f"to {self.positions_after} positions; KV bytes {self.bytes_before:,} -> {self.bytes_after:,} "
                f"({self.bytes_saved:,} freed, {self.bytes_saved / max(self.bytes_before, 1):.1%})")


def evict_kv(cache, attention_mask: torch.Tensor | None = None) -> EvictionReport:
    """Compact ``cache`` (a ``transformers.DynamicCache``) to the positions a ``sage_kv`` or
    ``snapkv`` decode step attends to, after a prefill through the ``prhs`` backend.

    ``attention_mask``: the 2-D ``[batch, length]`` padding mask of the sequence so far, when
    rows are padded (left padding); the sinks are each row's first valid positions. Without
    it every cached position is taken as valid.

    Raises ``ValueError`` when the cache is not a plain dynamic cache, when a layer has no
    matching one-shot selection state (no prefill through a model compiled with
    ``policy="sage_kv"`` or ``"snapkv"``), or when a row's sequence fits the budget (nothing
    to evict). The cache is left untouched when it raises.
    """
    layers = _dynamic_layers(cache)
    plans, selections = [], []
    for index, layer in enumerate(layers):
        plan, kept = _one_shot_selection(index, layer.keys)
        plans.append(plan)
        selections.append(kept)
    first = plans[0]
    for index, plan in enumerate(plans):
        if (plan.policy, plan.budget, plan.sink, plan.local) != (first.policy, first.budget, first.sink, first.local):
            raise ValueError(f"layer {index} was selected with {plan.policy} budget {plan.budget} sink {plan.sink} "
                             f"local {plan.local}, layer 0 with {first.policy} budget {first.budget} sink "
                             f"{first.sink} local {first.local}: evict_kv needs one layout for every layer")
    length = layers[0].keys.shape[2]
    sinks, window = _windows(_valid_positions(attention_mask, layers[0].keys), first)
    positions = [_kept_positions(kept, sinks, window, index) for index, kept in enumerate(selections)]

    before = sum(_nbytes(layer) for layer in layers)
    for index, (layer, where) in enumerate(zip(layers, positions)):
        cache.layers[index] = _compact_layer(layer, where, prefix=first.sink + first.middle, local=first.local,
                                             true_length=length)
    after = sum(_nbytes(layer) for layer in cache.layers)
    report = EvictionReport(first.policy, first.budget, list(range(len(layers))), length, first.budget, before, after)
    log.info("evict_kv: %s", report)
    return report


def _compact_layer(layer, positions: torch.Tensor, prefix: int, local: int, true_length: int):
    """An evicted copy of ``layer`` holding ``positions`` ``[B, Hkv, prefix + local]``."""
    index = positions[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
    compact = evicted_layer_class()()
    compact.lazy_initialization(layer.keys, layer.values)
    compact.keys = layer.keys.gather(2, index)
    compact.values = layer.values.gather(2, index)
    compact.prefix, compact.local, compact.true_length = prefix, local, true_length
    return compact


@functools.cache
def evicted_layer_class() -> type:
    """``EvictedLayer``: a ``transformers`` ``DynamicLayer`` holding ``prefix`` entries (the
    sinks and the one-shot selection) that stay, then a rolling window of the most recent
    positions; it reports the true sequence length and maps its window to true positions for
    the mask builder. (Made on first use: transformers is imported only when needed.)"""
    from transformers.cache_utils import DynamicLayer

    class EvictedLayer(DynamicLayer):
        prefix: int
        local: int
        true_length: int

        def _recent_after(self, query_length: int) -> int:
            """Window entries held once ``query_length`` new tokens are in."""
            recent = self.keys.shape[2] - self.prefix
            return min(recent + query_length, self.local + query_length - 1)

        def update(self, key_states, value_states, *args, **kwargs):
            keep = self._recent_after(key_states.shape[2])
            keys = torch.cat([self.keys, key_states], dim=2)
            values = torch.cat([self.values, value_states], dim=2)
            cut = keys.shape[2] - self.prefix - keep  # entries that left every query's window
            if cut > 0:
                keys = torch.cat([keys[:, :, : self.prefix], keys[:, :, self.prefix + cut :]], dim=2)
                values = torch.cat([values[:, :, : self.prefix], values[:, :, self.prefix + cut :]], dim=2)
            self.keys, self.values = keys, values
            self.true_length += key_states.shape[2]
            return keys, values

        def get_seq_length(self) -> int:
            return self.true_length

        def get_mask_sizes(self, query_length, *args, **kwargs):
            # ``query_length`` is an int in recent transformers, the cache positions before.
            q = query_length if isinstance(query_length, int) else query_length.shape[0]
            kv_length = self.prefix + self._recent_after(q)
            # Stored entry i stands for true position i + offset: exact over the window; the
            # prefix maps below the window's first position, visible to every query.
            return kv_length, self.true_length + q - kv_length

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("an evicted cache layer cannot be cropped: its positions are not contiguous")

    return EvictedLayer


def _dynamic_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"evict_kv needs a transformers DynamicCache, got {type(cache).__name__}")
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError as err:  # pragma: no cover - transformers < 5
        raise ValueError("evict_kv needs transformers >= 5 (cache layers)") from err
    for index, layer in enumerate(layers):
        if type(layer) is evicted_layer_class():
            raise ValueError(f"layer {index} of this cache is already evicted")
        if type(layer) is not DynamicLayer or isinstance(layer, DynamicSlidingWindowLayer):
            raise ValueError(f"layer {index} is a {type(layer).__name__}: evict_kv compacts plain DynamicLayer "
                             "caches (not static, sliding-window, quantized or offloaded ones)")
        if not layer.is_initialized or layer.keys.numel() == 0:
            raise ValueError(f"layer {index} of the cache is empty: run the prefill first")
    return list(layers)


def _one_shot_selection(index: int, keys: torch.Tensor):
    """The plan and stored selection ``[B, Hkv, middle]`` of the one-shot state built on
    this layer's keys (its newest-key fingerprint matches), or ``ValueError``."""
    from prhs_compile.kernels import state_spec
    from prhs_compile.kernels.selection import keys_at
    from prhs_compile.state import all_states

    batch = keys.shape[0]
    found, other_policies = [], set()
    for plan, tensors in all_states():
        if plan.layer != index:
            continue
        if plan.policy not in ONE_SHOT_POLICIES:
            other_policies.add(plan.policy)
            continue
        st = dict(zip(state_spec(plan, 1, 1, 1, 1), tensors))
        if st["pos"].shape[0] < batch or st["kept"].shape[1] != keys.shape[1]:
            continue
        pos = st["pos"][:batch]
        if bool((pos != keys.shape[2] - 1).any()):
            continue
        newest = keys_at(keys, pos.to(keys.device))[:, 0]  # how the state fingerprints a key
        if torch.equal(newest, st["fingerprint"][:batch].to(newest.device)):
            found.append((plan, st))
    if not found:
        seen = f" (states of policies {sorted(other_policies)} exist: their selections change every step, so " \
               "dropping positions would change their answers)" if other_policies else ""
        raise ValueError(f"no {' or '.join(ONE_SHOT_POLICIES)} selection state matches layer {index} of this cache"
                         f"{seen}: run the prefill through a model compiled with backend='prhs' and "
                         f"options policy in {ONE_SHOT_POLICIES}, on this cache, right before evict_kv")
    if len(found) > 1:
        raise ValueError(f"{len(found)} one-shot selection states match layer {index} of this cache (the same "
                         "prompt through several compiled models): call prhs_compile.clear_states() and run the "
                         "prefill once more")
    plan, st = found[0]
    if plan.head_budgets:
        raise ValueError(f"layer {index}: per-head budgets (head_budgets) give KV heads different sizes; "
                         "evict_kv needs one size for every head")
    if bool((st["ready"][:batch] <= 0).any()):
        raise ValueError(f"layer {index}: the selection state holds no selection for this sequence yet")
    return plan, st["kept"][:batch].to(keys.device).long()


def _valid_positions(attention_mask, keys) -> torch.Tensor:
    """``[B, L]`` bool: which cached positions hold tokens (not padding)."""
    batch, length = keys.shape[0], keys.shape[2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=keys.device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be the 2-D [batch, length] = [{batch}, {length}] padding mask of "
                         f"the cached sequence, got shape {tuple(attention_mask.shape)}")
    return attention_mask.to(keys.device).bool()


def _windows(valid, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first ``sink`` valid positions ``[B, sink]`` and last ``local`` positions
    ``[B, local]`` (the same for every layer), after checking that the rows exceed the
    budget and are padded on the left only."""
    batch, length = valid.shape
    count = valid.sum(-1).tolist()
    for row in range(batch):
        if count[row] <= plan.budget:
            raise ValueError(f"row {row} holds {count[row]} valid positions, within the budget "
                             f"{plan.budget}: every position is attended, nothing to evict")
    if plan.local and not bool(valid[:, length - plan.local:].all()):
        raise ValueError("the last local positions of a row are padding: evict_kv supports left padding only")
    rank = valid.long().cumsum(-1) - 1
    positions = torch.arange(length, device=valid.device).expand(batch, -1)
    return positions[valid & (rank < plan.sink)].view(batch, plan.sink), positions[:, length - plan.local:]


def _kept_positions(kept, sinks, window, index: int) -> torch.Tensor:
    """``[B, Hkv, budget]`` positions: the sinks, the layer's stored selection in position
    order, the window."""
    if bool((kept < 0).any()):
        raise ValueError(f"layer {index}: the stored selection has empty slots (a row fit its budget when it "
                         "selected): nothing to evict")
    heads = kept.shape[1]
    parts = [sinks[:, None].expand(-1, heads, -1), kept.sort(-1).values, window[:, None].expand(-1, heads, -1)]
    return torch.cat(parts, dim=-1)


def _nbytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
