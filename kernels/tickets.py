"""Atomic tickets: a zeroed int32 buffer per device for a kernel whose last program of a group
finishes the group's work, so that it needs no second launch (the bounds' mask stats: the
last chunk of a row writes the row's bounds; attend: the last split of a KV head merges the
splits).

The kernel increments its group's ticket and the program that draws the last one resets it
to 0, so the buffer is all zeros again after every launch: one buffer serves every call and
every CUDA-graph replay, and kernels that run one after another on a device's stream could
share it.

The buffer is made only by ``reserve_tickets``, which the selection state's allocation calls
outside any CUDA graph: a persistent buffer first made inside a CUDA-graph tree's recording
run would be an allocation of its memory pool that no output tracks, which torch refuses.
A call that finds none large enough gets zeros of its own (a fill launch more).
"""

from __future__ import annotations

import torch

from .plan import device_key

__all__ = ["reserve_tickets", "tickets"]

_BUFFERS: dict = {}


def reserve_tickets(device, count: int) -> None:
    """Keep a zeroed ticket buffer of at least ``count`` entries for ``device``."""
    device = device_key(device)
    buf = _BUFFERS.get(device)
    if buf is None or buf.numel() < count:
        _BUFFERS[device] = torch.zeros(max(count, 256), dtype=torch.int32, device=device)


def tickets(device, count: int) -> torch.Tensor:
    """``count`` zeroed tickets: the reserved buffer, or zeros of this call's own."""
    buf = _BUFFERS.get(device_key(device))
    if buf is None or buf.numel() < count:
        return torch.zeros(count, dtype=torch.int32, device=device)
    return buf
