"""Runtime statistics: decode steps, retrievals and (with ``verify=True``) dropped mass.

Counters live on the device inside each layer's state and are only read here, so collecting
them costs nothing per step. Dropped mass needs the exact attention, so it is measured only
when a graph was compiled with ``verify=True``; those steps report to :func:`_record_dropped`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from prhs_compile.kernels import COUNTER_NAMES, COUNTERS_INDEX, dropped_mass_listeners, state_spec
from prhs_compile.kernels.pages import PAGE_MAX, PAGE_MIN
from prhs_compile.kernels.sketch import SKETCH_BITS, SKETCH_CENTRE, SKETCH_SCALE
from prhs_compile.state import all_states

# layer -> one VerifyStep per decode step (verify mode)
_VERIFY: dict[int, list["VerifyStep"]] = defaultdict(list)


@dataclasses.dataclass
class VerifyStep:
    """Exact dropped attention mass of one decode step of one layer, with its bounds."""

    mean: float  # over batch rows, query heads and query rows
    max: float
    output_bound: float  # max of 2 * dropped * max||v||: L2 error bound of the sparse output
    retrieved_max: float | None  # max group-mean dropped mass over groups that retrieved
    reused_max: float | None  # max group-mean dropped mass over groups that reused a set
    reuse_bound: float | None  # max predicted bound over those reused groups
    reuse_violations: int  # reused groups whose dropped mass exceeded their bound
    retrieved_mean: float | None = None  # mean group-mean dropped mass over groups that retrieved
    retrieved_groups: int = 0  # groups that retrieved
    # two-stage retrieval (retrieval="pages"), over the groups that retrieved; else None:
    exact_retrieved_max: float | None = None  # max dropped mass had they retrieved exactly
    exact_retrieved_mean: float | None = None  # mean of that
    outside_candidates: float | None = None  # mean share of the exact picks not among the candidates
    missed_retrievals: int | None = None  # retrievals where some exact pick was not a candidate


@dataclasses.dataclass
class LayerStats:
    layer: int
    decode_steps: int = 0
    slots: int = 0  # (batch row, KV head) pairs that went through select
    retrievals: int = 0  # of those, how many scored the keys to choose
    resets: int = 0  # rows whose state did not continue the previous step
    prefill_pairs: int = 0  # (query, key, KV head) pairs of causal prefill attention (PSAW layers)
    prefill_pairs_kept: int = 0  # of those, inside the layer's recency window
    page_summary_bytes: int = 0  # memory of the layer's page summaries (retrieval="pages")
    sketch_bytes: int = 0  # memory of the layer's key sketch (retrieval="sketch")
    dropped_mass: list = dataclasses.field(default_factory=list)  # VerifyStep per step

    @property
    def retrieval_rate(self) -> float:
        return self.retrievals / self.slots if self.slots else 0.0

    @property
    def dropped_mean(self) -> float | None:
        return sum(s.mean for s in self.dropped_mass) / len(self.dropped_mass) if self.dropped_mass else None

    @property
    def dropped_max(self) -> float | None:
        return max(s.max for s in self.dropped_mass) if self.dropped_mass else None

    @property
    def reuse_violations(self) -> int:
        return sum(s.reuse_violations for s in self.dropped_mass)

    def two_stage(self) -> dict | None:
        """Verify mode with two-stage retrieval: over every group that retrieved, the mean
        dropped mass of its two-stage picks and of the exact picks of the same step, the
        mean share of the exact picks outside the candidates, and the share of retrievals
        that missed any. None without such records."""
        steps = [s for s in self.dropped_mass if s.exact_retrieved_mean is not None]
        groups = sum(s.retrieved_groups for s in steps)
        if not groups:
            return None

        def weighted(name):
            return sum(getattr(s, name) * s.retrieved_groups for s in steps) / groups

        return {"retrieved_groups": groups, "dropped_mean": weighted("retrieved_mean"),
                "exact_dropped_mean": weighted("exact_retrieved_mean"),
                "outside_candidates": weighted("outside_candidates"),
                "missed_share": sum(s.missed_retrievals for s in steps) / groups}


@dataclasses.dataclass
class PrHSStats:
    layers: dict[int, LayerStats]

    @property
    def decode_steps(self) -> int:
        return max((s.decode_steps for s in self.layers.values()), default=0)

    @property
    def retrieval_rate(self) -> float:
        slots = sum(s.slots for s in self.layers.values())
        return sum(s.retrievals for s in self.layers.values()) / slots if slots else 0.0

    @property
    def page_summary_bytes(self) -> int:
        """Memory the page summaries of every layer hold (``2 / page_size`` of the keys they
        cover)."""
        return sum(s.page_summary_bytes for s in self.layers.values())

    @property
    def sketch_bytes(self) -> int:
        """Memory the key sketches of every layer hold (1/16 of the bf16 keys they cover)."""
        return sum(s.sketch_bytes for s in self.layers.values())

    @property
    def prefill_attention_fraction(self) -> float | None:
        """Share of causal prefill attention pairs (hence FLOPs) the recency windows keep."""
        total = sum(s.prefill_pairs for s in self.layers.values())
        return sum(s.prefill_pairs_kept for s in self.layers.values()) / total if total else None

    def as_dict(self) -> dict:
        return {
            "decode_steps": self.decode_steps,
            "retrieval_rate": self.retrieval_rate,
            "prefill_attention_fraction": self.prefill_attention_fraction,
            "page_summary_bytes": self.page_summary_bytes,
            "sketch_bytes": self.sketch_bytes,
            "layers": {
                layer: {
                    **{f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "dropped_mass"},
                    "retrieval_rate": s.retrieval_rate,
                    "dropped_mean": s.dropped_mean,
                    "dropped_max": s.dropped_max,
                    "reuse_violations": s.reuse_violations,
                    "verify_steps": [dataclasses.asdict(v) for v in s.dropped_mass],
                }
                for layer, s in sorted(self.layers.items())
            },
        }

    def __str__(self) -> str:
        window = self.prefill_attention_fraction
        lines = [
            f"prhs stats: {self.decode_steps} decode steps, retrieval rate {self.retrieval_rate:.3f}"
            + ("" if window is None else f", windowed prefill keeps {window:.3f} of the windowed layers' attention pairs"),
            f"{'layer':>5} {'steps':>6} {'slots':>7} {'retrievals':>10} {'resets':>6} {'dropped mean':>12} {'dropped max':>11}",
        ]
        for layer, s in sorted(self.layers.items()):
            mean = "-" if s.dropped_mean is None else f"{s.dropped_mean:.2e}"
            mx = "-" if s.dropped_max is None else f"{s.dropped_max:.2e}"
            lines.append(f"{layer:>5} {s.decode_steps:>6} {s.slots:>7} {s.retrievals:>10} {s.resets:>6} {mean:>12} {mx:>11}")
        return "\n".join(lines)


def stats(across_ranks: bool = False) -> PrHSStats:
    """Statistics of every rewritten layer since the last :func:`reset_stats` (host sync).

    ``across_ranks=True`` (tensor parallelism, ``torch.distributed`` initialised): every rank
    must call it; slots, retrievals, resets and prefill pairs are summed over the ranks
    (each holds its share of the KV heads), decode steps are the largest any rank counted,
    and verify records and page-summary memory stay the calling rank's own."""
    layers: dict[int, LayerStats] = {}
    rows = [(plan.layer, tensors[COUNTERS_INDEX].tolist()) for plan, tensors in all_states()]
    if across_ranks:
        rows = _gathered(rows)
    for layer, counters in rows:
        s = layers.setdefault(layer, LayerStats(layer))
        values = dict(zip(COUNTER_NAMES, counters))
        s.decode_steps += values["decode_calls"]
        s.slots += values["slots"]
        s.retrievals += values["retrievals"]
        s.resets += values["resets"]
        s.prefill_pairs += values["prefill_pairs"]
        s.prefill_pairs_kept += values["prefill_pairs_kept"]
    for plan, tensors in all_states():  # this rank's own memory
        names = state_spec(plan, 1, 1, 1, 1)
        summaries = [t for name, t in zip(names, tensors) if name in (PAGE_MIN, PAGE_MAX)]
        if summaries:
            layers.setdefault(plan.layer, LayerStats(plan.layer)).page_summary_bytes += sum(
                t.numel() * t.element_size() for t in summaries)
        sketches = [t for name, t in zip(names, tensors) if name in (SKETCH_BITS, SKETCH_CENTRE, SKETCH_SCALE)]
        if sketches:
            layers.setdefault(plan.layer, LayerStats(plan.layer)).sketch_bytes += sum(
                t.numel() * t.element_size() for t in sketches)
    for layer, records in _VERIFY.items():
        layers.setdefault(layer, LayerStats(layer)).dropped_mass = list(records)
    return PrHSStats({k: v for k, v in layers.items() if v.decode_steps or v.dropped_mass or v.prefill_pairs})


def _gathered(rows):
    """Every rank's (layer, counters) rows, combined: counters summed over ranks, except the
    decode-call count, which every rank makes the same number of (the largest is kept)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("stats(across_ranks=True) needs an initialised torch.distributed process group")
    world = dist.get_world_size()
    every = [None] * world
    dist.all_gather_object(every, rows)
    combined: dict[int, list[int]] = {}
    calls = COUNTER_NAMES.index("decode_calls")
    for rank_rows in every:
        mine: dict[int, list[int]] = {}
        for layer, counters in rank_rows:  # one rank may hold several states of a layer
            mine[layer] = [a + b for a, b in zip(mine.get(layer, [0] * len(counters)), counters)]
        for layer, counters in mine.items():
            if layer not in combined:
                combined[layer] = list(counters)
                continue
            total = combined[layer]
            for i, value in enumerate(counters):
                total[i] = max(total[i], value) if i == calls else total[i] + value
    return sorted(combined.items())


def reset_stats() -> None:
    for _plan, tensors in all_states():
        tensors[COUNTERS_INDEX].zero_()
    _VERIFY.clear()


def _record_dropped(record: dict) -> None:
    dropped, group_dropped, retrieved = record["dropped"], record["group_dropped"], record["retrieved"]

    def max_where(values, where):
        return values[where].max().item() if bool(where.any()) else None

    def mean_where(values, where):
        return values[where].mean().item() if bool(where.any()) else None

    bound, reused = record["reuse_bound"], record["reused"]
    if reused is None:
        reused = torch.zeros_like(retrieved)
    violations = int(((group_dropped > bound + 1e-6) & reused).sum()) if bound is not None else 0
    two_stage = {}
    if record.get("exact_group_dropped") is not None:
        outside = record["outside_candidates"]
        two_stage = dict(
            exact_retrieved_max=max_where(record["exact_group_dropped"], retrieved),
            exact_retrieved_mean=mean_where(record["exact_group_dropped"], retrieved),
            outside_candidates=mean_where(outside, retrieved),
            missed_retrievals=int(((outside > 0) & retrieved).sum()),
        )
    _VERIFY[record["layer"]].append(
        VerifyStep(
            mean=dropped.mean().item(),
            max=dropped.max().item(),
            output_bound=record["output_bound"].max().item(),
            retrieved_max=max_where(group_dropped, retrieved),
            reused_max=max_where(group_dropped, reused),
            retrieved_mean=mean_where(group_dropped, retrieved),
            retrieved_groups=int(retrieved.sum()),
            reuse_bound=max_where(bound, reused) if bound is not None else None,
            reuse_violations=violations,
            **two_stage,
        )
    )


if _record_dropped not in dropped_mass_listeners:
    dropped_mass_listeners.append(_record_dropped)
