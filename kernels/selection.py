"""What every selection rule shares: the base class and the selection helpers.

A policy is *data plus a selection rule*: the rule declares the per-layer state it needs
(``state_spec``), says which positions to keep at a decode step (``choose``), and how to
(re)start at a prefill (``on_prefill``). Everything rules share (the valid region, the sink
and local windows, state validity across steps, the index layout, the counters) lives in
``select_reference.py``; the helpers here pick positions from scores. A new policy is a small
class (``rules_basic.py``, ``rule_prhs.py``, ``rules_baselines.py``), not a fork of the
pipeline.

Rules see a :class:`~kernels.select_reference.StepView` and return a boolean keep-mask
``[B, Hkv, L]`` plus a boolean ``[B, Hkv]`` saying which (row, KV head) slots ran a retrieval
(read the keys to score them) this step. They only have to be right for rows with more valid
positions than the budget; rows that fit entirely are kept whole by the caller.
"""

from __future__ import annotations

import torch

from .plan import SelectPlan


class SelectionRule:
    """Base class. Subclasses set ``name`` and override what they need."""

    name: str = ""
    #: True when ``select`` returns one slot per cache position (``dense``).
    all_positions: bool = False
    #: True when the rule keeps per-position state, sized by a static cache length.
    needs_static_length: bool = False
    #: Which step of the CUDA select engine runs this rule (``select_step_triton.STEPS``):
    #: ``"gated"`` (gate, gated one-pass retrieval, radix top-k with dilation), ``"exact"``
    #: (the same retrieval and top-k for every slot, every step), ``"one_shot"`` (a stored
    #: prompt selection; a retrieval only for slots without one), ``"windows"`` (sinks and
    #: recent window only), ``"pages"``, ``"heavy_hitters"``, ``"labels"`` (the policy's own
    #: scorer); None: the torch reference runs it on every device.
    cuda_step: str | None = None
    #: True when that step applies per-KV-head budgets (``head_budgets``) itself.
    cuda_head_budgets: bool = False
    #: True when the rule retrieves only inside PrHS's progressive recency window (PSAW).
    recency_window: bool = False
    #: True when its retrievals may be two-stage (``retrieval="pages"``, ``pages.retrieve``).
    two_stage: bool = False
    #: True when it selects whole pages from the page summaries (``pages.best_pages``).
    selects_pages: bool = False

    def local_window(self, plan: SelectPlan) -> int:
        """The most recent valid positions always kept."""
        return plan.local

    def state_spec(self, plan: SelectPlan, batch: int, q_heads: int, kv_heads: int, head_dim: int):
        """Extra state tensors: ``{name: (shape, dtype, fill)}``, in a fixed order."""
        return {}

    def choose(self, plan: SelectPlan, view, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def on_prefill(self, plan: SelectPlan, view, state: dict, tail) -> None:
        """Forget whatever the previous sequence left behind. ``tail(rows)`` gives a view of
        the prompt's last ``rows`` queries, for rules that select once from the prompt."""

    def keeps_dense(self, plan: SelectPlan) -> str | None:
        """A reason this rule leaves the layer dense (checked when the graph is rewritten)."""
        return None

    #: False for rules that keep only sinks and windows (they need no room to retrieve).
    retrieves: bool = True

    def validate(self, plan: SelectPlan) -> str | None:
        """A reason why ``plan`` cannot work with this rule, or None."""
        if self.retrieves and not self.all_positions and plan.middle <= 0:
            return (
                f"sink + local = {plan.sink + plan.local} leaves no room for retrieved "
                f"positions in budget={plan.budget}"
            )
        return None


def retrieval_region(plan: SelectPlan, view) -> torch.Tensor:
    """``[B, L]`` positions a retrieval may pick: valid, outside the windows, and inside the
    layer's progressive recency window (PSAW) when that selector is on."""
    region = view.valid & ~view.windows(plan)
    excluded = plan.psaw_excluded(view.count)  # [B] oldest non-sink positions left out
    if plan.psaw_start >= 0:
        region = region & ((view.rank < plan.sink) | (view.rank >= (plan.sink + excluded)[:, None]))
    return region


def dilate_and_pick(mass: torch.Tensor, region: torch.Tensor, plan: SelectPlan, dilate: bool = True) -> torch.Tensor:
    """Top positions by group mass, each of the best ``m`` pulling in its +-r neighbours.

    ``mass`` [B, Hkv, L], ``region`` [B, L] (or per KV head, [B, Hkv, L]). Returns a keep-mask [B, Hkv, L] of at most
    ``plan.middle`` positions: first the top ``m`` and their neighbours (best first, should
    they not all fit), then the next best. With ``dilate=False``, ``dilation_m == 0`` or
    ``dilation_r == 0`` this is exactly the top-k.
    """
    length = mass.shape[-1]
    k = min(plan.middle, length)
    if region.dim() == 2:
        region = region[:, None, :]
    score = mass.masked_fill(~region, float("-inf"))
    radius = plan.dilation_r
    m = plan.dilation_m if plan.dilation_m >= 0 else k // (2 * radius + 1)
    caps = head_caps(plan, k, mass.device)
    if not (dilate and m > 0 and radius > 0):
        top = ranked_topk(score, k)
        rank = torch.arange(k, device=mass.device)
        return scatter_keep(top.indices, (top.values > float("-inf")) & (rank < caps), length)
    cores = ranked_topk(score, min(m, length))
    offsets = torch.arange(-radius, radius + 1, device=mass.device)
    neighbours = (cores.indices[..., None] + offsets).clamp(0, length - 1).flatten(-2)
    core_ok = (cores.values > float("-inf"))[..., None].expand(-1, -1, -1, offsets.numel()).flatten(-2)
    dilated = scatter_keep(neighbours, core_ok, length) & region
    # Two rankings rather than one shifted score (score + constant would round masses
    # together): the neighbours first, best first, then the best of the others.
    lead = ranked_topk(score.masked_fill(~dilated, float("-inf")), k)
    rest = ranked_topk(score.masked_fill(dilated, float("-inf")), k)
    n_lead = (lead.values > float("-inf")).sum(-1, keepdim=True)
    rank = torch.cat([torch.arange(k, device=mass.device).expand_as(lead.indices),
                      n_lead + torch.arange(k, device=mass.device)], -1)
    values = torch.cat([lead.values, rest.values], -1)
    take = (values > float("-inf")) & (rank < caps)
    return scatter_keep(torch.cat([lead.indices, rest.indices], -1), take, length)


def ranked_topk(score: torch.Tensor, k: int):
    """``score.topk(k)`` (best first) with ties broken by the lower position, as the Triton
    top-k (``topk_triton``) breaks them; ``torch.topk`` leaves the order of ties unspecified.
    Ranks an int64 key (the fp32 score's order-preserving bits, then the reversed position),
    so it stays one top-k, not a sort."""
    length = score.shape[-1]
    bits = score.float().contiguous().view(torch.int32).long()
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the fp32 value
    position = torch.arange(length, device=score.device)
    top = (ordered * (1 << 32) + (length - 1 - position)).topk(k, dim=-1)
    indices = (length - 1) - (top.values & 0xFFFFFFFF)
    return torch.return_types.topk((score.gather(-1, indices), indices))


def scatter_keep(indices: torch.Tensor, take: torch.Tensor, length: int) -> torch.Tensor:
    """Keep-mask ``[..., length]`` of ``indices`` where ``take``. Entries not taken point at a
    spare column, so they never clear a position another entry set (scatter order is
    unspecified)."""
    keep = torch.zeros(*indices.shape[:-1], length + 1, dtype=torch.bool, device=indices.device)
    return keep.scatter_(-1, torch.where(take, indices, length).long(), True)[..., :length]


def head_caps(plan: SelectPlan, k: int, device) -> torch.Tensor:
    """``[1, Hkv, 1]`` (or ``[1, 1, 1]``): how many of its ranked picks each KV head may keep
    (LU-KV per-head budgets), at most ``k``."""
    caps = plan.head_middles(device)
    if caps is None:
        return torch.full((1, 1, 1), k, device=device)
    return caps.clamp_max(k)[None, :, None]


def within_head_budget(plan: SelectPlan, k: int, device) -> torch.Tensor:
    """``[1, Hkv, k]`` (or ``[1, 1, k]``): which of the k best picks each KV head may keep
    under its own budget (LU-KV per-head budgets); all of them without per-head budgets."""
    return torch.arange(k, device=device)[None, None, :] < head_caps(plan, k, device)


def smallest_sufficient(mass: torch.Tensor, region: torch.Tensor, windows: torch.Tensor, rows: int, plan: SelectPlan):
    """``delta_target`` mode: the fewest top positions whose retained mass reaches
    ``1 - delta_target`` (windows included), capped by the budget. ``mass`` sums ``rows``
    query rows, so the retained share is ``mass / rows``."""
    share = mass / rows
    base = (share * windows[:, None, :]).sum(-1)  # [B, Hkv] mass of sinks + local window
    score = share.masked_fill(~region[:, None, :], float("-inf"))
    k = min(plan.middle, score.shape[-1])
    top = score.topk(k, dim=-1)
    gained = base[..., None] + top.values.clamp_min(0).cumsum(-1)  # retained after n+1 picks
    need = (gained < 1.0 - plan.delta_target).sum(-1, keepdim=True) + 1  # picks to reach target
    take = (torch.arange(k, device=mass.device) < need) & (top.values > float("-inf"))
    take = take & within_head_budget(plan, k, mass.device)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, take)
    return keep


def keep_to_indices(keep: torch.Tensor, slots: int) -> torch.Tensor:
    """Boolean keep-mask [B, Hkv, L] -> ascending int32 positions [B, Hkv, slots], -1 padded."""
    length = keep.shape[-1]
    positions = torch.arange(length, device=keep.device)
    order = torch.where(keep, positions, positions + length)
    if length < slots:
        order = torch.nn.functional.pad(order, (0, slots - length), value=2 * length)
    chosen = order.sort(dim=-1).values[..., :slots]
    return torch.where(chosen < length, chosen, -1).to(torch.int32)


def stored_and_windows(kept: torch.Tensor, plan: SelectPlan, view) -> torch.Tensor:
    """Keep-mask of a stored selection (still valid positions) plus this step's sinks and
    local window, which always slide with the sequence."""
    return indices_to_keep(kept, view.kv_len) & view.valid[:, None, :] | view.windows(plan)[:, None, :]


def indices_to_keep(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``[B, Hkv, S]`` (-1 padded) -> boolean keep-mask ``[B, Hkv, length]``.
    Positions past ``length`` are dropped: a stored selection can outlive a cache that
    shrank (a new, shorter sequence, or an evicted cache) until the rule replaces it."""
    return scatter_keep(indices, (indices >= 0) & (indices < length), length)


def advance_age(age: torch.Tensor, retrieve: torch.Tensor, reuse: torch.Tensor) -> None:
    """Steps since each slot's retrieval, in place: 0 where it retrieved, one more where it
    reused its set, -1 (no set) elsewhere."""
    age.copy_(torch.where(retrieve, 0, torch.where(reuse, age + 1, -1)).to(age.dtype))


def keys_at(k: torch.Tensor, pos: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """``k[b, :heads, pos[b]]`` as fp32 ``[B, heads, D]`` (positions clamped into range)."""
    index = pos.clamp(0, k.shape[2] - 1)[:, None, None, None].expand(-1, heads, 1, k.shape[-1])
    return k[:, :heads].gather(2, index)[:, :, 0].float()
