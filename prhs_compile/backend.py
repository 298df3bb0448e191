"""The ``prhs`` torch.compile backend.

``torch.compile(model, backend="prhs", options={...}, mode=...)`` reaches
:func:`prhs_backend` once per graph Dynamo captures. It validates the options, rewrites the
attention calls (``passes/``), records what it did for :func:`prhs_compile.explain`, and hands
the graph to Inductor (or runs it eagerly with ``inductor=False``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.fx as fx

from prhs_compile._log import enable_debug, log
from prhs_compile.config import MODES, PrHSConfig
from prhs_compile.kernels.rules import get_rule
from prhs_compile.passes.decide import Decision, decide
from prhs_compile.passes.match import find_attention_calls
from prhs_compile.passes.rewrite import rewrite_calls
from prhs_compile.state import state_for


@dataclasses.dataclass
class GraphReport:
    """What the backend did to one captured graph."""

    before: str  # graph code as Dynamo captured it
    after: str  # graph code handed to the inner compiler
    decisions: list[Decision]

    def __str__(self) -> str:
        lines = [str(d) for d in self.decisions] or ["(no attention calls)"]
        return "\n".join(lines)


# Receivers of every GraphReport (explain() installs one while it runs).
report_listeners: list[Callable[[GraphReport], None]] = []


def inductor_patches(mode: str | None, config: PrHSConfig) -> dict:
    if mode is not None and mode not in MODES:
        raise ValueError(f"prhs backend: unknown mode={mode!r}; valid modes are {list(MODES)}")
    mode = config.mode if mode in (None, "default") else mode
    if mode not in (None, "default") and not config.inductor:
        raise ValueError(f"prhs backend: mode={mode!r} configures Inductor, but options set inductor=False")
    patches = dict(torch._inductor.list_mode_options(mode or "default"))
    if patches.get("triton.cudagraphs") and hasattr(torch._inductor.config, "graph_partition"):
        # With CUDA graphs, Inductor's graph partitioning (torch 2.11) segfaults on an HF
        # decoder, with the default backend too (scripts/cuda_graphs_probe.py). The ops are
        # safe to capture (no host syncs, allocations from the graph's pool), so one graph
        # holds all.
        patches["graph_partition"] = False
    patches.update(config.inductor_config)
    return patches


def rewrite_graph(gm: fx.GraphModule, example_inputs, config: PrHSConfig) -> GraphReport:
    """Apply the PrHS rewrite to ``gm`` in place and describe it."""
    before = gm.code
    autograd = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )
    calls = find_attention_calls(gm)
    decisions = [decide(c, config, autograd) for c in calls]
    num_layers = max((c.layer for c in calls), default=-1) + 1
    check_share_map(config, calls, num_layers)
    check_head_budgets(config, calls, num_layers)
    make_plan = functools.partial(_plan_for, config, num_layers)
    rewrite_calls(gm, calls, decisions, make_plan, state_for, config.max_batch_size)
    return GraphReport(before=before, after=gm.code, decisions=decisions)


def _plan_for(config: PrHSConfig, num_layers: int, call):
    plan = config.select_plan(call.layer, num_layers)
    if plan.head_budgets:
        local = local_head_budgets(plan.head_budget_list, call.meta("key_source").shape[1], call.layer)
        plan = dataclasses.replace(plan, head_budgets=",".join(map(str, local)))
    kv_len = call.meta("key_source").shape[2]
    if get_rule(config.policy).needs_static_length and isinstance(kv_len, int):
        plan = dataclasses.replace(plan, kv_len=kv_len)
    return plan


def check_head_budgets(config: PrHSConfig, calls, num_layers: int) -> None:
    """Per-head budgets must name this model's layers and KV heads."""
    total = config.num_layers or num_layers
    heads = {c.layer: c.meta("key_source").shape[1] for c in calls if isinstance(c.meta("key_source"), torch.Tensor)}
    for layer, per_head in config.head_budgets.items():
        if layer >= total:
            raise ValueError(f"prhs option head_budgets names layer {layer}, but the model has {total} layers")
        if layer in heads:
            local_head_budgets(per_head, heads[layer], layer)  # raises if they do not fit


def tensor_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of the process group a tensor-parallel model is sharded over (the
    default group, as ``from_pretrained(tp_plan="auto")`` uses), or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_head_budgets(per_head, kv_heads, layer: int) -> tuple[int, ...]:
    """A layer's per-KV-head budgets for the heads this process holds. Tables name global KV
    heads; under tensor parallelism rank r holds heads [r * h, (r + 1) * h) of each layer."""
    per_head = tuple(per_head)
    if not isinstance(kv_heads, int) or len(per_head) == kv_heads:
        return per_head
    rank, world = tensor_parallel_rank()
    if world > 1 and len(per_head) == kv_heads * world:
        return per_head[rank * kv_heads:(rank + 1) * kv_heads]
    where = f" here ({world} ranks of {kv_heads})" if world > 1 else ""
    raise ValueError(
        f"prhs option head_budgets gives layer {layer} {len(per_head)} budgets, "
        f"but it has {kv_heads} KV heads{where}"
    )


def check_share_map(config: PrHSConfig, calls, num_layers: int) -> None:
    """A sharing map must fit the model it is applied to."""
    shares = config.layer_share
    if not shares.share:
        return
    total = config.num_layers or num_layers
    if shares.num_layers is not None and shares.num_layers != total:
        raise ValueError(
            f"prhs option layer_share was calibrated for {shares.num_layers} layers, "
            f"but this model has {total}: calibrate it for this model"
        )
    for follower in shares.share:
        if follower >= total:
            raise ValueError(f"prhs option layer_share names layer {follower}, but the model has {total} layers")
    heads = {c.meta("key_source").shape[1] for c in calls if isinstance(c.meta("key_source"), torch.Tensor)}
    if shares.kv_heads is not None and heads and heads != {shares.kv_heads}:
        raise ValueError(
            f"prhs option layer_share was calibrated with {shares.kv_heads} KV heads, "
            f"but this model has {sorted(heads)}"
        )


def prhs_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    config = PrHSConfig.from_options(options)
    patches = inductor_patches(mode, config)
    if config.debug:
        enable_debug()
    report = rewrite_graph(gm, example_inputs, config)
    for decision in report.decisions:
        if decision.kind == "dense":
            log.info("prhs: layer %d stays dense: %s", decision.layer, decision.reason)
        else:
            log.info("prhs: layer %d %s: %s", decision.layer, decision.kind, decision.reason)
    log.debug("prhs: graph before rewrite:\n%s", report.before)
    log.debug("prhs: graph after rewrite:\n%s", report.after)
    for listener in list(report_listeners):
        listener(report)
    if not config.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches)
