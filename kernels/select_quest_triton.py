"""Quest's page scores on the GPU (policy ``quest``; its rule is ``QuestRule``).

A page of ``PAGE`` consecutive positions keeps, per channel, the min and max of its keys over
the positions a retrieval may pick (valid, outside the sink and local windows); its score for
the group's query rows is ``sum_rows sum_d max(q_d * min_d, q_d * max_d)``, an upper bound of
every ``q . k`` in it. One program scores one page of one (row, KV head): it reads the page's
keys once (no fp32 copy of K, no ``[B, Hkv, pages, D]`` min/max tensors), and pages with no
such position score ``-inf``. The best ``middle // PAGE`` pages are then kept whole.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from .select_triton import _row_bounds, _valid_positions

__all__ = ["QuestKernelUnavailable", "quest_page_scores", "quest_picks"]

# Set when the page kernel failed to compile on this machine: quest then selects with the
# torch reference (the caller logs why).
unavailable: str | None = None


class QuestKernelUnavailable(RuntimeError):
    """The page kernel cannot run here; nothing was mutated, use the reference instead."""


@triton.jit
def _quest_page_kernel(
    Q, K, MASK, BOUNDS, OUT, Hkv, G, Tq, L, pages,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_mt, stride_ml, mask_min,
    D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    page = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    lo, hi, _, sink_end, local_start, _ = _row_bounds(BOUNDS, b)

    pos = page * PAGE + tl.arange(0, PAGE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    inside = (pos >= lo) & (pos < hi) & (pos >= sink_end) & (pos < local_start)
    inside = inside & _valid_positions(MASK, b, pos, inside, Tq, stride_mb, stride_mt, stride_ml,
                                       mask_min, MASK_KIND, TQ_P2)
    k = tl.load(K + b * stride_kb + hkv * stride_kh + pos[:, None].to(tl.int64) * stride_kl
                + offs_d[None, :] * stride_kd, mask=inside[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    k_min = tl.min(tl.where(inside[:, None], k, float("inf")), 0)  # [BLOCK_D]
    k_max = tl.max(tl.where(inside[:, None], k, float("-inf")), 0)
    any_inside = tl.sum(inside.to(tl.int32), 0) > 0
    k_min = tl.where(d_ok & any_inside, k_min, 0.0)
    k_max = tl.where(d_ok & any_inside, k_max, 0.0)

    # The group's query rows (head-major, then query position), as the reference orders them.
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < G * Tq
    head = hkv * G + (offs_m // Tq).to(tl.int64)
    tpos = (offs_m % Tq).to(tl.int64)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + tpos[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    bound = tl.maximum(q * k_min[None, :], q * k_max[None, :])
    score = tl.sum(tl.sum(bound, 1), 0)
    tl.store(OUT + pid_bh.to(tl.int64) * pages + page, tl.where(any_inside, score, float("-inf")))


def quest_page_scores(q, k, operand, bounds, page: int) -> torch.Tensor:
    """fp32 ``[B, Hkv, pages]`` page scores (``-inf``: no pickable position in the page)."""
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    pages = triton.cdiv(L, page)
    mask_t, kind, ms, mask_min = operand
    if mask_t is None:
        mask_t = bounds  # unused placeholder pointer
    global unavailable
    if unavailable is not None:
        raise QuestKernelUnavailable(unavailable)
    out = torch.empty((B, Hkv, pages), dtype=torch.float32, device=q.device)
    try:
        _quest_page_kernel[(B * Hkv, pages)](
            q, k, mask_t, bounds, out, Hkv, Hq // Hkv, Tq, L, pages, *q.stride(), *k.stride(),
            *ms, mask_min, D=D, PAGE=page,
            BLOCK_M=max(16, triton.next_power_of_2(Hq // Hkv * Tq)),
            BLOCK_D=max(16, triton.next_power_of_2(D)), MASK_KIND=kind,
            TQ_P2=triton.next_power_of_2(Tq), num_warps=4,
        )
    except CompilationError as exc:  # compiled before it runs: nothing written yet
        unavailable = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise QuestKernelUnavailable(unavailable) from exc
    return out


def quest_picks(page_score: torch.Tensor, middle: int, page: int, length: int) -> torch.Tensor:
    """The positions of the best ``middle // page`` pages, ascending int32 ``[B, Hkv, n * page]``
    (-1 for pages not chosen; the compose kernel drops positions outside the retrieval region)."""
    top = page_score.topk(min(middle // page, page_score.shape[-1]), dim=-1)
    pages = torch.where(top.values > float("-inf"), top.indices, -1).sort(-1).values
    pos = pages[..., None] * page + torch.arange(page, device=pages.device)
    pos = torch.where((pages[..., None] >= 0) & (pos < length), pos, -1)
    return pos.flatten(-2).to(torch.int32)
