"""The ``prhs`` custom ops: schemas, fake (meta) implementations and device dispatch.

* ``prhs::select(q, k, v, mask, scale, plan, state, shared) -> idx``  pick positions for one
  decode step (``v`` is read only by ``verify``; ``shared`` is an earlier layer's selection)
* ``prhs::attend(q, k, v, idx, mask, scale) -> out``       attend over the picked positions
* ``prhs::prefill(q, k, mask, is_causal, scale, plan, state)``  reset state for a new sequence
* ``prhs::window_prefill(q, k, v, mask, is_causal, scale, plan, state) -> out``  prefill
  attention inside the layer's PrHS recency window (PSAW), plus the reset; on CUDA a
  block-sparse FlexAttention kernel skips the KV blocks outside the window

``q`` is ``[B, Hq, Tq, D]`` and ``k``/``v`` are the raw (not GQA-expanded) cache
``[B, Hkv, L, D]``. ``plan`` is an encoded :class:`~kernels.plan.SelectPlan`. ``state`` is the
layer's list of state tensors (see ``select_reference.py``), mutated in place so the whole
step stays inside the graph (and inside a CUDA graph).

Fake implementations only compute shapes, so symbolic sequence lengths trace; importing this
module never imports Triton.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .attend_reference import attend_reference
from .plan import decode_plan
from .rules import get_rule
from .select_reference import _state_dict, prefill_reference, select_reference, window_prefill_reference

_log = logging.getLogger("prhs")
# (layer, reason) pairs already logged: a CUDA select that runs the reference says why, once.
_logged_fallbacks: set[tuple[int, str]] = set()


@torch.library.custom_op("prhs::select", mutates_args=("state",))
def select(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    plan: str,
    state: list[torch.Tensor],
    shared: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return select_reference(q, k, v, mask, scale, decode_plan(plan), state, shared)


@select.register_fake
def _select_fake(q, k, v, mask, scale, plan, state, shared=None):
    if shared is not None:
        return torch.empty_like(shared)
    p = decode_plan(plan)
    slots = k.shape[2] if get_rule(p.policy).all_positions else p.slots
    return k.new_empty((q.shape[0], k.shape[1], slots), dtype=torch.int32)


@torch.library.custom_op("prhs::attend", mutates_args=())
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    return attend_reference(q, k, v, idx, mask, scale)


@attend.register_fake
def _attend_fake(q, k, v, idx, mask, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("prhs::prefill", mutates_args=("state",))
def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
    plan: str,
    state: list[torch.Tensor],
) -> None:
    prefill_reference(q, k, mask, is_causal, scale, decode_plan(plan), state)


@prefill.register_fake
def _prefill_fake(q, k, mask, is_causal, scale, plan, state):
    return None


@torch.library.custom_op("prhs::window_prefill", mutates_args=("state",))
def window_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
    plan: str,
    state: list[torch.Tensor],
) -> torch.Tensor:
    return window_prefill_reference(q, k, v, mask, is_causal, scale, decode_plan(plan), state)


@window_prefill.register_fake
def _window_prefill_fake(q, k, v, mask, is_causal, scale, plan, state):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@select.register_kernel("cuda")
def _select_cuda(q, k, v, mask, scale, plan, state, shared=None):
    from .pages_triton import PagesKernelUnavailable  # Triton only when a GPU runs it
    from .select_step_triton import select_step_triton, unsupported_reason

    p = decode_plan(plan)
    named = _state_dict(p, state, q, k)
    reason = unsupported_reason(p, q, k, named)
    if reason is None:
        try:
            return select_step_triton(q, k, mask, scale, p, named, shared)
        except PagesKernelUnavailable as exc:  # the reference redoes what the step had done
            reason = f"page kernels unavailable ({exc})"
    # The dense policy needs no ranking: the reference's index list is all it does.
    if p.policy != "dense" and (p.layer, reason) not in _logged_fallbacks:
        _logged_fallbacks.add((p.layer, reason))
        _log.warning("prhs: layer %d selects with the torch reference on CUDA (it scores the "
                     "whole cache every step): %s", p.layer, reason)
    return select_reference(q, k, v, mask, scale, p, state, shared)


@attend.register_kernel("cuda")
def _attend_cuda(q, k, v, idx, mask, scale):
    from .attend_triton import attend_triton  # Triton is imported only when a GPU runs it

    return attend_triton(q, k, v, idx, mask, scale)


@window_prefill.register_kernel("cuda")
def _window_prefill_cuda(q, k, v, mask, is_causal, scale, plan, state):
    # FlexAttention is imported (and compiled) only when a GPU runs it
    from .window_prefill_flex import window_prefill_flex_and_reset

    return window_prefill_flex_and_reset(q, k, v, mask, is_causal, scale, decode_plan(plan), state)
