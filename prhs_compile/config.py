"""``PrHSConfig``: the validated form of ``torch.compile(..., backend="prhs", options={...})``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from prhs_compile.kernels.rules import RULES

# torch.compile modes the backend understands; each maps onto Inductor config patches.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RETRIEVALS = ("exact", "pages", "sketch")  # how a retrieval scores keys (option ``retrieval``)


@dataclasses.dataclass(frozen=True)
class PrHSConfig:
    """Options of the ``prhs`` backend. Every field can be passed in ``options={...}``.

    Selection:
        policy: selection rule for decode attention (``"prhs"``, ``"oracle"``,
            ``"streaming"``, ``"dense"``; see ``prhs_compile.available_policies()``).
        budget: positions attended per KV head and batch row at a decode step, sinks and
            local window included.
        sink: first valid positions always attended (attention sinks).
        local: most recent valid positions always attended.
        min_context: rows with fewer valid positions than this attend to all of them
            (the op reserves ``max(budget, min_context)`` index slots).
        tau: PrHS time axis: a group reuses its selection while the cosine between every
            query head and its anchor query (from the last retrieval) is at least ``tau``;
            1.0 disables reuse, -1.0 reuses for ``max_reuse`` steps whatever the drift.
        layer_tau: per-layer ``tau`` overriding ``tau`` for the layers it names:
            ``{layer: tau}`` or the path of a calibration JSON (its ``suggested_tau``,
            written by ``prhs_compile.calibrate`` / ``prhs-bench calibrate``).
        dilation_m: how many of the top positions pull in their +-``dilation_r`` neighbours
            at a retrieval; -1 = k / (2r + 1) of the k retrieved, 0 = no dilation.
        dilation_r: neighbourhood radius of that dilation (0 = no dilation).
        max_reuse: a selection serves at most this many steps, its retrieval included
            (1 = retrieve every step).
        delta_target: PrHS accuracy control: > 0 keeps, at a retrieval, the smallest set whose
            retained attention mass is at least ``1 - delta_target`` (capped by the budget,
            no dilation), and reuses it only while the reuse bound stays within the slack
            left (replaces ``tau``). 0 = off.
        psaw_start_layer: PrHS depth axis: from this layer on, the oldest
            ``floor((1 - phi ** (alpha * (l - start) / (N - start))) * t)`` non-sink tokens
            are outside layer ``l``'s recency window and never retrieved. -1 = off.
        psaw_phi, psaw_alpha: the window's schedule (phi in (0, 1), alpha > 0).
        num_layers: N in that schedule; 0 = the number of attention calls in the graph.
        layer_share: PrHS layer axis: ``{follower: anchor}`` layers that reuse an earlier
            layer's selection of the same step, or the path of a JSON map written by
            ``prhs_compile.calibrate``.
        head_budgets: LU-KV per-(layer, KV head) budgets: the path of a table written by
            ``prhs-bench profile`` (the entry for ``budget`` as the mean per-head budget is
            used) or ``{layer: [budget per KV head]}``. Used by ``lu_kv``, ``oracle`` and
            ``prhs``.
        retrieval: how a retrieval (policies ``prhs``, ``oracle``, ``lu_kv``) scores keys:
            ``"exact"`` scores every retrievable key; ``"pages"`` is two-stage: page summaries
            (channel-wise min and max of every ``page_size`` keys, kept in the selection state)
            bound each page's scores, and only the keys of the best pages, holding
            ``candidates`` x ``budget`` positions, are scored exactly; ``"sketch"`` is
            two-stage over a one-bit key sketch (a sign bit per channel around the prompt's
            channel means, kept in the selection state): the ``candidates`` x ``budget``
            positions of highest estimated score are scored exactly (torch reference only).
        page_size: positions per page of the summaries (a power of two, 1 to 256).
        candidates: the first stage keeps this many budgets of positions (>= 1).
        max_cache_len: positions the stored page summaries or key sketch cover per row (at
            least the cache length of the layer's first compiled graph; the summaries take
            ``2 / page_size`` of the keys' memory, the sketch 1/16 of bf16 keys); past them
            the cache is summarised at each step (correct, slower; logged).
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

    policy: str = "prhs"
    budget: int = 1024
    sink: int = 4
    local: int = 64
    min_context: int = 0
    tau: float = 0.8
    layer_tau: object = None
    dilation_m: int = -1
    dilation_r: int = 1
    max_reuse: int = 16
    delta_target: float = 0.0
    psaw_start_layer: int = -1
    psaw_phi: float = 0.5
    psaw_alpha: float = 1.0
    num_layers: int = 0
    layer_share: object = None
    head_budgets: object = None
    retrieval: str = "exact"
    page_size: int = 16
    candidates: int = 4
    max_cache_len: int = 32768
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
        _check_range("tau", self.tau, -1.0, 1.0)
        object.__setattr__(self, "layer_tau", load_layer_tau(self.layer_tau))
        if self.dilation_m != -1:
            _check_range("dilation_m", self.dilation_m, 0, None)
        _check_range("dilation_r", self.dilation_r, 0, None)
        _check_range("max_reuse", self.max_reuse, 1, None)
        _check_range("delta_target", self.delta_target, 0.0, 1.0)
        if self.psaw_start_layer != -1:
            _check_range("psaw_start_layer", self.psaw_start_layer, 0, None)
        if not 0.0 < self.psaw_phi < 1.0:
            _bad("psaw_phi", self.psaw_phi, "in the open interval (0, 1)")
        if not self.psaw_alpha > 0:
            _bad("psaw_alpha", self.psaw_alpha, "> 0")
        _check_range("num_layers", self.num_layers, 0, None)
        object.__setattr__(self, "layer_share", load_share_map(self.layer_share))
        object.__setattr__(self, "head_budgets", load_head_budgets(self.head_budgets, self.budget))
        self._check_retrieval()
        _check_range("max_decode_query_len", self.max_decode_query_len, 1, None)
        _check_range("max_batch_size", self.max_batch_size, 1, None)
        if self.mode not in MODES:
            _bad("mode", self.mode, f"one of {list(MODES)}")
        # Checked on a layer the per-head budgets name when there are any (a table lists only
        # the layers its profile rewrote: e.g. the global layers of a sliding-window model).
        first = min(self.head_budgets) if self.head_budgets else 0
        plan_problem = RULES[self.policy].validate(self.select_plan(layer=first))
        if plan_problem:
            raise ValueError(f"prhs option policy={self.policy!r}: {plan_problem}")

    def _check_retrieval(self) -> None:
        if self.retrieval not in RETRIEVALS:
            _bad("retrieval", self.retrieval, f"one of {list(RETRIEVALS)}")
        if not (1 <= self.page_size <= 256 and self.page_size & (self.page_size - 1) == 0):
            _bad("page_size", self.page_size, "a power of two from 1 to 256")
        _check_range("candidates", self.candidates, 1, None)
        _check_range("max_cache_len", self.max_cache_len, self.page_size, None)
        if self.retrieval != "exact":
            if not RULES[self.policy].two_stage:
                two_stage = sorted(name for name, rule in RULES.items() if rule.two_stage)
                raise ValueError(f"prhs option retrieval={self.retrieval!r} needs a policy that retrieves by "
                                 f"score, one of {two_stage}; policy={self.policy!r} does not")
            if self.delta_target > 0:
                raise ValueError(f"prhs options retrieval={self.retrieval!r} and delta_target={self.delta_target} do not "
                                 "combine: delta_target needs the attention mass outside the candidates, "
                                 "which a two-stage retrieval never scores; use retrieval='exact'")

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

    def select_plan(self, layer: int, num_layers: int = 0):
        from prhs_compile.kernels.plan import SelectPlan

        return SelectPlan(
            policy=self.policy,
            layer=layer,
            budget=self.budget,
            sink=self.sink,
            local=self.local,
            min_context=self.min_context,
            tau=self.layer_tau.get(layer, self.tau),
            dilation_m=self.dilation_m,
            dilation_r=self.dilation_r,
            max_reuse=self.max_reuse,
            delta_target=self.delta_target,
            psaw_start=self.psaw_start_layer,
            psaw_phi=self.psaw_phi,
            psaw_alpha=self.psaw_alpha,
            num_layers=self.num_layers or num_layers,
            share_from=self.layer_share.get(layer, -1) if self.policy in ("prhs", "hshare") else -1,
            head_budgets=",".join(map(str, self.head_budgets.get(layer, ()))),
            verify=self.verify,
            retrieval=self.retrieval,
            page_size=self.page_size,
            candidates=self.candidates,
            max_cache_len=self.max_cache_len,
        )


@dataclasses.dataclass(frozen=True)
class ShareMap:
    """Cross-layer sharing: ``share[follower] = anchor``, and what the map was made for."""

    share: dict
    num_layers: int | None = None  # set when loaded from a calibration JSON
    kv_heads: int | None = None

    def get(self, layer: int, default: int = -1) -> int:
        return self.share.get(layer, default)


def load_share_map(value) -> ShareMap:
    """``layer_share`` option -> :class:`ShareMap` (from a dict, a JSON path, or a ShareMap)."""
    if isinstance(value, ShareMap):
        return value
    if value is None:
        return ShareMap({})
    num_layers = kv_heads = None
    if isinstance(value, (str, os.PathLike)):
        data = _read_json("layer_share", value, "a JSON sharing map")
        if isinstance(data, dict) and "share" in data:
            num_layers, kv_heads = data.get("num_layers"), data.get("num_kv_heads")
            value = data["share"]
        else:
            value = data
    if not isinstance(value, dict):
        _bad("layer_share", value, "a dict {follower layer: anchor layer} or a path to a JSON map")
    share = {}
    for follower, anchor in value.items():
        try:
            follower, anchor = int(follower), int(anchor)
        except (TypeError, ValueError):
            _bad("layer_share", value, "integer layer indices")
        if not 0 <= anchor < follower:
            raise ValueError(
                f"prhs option layer_share: layer {follower} cannot share layer {anchor}'s selection: "
                "the anchor must be an earlier layer (0 <= anchor < follower)"
            )
        share[follower] = anchor
    return ShareMap(share, num_layers, kv_heads)


def load_layer_tau(value) -> dict[int, float]:
    """``layer_tau`` option -> ``{layer: tau}`` (from a dict or a calibration JSON's ``suggested_tau``)."""
    if value is None:
        return {}
    if isinstance(value, (str, os.PathLike)):
        data = _read_json("layer_tau", value, "a calibration JSON")
        if not isinstance(data, dict) or not isinstance(data.get("suggested_tau"), dict):
            _bad("layer_tau", os.fspath(value), "a calibration JSON with a 'suggested_tau' map")
        value = data["suggested_tau"]
    if not isinstance(value, dict):
        _bad("layer_tau", value, "a dict {layer: tau} or the path of a calibration JSON")
    taus = {}
    for layer, tau in value.items():
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            _bad("layer_tau", value, "integer layer indices")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not -1.0 <= tau <= 1.0 or layer < 0:
            _bad("layer_tau", {layer: tau}, "a layer >= 0 mapped to a tau in [-1, 1]")
        taus[layer] = float(tau)
    return taus


def load_head_budgets(value, budget: int) -> dict[int, tuple[int, ...]]:
    """``head_budgets`` option -> ``{layer: (budget per KV head, ...)}``."""
    if value is None:
        return {}
    if isinstance(value, (str, os.PathLike)):
        data = _read_json("head_budgets", value, "an LU-KV table")
        tables = data.get("table", {}) if isinstance(data, dict) else {}
        if str(budget) not in tables:
            raise ValueError(
                f"prhs option head_budgets={os.fspath(value)!r} has no allocation for budget={budget}; "
                f"its mean budgets are {sorted(int(b) for b in tables)}"
            )
        value = tables[str(budget)]
    if not isinstance(value, dict):
        _bad("head_budgets", value, "a dict {layer: [budget per KV head]} or a path to an LU-KV table")
    budgets = {}
    for layer, per_head in value.items():
        if not isinstance(per_head, (list, tuple)) or not per_head or not all(isinstance(b, int) and b >= 1 for b in per_head):
            _bad("head_budgets", {layer: per_head}, "a non-empty list of positive integer budgets per layer")
        budgets[int(layer)] = tuple(per_head)
    return budgets


def _read_json(option: str, path, what: str):
    path = os.fspath(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"prhs option {option}={path!r}: cannot read {what} ({err})") from None


def _bad(name, value, allowed):
    raise ValueError(f"prhs option {name}={value!r} is invalid: expected {allowed}")


def _check_range(name, value, low, high):
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        _bad(name, value, allowed)


def _check_type(config: PrHSConfig) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "object":
            continue  # checked by its own loader
        expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}[f.type]
        # bool is an int subclass: reject True where a number is meant, and 1 where a flag is.
        if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, expected):
            _bad(f.name, value, f"a value of type {f.type}")
