"""Page summaries and two-stage retrieval (``retrieval="pages"``), in torch.

A page is ``page_size`` consecutive cache positions. Its summary, per (row, KV head), is the
channel-wise min and max of its valid keys, kept in the selection state in the cache's dtype
(min and max of bf16 values are bf16 values: nothing is rounded) for the first
``capacity = ceil(max(max_cache_len, L0) / page_size)`` pages, ``L0`` the cache length of the
first graph compiled for the layer (a static cache's whole length): ``2 / page_size`` of K's bytes. An empty
page holds ``+inf`` / ``-inf``.

* **Prefill** writes the summaries of the whole prompt (``build_summaries``); every other
  page is emptied, so a new sequence never sees the previous one's keys.
* **Each decode step** recomputes the pages the step's new keys land in, and the page of the
  oldest valid key (``maintain_summaries``); a row that does not continue the state's
  sequence (new prompt, position jump, reordered beams, changed batch) is rebuilt from its
  cache instead.
* **Two-stage retrieval** (``two_stage_mass``): stage one scores every page holding a
  retrievable position by Quest's upper bound ``sum_d max(q_d * min_d, q_d * max_d)``, summed
  over the GQA group's query rows, and keeps the best ``candidate_pages`` of them; stage two
  scores the candidates' positions exactly. The attention it ranks by is a softmax over the
  positions it read (the candidates plus the sink and local windows), summed over the group.
  With every page a candidate and no recency window (PSAW) excluding positions, that is the
  exact retrieval's group mass, so both pick the same set.

Pages past the summaries' capacity (a dynamic cache that outgrew ``max_cache_len``) are
summarised from the cache at each step, so selection stays correct there, only slower; the op logs it once.

The same functions keep the state on every device: they are torch code, shared by the
reference and the CUDA step (which compiles them into its glue).
"""

from __future__ import annotations

import logging
import math

import torch

from . import sketch
from .plan import SelectPlan
from .selection import ranked_topk

PAGE_MIN, PAGE_MAX = "page_min", "page_max"
log = logging.getLogger("prhs")
_warned_capacity: set[int] = set()  # layers whose cache outgrew the summaries (logged once)


def uses_pages(plan: SelectPlan) -> bool:
    """Whether this plan keeps page summaries in its selection state: two-stage retrieval,
    or a rule that selects whole pages (``quest``, stage one alone)."""
    from .rules import get_rule  # the rules import this module

    return plan.retrieval == "pages" or get_rule(plan.policy).selects_pages


def capacity(plan: SelectPlan, cache_len: int = 0) -> int:
    """Pages the summaries hold per (row, KV head): enough for ``max_cache_len`` positions,
    or for ``cache_len`` (a static cache's length, known when the state is made) if longer."""
    return math.ceil(max(plan.max_cache_len, cache_len) / plan.page_size)


def summary_spec(plan: SelectPlan, batch: int, kv_heads: int, head_dim: int, key_dtype,
                 cache_len: int = 0) -> dict:
    """The two summary tensors of the state spec: ``[Bc, Hkv, capacity, D]`` each."""
    shape = (batch, kv_heads, capacity(plan, cache_len), head_dim)
    return {PAGE_MIN: (shape, key_dtype, float("inf")), PAGE_MAX: (shape, key_dtype, float("-inf"))}


def summaries_of(k: torch.Tensor, valid: torch.Tensor, page_size: int, pages: int):
    """From scratch: min and max of the valid keys of each of the first ``pages`` pages.

    ``k`` [B, Hkv, L, D], ``valid`` [B, L]. Returns two ``[B, Hkv, pages, D]`` tensors in k's
    dtype (``+inf`` / ``-inf`` for pages without a valid key, or past the cache)."""
    batch, heads, length, dim = k.shape
    held = min(pages, -(-length // page_size))  # pages that hold cache positions
    span = held * page_size
    keys = k[:, :, :span]
    inside = valid[:, :span]
    if span > length:  # the last page reaches past the cache: pad it empty
        keys = torch.nn.functional.pad(keys, (0, 0, 0, span - length))
        inside = torch.nn.functional.pad(inside, (0, span - length))
    inside = inside[:, None, :, None]
    low = keys.masked_fill(~inside, float("inf")).unflatten(2, (held, page_size)).amin(3)
    high = keys.masked_fill(~inside, float("-inf")).unflatten(2, (held, page_size)).amax(3)
    if held < pages:  # pages past the cache are empty (no padded copy of K for them)
        empty = low.new_full((batch, heads, pages - held, dim), float("inf"))
        low, high = torch.cat([low, empty], 2), torch.cat([high, -empty], 2)
    return low, high


def build_summaries(state: dict, k: torch.Tensor, valid: torch.Tensor, plan: SelectPlan) -> None:
    """A new sequence (prefill): the summaries of its valid keys, every other page empty."""
    low, high = state[PAGE_MIN][: k.shape[0]], state[PAGE_MAX][: k.shape[0]]
    fresh_low, fresh_high = summaries_of(k, valid, plan.page_size, low.shape[2])
    low.copy_(fresh_low)
    high.copy_(fresh_high)


def maintain_summaries(state: dict, k: torch.Tensor, valid: torch.Tensor, old_newest: torch.Tensor,
                       continuing: torch.Tensor, plan: SelectPlan) -> None:
    """One decode step. A row that continues recomputes the pages its new keys (after
    ``old_newest``, the newest position the state had seen) land in, and the page of its
    oldest valid key (a sliding window drops keys there); every other page keeps its summary.
    A row that does not continue is rebuilt.

    Pages wholly before the oldest valid key keep what they held (no position there is ever
    retrievable, so they are never candidates); every page holding a valid key equals a
    from-scratch summary. The reference computes every page and keeps the refreshed ones;
    the Triton step computes only those."""
    batch, length = k.shape[0], k.shape[2]
    low, high = state[PAGE_MIN][:batch], state[PAGE_MAX][:batch]
    pages, size = low.shape[2], plan.page_size
    positions = torch.arange(length, device=k.device)
    oldest = torch.where(valid, positions, length).amin(-1)  # [B] (length: no valid key)
    touched = valid & ((positions[None, :] > old_newest[:, None]) | (positions[None, :] == oldest[:, None]))
    span = pages * size
    touched = torch.nn.functional.pad(touched, (0, max(0, span - length)))[:, :span]
    refresh = touched.unflatten(1, (pages, size)).any(-1) | ~continuing[:, None]  # [B, pages]
    fresh_low, fresh_high = summaries_of(k, valid, size, pages)
    refresh = refresh[:, None, :, None]
    low.copy_(torch.where(refresh, fresh_low, low))
    high.copy_(torch.where(refresh, fresh_high, high))


def page_summaries(state: dict, k: torch.Tensor, valid: torch.Tensor, plan: SelectPlan, layer: int):
    """Summaries of every page of the cache: the stored ones, and pages past the stored
    capacity computed from the cache (logged once per layer)."""
    batch, length = k.shape[0], k.shape[2]
    pages = math.ceil(length / plan.page_size)
    low, high = state[PAGE_MIN][:batch], state[PAGE_MAX][:batch]
    stored = low.shape[2]
    if pages <= stored:
        return low[:, :, :pages], high[:, :, :pages]
    if layer not in _warned_capacity:
        _warned_capacity.add(layer)
        log.warning("prhs: layer %d's cache holds %d positions, more than the %d its page summaries "
                    "cover: pages past them are summarised from the cache at every step (raise "
                    "max_cache_len, now %d)", layer, length, stored * plan.page_size, plan.max_cache_len)
    start = stored * plan.page_size
    rest_low, rest_high = summaries_of(k[:, :, start:], valid[:, start:], plan.page_size, pages - stored)
    return torch.cat([low, rest_low], 2), torch.cat([high, rest_high], 2)


def page_bounds(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Quest's score of each page: ``sum_rows sum_d max(q_d * min_d, q_d * max_d)`` over the
    group's query rows, an upper bound of the sum of their logits (before scaling) for any
    key in the page. ``q`` [B, Hq, Tq, D], ``low``/``high`` [B, Hkv, pages, D]; returns fp32
    ``[B, Hkv, pages]`` (non-finite for empty pages: mask them)."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads = low.shape[1]
    rows = q.float().reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, dim)
    # max(q*min, q*max) is q*max where q >= 0 and q*min elsewhere (max >= min), so the sum
    # over rows is linear in the summaries: one pass over them, no [rows, pages, D] product.
    q_pos, q_neg = rows.clamp_min(0).sum(2), rows.clamp_max(0).sum(2)  # [B, Hkv, D]
    return (torch.einsum("bhpd,bhd->bhp", high.float(), q_pos)
            + torch.einsum("bhpd,bhd->bhp", low.float(), q_neg))


def candidate_pages(plan: SelectPlan) -> int:
    """Pages stage one keeps: those holding ``candidates`` x the budget (the largest per-head
    budget with LU-KV's) positions."""
    budget = max(plan.head_budget_list or (plan.budget,))
    return math.ceil(plan.candidates * budget / plan.page_size)


def best_pages(plan: SelectPlan, view, state: dict, region: torch.Tensor, count: int) -> torch.Tensor:
    """Stage one: ``[B, Hkv, L]`` the retrievable positions of each slot's ``count`` pages of
    highest bound (ties to the lower page)."""
    length, size = view.kv_len, plan.page_size
    low, high = page_summaries(state, view.k, view.valid, plan, plan.layer)
    pages = low.shape[2]
    pad = pages * size - length
    pickable = torch.nn.functional.pad(region, (0, pad)).unflatten(1, (pages, size)).any(-1)  # [B, pages]
    score = page_bounds(view.q, low, high).masked_fill(~pickable[:, None, :], float("-inf"))
    top = ranked_topk(score, min(count, pages))
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
    return chosen.repeat_interleave(size, dim=-1)[..., :length] & region[:, None, :]


def stage_one(plan: SelectPlan, view, state: dict, region: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, L]`` the candidates of a two-stage retrieval: the positions of the best
    pages by their summaries (``retrieval="pages"``), or the best positions by their key
    sketch (``retrieval="sketch"``, ``sketch.py``)."""
    if sketch.uses_sketch(plan):
        return sketch.best_positions(plan, view, state, region)
    return best_pages(plan, view, state, region, candidate_pages(plan))


def two_stage_mass(plan: SelectPlan, view, state: dict, region: torch.Tensor):
    """``(mass, candidates)``: the group's attention mass over the positions a two-stage
    retrieval reads (``[B, Hkv, L]``, 0 elsewhere), and the candidate positions it may pick
    from (``[B, Hkv, L]``)."""
    candidates = stage_one(plan, view, state, region)
    read = candidates | view.windows(plan)[:, None, :]  # [B, Hkv, L]
    b, hkv, group, q_len, dim = view.batch, view.kv_heads, view.group, view.q_len, view.head_dim
    qg = view.q.float().reshape(b, hkv, group, q_len, dim)
    logits = torch.einsum("bhgtd,bhld->bhgtl", qg, view.k.float()) * view.scale
    if view.row_bias is not None:
        logits = logits + view.row_bias[:, None, None]
    logits = logits.masked_fill(~read[:, :, None, None, :], float("-inf"))
    mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=(2, 3))
    return mass, candidates


def retrieve(plan: SelectPlan, view, state: dict, region: torch.Tensor, pick):
    """A retrieval's picks, and the group's attention mass over the whole context
    (``[B, Hkv, L]``) where it is known, exact or two-stage.

    ``pick(mass, pickable)`` is the rule's own choice of positions (top-k, dilation) from a
    mass ``[B, Hkv, L]`` over pickable positions (``[B, L]`` or ``[B, Hkv, L]``). A two-stage
    retrieval ranks by a softmax over the positions it reads, which sums to 1 there and so
    overstates what its picks keep of the whole context: the mass it returns is the exact one
    in verify mode (which then also leaves on ``view`` what the exact retrieval would have
    picked, for ``select_reference._verify_record``), and the two-stage one otherwise (only
    the reuse bound reads it, and outside verify mode only ``delta_target`` does, which
    two-stage retrieval refuses)."""
    if plan.retrieval == "exact":
        mass = view.group_mass()
        return pick(mass, region), mass
    mass, candidates = two_stage_mass(plan, view, state, region)
    picked = pick(mass, candidates)
    if plan.verify:
        mass = view.group_mass()
        view.two_stage = {"candidates": candidates, "exact": pick(mass, region)}
    return picked, mass
