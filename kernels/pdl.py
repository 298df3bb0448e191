"""Programmatic dependent launch (PDL) between the decode step's kernels, on Hopper and later.

Inside a CUDA graph a small kernel costs its own microseconds, and part of each is the gap
between one kernel's end and the next one's start (the next grid's launch, its programs
placed on the SMs). A kernel launched with PDL may start while the kernel before it in the
stream still runs: its programs are placed as soon as every program of that kernel has
signalled (``gdc_launch_dependents``), and each waits (``gdc_wait``) until that kernel has
finished and its writes are visible. So the launch overlaps the previous kernel's work.

The contract every kernel here keeps: ``wait_for_inputs`` comes first, before any load or
store of global memory. Waiting on the kernel just before it waits, transitively, on every
earlier one (that kernel waited too, or was launched without PDL, which serialises the
stream as always), so no read sees a stale value and no write overtakes an earlier reader
(as long as every kernel launched with PDL in the stream waits before it signals, which
Inductor's own PDL kernels do too).
The signal right after the wait lets the next kernel be placed while this one works: it
fires once every program of this launch has passed it, so programs of the next launch
never take the place of one of this launch's that has not started (the top-k, whose
programs wait for each other, needs all of its own resident).

``PRHS_PDL`` in the environment: ``1`` (default) as above; ``exit``: launched with PDL and
waiting, but without the early signal, so the next kernel is placed only as this one's
programs exit (its programs then spread over an idle GPU rather than over the SMs the
tail of this kernel leaves free); ``0``: launched as before. ``launch_options(device)``
gives a launch's keyword arguments (PDL is off where the device is not an NVIDIA GPU of
compute capability 9 or more, and under the Triton interpreter); ``pdl(device)`` the mode.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4 on every backend's wheel; the kernels never reach it where PDL is off
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None

__all__ = ["launch_options", "pdl", "wait_for_inputs"]


OFF, EARLY, AT_EXIT = 0, 1, 2  # the modes (the kernels' PDL constexpr)
_MODES = {"0": OFF, "1": EARLY, "exit": AT_EXIT}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """First thing in a kernel launched with ``launch_options``: wait for the kernel before
    it, then (mode EARLY) let the next one be placed (module docstring)."""
    if PDL != 0:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()


def pdl(device: torch.device) -> int:
    """How kernels on ``device`` are launched: OFF, EARLY or AT_EXIT."""
    return _mode(os.environ.get("PRHS_PDL", "1").strip().lower(),
                 os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), device.type,
                 device.index)


@functools.lru_cache(maxsize=None)
def _mode(setting: str, interpreted: bool, device_type: str, index) -> int:
    """``pdl``'s answer, once per setting and device (every launch asks)."""
    if setting not in _MODES:
        raise ValueError(f"PRHS_PDL={setting!r}: expected one of {sorted(_MODES)}")
    if device_type != "cuda" or gdc_wait is None or _MODES[setting] == OFF or interpreted:
        return OFF
    if torch.version.hip is not None:  # ROCm reports its own versions as capabilities
        return OFF
    index = torch.cuda.current_device() if index is None else index
    return _MODES[setting] if torch.cuda.get_device_capability(index)[0] >= 9 else OFF


def launch_options(device: torch.device) -> dict:
    """Keyword arguments of a launch: the kernel's ``PDL`` constexpr and, with it on,
    Triton's ``launch_pdl``."""
    mode = pdl(device)
    return {"PDL": mode, "launch_pdl": True} if mode != OFF else {"PDL": OFF}
