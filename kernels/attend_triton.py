"""Triton decode attention over selected KV positions ("attend"), GQA-aware split-K.

Semantics (see ``attend_triton``): for every query row, softmax over the selected slots
``idx[b, h // G, :]`` that are not ``-1`` (and that the mask allows), then the weighted sum
of the matching V rows. Nothing gathered is ever written to memory: each program reads the
selected K/V rows straight from the (possibly strided, static) cache.

One kernel (flash-decoding with the combine fused in), ``_attend_split_kernel``, grid
``(B * Hkv, num_splits, m_blocks)``. One program owns one KV head of one batch row and a
contiguous range of slots. Decode is memory bound and the G query heads of a group share
their K/V rows, so the program treats the ``G * Tq`` query rows of the group as the M side of
a small matmul and reads every selected K/V row once for all of them. With a single split it
writes the output directly; otherwise it writes an fp32 partial (normalised output,
log-sum-exp) and draws an atomic ticket of its (KV head, row block), and the program that
draws the last one merges every split's partials into the output (``_combine_rows``),
loading them in tiles rather than split after split (a chain of dependent loads at the
tail of the launch). In a CUDA graph a small kernel costs its own microseconds, so the
merge saves one (README, "Kernels and the GPU").

Everything is decided from shapes on the host; no tensor values are read there, so the call
can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .bounds_triton import mask_load_ok, mask_row_ptrs
from .kpass_triton import num_sms
from .pdl import launch_options, wait_for_inputs
from .tickets import tickets

__all__ = ["attend_triton"]

# Scores are kept in the log2 domain so the kernels can use exp2 (a single MUFU op on GPU).
_LOG2E = 1.4426950408889634

_MASK_NONE = 0
_MASK_BOOL = 1
_MASK_ADD = 2


@triton.jit
def _attend_split_kernel(
    Q, K, V, IDX, MASK, O_PART, LSE_PART, OUT, TICKETS,
    qk_scale_log2,
    Hkv, G, Tq, S, L, num_splits, blocks_per_split,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ib, stride_ih, stride_is,
    stride_mb, stride_mh, stride_mt, stride_ml,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, DIRECT: tl.constexpr, DOT_F32: tl.constexpr,
    SHARED_ROWS: tl.constexpr, PREFETCH_IDX: tl.constexpr, ROWS_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr, SPLIT_CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    # int64 bases: a static cache of B * Hkv * L * D elements passes 2**31 at realistic sizes.
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    M = G * Tq

    # Row m of the tile is query head hkv * G + m // Tq at query position m % Tq, so the rows
    # of one group are contiguous in a [B, Hq, Tq, *] layout: row id = pid_bh * M + m.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    head = hkv * G + (offs_m // Tq).to(tl.int64)
    tpos = (offs_m % Tq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV

    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + tpos[:, None] * stride_qt
        + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    idx_base = IDX + b * stride_ib + hkv * stride_ih
    mask_rows = mask_row_ptrs(MASK + b * stride_mb, head * stride_mh + tpos * stride_mt,
                              SHARED_ROWS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo = split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, S)
    # PREFETCH_IDX: the next block's positions are loaded while this block's K/V rows are,
    # so the gathers of consecutive blocks do not wait on an index load in between.
    offs_next = lo + tl.arange(0, BLOCK_N)
    pos_next = tl.load(idx_base + offs_next * stride_is, mask=offs_next < hi, other=-1)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if PREFETCH_IDX:
            pos = pos_next
            offs_next = offs_n + BLOCK_N
            pos_next = tl.load(idx_base + offs_next * stride_is, mask=offs_next < hi, other=-1)
        else:
            pos = tl.load(idx_base + offs_n * stride_is, mask=offs_n < hi, other=-1)
        # -1 slots (and, defensively, anything outside the cache) become predicated-off
        # loads: they cost no memory traffic, which is what matters for a bandwidth-bound
        # kernel. A branch skipping whole empty blocks would stop Triton from pipelining
        # the K/V loads, so it is not worth it.
        valid = (pos >= 0) & (pos < L)
        pos64 = pos.to(tl.int64)

        k = tl.load(
            k_base + pos64[:, None] * stride_kl + offs_d[None, :] * stride_kd,
            mask=valid[:, None] & d_ok[None, :], other=0.0,
        )
        # "ieee" keeps fp32 inputs out of TF32; for bf16/fp16 it changes nothing.
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = s * qk_scale_log2
        mask_ld = mask_load_ok(mask_rows, m_ok, valid)
        if MASK_KIND == 1:
            mv = tl.load(mask_rows + pos64[None, :] * stride_ml, mask=mask_ld, other=0)
            s = tl.where(valid[None, :] & (mv != 0), s, float("-inf"))
        elif MASK_KIND == 2:
            bias = tl.load(mask_rows + pos64[None, :] * stride_ml, mask=mask_ld, other=0.0)
            s = tl.where(valid[None, :], s + bias.to(tl.float32) * 1.4426950408889634,
                         float("-inf"))
        else:
            s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen nothing allowed, m is -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out, and every p and alpha stays exactly 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(
            v_base + pos64[:, None] * stride_vl + offs_dv[None, :] * stride_vd,
            mask=valid[:, None] & dv_ok[None, :], other=0.0,
        )
        # P is rounded to V's dtype, as the tensor cores need; DOT_F32 keeps that rounding.
        pv = p.to(v.dtype)
        if DOT_F32:
            pv = tl.dot(pv.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(pv, v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # A row with nothing allowed keeps l = 0 and acc = 0: dividing by 1 gives the zeros the
    # contract asks for (and a -inf lse, i.e. zero weight in the combine).
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    row = pid_bh.to(tl.int64) * M + offs_m
    if DIRECT:
        tl.store(OUT + row[:, None] * DV + offs_dv[None, :], o.to(OUT.dtype.element_ty),
                 mask=m_ok[:, None] & dv_ok[None, :])
    else:
        part = row * num_splits + split
        tl.store(O_PART + part[:, None] * DV + offs_dv[None, :], o,
                 mask=m_ok[:, None] & dv_ok[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=m_ok)
        # Release: every thread's partials are stored before the ticket is drawn; acquire:
        # the program with the last ticket sees every other split's.
        tl.debug_barrier()
        ticket = TICKETS + pid_bh * tl.num_programs(2) + pid_m
        done = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            tl.store(ticket, 0)  # zero again for the next launch (tickets.py)
            first = pid_bh.to(tl.int64) * M + pid_m * BLOCK_M
            _combine_rows(O_PART, LSE_PART, OUT, first, tl.minimum(M - pid_m * BLOCK_M, BLOCK_M),
                          num_splits, DV, BLOCK_DV, ROWS_P2, SPLITS_P2, SPLIT_CHUNK)


@triton.jit
def _combine_rows(O_PART, LSE_PART, OUT, first, n_rows, num_splits, DV: tl.constexpr,
                  BLOCK_DV: tl.constexpr, ROWS_P2: tl.constexpr, SPLITS_P2: tl.constexpr,
                  SPLIT_CHUNK: tl.constexpr):
    """Merge the splits' partials of query rows ``first .. first + n_rows - 1`` into the
    output: each split's normalised output weighted by its share of the row's softmax sum.
    ``ROWS_P2`` rows at a time, ``SPLIT_CHUNK`` splits per load (their loads in flight
    together). The partials were written by other programs of this launch: they are read
    past L1 (``.cg``), whose lines are not kept coherent between SMs."""
    offs_r = tl.arange(0, ROWS_P2)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_c = tl.arange(0, SPLIT_CHUNK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    for r0 in range(0, n_rows, ROWS_P2):
        row = first + r0 + offs_r
        r_ok = (r0 + offs_r) < n_rows
        lse = tl.load(LSE_PART + row[:, None] * num_splits + offs_s[None, :],
                      mask=r_ok[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"),
                      cache_modifier=".cg")
        lse_max = tl.max(lse, 1)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        denom = tl.sum(tl.exp2(lse - lse_max[:, None]), 1)
        acc = tl.zeros([ROWS_P2, BLOCK_DV], tl.float32)
        for s0 in range(0, num_splits, SPLIT_CHUNK):
            sp = s0 + offs_c
            ok = r_ok[:, None] & (sp < num_splits)[None, :]
            part = row[:, None] * num_splits + sp[None, :]
            w = tl.exp2(tl.load(LSE_PART + part, mask=ok, other=float("-inf"),
                                cache_modifier=".cg") - lse_max[:, None])
            o = tl.load(O_PART + part[:, :, None] * DV + offs_dv[None, None, :],
                        mask=ok[:, :, None] & dv_ok[None, None, :], other=0.0,
                        cache_modifier=".cg")
            acc += tl.sum(w[:, :, None] * o, 1)
        out = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
        tl.store(OUT + row[:, None] * DV + offs_dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=r_ok[:, None] & dv_ok[None, :])


def _pick_splits(n_blocks: int, n_base_programs: int, num_sms: int) -> tuple[int, int]:
    """Return ``(num_splits, blocks_per_split)`` for ``n_blocks`` slot blocks per KV head.

    Decode attention is bandwidth bound, and one SM cannot pull its share of HBM bandwidth
    with a single resident program whose loads are dependent gathers (idx, then K/V). So aim
    for about 4 programs per SM in total (one wave, several resident per SM to hide load
    latency). Splitting beyond that only adds partial-result traffic and a bigger combine.
    ``n_base_programs`` (B * Hkv * m_blocks) already fills the machine for large batches,
    in which case one split is kept and nothing is merged. The split
    count is then recomputed from the blocks per split so that no split is empty (only the
    last may be shorter).
    """
    target = CONFIG["programs_per_sm"] * num_sms
    splits = max(1, min(triton.cdiv(target, max(1, n_base_programs)), n_blocks))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split


# Kernel configuration; module-level so that ``scripts/attend_sweep.py`` can sweep it (its
# findings: README, "Kernel configurations"). 8 warps leave the small tile of an iteration
# too little work. ``programs_per_sm``: the split-K target (see ``_pick_splits``).
# ``prefetch_idx``: load the next block's positions one iteration ahead, so consecutive
# gathers do not wait on an index load in between. (Loading a block's V rows with its K
# rows rather than after the scores measured no faster at B=1 or 16: README.)
CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4,
          "prefetch_idx": True}


# fp32 elements of the merge's tiles (the rows' log-sum-exps, the partials of one load):
# about 64 registers a thread at 4 warps.
MERGE_TILE = 8192


def _kernel_config(d: int, dv: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages)."""
    return CONFIG["block_n"], CONFIG["num_warps"], CONFIG["num_stages"]


def _mask_operand(mask: torch.Tensor, B: int, Hq: int, Tq: int, L: int):
    m4 = mask
    while m4.dim() < 4:
        m4 = m4.unsqueeze(0)
    if m4.dim() != 4:
        raise ValueError(f"mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    if m4.shape[0] not in (1, B) or m4.shape[1] not in (1, Hq) or m4.shape[2] not in (1, Tq):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"[{B}, 1, {Tq}, {L}]")
    # A static-cache mask may be longer than the K/V view passed in; only columns < L are
    # ever gathered, so the extra ones are harmless.
    if m4.shape[3] != 1 and m4.shape[3] < L:
        raise ValueError(f"mask last dim {m4.shape[3]} is shorter than the cache length {L}")
    if m4.dtype == torch.bool:
        kind = _MASK_BOOL
        # Same itemsize, so this is a free reinterpretation; it avoids relying on how each
        # Triton version lowers loads through an i1 pointer.
        m4 = m4.view(torch.uint8)
    elif m4.is_floating_point():
        kind = _MASK_ADD
    else:
        raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
    # Broadcast dims read with stride 0 (no copy); expand already does that for the ones it
    # grows, and a size-1 dim that stays size 1 may carry any stride, so zero it too.
    strides = [0 if m4.shape[i] == 1 else m4.stride(i) for i in range(4)]
    return m4, kind, strides


def attend_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over the KV positions listed in ``idx``.

    q: [B, Hq, Tq, D]; k: [B, Hkv, L, D]; v: [B, Hkv, L, Dv], any strides; Hq % Hkv == 0 and
    query head h reads KV head h // (Hq // Hkv). idx: [B, Hkv, S] integer positions in
    [0, L), unique within a row, any order, -1 for an empty slot. mask: None, or bool
    (True = may attend) / float (additive bias) broadcastable to [B, 1, Tq, L]; only the
    entries at the selected positions are read. Softmax of ``q . k * scale`` (fp32) over the
    valid slots; a query row with no valid slot yields zeros. Returns [B, Hq, Tq, Dv] in
    q's dtype. ``scale`` defaults to 1/sqrt(D).

    ``num_splits`` / ``block_n`` override the heuristics (tests and benchmarks).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or idx.dim() != 3:
        raise ValueError("expected q, k, v of rank 4 and idx of rank 3")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, L, Dk = k.shape
    if (Bk, Dk) != (B, D) or tuple(v.shape[:3]) != (B, Hkv, L):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if tuple(idx.shape[:2]) != (B, Hkv):
        raise ValueError(f"idx shape {tuple(idx.shape)} does not match [B={B}, Hkv={Hkv}, S]")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q/k/v must share one of fp16/bf16/fp32, got "
                        f"{q.dtype}/{k.dtype}/{v.dtype}")
    Dv = v.shape[3]
    S = idx.shape[2]
    G = Hq // Hkv
    M = G * Tq
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    out = torch.empty((B, Hq, Tq, Dv), dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0 or Tq == 0 or Dv == 0:
        return out

    cfg_block_n, num_warps, num_stages = _kernel_config(D, Dv)
    if block_n is None:
        # Short selections would waste most of a 64-wide block on padding.
        block_n = min(cfg_block_n, max(16, triton.next_power_of_2(S)))
    # tl.dot needs every tile side >= 16 on GPU; padding rows/columns are masked off.
    BLOCK_M = min(64, max(16, triton.next_power_of_2(M)))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    m_blocks = triton.cdiv(M, BLOCK_M)

    n_blocks = max(1, triton.cdiv(S, block_n))
    if num_splits is None:
        num_splits, blocks_per_split = _pick_splits(n_blocks, B * Hkv * m_blocks,
                                                    num_sms(q.device))
    else:
        blocks_per_split = triton.cdiv(n_blocks, max(1, min(num_splits, n_blocks)))
        num_splits = triton.cdiv(n_blocks, blocks_per_split)

    if mask is None:
        mask_t, mask_kind, ms = q, _MASK_NONE, [0, 0, 0, 0]
    else:
        mask_t, mask_kind, ms = _mask_operand(mask, B, Hq, Tq, L)

    direct = num_splits == 1
    if direct:
        o_part = lse_part = ticket_t = out  # unused placeholders
    else:
        o_part = torch.empty((B * Hq * Tq, num_splits, Dv), dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty((B * Hq * Tq, num_splits), dtype=torch.float32,
                               device=q.device)
        ticket_t = tickets(q.device, B * Hkv * m_blocks)
    splits_p2 = triton.next_power_of_2(num_splits)
    rows_p2 = min(triton.next_power_of_2(min(M, BLOCK_M)), max(1, MERGE_TILE // splits_p2))

    _attend_split_kernel[(B * Hkv, num_splits, m_blocks)](
        q, k, v, idx, mask_t, o_part, lse_part, out, ticket_t,
        float(scale) * _LOG2E,
        Hkv, G, Tq, S, L, num_splits, blocks_per_split,
        *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *ms,
        D=D, DV=Dv, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        MASK_KIND=mask_kind, DIRECT=direct,
        # The Triton interpreter (the only way CPU tensors get here) multiplies bf16 tiles as
        # their raw uint16 bit patterns; upcasting first is exact and sidesteps that.
        DOT_F32=q.device.type != "cuda" and q.dtype == torch.bfloat16,
        # One mask row for all query rows of a group (a mask broadcast over heads, and one
        # query position or a mask broadcast over positions): each column is loaded once.
        SHARED_ROWS=ms[1] == 0 and (Tq == 1 or ms[2] == 0),
        PREFETCH_IDX=bool(CONFIG.get("prefetch_idx", False)),
        ROWS_P2=rows_p2, SPLITS_P2=splits_p2,
        SPLIT_CHUNK=min(splits_p2, max(1, MERGE_TILE // (rows_p2 * BLOCK_DV))),
        num_warps=num_warps, num_stages=num_stages, **launch_options(q.device),
    )
    return out
