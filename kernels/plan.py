"""The static description of one rewritten attention call: a ``SelectPlan``.

The graph pass builds one plan per attention call and passes it to the custom ops as a short
``key=value;...`` string. A string (rather than an integer handle into a process-local table)
keeps the rewritten graph self-describing: it reads well in graph dumps and snapshots, and a
graph restored from Inductor's FX-graph cache in another process means the same thing.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class SelectPlan:
    """What one layer's ``select`` does. All fields are static for a compiled graph."""

    policy: str
    layer: int
    budget: int  # positions attended per KV head, sinks and local window included
    sink: int = 0  # first valid positions always kept
    local: int = 0  # most recent valid positions always kept
    min_context: int = 0  # rows with fewer valid positions attend to all of them
    tau: float = 0.8  # cosine gate for reusing a selection (policies that reuse)
    dilation_m: int = -1  # top positions whose neighbours are pulled in; -1: a third of the top-k
    dilation_r: int = 1  # neighbourhood radius of the dilation
    max_reuse: int = 16  # a selection serves at most this many steps (1: retrieve every step)
    delta_target: float = 0.0  # > 0: keep the smallest set whose retained mass >= 1 - delta_target
    psaw_start: int = -1  # first layer of the progressive recency window (-1: off)
    psaw_phi: float = 0.5
    psaw_alpha: float = 1.0
    num_layers: int = 0  # decoder layers of the model (for the recency window schedule)
    share_from: int = -1  # reuse the selection of this (earlier) layer instead of retrieving
    head_budgets: str = ""  # per-KV-head budgets of this layer ("64,192"), from an LU-KV table
    kv_len: int = 0  # static cache length, for rules that keep per-position state (H2O)
    verify: bool = False  # measure the exact dropped attention mass every step (host sync)
    retrieval: str = "exact"  # "exact": every retrievable key; two-stage: "pages" (pages.py), "sketch" (sketch.py)
    page_size: int = 16  # positions per page of the page summaries (retrieval="pages")
    candidates: int = 4  # two-stage retrieval scores exactly this x budget positions (the best pages' or positions')
    max_cache_len: int = 32768  # positions the stored page summaries cover

    @property
    def head_budget_list(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.head_budgets.split(",")) if self.head_budgets else ()

    @property
    def middle(self) -> int:
        """Retrieved positions per KV head (the largest, with per-head budgets): the budget
        left after sinks and local window."""
        return max(self.head_budget_list or (self.budget,)) - self.sink - self.local

    def head_middles(self, device):
        """Per-KV-head retrieved counts as a tensor, or None without per-head budgets. The
        tensor is made once per device: a select step (every decode step, possibly inside a
        CUDA graph being captured) must not copy it from the host each time. On a GPU the
        selection state's allocation makes it first, outside any CUDA graph
        (``prhs_compile.state.allocate_state``)."""
        if not self.head_budgets:
            return None
        return _head_middles(self.head_budget_list, self.sink + self.local,
                             str(device_key(device)))

    @property
    def psaw_fraction(self) -> float:
        """1 - phi ** (alpha * (l - l_s) / (N - l_s)): the share of the valid positions outside
        this layer's progressive recency window; -1 when the layer has no window."""
        if self.psaw_start < 0 or self.layer < self.psaw_start or self.num_layers <= self.psaw_start:
            return -1.0
        depth = (self.layer - self.psaw_start) / (self.num_layers - self.psaw_start)
        return 1.0 - self.psaw_phi ** (self.psaw_alpha * depth)

    def psaw_excluded(self, count):
        """Oldest non-sink positions outside this layer's progressive recency window.

        P_l(t) = floor(psaw_fraction * t) for l >= l_s, else 0. ``count`` is the number of
        valid positions t (a tensor); returns a tensor like it.
        """
        fraction = self.psaw_fraction
        if fraction < 0:
            return count * 0
        return (fraction * count).floor().long()

    def psaw_cut(self, count):
        """``psaw_excluded(count)`` never eating into the local window: at most the
        ``count - sink - local`` valid positions between the sinks and the local window."""
        return self.psaw_excluded(count).minimum((count - self.sink - self.local).clamp_min(0))

    @property
    def slots(self) -> int:
        """Number of index slots ``select`` returns per (batch row, KV head).

        Rows with fewer than ``min_context`` valid positions attend to all of them, so the
        slot count must hold ``min_context`` positions as well as ``budget``.
        """
        return max(self.budget, self.min_context, *self.head_budget_list)

    def encode(self) -> str:
        """``policy=oracle;layer=3;budget=256;sink=4`` (fields at their default are left out)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in _ALWAYS_ENCODED and value == f.default:
                continue
            parts.append(f"{f.name}={int(value) if isinstance(value, bool) else value}")
        return ";".join(parts)


def device_key(device):
    """``device`` as a ``torch.device`` naming its index (``cuda`` -> ``cuda:N``), so that
    a cache keyed by device holds one entry per GPU however the device is named."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=None)
def _head_middles(budgets: tuple[int, ...], always_kept: int, device: str):
    import torch

    return torch.tensor([b - always_kept for b in budgets], device=device).clamp_min(0)


_ALWAYS_ENCODED = ("policy", "layer", "budget")
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(SelectPlan)}
_CASTS = {"str": str, "int": int, "float": float, "bool": lambda s: bool(int(s))}


@functools.lru_cache(maxsize=None)
def decode_plan(text: str) -> SelectPlan:
    """Inverse of :meth:`SelectPlan.encode` (cached: the ops call it on every step)."""
    values = {}
    for part in text.split(";"):
        name, _, raw = part.partition("=")
        if name not in _FIELD_TYPES:
            raise ValueError(f"unknown select-plan field {name!r} in {text!r}")
        values[name] = _CASTS[_FIELD_TYPES[name]](raw)
    return SelectPlan(**values)
