"""HShare's label channels on the GPU (policy ``hshare``; its rule is ``HShareRule``).

The label channels of a KV head are the ``D // 8`` channels with the largest sum of ``|k|``
over the valid positions. They are chosen at prefill, and again at a decode step for rows
that continue no sequence this state saw; ``channel_abs_sums`` computes the sums for the
flagged (row, KV head) slots only (the others read no K), with no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bounds_triton import row_bounds, valid_positions
from .kpass_triton import num_sms, split_range

__all__ = ["channel_abs_sums"]


@triton.jit
def _channel_abs_sum_kernel(
    K, MASK, BOUNDS, ACTIVE, OUT, Hkv, Tq, num_splits,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_mb, stride_mt, stride_ml, mask_min,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, TQ_P2: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    lo, hi, _, _, _, _ = row_bounds(BOUNDS, b)
    hi = tl.where(tl.load(ACTIVE + pid_bh) != 0, hi, lo)
    start, end = split_range(lo, hi, split, num_splits, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + tl.arange(0, BLOCK_N)
        ok = valid_positions(MASK, b, pos, pos < end, Tq, stride_mb, stride_mt, stride_ml,
                             mask_min, MASK_KIND, TQ_P2)
        k = tl.load(K + b * stride_kb + hkv * stride_kh + pos[:, None].to(tl.int64) * stride_kl
                    + offs_d[None, :] * stride_kd, mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.abs(k.to(tl.float32))
    out = OUT + (pid_bh.to(tl.int64) * num_splits + split) * BLOCK_D + offs_d
    tl.store(out, tl.sum(acc, 0))


def channel_abs_sums(k, operand, bounds, active, q_len: int, block_n: int = 64) -> torch.Tensor:
    """fp32 ``[B, Hkv, D]``: sum of ``|k|`` over the valid positions (those at least one of the
    ``q_len`` query rows may attend to), for the ``active`` ``[B, Hkv]`` slots (zeros
    elsewhere)."""
    B, Hkv, L, D = k.shape
    mask_t, kind, ms, mask_min = operand
    if mask_t is None:
        mask_t = bounds  # unused placeholder pointer
    block_d = max(16, triton.next_power_of_2(D))
    num_splits = max(1, min(triton.cdiv(4 * num_sms(k.device), B * Hkv), triton.cdiv(L, block_n)))
    part = torch.empty((B * Hkv, num_splits, block_d), dtype=torch.float32, device=k.device)
    _channel_abs_sum_kernel[(B * Hkv, num_splits)](
        k, mask_t, bounds, active.reshape(-1).to(torch.int32), part, Hkv, q_len, num_splits,
        *k.stride(), *ms, mask_min, D=D, BLOCK_N=block_n, BLOCK_D=block_d, MASK_KIND=kind,
        TQ_P2=triton.next_power_of_2(q_len), num_warps=4,
    )
    return part.sum(1)[:, :D].view(B, Hkv, D)
