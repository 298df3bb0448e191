"""Pure-torch reference of ``prhs::attend``: softmax attention over selected positions."""

from __future__ import annotations

import torch


def attend_reference(q, k, v, idx, mask, scale: float) -> torch.Tensor:
    """Attention of ``q [B, Hq, Tq, D]`` over the positions ``idx [B, Hkv, S]`` of each KV head.

    ``k [B, Hkv, L, D]``, ``v [B, Hkv, L, Dv]``; query head ``h`` reads KV head ``h // G``.
    ``idx`` holds positions in ``[0, L)`` or -1 for an empty slot. ``mask`` (bool, True =
    allowed, or an additive float bias) broadcasts to ``[B, 1, Tq, L]`` and is read only at the
    selected positions. Rows with no allowed slot give zeros.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    safe = idx.clamp_min(0).long()  # [B, Hkv, S]
    k_sel = k.gather(2, safe[..., None].expand(-1, -1, -1, head_dim))
    v_sel = v.gather(2, safe[..., None].expand(-1, -1, -1, v.shape[-1]))

    qg = q.reshape(batch, kv_heads, group, q_len, head_dim).float()
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k_sel.float()) * scale
    allowed = (idx >= 0)[:, :, None, None, :].expand(-1, -1, group, q_len, -1)
    if mask is not None:
        m = mask.expand(batch, 1, q_len, kv_len)[:, 0]  # [B, Tq, L]
        m_sel = m[:, None].expand(-1, kv_heads, -1, -1).gather(
            3, safe[:, :, None, :].expand(-1, -1, q_len, -1)
        )[:, :, None]  # [B, Hkv, 1, Tq, S]
        if m.dtype == torch.bool:
            allowed = allowed & m_sel
        else:
            allowed = allowed & (m_sel > torch.finfo(m.dtype).min / 2)
            logits = logits + m_sel.float()
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, v_sel.float())
    return out.reshape(batch, q_heads, q_len, v.shape[-1]).to(q.dtype)
