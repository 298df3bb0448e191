"""One decode step of ``prhs::select`` on the Triton path (what CUDA runs).

``select_step_triton`` returns what ``select_reference`` returns and mutates the same state,
for the plans it supports (``supports``): policies ``oracle``, ``prhs`` (every selector:
cosine or ``delta_target`` gate, dilation, PSAW recency window, cross-layer ``shared`` sets),
``streaming``, ``quest`` (page bounds from the page summaries, ``pages_triton.py``), ``h2o``,
``lu_kv`` (and
``oracle`` / ``prhs`` within per-head budgets), and
``sage_kv`` / ``snapkv`` at decode (their one-shot selection is made at prefill by
``prhs::prefill``, the reference on every device), verify mode or selection listeners; everything else falls back to
the reference (which runs on the GPU too, only slower). Ties between equal masses go to the
lower position, as in the reference.

Dispatch: each selection rule declares the engine step it is built from (``cuda_step``:
``gated``, ``exact``, ``one_shot``, ``windows``, ``pages``, ``heavy_hitters``, ``labels``),
whether that step applies per-head budgets, its local window and whether it retrieves inside
PSAW's recency window; ``STEPS`` maps the step to the function here. The torch parts of a
policy's logic (the continuity checks, the step bookkeeping, the gates and state updates)
are the reference's own functions, compiled by Inductor for the GPU; PrHS's cosine gate,
the state it decides and the bookkeeping run in the bounds' launch instead
(``gate_triton``, tested against those functions).

Why it is cheaper than the reference, per step of a ``[B, Hkv, L]`` cache:

* the valid region and the windows come from the per-row bounds kernels (``[B, 8]``), not
  from ``[B, Tq, L]`` biases and cumulative sums;
* the gate runs first (``[B, Hq, D]``; PrHS's in the bounds' launch); only the (row, KV
  head) slots that retrieve read K, once (``retrieve_triton``: scores and log-sum-exp in
  one pass), sharing the whole grid among them, with no host synchronisation; the top-k's
  programs form the group-mass keys from those scores;
* the picks come from a radix top-k over the keys of the retrieving slots
  (``topk_triton``: histograms of the key bytes, a threshold, a compaction in position
  order, dilation included), written straight into the stored set; a slot that reuses its
  set ranks nothing and sorts nothing;
* the output (sinks ++ stored picks ++ local window, ascending) is written from the stored
  picks in ``O(slots)`` (``compose_triton.compose_row``), by the top-k's own launch: at
  once for a slot that keeps its set, after its picks for one that retrieves.

What still costs ``O(L)`` on a step where no slot retrieves: the bounds kernels, which read
the mask (1 byte per position and row). h2o (it needs every valid position's share of the
softmax) and hshare take the fp32 mass of the two-pass ``kpass_triton.group_mass`` and rank
it with the radix top-k; ``delta_target`` takes the radix top-k's set and sorts only that
set by mass.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Optional

import torch
import torch._dynamo
import torch._inductor
from . import pages_triton
from .plan import SelectPlan
from .rule_prhs import prhs_advance, prhs_gate, prhs_store
from .rules import get_rule
from .pages import PAGE_MIN, capacity, uses_pages
from .pages_triton import maintain_summaries_triton, page_positions, quest_pages, two_stage_keys
from .select_hshare_triton import channel_abs_sums
from .select_reference import (
    TOPK_GUESS,
    continuing_rows,
    selection_listeners,
    step_bookkeeping,
)
from .selection import advance_age, scatter_keep
from .compose_triton import compose as _compose
from .compose_triton import composition
from .gate_triton import GateState, bounds_and_gate
from .retrieve_triton import retrieve_keys
from .bounds_triton import BoundsColumn as Col
from .bounds_triton import compute_bounds, mask_operand
from .kpass_triton import check_inputs, group_mass
from .topk_triton import SCRATCH_WIDTH, topk_picks

__all__ = ["oracle_select_triton", "select_step_triton", "supports", "unsupported_reason"]

log = logging.getLogger("prhs")


def supports(plan: SelectPlan, q: torch.Tensor, k: torch.Tensor, state: dict | None = None) -> bool:
    """Whether ``select_step_triton`` runs this plan here (else use the reference)."""
    return unsupported_reason(plan, q, k, state) is None


def pages_unavailable(plan: SelectPlan) -> str | None:
    """Why this plan's page kernels cannot run on this machine, or None."""
    if not uses_pages(plan) or pages_triton.unavailable is None:
        return None
    return f"page kernels unavailable ({pages_triton.unavailable})"


def unsupported_reason(plan: SelectPlan, q: torch.Tensor, k: torch.Tensor, state: dict | None = None) -> str | None:
    """Why ``select_step_triton`` does not run this plan here (the reference does), or None.
    ``state`` (the named state tensors) gives the page summaries' capacity; without it, the
    plan's ``max_cache_len``."""
    rule = get_rule(plan.policy)
    if rule.all_positions:
        return f"policy {plan.policy!r} selects every position: nothing to rank"
    if rule.cuda_step not in STEPS:
        return f"policy {plan.policy!r} declares no step of the CUDA select engine"
    if plan.retrieval == "sketch":
        return "retrieval='sketch' has a torch reference only: no CUDA step is built for it yet"
    if plan.retrieval == "pages":
        if rule.cuda_step not in ("gated", "exact"):
            return f"retrieval='pages' is for policies that retrieve by score, not {plan.policy!r}"
        if plan.delta_target > 0:
            return "delta_target needs the mass outside the candidates of a two-stage retrieval"
    if plan.verify:
        return "verify=True measures the exact dropped mass with the torch reference"
    if selection_listeners:
        return "a selection listener (e.g. calibrate) records selections through the reference"
    if plan.head_budgets and not rule.cuda_head_budgets:
        return f"per-head budgets are applied by the reference only for policy {plan.policy!r}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or q.dtype != k.dtype:
        return f"dtypes q {q.dtype} / k {k.dtype}: the kernels take one of fp16, bf16, fp32"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if q.shape[2] < 1 or k.shape[2] < 1:
        return "an empty query or cache"
    if uses_pages(plan):
        covered = (state[PAGE_MIN].shape[2] if state else capacity(plan)) * plan.page_size
        if k.shape[2] > covered:
            return (f"the cache holds {k.shape[2]} positions, more than the {covered} the page "
                    f"summaries cover (raise max_cache_len, now {plan.max_cache_len})")
    return pages_unavailable(plan)


def _fused(fn):
    """``fn`` compiled by Inductor when it runs on CUDA, so that its dozens of small torch ops
    become a few fused kernels (each launch costs microseconds even inside a CUDA graph);
    eager elsewhere (CPU tests go through the Triton interpreter). Only the glue between the
    Triton kernels is compiled; arguments that change between layers are tensors or ints
    shared by all layers of a model, so one compiled version serves them all. A size that
    changes between calls (the length of a growing DynamicCache, the batch) becomes symbolic
    at its first change (torch.compile's automatic dynamic shapes): one recompile, not one
    per step until Dynamo's recompile limit leaves the glue eager (as static shapes did)."""
    compiled = None
    failed = set()  # argument signatures (shapes, scalars) Inductor could not compile

    def call(*args, **kwargs):
        nonlocal compiled
        if _COMPILE_GLUE == "never" or (_COMPILE_GLUE == "cuda" and not args[0].is_cuda):
            return fn(*args, **kwargs)
        if compiled is None:
            options = dict(GLUE_INDUCTOR_OPTIONS) if args[0].is_cuda else {}
            compiled = torch.compile(fn, fullgraph=True, dynamic=None, options=options or None)
        signature = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if signature in failed:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except _COMPILE_ERRORS as exc:
            # A compiler failure happens before the function runs (nothing mutated yet):
            # run it eagerly for these shapes rather than fail the decode step.
            log.warning("prhs: compiling %s failed for one shape (%s: %s); it runs eagerly there",
                        fn.__name__, type(exc).__name__, str(exc).splitlines()[0][:200])
            failed.add(signature)
            return fn(*args, **kwargs)

    call.__wrapped__ = fn
    return call


_COMPILE_ERRORS = tuple(
    cls for cls in (
        getattr(getattr(torch._dynamo, "exc", None), "BackendCompilerFailed", None),
        getattr(getattr(torch._inductor, "exc", None), "InductorError", None),
        # Past Dynamo's recompile limit (many distinct shapes in one process) a fullgraph
        # compile raises this rather than falling back by itself.
        getattr(getattr(torch._dynamo, "exc", None), "FailOnRecompileLimitHit", None),
    ) if isinstance(cls, type)
)

# When to compile the glue: "cuda" (default), "always" (tests: compiled on CPU too) or
# "never" (debugging, and timing the glue eagerly).
_COMPILE_GLUE = "cuda"
# Inductor options of the glue's compiled graphs on CUDA, read when a graph is first
# compiled (``scripts/profile_step.py --glue-options`` tries others). Combo kernels put the
# glue's independent small kernels into shared launches (fewer launches, measured in the
# README's "Kernel configurations"). CPU glue (tests) takes the defaults.
GLUE_INDUCTOR_OPTIONS: dict = {"combo_kernels": True}


def _row_facts(bounds, pos, fingerprint, k, q_len: int):
    """Per row: the newest valid position, whether the row continues the sequence the state
    was built on (``select_reference.continuing_rows``), and whether it fits the budget."""
    count, fits = bounds[:, Col.COUNT].long(), bounds[:, Col.FITS] != 0
    newest = torch.where(count > 0, bounds[:, Col.HI].long() - 1, -1)
    return newest, continuing_rows(pos, fingerprint, k, newest, q_len), fits


_continuity = _fused(_row_facts)
_bookkeeping = _fused(step_bookkeeping)


class Step(NamedTuple):
    """What every engine step of one decode call sees: the inputs, the plan, the layer's
    named state, the mask operand and per-row bounds (None until the gated step's first
    launch writes them), and (once ``with_row_facts`` or a
    step's own fused prologue has run) per row its newest position, whether it continues
    the state's sequence and whether it fits the budget."""

    q: torch.Tensor
    k: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    plan: SelectPlan
    st: dict
    operand: tuple
    bounds: torch.Tensor
    newest: Optional[torch.Tensor] = None
    continuing: Optional[torch.Tensor] = None
    fits: Optional[torch.Tensor] = None

    @property
    def shape(self):
        """(batch, query heads, query length, KV heads, cache length)."""
        return (self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[1],
                self.k.shape[2])

    @property
    def rows(self) -> int:
        """Query rows of a KV group (the group mass of a position sums over them)."""
        return (self.q.shape[1] // self.k.shape[1]) * self.q.shape[2]

    def seq_state(self):
        """The layer's (pos, fingerprint) of the rows of this batch."""
        batch = self.q.shape[0]
        return self.st["pos"][:batch], self.st["fingerprint"][:batch]

    def with_row_facts(self) -> "Step":
        """This step with its per-row facts, from their own fused kernels (steps whose glue
        has a prologue of its own compute them there, saving the launches)."""
        pos, fingerprint = self.seq_state()
        newest, continuing, fits = _continuity(self.bounds, pos, fingerprint, self.k,
                                               self.q.shape[2])
        return self._replace(newest=newest, continuing=continuing, fits=fits)

    def finish(self, indices, retrieved):
        """Count the step and remember where each row's sequence ends; returns ``indices``."""
        pos, fingerprint = self.seq_state()
        _bookkeeping(self.st["counters"], pos, fingerprint, self.k, self.newest,
                     self.continuing, retrieved)
        return indices

    def compose(self, picks, local=None):
        return _compose(self.operand, self.bounds, picks, self.plan, self.q.shape[0],
                        self.k.shape[1], self.q.shape[2], local=local)

    def composition(self):
        """The step's output for the top-k to compose in its own launch
        (``topk_picks(compose=...)``; saves the compose launch)."""
        return composition(self.operand, self.bounds, self.plan, self.q.shape[0],
                           self.k.shape[1], self.q.shape[2])

    def keep_summaries(self) -> None:
        """Fold this step's new keys into the page summaries (``retrieval="pages"``), before
        the bookkeeping moves the state's newest position."""
        if uses_pages(self.plan):
            pos, _ = self.seq_state()
            maintain_summaries_triton(self.st, self.k, self.operand, self.bounds, pos,
                                      self.continuing, self.plan, self.q.shape[2])

    def retrieval_keys(self, active, want_norm: bool = False):
        """The top-k keys of the ``active`` slots (int32 ``[B * Hkv]``, None: all): one pass
        over K, or a two-stage retrieval over the page summaries (``retrieval="pages"``; no
        key norms there, which only verify and ``delta_target`` read)."""
        if uses_pages(self.plan):
            if active is None:
                active = torch.ones(self.q.shape[0] * self.k.shape[1], dtype=torch.int32,
                                    device=self.q.device)
            return two_stage_keys(self.q, self.k, self.operand, self.bounds, self.scale,
                                  self.st, active, self.plan)
        # The keys themselves are formed by the top-k (``topk_picks(pending=...)``).
        return retrieve_keys(self.q, self.k, self.operand, self.bounds, self.scale, active,
                             want_norm=want_norm, want_window_mass=True, defer=True)

    def every_slot_retrieves(self):
        return ~self.fits[:, None].expand(-1, self.k.shape[1])


def select_step_triton(q, k, mask, scale: float, plan: SelectPlan, st: dict, shared=None):
    """One decode step; ``st`` is the layer's named state (``select_reference._state_dict``).
    Each engine step runs the continuity check and the bookkeeping too (``Step.with_row_facts``
    and ``Step.finish``, or inside its own fused glue)."""
    batch, _, q_len, head_dim = q.shape
    length = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    rule = get_rule(plan.policy)
    operand = mask_operand(mask, batch, q_len, length)
    if shared is None and rule.cuda_step == "gated" and _gate_in_bounds_launch(plan):
        bounds = None  # the gated step's first launch writes them (gate_triton)
    else:
        sink, local, budget, min_context, psaw_frac = _bounds_settings(plan)
        bounds = compute_bounds(*operand, batch, q_len, length, sink, local, budget,
                                min_context, q.device, psaw_frac)
    step = Step(q, k, mask, scale, plan, st, operand, bounds)
    if shared is not None:  # cross-layer sharing: an earlier layer's selection, as is
        step = step.with_row_facts()
        step.keep_summaries()
        retrieved = torch.zeros(batch, k.shape[1], dtype=torch.bool, device=q.device)
        return step.finish(shared.clone(), retrieved)
    return STEPS[rule.cuda_step](step)


def _bounds_settings(plan: SelectPlan):
    """(sink, local window, budget, min_context, PSAW fraction or -1) of the plan's bounds."""
    rule = get_rule(plan.policy)
    return (plan.sink, rule.local_window(plan), plan.budget, plan.min_context,
            plan.psaw_fraction if rule.recency_window else -1.0)


def _gate_in_bounds_launch(plan: SelectPlan) -> bool:
    """Whether the gated step's gate, its state update and the bookkeeping run in the bounds'
    launch (``gate_triton``): the cosine gate with exact retrieval. ``delta_target``'s gate
    and two-stage retrieval (whose page summaries read the stored position before the
    bookkeeping moves it) take them from compiled torch."""
    return plan.delta_target <= 0 and not uses_pages(plan)


@_fused
def _gate(bounds, pos, fingerprint, q, k, age, anchor, anchor_dropped, key_norm,
          q_len: int, scale: float, tau: float, delta_target: float, max_reuse: int,
          advance: bool):
    """The gated step's prologue where the gate kernel (``gate_triton``) does not serve it
    (``delta_target``'s gate, two-stage retrieval): the per-row facts (``_row_facts``) and
    PrHS's gate (``rule_prhs.prhs_gate``): which slots reuse their stored set this step and
    which retrieve, also as int32 flags for the kernels (not the reuse bound: only verify mode
    reports it, on the reference). With ``advance``, also the state the decision alone sets
    (``rule_prhs.prhs_advance``: anchors, ages). One compiled graph, so a few fused kernels;
    it also makes the top-k's zeroed scratch, whose fill Inductor folds into those launches."""
    newest, continuing, fits = _row_facts(bounds, pos, fingerprint, k, q_len)
    retrieve, reuse, _ = prhs_gate(q, k, newest, continuing, fits, age, anchor, anchor_dropped,
                                   key_norm, scale, tau, delta_target, max_reuse)
    if advance:  # no fresh key norm: only the reuse bound reads it (delta_target, verify)
        prhs_advance(q, None, retrieve, reuse, age, anchor, key_norm)
    scratch = torch.zeros((retrieve.numel(), SCRATCH_WIDTH), dtype=torch.int32,
                          device=retrieve.device)
    return (newest, continuing, fits, retrieve, reuse, retrieve.flatten().to(torch.int32),
            scratch)


@_fused
def _store_sufficient(q, keys, top, window_mass, fresh_key_norm, retrieve, reuse, age, kept,
                      anchor, anchor_dropped, key_norm, delta_target: float, rows: int):
    """``delta_target``'s picks, once the top-k kernel has found each retrieving slot's top
    set ``top`` (ascending positions, -1 padded; per-head caps applied): the fewest of them,
    best first, whose mass with the windows' reaches ``1 - delta_target``
    (``selection.smallest_sufficient``), ranked by a sort of the top set (not of the cache;
    equal masses keep the lower position first); then the state they leave
    (``rule_prhs.prhs_store``)."""
    valid = top >= 0
    found = keys.gather(-1, top.clamp_min(0).long()) - 1  # a key is the mass's bits + 1
    mass = torch.where(valid, found.view(torch.float32), float("-inf"))
    ranked = mass.sort(dim=-1, descending=True, stable=True)
    gained = (window_mass[..., None] + ranked.values.clamp_min(0.0).cumsum(-1)) / rows
    need = (gained < 1.0 - delta_target).sum(-1, keepdim=True) + 1
    rank = torch.arange(top.shape[-1], device=top.device)
    taken = torch.zeros_like(valid).scatter(-1, ranked.indices,
                                            (rank < need) & (ranked.values > float("-inf")))
    last = torch.iinfo(torch.int32).max
    picks = torch.where(taken, top, last).sort(dim=-1).values  # ascending, the rest at the end
    picks = torch.where(picks == last, -1, picks)
    retained = (window_mass + torch.where(taken, mass, 0.0).sum(-1)) / rows
    prhs_store(q, picks, retained, fresh_key_norm, retrieve, reuse, age, kept, anchor,
               anchor_dropped, key_norm)


def _gated_step(step: Step):
    """``PrHSRule.choose`` on the Triton path: gate, gated retrieval, stored picks, output.
    Slots that reuse their set read no K and rank nothing: the score pass and the top-k
    return at once for them. Each launch costs microseconds even inside a CUDA graph, so
    one kernel comes before the pass over K (``gate_triton``: the bounds, the gate, the state
    it alone decides and the bookkeeping) and the top-k writes the picks, their dropped mass and the
    output. ``delta_target`` (which ranks its top set by mass after the top-k) and two-stage
    retrieval (whose page summaries read the sequence's old end, so the bookkeeping waits
    for them) take the gate from a compiled graph of the torch functions instead, and add
    one after the top-k."""
    q, k, mask, scale, plan, st, operand, bounds = step[:8]
    batch, _, q_len, _, length = step.shape
    rows = step.rows
    age, kept, anchor = st["age"][:batch], st["kept"][:batch], st["anchor"][:batch]
    anchor_dropped, key_norm = st["anchor_dropped"][:batch], st["key_norm"][:batch]
    pos, fingerprint = step.seq_state()
    sufficient = plan.delta_target > 0
    # The cosine gate with exact retrieval: the bounds, the gate, the state it decides and
    # the step's bookkeeping in one launch, and none after the top-k.
    one_launch = bounds is None
    if one_launch:
        bounds, flags, scratch = bounds_and_gate(
            operand, q, k, *_bounds_settings(plan),
            GateState(pos, fingerprint, age, anchor, key_norm, st["counters"]), plan.tau,
            plan.max_reuse, SCRATCH_WIDTH)
        step = step._replace(bounds=bounds)
    else:
        newest, continuing, fits, retrieve, reuse, flags, scratch = _gate(
            bounds, pos, fingerprint, q, k, age, anchor, anchor_dropped, key_norm, q_len,
            float(scale), plan.tau, plan.delta_target, plan.max_reuse, not sufficient)
        step = step._replace(newest=newest, continuing=continuing, fits=fits)
    if sufficient:
        # The smallest sufficient prefix of the top set, best first (no dilation): the top
        # set from the one-pass retrieval and the radix top-k, then a sort of that set.
        found = step.retrieval_keys(flags, want_norm=True)
        top_set, _ = topk_picks(found.keys, bounds, min(plan.middle, length), active=flags,
                                caps=plan.head_middles(q.device), width=plan.middle,
                                guess=st[TOPK_GUESS][:batch], pending=found.pending,
                                scratch=scratch)
        _store_sufficient(q, found.keys, top_set, found.window_mass, found.key_norm, retrieve,
                          reuse, age, kept, anchor, anchor_dropped, key_norm, plan.delta_target,
                          rows)
        return step.finish(step.compose(kept), retrieve)
    step.keep_summaries()
    # Key norms: only delta_target (above) and verify mode (the reference) read them.
    found = step.retrieval_keys(flags, want_norm=False)
    top = min(plan.middle, length)
    radius = plan.dilation_r
    cores = plan.dilation_m if plan.dilation_m >= 0 else top // (2 * radius + 1)
    # The top-k writes the picks of retrieving slots straight into the stored set, their
    # dropped mass (rule_prhs.prhs_keep) and the step's output of every slot.
    output = step.composition()
    topk_picks(found.keys, bounds, top, out=kept, active=flags,
               caps=plan.head_middles(q.device), dilation_m=min(cores, length),
               dilation_r=radius, width=plan.middle, guess=st[TOPK_GUESS][:batch],
               positions=found.positions, pending=found.pending, compose=output,
               scratch=scratch, dropped=(anchor_dropped, found.window_mass, rows))
    if not one_launch:
        step.finish(None, retrieve)
    return output.out


_page_positions = _fused(page_positions)


def _h2o_windows(mass, bounds):
    """Valid positions (``[B, Hkv, L]``) and those of the sinks and local window
    (``[B, 1, L]``) of H2O's step: ``mass`` is the group mass of every valid position, -inf
    elsewhere."""
    pos = torch.arange(mass.shape[-1], device=mass.device)
    in_window = ((pos < bounds[:, Col.SINK_END, None].long())
                 | (pos >= bounds[:, Col.LOCAL_START, None].long()))  # [B, L]
    valid = mass > float("-inf")
    return valid, valid & in_window[:, None, :]


@_fused
def _h2o_keys(mass, score, continuing, bounds):
    """H2O (``H2ORule.choose``), before the top-k: a new or reordered sequence (or one whose
    prefill this state never saw) starts its accumulated scores over from this step's group
    mass; returns the top-k's keys (a score's fp32 bits + 1, 0 where it cannot be picked:
    invalid, or in the sinks or the local window, which are kept anyway)."""
    fresh = ~continuing[:, None] | (score.sum(-1) == 0)
    score.copy_(torch.where(fresh[..., None], mass.clamp_min(0.0), score))
    valid, windows = _h2o_windows(mass, bounds)
    return torch.where(valid & ~windows, score.view(torch.int32) + 1, 0)


@_fused
def _h2o_accumulate(mass, score, picks, bounds, rows: int):
    """H2O, after the top-k: each kept position's share of the attention (the picks and the
    windows, renormalised over the kept set) is added to its score."""
    _, windows = _h2o_windows(mass, bounds)
    keep = scatter_keep(picks, picks >= 0, mass.shape[-1])
    got = mass.clamp_min(0.0) * (keep | windows)  # the mass each kept position received
    score.add_(got / got.sum(-1, keepdim=True).clamp_min(1e-30) * rows)


@_fused
def _one_shot_gate(continuing, fits, ready):
    """SAGE-KV / SnapKV: a slot keeps the set chosen at prefill; one that reaches decode
    without a set of its own sequence (no prefill seen, reordered beams) retrieves once."""
    return ~(continuing[:, None] & (ready > 0)) & ~fits[:, None]


@_fused
def _one_shot_ready(retrieve, ready):
    ready.copy_(torch.where(retrieve, 1, ready).to(ready.dtype))


def _one_shot_step(step: Step):
    """SAGE-KV / SnapKV at decode: the stored prompt selection; a gated retrieval for the
    slots without one."""
    step = step.with_row_facts()
    batch, _, _, _, length = step.shape
    plan, st = step.plan, step.st
    kept, ready = st["kept"][:batch], st["ready"][:batch]
    retrieve = _one_shot_gate(step.continuing, step.fits, ready)
    found = retrieve_keys(step.q, step.k, step.operand, step.bounds, step.scale, retrieve,
                          defer=True)
    output = step.composition()
    topk_picks(found.keys, step.bounds, min(plan.middle, length), out=kept, active=retrieve,
               width=plan.middle, pending=found.pending, compose=output)
    _one_shot_ready(retrieve, ready)
    return step.finish(output.out, retrieve)


def _exact_step(step: Step):
    """The exact top-k of every slot at every step (oracle; LU-KV's per-head budgets)."""
    step = step.with_row_facts()
    plan, bounds = step.plan, step.bounds
    step.keep_summaries()
    found = step.retrieval_keys(None)
    output = step.composition()
    topk_picks(found.keys, bounds, min(plan.middle, step.shape[4]),
               caps=plan.head_middles(step.q.device), width=plan.middle,
               guess=step.st[TOPK_GUESS][:step.shape[0]], positions=found.positions,
               pending=found.pending, compose=output)
    return step.finish(output.out, step.every_slot_retrieves())


def _windows_step(step: Step):
    """Sinks and the recent window only (StreamingLLM): nothing is scored."""
    step = step.with_row_facts()
    local = get_rule(step.plan.policy).local_window(step.plan)
    retrieved = torch.zeros_like(step.every_slot_retrieves())
    return step.finish(step.compose(None, local=local), retrieved)


def _pages_step(step: Step):
    """Quest: the page summaries kept up to date, every page's bound from them, the best
    pages' positions. Reads the summaries, not K."""
    step = step.with_row_facts()
    step.keep_summaries()
    length = step.shape[4]
    chosen = quest_pages(step.q, step.st, step.operand, step.bounds, step.plan, length)
    picks = _page_positions(chosen, step.plan.page_size, length)
    return step.finish(step.compose(picks), step.every_slot_retrieves())


def _heavy_hitters_step(step: Step):
    """H2O: every step needs each kept position's share of the full softmax, the group mass
    of every valid position (both K passes over the whole valid region). The bounds of that
    region: this step's lo, hi and count, with no sinks, no local window, no PSAW cut, never
    fitting (what compute_bounds gives for sink=0, local=0, budget=-1, min_context=0)."""
    step = step.with_row_facts()
    batch, _, _, _, length = step.shape
    whole = step.bounds.clone()
    whole[:, Col.SINK_END] = 0
    whole[:, Col.LOCAL_START] = length
    whole[:, Col.FITS] = 0
    whole[:, Col.MIDDLE_START] = 0
    found = group_mass(step.q, step.k, step.mask, step.scale, 0, 0, -1, 0, bounds=whole)
    score = step.st["score"][:batch, :, :length]
    keys = _h2o_keys(found.mass, score, step.continuing, step.bounds)
    # The best accumulated scores by the radix top-k (ties to the lower position, as the
    # reference), composed with the windows in the same launch.
    output = step.composition()
    picks, _ = topk_picks(keys, step.bounds, min(step.plan.middle, length),
                          width=step.plan.middle, compose=output)
    _h2o_accumulate(found.mass, score, picks, step.bounds, step.rows)
    return step.finish(output.out, step.every_slot_retrieves())


@_fused
def _hshare_gate(continuing, fits, labels, anchor, age):
    """HShare: which slots continue no sequence this state saw (their labels are chosen
    afresh), which reuse the set of the step before, which retrieve."""
    unseeded = (labels[..., 0] < 0) | ~continuing[:, None]
    own = torch.arange(anchor.shape[1], device=anchor.device).expand_as(anchor)
    anchor.copy_(torch.where(unseeded | (anchor < 0), own, anchor))
    reuse = continuing[:, None] & (age == 0) & ~unseeded
    return unseeded, reuse, ~reuse & ~fits[:, None]


@_fused
def _hshare_labelled(q, k, labels, sums, unseeded):
    """New label channels where unseeded, and q, k restricted to each KV head's labels."""
    labels.copy_(torch.where(unseeded[..., None], sums.topk(labels.shape[-1], dim=-1).indices, labels))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q_idx = labels.repeat_interleave(group, 1)[:, :, None, :].expand(-1, -1, q_len, -1)
    k_idx = labels[:, :, None, :].expand(-1, -1, length, -1)
    return q.gather(-1, q_idx).contiguous(), k.gather(-1, k_idx).contiguous()


@_fused
def _mass_keys(mass):
    """The radix top-k's keys of a group mass (-inf: not pickable): fp32 bits + 1, or 0."""
    return torch.where(mass > float("-inf"), mass.clamp_min(0.0).view(torch.int32) + 1, 0)


@_fused
def _hshare_store(fresh, retrieve, anchor, kept, age, reuse):
    """HShare's state after the top-k wrote the picks of the retrieving slots into
    ``fresh``: a head that shares another's set copies it; returns which slots read keys."""
    fresh = fresh.gather(1, anchor[..., None].expand(-1, -1, fresh.shape[-1]))  # shared heads copy
    kept.copy_(torch.where(retrieve[..., None], fresh, kept))
    advance_age(age, retrieve, reuse)
    own = torch.arange(anchor.shape[1], device=anchor.device)
    return retrieve & (anchor == own)  # a head copying another reads no keys


def _labels_step(step: Step):
    """``HShareRule.choose`` on the Triton path: label-channel scores, reuse every second
    step, head sharing."""
    step = step.with_row_facts()
    q, k, mask, scale, plan, st, operand, bounds, _, continuing, fits = step
    batch, _, q_len, _, _ = step.shape
    labels, anchor = st["labels"][:batch], st["head_anchor"][:batch]
    age, kept = st["age"][:batch], st["kept"][:batch]
    unseeded, reuse, retrieve = _hshare_gate(continuing, fits, labels, anchor, age)
    sums = channel_abs_sums(k, operand, bounds, unseeded, q_len)
    q_lab, k_lab = _hshare_labelled(q, k, labels, sums, unseeded)
    found = group_mass(q_lab, k_lab, mask, scale, plan.sink, plan.local, plan.budget,
                       plan.min_context, bounds=bounds, active=retrieve)
    fresh, _ = topk_picks(_mass_keys(found.mass), bounds, min(plan.middle, step.shape[4]),
                          active=retrieve, width=plan.middle)
    retrieved = _hshare_store(fresh, retrieve, anchor, kept, age, reuse)
    return step.finish(step.compose(kept), retrieved)


# The engine's steps, by the name a rule declares as its ``cuda_step``.
STEPS = {
    "gated": _gated_step,
    "exact": _exact_step,
    "one_shot": _one_shot_step,
    "windows": _windows_step,
    "pages": _pages_step,
    "heavy_hitters": _heavy_hitters_step,
    "labels": _labels_step,
}


def oracle_select_triton(q, k, mask, scale, budget, sink=0, local=0, min_context=0, *,
                         num_splits=None, block_n=None, bounds=None) -> torch.Tensor:
    """Positions of the oracle selection (exact group-mass top-k of every slot), int32
    ``[B, Hkv, max(budget, min_context)]``: what ``select_reference`` returns for a fresh
    ``SelectPlan(policy="oracle", budget, sink, local, min_context)``, ties broken the same
    way. q: [B, Hq, Tq, D]; k: [B, Hkv, L, D] (any strides, e.g. a view of a static cache);
    mask: None, or bool (True = may attend) / float (additive bias; entries <= finfo.min / 2
    mean masked) broadcastable to [B, 1, Tq, L] (a longer last dim is allowed). No host
    synchronisation: one read of K, the radix top-k, the composed output."""
    if budget < 1 or sink < 0 or local < 0 or min_context < 0:
        raise ValueError(f"invalid budget={budget} sink={sink} local={local} "
                         f"min_context={min_context}")
    if sink + local >= budget:
        raise ValueError(f"sink + local = {sink + local} leaves no room for retrieved "
                         f"positions in budget={budget}")
    check_inputs(q, k)
    plan = SelectPlan(policy="oracle", layer=0, budget=budget, sink=sink, local=local,
                      min_context=min_context)
    B, Tq = q.shape[0], q.shape[2]
    Hkv, L = k.shape[1], k.shape[2]
    if B == 0 or L == 0 or Tq == 0:
        return torch.full((B, Hkv, plan.slots), -1, dtype=torch.int32, device=q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    operand = mask_operand(mask, B, Tq, L)
    if bounds is None:
        bounds = compute_bounds(*operand, B, Tq, L, sink, local, budget, min_context, q.device)
    found = retrieve_keys(q, k, operand, bounds, scale, num_splits=num_splits, block_n=block_n,
                          defer=True)
    output = composition(operand, bounds, plan, B, Hkv, Tq)
    topk_picks(found.keys, bounds, min(plan.middle, L), width=plan.middle,
               pending=found.pending, compose=output)
    return output.out
