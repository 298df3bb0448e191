"""The accuracy part of ``prhs-bench compare``: every (policy, budget) cell through
``accuracy.evaluate``, in this process or spread over worker processes.

A cell's cost is mostly single-threaded Python (Dynamo traces the model for every cell, and
each decode step of the reference ops is a few hundred small kernel launches), while a small
model leaves the GPU idle most of the time. Cells are independent (each resets Dynamo and the
selection state), so ``workers > 1`` runs them in spawned processes, each with its own copy of
the model, and the rows do not depend on how many there are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from prhs_compile.bench.evals import accuracy

log = logging.getLogger("prhs.bench.compare")

# on_cell(index, rows, error): the rows of cell ``index`` (nulls with a reason when it could
# not run) and the error message when it failed.
CellCallback = Callable[[int, list, "str | None"], None]


def cells(settings) -> list[tuple[str, int | None]]:
    """(policy, budget) cells of a compare run (``accuracy.cells``)."""
    return accuracy.cells(settings["policies"], settings["budgets"])


def evaluate_cells(model, codec, settings, table_path, device, on_cell: CellCallback, *, workers: int = 1,
                   model_id: str = "", dtype_name: str = "float32") -> None:
    """Evaluate every cell with ``verify`` on; ``on_cell`` hears of each as it finishes."""
    jobs = []
    for index, (policy, budget) in enumerate(cells(settings)):
        extra = {"head_budgets": table_path} if policy == "lu_kv" and table_path else {}
        reason = _cannot_run(policy, budget, extra, settings)
        if reason:
            on_cell(index, null_rows(policy, budget, settings, reason), None)
        else:
            jobs.append((index, policy, budget, extra))
    if workers <= 1:
        _run_here(model, codec, settings, device, jobs, on_cell)
    else:
        _run_in_pool(settings, device, jobs, on_cell, workers, model_id, dtype_name)


def evaluate_cell(model, codec, policy, budget, extra, settings, device, progress=None) -> list[dict]:
    return accuracy.evaluate(
        model, codec, policies=[policy], budgets=[budget], contexts=settings["contexts"],
        task_names=settings["tasks"], examples=settings["examples"], sink=settings["sink"],
        local=settings["local"], extra=extra, verify=True, inductor=False, device=device,
        seed=settings["seed"], progress=progress,
        task_options={"natural_text": {"continuation": settings["text_tokens"]}})


def null_rows(policy, budget, settings, reason) -> list[dict]:
    """Rows of a cell that did not run: every field null, and why."""
    return [{"policy": policy, "budget": budget, "context": c, "task": t, "accuracy": None, "examples": 0,
             "retrieval_rate": None, "dropped_mean": None, "dropped_mean_all_layers": None, "reason": reason}
            for c in settings["contexts"] for t in settings["tasks"]]


def _cannot_run(policy, budget, extra, settings) -> str | None:
    """Why the backend would refuse this cell's options (a budget too small for the policy,
    no LU-KV allocation for it), or None: such a cell is reported, not attempted."""
    from prhs_compile.config import PrHSConfig

    options = accuracy.backend_options(policy, budget, sink=settings["sink"], local=settings["local"],
                                       extra=extra, verify=True, inductor=False)
    try:
        PrHSConfig.from_options(options)
    except ValueError as err:
        return f"cannot run: {err}"
    return None


def _failed(policy, budget, settings, err) -> tuple[list, str]:
    message = f"{policy} budget {budget}: {type(err).__name__}: {err}"
    return null_rows(policy, budget, settings, f"error: {type(err).__name__}: {err}"), message


def _run_here(model, codec, settings, device, jobs, on_cell) -> None:
    from tqdm import tqdm

    per_cell = len(settings["contexts"]) * len(settings["tasks"]) * settings["examples"]
    with tqdm(total=len(jobs) * per_cell, desc="accuracy", unit="example") as bar:
        for index, policy, budget, extra in jobs:
            try:
                rows = evaluate_cell(model, codec, policy, budget, extra, settings, device, progress=bar)
            except Exception as err:  # one failing cell must not lose the others
                log.exception("prhs-bench compare: %s budget %s failed", policy, budget)
                on_cell(index, *_failed(policy, budget, settings, err))
                continue
            on_cell(index, rows, None)


def _run_in_pool(settings, device, jobs, on_cell, workers, model_id, dtype_name) -> None:
    import multiprocessing

    from tqdm import tqdm

    threads = max(1, (os.cpu_count() or 1) // workers)  # no oversubscription of the host
    # spawn: a forked child cannot use CUDA once the parent has.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(model_id, device, dtype_name, threads)) as pool:
        futures = {pool.submit(_worker_cell, policy, budget, extra, settings, device): (index, policy, budget)
                   for index, policy, budget, extra in jobs}
        with tqdm(total=len(futures), desc=f"accuracy ({workers} workers)", unit="cell") as bar:
            for future in as_completed(futures):
                index, policy, budget = futures[future]
                try:
                    on_cell(index, future.result(), None)
                except Exception as err:  # a failed cell, or a worker that died
                    log.exception("prhs-bench compare: %s budget %s failed", policy, budget)
                    on_cell(index, *_failed(policy, budget, settings, err))
                bar.update(1)


_WORKER: dict = {}  # the model and codec of a worker process


def _init_worker(model_id: str, device: str, dtype_name: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["model"], _WORKER["codec"] = accuracy.load(model_id, device, getattr(torch, dtype_name))


def _worker_cell(policy, budget, extra, settings, device) -> list[dict]:
    return evaluate_cell(_WORKER["model"], _WORKER["codec"], policy, budget, extra, settings, device)
