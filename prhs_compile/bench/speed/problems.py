"""Random decode problems for the engine's kernel scripts (``scripts/engine_sweep.py``,
``scripts/topk_probe.py``): one query position over a full static cache."""

from __future__ import annotations

import torch


def decode_problem(B: int, L: int, *, q_heads: int, kv_heads: int, head_dim: int, sink: int,
                   local: int, budget: int, device, seed: int | None = None):
    """(q, k, mask operand, bounds) of one decode step: bf16 q ``[B, q_heads, 1, head_dim]``
    and K ``[B, kv_heads, L, head_dim]`` drawn from a generator seeded with ``B + L`` (or
    ``seed``), a bool mask with every position valid, and the bounds for ``budget`` with
    ``sink`` and ``local``."""
    from prhs_compile.kernels.bounds_triton import compute_bounds, mask_operand

    gen = torch.Generator(device=device).manual_seed(B + L if seed is None else seed)
    q = torch.randn(B, q_heads, 1, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, kv_heads, L, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
    operand = mask_operand(mask, B, 1, L)
    bounds = compute_bounds(*operand, B, 1, L, sink, local, budget, 0, device)
    return q, k, operand, bounds
