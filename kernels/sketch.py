"""Key sketches: stage one of two-stage retrieval one bit per channel (``retrieval="sketch"``), in torch.

A sketch keeps, per (row, KV head), one bit per channel of every cached key: whether the
key lies above the channel's centre, the mean of the prompt's valid keys. Beside the bits it
keeps the centre and each channel's mean absolute deviation around it (``scale``). With
``s_d = +-1`` a key's bits, ``centre + scale * s`` is a one-bit reconstruction of the key,
and the group's summed logit over it is, up to a constant of the row,

    sum_d  w_d * s_d,    w_d = scale_d * sum over the group's query rows of q_d.

Stage one ranks the retrievable positions by that estimate and keeps the best
``candidates x budget`` of them; stage two scores those exactly (``pages.two_stage_mass``),
as after the page summaries' stage one. Memory: ``D / 8`` bytes per position and KV head,
1/16 of a bf16 K (the page summaries take ``2 / page_size`` of it, 1/8 at pages of 16), for
the first ``max(max_cache_len, L0)`` positions (``L0`` as for the summaries, see ``pages``).

Why: Quest's min/max box bounds a page of wide keys loosely. On Gemma 3 270M (head dim 256,
4K contexts, budget 256, four budgets of candidates) stage one over page summaries left 49%
of the exact top-k out of the candidates and lost 0.081 of attention mass against it; even
pages ranked by their true mass lost 0.011; positions ranked by the sketch left 14% out and
lost 0.008, from half the bytes (``scripts/stage_one_recall.py``, README "Two-stage retrieval").

* **Prefill** computes the centre and scale over the prompt's valid keys and the bits of its
  positions; positions past it are zero (never read: not valid).
* **Each decode step** writes the bits of the step's new keys (against the stored centre);
  a row that does not continue the state's sequence is rebuilt from its cache (new centre).
* Positions past the sketch's capacity are sketched from the cache at each step (correct,
  slower, logged once per layer).
"""

from __future__ import annotations

import logging

import torch

from .plan import SelectPlan
from .selection import ranked_topk

SKETCH_BITS, SKETCH_CENTRE, SKETCH_SCALE = "sketch_bits", "sketch_centre", "sketch_scale"
log = logging.getLogger("prhs")
_warned_capacity: set[int] = set()  # layers whose cache outgrew the sketch (logged once)


def uses_sketch(plan: SelectPlan) -> bool:
    return plan.retrieval == "sketch"


def words(head_dim: int) -> int:
    """int32 words holding one bit per channel."""
    return -(-head_dim // 32)


def capacity(plan: SelectPlan, cache_len: int = 0) -> int:
    """Positions the sketch holds per (row, KV head) (``pages.capacity``'s rule, in positions)."""
    return max(plan.max_cache_len, cache_len)


def sketch_spec(plan: SelectPlan, batch: int, kv_heads: int, head_dim: int, cache_len: int = 0) -> dict:
    """The sketch's tensors of the state spec: bits ``[Bc, Hkv, capacity, words]`` int32,
    centre and scale ``[Bc, Hkv, D]`` fp32."""
    return {
        SKETCH_BITS: ((batch, kv_heads, capacity(plan, cache_len), words(head_dim)), torch.int32, 0),
        SKETCH_CENTRE: ((batch, kv_heads, head_dim), torch.float32, 0.0),
        SKETCH_SCALE: ((batch, kv_heads, head_dim), torch.float32, 0.0),
    }


def channel_stats(k: torch.Tensor, valid: torch.Tensor):
    """``(centre, scale)`` ``[B, Hkv, D]`` fp32: the mean of each channel over the valid keys
    and the mean absolute deviation around it (0 for a row without valid keys)."""
    weight = valid[:, None, :, None].float()
    count = weight.sum(2).clamp_min(1.0)
    keys = k.float()
    centre = (keys * weight).sum(2) / count
    scale = ((keys - centre[:, :, None]).abs() * weight).sum(2) / count
    return centre, scale


def pack_bits(k: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, L, D]`` keys -> ``[B, Hkv, L, words]`` int32: bit ``d % 32`` of word
    ``d // 32`` is set where channel d lies above the centre."""
    dim = k.shape[-1]
    above = k.float() > centre[:, :, None]
    above = torch.nn.functional.pad(above, (0, words(dim) * 32 - dim)).unflatten(-1, (words(dim), 32))
    shifts = torch.arange(32, device=k.device)
    packed = (above.long() << shifts).sum(-1)  # in [0, 2^32)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def signs(bits: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[..., words]`` int32 -> ``[..., D]`` fp32 of +1 (bit set) and -1."""
    shifts = torch.arange(32, device=bits.device)
    set_bits = (bits.long()[..., None] >> shifts) & 1  # [..., words, 32]
    return (set_bits.flatten(-2)[..., :head_dim] * 2 - 1).float()


def build_sketch(state: dict, k: torch.Tensor, valid: torch.Tensor, plan: SelectPlan) -> None:
    """A new sequence (prefill): the prompt's centre, scale and bits; other positions zero."""
    batch, length = k.shape[0], k.shape[2]
    bits = state[SKETCH_BITS][:batch]
    centre, scale = channel_stats(k, valid)
    state[SKETCH_CENTRE][:batch].copy_(centre)
    state[SKETCH_SCALE][:batch].copy_(scale)
    held = min(length, bits.shape[2])
    bits.zero_()
    bits[:, :, :held].copy_(pack_bits(k[:, :, :held], centre))


def maintain_sketch(state: dict, k: torch.Tensor, valid: torch.Tensor, old_newest: torch.Tensor,
                    continuing: torch.Tensor, plan: SelectPlan) -> None:
    """One decode step: a row that continues writes the bits of its keys after
    ``old_newest`` (the newest position the state had seen); a row that does not continue is
    rebuilt (centre, scale and every position's bits) from its cache."""
    batch, length = k.shape[0], k.shape[2]
    bits = state[SKETCH_BITS][:batch]
    centre, scale = state[SKETCH_CENTRE][:batch], state[SKETCH_SCALE][:batch]
    fresh_centre, fresh_scale = channel_stats(k, valid)
    rebuild = ~continuing[:, None, None]
    centre.copy_(torch.where(rebuild, fresh_centre, centre))
    scale.copy_(torch.where(rebuild, fresh_scale, scale))
    held = min(length, bits.shape[2])
    positions = torch.arange(held, device=k.device)
    write = (positions[None, :] > old_newest[:, None]) | ~continuing[:, None]  # [B, held]
    fresh = pack_bits(k[:, :, :held], centre)
    bits[:, :, :held].copy_(torch.where(write[:, None, :, None], fresh, bits[:, :, :held]))


def sketch_bits(state: dict, k: torch.Tensor, plan: SelectPlan) -> torch.Tensor:
    """``[B, Hkv, L, words]``: the stored bits, and those of positions past the capacity
    computed from the cache (logged once per layer)."""
    batch, length = k.shape[0], k.shape[2]
    bits = state[SKETCH_BITS][:batch]
    stored = bits.shape[2]
    if length <= stored:
        return bits[:, :, :length]
    if plan.layer not in _warned_capacity:
        _warned_capacity.add(plan.layer)
        log.warning("prhs: layer %d's cache holds %d positions, more than the %d its key sketch covers: "
                    "positions past them are sketched from the cache at every step (raise "
                    "max_cache_len, now %d)", plan.layer, length, stored, plan.max_cache_len)
    rest = pack_bits(k[:, :, stored:], state[SKETCH_CENTRE][:batch])
    return torch.cat([bits, rest], 2)


def sketch_scores(q: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stage one's estimate ``[B, Hkv, L]`` fp32 of each key's logit summed over the group's
    query rows (before the softmax scale, up to a constant per slot). ``q`` [B, Hq, Tq, D],
    ``bits`` [B, Hkv, L, words], ``scale`` [B, Hkv, D]."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads = bits.shape[1]
    summed = q.float().reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, dim).sum(2)
    weight = summed * scale  # [B, Hkv, D]
    return torch.einsum("bhd,bhld->bhl", weight, signs(bits, dim))


def best_positions(plan: SelectPlan, view, state: dict, region: torch.Tensor) -> torch.Tensor:
    """Stage one: ``[B, Hkv, L]`` the ``candidates x budget`` retrievable positions of each
    slot with the highest sketch score (ties to the lower position)."""
    budget = max(plan.head_budget_list or (plan.budget,))
    count = min(plan.candidates * budget, view.kv_len)
    bits = sketch_bits(state, view.k, plan)
    score = sketch_scores(view.q, bits, state[SKETCH_SCALE][: view.batch])
    score = score.masked_fill(~region[:, None, :], float("-inf"))
    top = ranked_topk(score, count)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
