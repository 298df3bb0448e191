"""``PrHSConfig``: the validated form of ``torch.compile(..., backend="prhs", options={...})``."""

from __future__ import annotations

import dataclasses
from typing import Any

from prhs_compile.kernels.rules import RULES

# torch.compile modes the backend understands; each maps onto Inductor config patches.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class PrHSConfig:
    """Options of the ``prhs`` backend. Every field can be passed in ``options={...}``.

    Selection:
        policy: selection rule for decode attention (``"oracle"``, ``"streaming"``,
            ``"dense"``; see ``prhs_compile.available_policies()``).
        budget: positions attended per KV head and batch row at a decode step, sinks and
            local window included.
        sink: first valid positions always attended (attention sinks).
        local: most recent valid positions always attended.
        min_context: rows with fewer valid positions than this attend to all of them
            (the op reserves ``max(budget, min_context)`` index slots).
        tau: cosine threshold for reusing a selection across steps (policies that reuse).
        dilation_m: how many of the top positions pull in their neighbours; -1 = a third of
            the retrieved top-k.
        dilation_r: neighbourhood radius of that dilation.
        max_reuse: a reused selection is refreshed after at most this many steps.
        max_decode_query_len: attention calls whose query length is at most this are
            decode steps (rewritten); longer ones are prefill (kept dense).
        max_batch_size: rows of selection state allocated when the batch size is symbolic.

    Debugging:
        debug: log every decision and print the graph before and after the rewrite.
        verify: compute the exact dropped attention mass at every step (slow; syncs the host).
        inductor: lower the rewritten graph with Inductor (False: run it eagerly, same rewrite).
        inductor_config: extra Inductor config patches, e.g. ``{"triton.cudagraphs": True}``.
        mode: a torch.compile mode given through options, for callers that cannot pass
            ``mode=`` together with ``options=`` (``torch.compile`` refuses both at once, and
            transformers' ``CompileConfig`` defaults ``mode`` to "reduce-overhead").
    """

    policy: str = "oracle"
    budget: int = 1024
    sink: int = 4
    local: int = 64
    min_context: int = 0
    tau: float = 0.8
    dilation_m: int = -1
    dilation_r: int = 1
    max_reuse: int = 16
    max_decode_query_len: int = 1
    max_batch_size: int = 64
    debug: bool = False
    verify: bool = False
    inductor: bool = True
    inductor_config: dict = dataclasses.field(default_factory=dict)
    mode: str = "default"

    def __post_init__(self):
        _check_type(self)
        if self.policy not in RULES:
            _bad("policy", self.policy, f"one of {sorted(RULES)}")
        _check_range("budget", self.budget, 1, None)
        _check_range("sink", self.sink, 0, None)
        _check_range("local", self.local, 0, None)
        if self.sink + self.local > self.budget:
            raise ValueError(
                f"prhs options sink={self.sink} + local={self.local} exceed budget={self.budget}: "
                "the always-kept positions must fit in the budget"
            )
        _check_range("min_context", self.min_context, 0, None)
        _check_range("tau", self.tau, 0.0, 1.0)
        if self.dilation_m != -1:
            _check_range("dilation_m", self.dilation_m, 0, None)
        _check_range("dilation_r", self.dilation_r, 0, None)
        _check_range("max_reuse", self.max_reuse, 1, None)
        _check_range("max_decode_query_len", self.max_decode_query_len, 1, None)
        _check_range("max_batch_size", self.max_batch_size, 1, None)
        if self.mode not in MODES:
            _bad("mode", self.mode, f"one of {list(MODES)}")
        plan_problem = RULES[self.policy].validate(self.select_plan(layer=0))
        if plan_problem:
            raise ValueError(f"prhs option policy={self.policy!r}: {plan_problem}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "PrHSConfig":
        """Build from ``torch.compile(options=...)``; unknown keys raise ``ValueError``."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown prhs option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**options)

    def select_plan(self, layer: int):
        from prhs_compile.kernels.plan import SelectPlan

        return SelectPlan(
            policy=self.policy,
            layer=layer,
            budget=self.budget,
            sink=self.sink,
            local=self.local,
            min_context=self.min_context,
            tau=self.tau,
            dilation_m=self.dilation_m,
            dilation_r=self.dilation_r,
            max_reuse=self.max_reuse,
            verify=self.verify,
        )


def _bad(name, value, allowed):
    raise ValueError(f"prhs option {name}={value!r} is invalid: expected {allowed}")


def _check_range(name, value, low, high):
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        _bad(name, value, allowed)


def _check_type(config: PrHSConfig) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}[f.type]
        # bool is an int subclass: reject True where a number is meant, and 1 where a flag is.
        if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, expected):
            _bad(f.name, value, f"a value of type {f.type}")
