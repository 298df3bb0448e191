"""The LU-KV part of ``prhs-bench compare``: the per-(layer, KV head) budget table ``lu_kv``
needs, profiled on a small calibration set (``prhs_compile.lu_kv.profile``, what ``prhs-bench
profile`` runs), and the head budgets a latency row runs.

The calibration prompts are task prompts whose seeds are negative, so they never coincide
with an evaluation example (those use non-negative seeds).
"""

from __future__ import annotations

import json
import time

import torch

from prhs_compile.bench.evals import accuracy

PROMPT_LEN = 4096  # calibration prompts: at most this long (shorter contexts: their length)


def lu_kv_grid(budgets: list[int], window: int, prompt_len: int, spread: int) -> list[int]:
    """Budgets the per-head loss curves are sampled at, for budgets sharing one sink + local
    ``window``: from half the smallest budget (at least one position beyond the window: the
    oracle must retrieve something) through the powers of two up to ``spread`` times the
    largest (so a head may get far less or more than the mean), every budget included,
    capped at half the calibration prompt (the curves need context beyond the budget)."""
    top = min(spread * max(budgets), prompt_len // 2)
    low = max(window + 1, min(budgets) // 2)
    grid = {b for b in [low, *budgets] if low <= b <= top}
    step = 1 << low.bit_length()  # the first power of two above low
    while step <= top:
        grid.add(step)
        step *= 2
    return sorted(grid)


def calibration_prompts(codec, count: int, length: int) -> list[tuple[str, list[int]]]:
    """``(task, prompt ids)`` of the calibration set: the tasks in turn, negative seeds."""
    names = list(codec.task_names)
    prompts = []
    for i in range(count):
        task = names[i % len(names)]
        example = codec.example(task, length, -(i + 1))
        prompts.append((task, codec.encode(example.prompt_ids, example)))
    return prompts


def table_for(model, codec, settings, given: str | None, path: str, device) -> tuple[str, dict]:
    """The LU-KV table's path and what the report says about it (profiled here unless given).

    A head's budget holds the sink and local window (which shrink with small budgets), so
    budgets are grouped by window and each group is profiled with its window: a curve then
    says what a head loses at each budget as it will run.
    """
    if given:
        with open(given) as f:
            table = json.load(f)
        return given, {"table_path": given, "profiled": False, "table": table.get("table", {})}
    from prhs_compile.lu_kv import profile

    start = time.perf_counter()
    length = settings["lu_kv_prompt_len"]
    prompts = calibration_prompts(codec, settings["lu_kv_prompts"], length)
    ids = [torch.tensor([p], device=device) for _, p in prompts]
    groups: dict[tuple[int, int], list[int]] = {}
    for budget in settings["budgets"]:
        groups.setdefault(window_of(budget, settings), []).append(budget)
    merged, profiles, not_allocated = {}, [], {}
    for (sink, local), budgets in groups.items():
        grid = lu_kv_grid(budgets, sink + local, length, settings["lu_kv_spread"])
        means = [b for b in budgets if len(grid) > 1 and grid[0] <= b <= grid[-1]]
        for b in sorted(set(budgets) - set(means)):
            not_allocated[str(b)] = (f"budget {b} cannot be profiled on {length}-token calibration prompts "
                                     f"(grid {grid}: budgets up to half the prompt, at least sink + local)")
        if not means:
            continue
        print(f"LU-KV: profiling {len(prompts)} prompt(s) of {length} tokens, sink {sink} local {local}, "
              f"budgets {grid}", flush=True)
        result = profile(model, ids, grid, means, steps=settings["lu_kv_steps"], sink=sink, local=local)
        merged.update(result.pop("table"))
        profiles.append(result)
    calibration = {"tasks": [t for t, _ in prompts], "seeds": [-(i + 1) for i in range(len(prompts))],
                   "prompt_len": length, "steps": settings["lu_kv_steps"]}
    table = {"format": "prhs-lukv/1", "table": merged, "calibration": calibration, "profiles": profiles}
    if profiles:
        table.update(num_layers=profiles[0]["num_layers"], num_kv_heads=profiles[0]["num_kv_heads"])
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    torch._dynamo.reset()
    info = {"table_path": path, "profiled": True, "seconds": time.perf_counter() - start, "calibration": calibration,
            "grids": {f"sink {p['sink']} local {p['local']}": p["grid"] for p in profiles}, "table": merged}
    if not_allocated:
        info["not_allocated"] = not_allocated
    return path, info


def window_of(budget: int, settings) -> tuple[int, int]:
    """(sink, local) of a budget, as the accuracy harness sets them."""
    options = accuracy.backend_options("oracle", budget, sink=settings["sink"], local=settings["local"], extra={},
                                       verify=False, inductor=False)
    return options["sink"], options["local"]


def head_budgets_for_latency(policy, budget, lu_kv, layer, shape) -> tuple[dict, str | None]:
    """``head_budgets`` for ``lu_kv`` from the model's table (tiled over a larger shape's KV
    heads, which keeps each layer's mean), or the reason there are none."""
    if policy != "lu_kv":
        return {}, None
    allocation = (lu_kv or {}).get("table", {}).get(str(budget), {})
    if str(layer) not in allocation:
        return {}, f"the LU-KV table has no allocation for budget {budget}, layer {layer}"
    heads = len(allocation[str(layer)])
    if shape.kv_heads % heads:
        return {}, f"the table's {heads} KV heads do not tile the shape's {shape.kv_heads}"
    return {"head_budgets": {int(name): b * (shape.kv_heads // heads) for name, b in allocation.items()}}, None
