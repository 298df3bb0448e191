"""``prhs-bench compare``: every selection policy on one footing, in one run.

1. **LU-KV table**: ``lu_kv`` needs per-(layer, KV head) budgets. Unless ``--lu-kv-table``
   names one, they are profiled first on a small calibration set (``compare_lukv.py``). Its
   allocation for each budget reaches ``lu_kv`` through the ``head_budgets`` option.
2. **Latency**: one decode step of one attention layer through ``torch.ops.prhs.select`` +
   ``torch.ops.prhs.attend`` per policy and budget, at the evaluation model's attention shape
   and at Llama-3-8B's, with dense SDPA as the reference (``policy_latency.py``). It needs
   CUDA (steps timed inside CUDA graphs, ``triton.testing.do_bench_cudagraph``); on CPU it
   runs only with ``--quick`` (wall clock).
   It runs before the accuracy part so that a run cut short still has it.
3. **Accuracy**: ``accuracy.evaluate`` (the ``prhs-bench accuracy`` harness) for dense and
   every policy and budget, every context and task, with ``verify`` on, so each row carries
   the mean exact dropped mass; natural_text is scored on ``--text-tokens`` teacher-forced
   tokens (decode steps dominate the run). A cell that cannot run (a budget too small for a
   policy, an error) gets rows with nulls and the reason. ``--workers N`` evaluates cells in
   N processes side by side (``compare_accuracy.py``).
4. **Report**: one JSON (rows, versions, the command line), the same JSON saved after every
   cell so a run cut short keeps what it measured, a PNG of accuracy against budget
   (``accuracy.plot``), and a markdown table printed and written beside the JSON (``.md``).

``--quick`` runs tiny contexts, one example, budgets 16 and 32 and a short natural_text
continuation: an end-to-end smoke test on CPU; its numbers mean nothing.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import sys
import time

import torch

from prhs_compile.bench.evals import accuracy
from prhs_compile.bench.evals import compare_accuracy as accuracy_lib
from prhs_compile.bench.evals import compare_lukv as lu_kv_lib
from prhs_compile.bench.evals import compare_report as report_lib
from prhs_compile.bench import models
from prhs_compile.bench.speed import policy_latency as latency_lib
from prhs_compile.bench.substrate import tasks as task_lib
from prhs_compile.bench.substrate import text_tasks
from prhs_compile.bench.report import write_json

log = logging.getLogger("prhs.bench.compare")

# Reference policies first, then the published selectors; a policy added later is appended.
POLICY_ORDER = ("dense", "oracle", "streaming", "prhs", "sage_kv", "snapkv", "quest", "h2o", "hshare", "lu_kv")

# Settings of a full run and of --quick; a flag given on the command line wins over both.
# (--quick: one sink/local window for both budgets, so one LU-KV profile serves them, and a
# narrower LU-KV grid: fewer compiles, which dominate a CPU smoke test.)
FULL = {"budgets": "64,256,1024", "contexts": "4096,16384", "examples": 2, "text_tokens": 64, "sink": 4,
        "local": 32, "lu_kv_prompts": 2, "lu_kv_steps": 4, "lu_kv_spread": 4}
QUICK = {"budgets": "16,32", "contexts": "256", "examples": 1, "text_tokens": 16, "sink": 4,
         "local": 4, "lu_kv_prompts": 1, "lu_kv_steps": 2, "lu_kv_spread": 2}

# What a policy's numbers mean where they could mislead, and why some are null.
POLICY_NOTES = {
    "dense": "every position, through the same ops: dropped mass is 0 up to rounding; it never selects, so "
             "retrieval_rate is null",
    "oracle": "exact top-k of the group's attention every step: retrieval_rate is 1 wherever the context "
              "exceeds the budget",
    "streaming": "sinks + recent window: never retrieves (retrieval_rate 0)",
    "prhs": "retrievals are reused while the queries stay within cosine tau of their anchor (default settings)",
    "sage_kv": "selects once at prefill from the last prompt query; that selection is not a decode-step "
               "retrieval, so retrieval_rate counts only rows that had to select at decode",
    "snapkv": "selects once at prefill from the pooled attention of the last prompt queries; that selection "
              "is not a decode-step retrieval, so retrieval_rate counts only rows that had to select at decode",
    "quest": "keeps its first two layers dense: dropped_mean averages the rewritten layers only, "
             "dropped_mean_all_layers counts the dense ones as 0 (the summary uses the latter)",
    "h2o": "updates its accumulated scores from the exact attention every step (a retrieval every step)",
    "hshare": "a KV head that copies another head's set is not counted as retrieving",
    "lu_kv": "per-(layer, KV head) budgets from the LU-KV table (mean per-head budget = budget), exact top-k "
             "within each head's budget; a latency row runs the timed layer's allocation (at the Llama-3-8B "
             "shape tiled over its 8 KV heads: no profile of that model here)",
}


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="models/substrate", help=models.model_help())
    parser.add_argument("--policies", default=None, help="comma-separated policies (default: all, dense and oracle included)")
    parser.add_argument("--budgets", default=None, help=f"comma-separated budgets (default {FULL['budgets']}; --quick {QUICK['budgets']})")
    parser.add_argument("--contexts", default=None, help=f"comma-separated contexts (default {FULL['contexts']}; --quick {QUICK['contexts']})")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: every task the model speaks; "
                        "see prhs-bench accuracy)")
    parser.add_argument("--examples", type=int, default=None, help=f"examples per (task, context) (default {FULL['examples']})")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help=f"natural_text continuation tokens scored (default {FULL['text_tokens']}; the task's own is 256)")
    parser.add_argument("--sink", type=int, default=None, help=f"sink positions (default {FULL['sink']}; at most budget / 4)")
    parser.add_argument("--local", type=int, default=None,
                        help=f"local window (default {FULL['local']}, --quick {QUICK['local']}; at most budget / 4)")
    parser.add_argument("--lu-kv-table", default=None, help="LU-KV table from prhs-bench profile (default: profile one first)")
    parser.add_argument("--lu-kv-prompts", type=int, default=None, help=f"calibration prompts (default {FULL['lu_kv_prompts']})")
    parser.add_argument("--lu-kv-steps", type=int, default=None, help=f"decode steps measured per prompt (default {FULL['lu_kv_steps']})")
    parser.add_argument("--latency-rep", type=int, default=25,
                        help="ms of calls per CUDA graph per latency measurement (do_bench_cudagraph rep)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes evaluating accuracy cells side by side (compiles and kernel launches are "
                             "single-threaded; a small model leaves the GPU mostly idle)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model and latency dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny end-to-end smoke test (runs on CPU; its numbers mean nothing)")
    parser.add_argument("--out", required=True, help="results JSON; .md and .png are written beside it")


def resolve(args) -> dict:
    """The run's settings: command-line values, else the --quick or full defaults."""
    defaults = QUICK if args.quick else FULL

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    policies = [p for p in (args.policies or ",".join(_all_policies())).split(",") if p]
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None  # None: the model's own (run)
    contexts = _ints(pick("contexts"))
    if args.workers < 1:
        raise SystemExit(f"--workers {args.workers}: expected >= 1")
    return {
        "policies": policies,
        "budgets": _ints(pick("budgets")),
        "contexts": contexts,
        "tasks": tasks,
        "examples": pick("examples"),
        "text_tokens": pick("text_tokens"),
        "sink": pick("sink"),
        "local": pick("local"),
        "seed": args.seed,
        "quick": args.quick,
        "workers": args.workers,
        "lu_kv_prompts": pick("lu_kv_prompts"),
        "lu_kv_steps": pick("lu_kv_steps"),
        "lu_kv_spread": defaults["lu_kv_spread"],
        "lu_kv_prompt_len": min(lu_kv_lib.PROMPT_LEN, max(contexts)),
    }


def run(args) -> int:
    import prhs_compile

    started = time.perf_counter()
    settings = resolve(args)
    unknown = sorted(set(settings["policies"]) - set(prhs_compile.available_policies()))
    if unknown:
        raise SystemExit(f"unknown policy(ies) {unknown}; available: {prhs_compile.available_policies()}")
    device = args.device
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    model, codec = accuracy.load(args.model, device, dtype)
    settings["tasks"] = settings["tasks"] or list(codec.task_names)
    unknown = sorted(set(settings["tasks"]) - set(task_lib.TASKS) - (set() if codec.native else set(text_tasks.TASKS)))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; available for this model: {list(codec.task_names)}")
    report = _new_report(args, settings, device, dtype_name)
    stem = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    phase = time.perf_counter()
    table_path = None
    if "lu_kv" in settings["policies"]:
        table_path, report["lu_kv"] = lu_kv_lib.table_for(model, codec, settings, args.lu_kv_table, stem + ".lukv.json", device)
    report["timing_s"]["lu_kv"] = time.perf_counter() - phase
    _save(report, args.out)

    phase = time.perf_counter()
    report["latency"] = _latency(model.config, settings, report.get("lu_kv"), device, dtype, args)
    report["errors"] += report["latency"].get("errors", [])
    report["timing_s"]["latency"] = time.perf_counter() - phase
    _save(report, args.out)

    phase = time.perf_counter()
    _accuracy(model, codec, settings, table_path, device, report, args, dtype_name)
    report["timing_s"]["accuracy"] = time.perf_counter() - phase
    report["timing_s"]["total"] = time.perf_counter() - started
    report["complete"] = True
    table = _save(report, args.out)

    plotted = accuracy.plot([r for r in report["accuracy"] if r["accuracy"] is not None], stem + ".png")
    print(table)
    for error in report["errors"]:
        print(f"error: {error}", file=sys.stderr)
    print(f"wrote {args.out}, {stem}.md" + (f" and {stem}.png" if plotted else " (matplotlib missing: no plot)")
          + f" in {report['timing_s']['total']:.0f} s")
    return 1 if report["errors"] else 0


# --------------------------------------------------------------------------- latency


def _latency(config, settings, lu_kv, device, dtype, args) -> dict:
    """Per-policy decode-step latency rows, or the reason the part was skipped."""
    if not device.startswith("cuda") and not settings["quick"]:
        reason = "no CUDA device: decode-attention latency is measured on a GPU (--quick times the CPU reference ops)"
        log.warning("prhs-bench compare: skipping latency: %s", reason)
        return {"skipped": reason, "rows": []}
    timer = latency_lib.Timer(device, rep_ms=args.latency_rep)
    num_layers = config.num_hidden_layers
    layer = num_layers - 1  # the deepest layer: past Quest's dense layers in any model
    shapes = [latency_lib.shape_of(config, "substrate"), latency_lib.LLAMA3_8B]
    rows, errors = [], []
    with latency_lib.recompile_room():  # the Triton select's glue compiles per (shape, budget)
        for shape in shapes:
            for context in settings["contexts"]:
                copies = latency_lib.DecodeStream.copies_past_l2(shape, context, dtype, device)
                stream = latency_lib.DecodeStream(shape, context, dtype, device, seed=settings["seed"], copies=copies)
                advance_ms = latency_lib.advance_cost(stream, timer)
                base = {"shape": shape.name, "context": context, "cache_copies": copies}
                dense = latency_lib.time_dense_sdpa(shape, stream, timer, advance_ms)
                rows.append({**base, "policy": "dense_sdpa", "budget": None, **dense})
                for policy, budget in accuracy_lib.cells(settings):
                    timed, error = _latency_row(policy, budget, stream, timer, settings, lu_kv, shape, layer, num_layers,
                                                advance_ms)
                    rows.append({**base, "policy": policy, "budget": budget, **timed})
                    if error:
                        errors.append(f"latency {shape.name} {context} {policy} budget {budget}: {error}")
                del stream
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return {
        "timer": timer.name,
        "layer": layer,
        "shapes": [s.as_dict() for s in shapes],
        "batch": 1,
        "dtype": str(dtype).replace("torch.", ""),
        "data": (f"synthetic: Gaussian K/V; queries an AR(1) walk with consecutive cosine {latency_lib.QUERY_DRIFT}; "
                 f"state primed by prhs.prefill over the last {latency_lib.PREFILL_ROWS} prompt rows, then decode steps "
                 f"advancing one position per call (the cache holds {latency_lib.DECODE_STEPS} steps, then wraps: "
                 "'resets' counts the wraps); each step reads its query and mask at a device-side cursor, and "
                 "step_ms is net of that read (advance_ms, timed alone)"),
        "dense_sdpa": (f"SDPA of the decode query over context + {latency_lib.DECODE_STEPS // 2} cached positions "
                       "(the mean valid length of the timed steps; no mask), enable_gqa"),
        "rows": rows,
        "errors": errors,
    }


def _latency_row(policy, budget, stream, timer, settings, lu_kv, shape, layer, num_layers,
                 advance_ms) -> tuple[dict, str | None]:
    """One policy and budget timed on ``stream`` (or nulls and the reason), and the error
    message when the measurement failed."""
    extra, why = lu_kv_lib.head_budgets_for_latency(policy, budget, lu_kv, layer, shape)
    if why is None and budget is not None and budget >= stream.context:
        why = f"budget {budget} covers the {stream.context}-token context: every position is attended (dense)"
    if why is None:
        options = accuracy.backend_options(policy, budget, sink=settings["sink"], local=settings["local"],
                                           extra=extra, verify=False, inductor=False)
        try:
            plan = latency_lib.select_plan(options, layer, num_layers, stream.length)
        except ValueError as err:
            why = f"cannot run: {err}"
    if why is not None:
        return {"step_ms": None, "attend_ms": None, "reason": why}, None
    try:
        timed = latency_lib.time_policy(plan, shape, stream, timer, advance_ms)
    except Exception as err:  # one failing policy must not lose the others
        log.exception("prhs-bench compare: latency of %s budget %s failed", policy, budget)
        error = f"{type(err).__name__}: {err}"
        return {"step_ms": None, "attend_ms": None, "reason": f"error: {error}"}, error
    return {"head_budgets": plan.head_budgets or None, **timed}, None


# --------------------------------------------------------------------------- accuracy


def _accuracy(model, codec, settings, table_path, device, report, args, dtype_name) -> None:
    """Every (policy, budget) cell, annotated; the report is saved as each cell finishes
    (rows kept in cell order, whatever order the workers finish in)."""
    num_layers = model.config.num_hidden_layers
    done: dict[int, list] = {}

    def on_cell(index, rows, error):
        done[index] = [annotate(r, num_layers) if "reason" not in r else r for r in rows]
        if error:
            report["errors"].append(error)
        report["accuracy"] = [r for i in sorted(done) for r in done[i]]
        _save(report, args.out)

    accuracy_lib.evaluate_cells(model, codec, settings, table_path, device, on_cell, workers=args.workers,
                                model_id=args.model, dtype_name=dtype_name)


def annotate(row: dict, num_layers: int) -> dict:
    """Add the all-layer dropped mass (layers kept dense drop nothing) and the reasons of
    nulls to one ``accuracy.evaluate`` row."""
    row = dict(row)
    reasons = {}
    sparse = row.get("sparse_layers", 0)
    if row["dropped_mean"] is not None:
        row["dropped_mean_all_layers"] = row["dropped_mean"] * sparse / num_layers
    else:
        row["dropped_mean_all_layers"] = 0.0 if sparse == 0 else None
    if sparse == 0:
        why = ("no layer ran a sparse decode step (the context fits the budget, or the policy keeps these layers "
               "dense): nothing was selected or dropped")
        reasons["dropped_mean"] = reasons["retrieval_rate"] = why
        row["retrieval_rate"] = None
    if row["policy"] == "dense":
        row["retrieval_rate"] = None
        reasons["retrieval_rate"] = "dense attends to every position: it never selects, so it never retrieves"
    if reasons:
        row["null_reasons"] = reasons
    return row


# --------------------------------------------------------------------------- report


def _all_policies() -> list[str]:
    import prhs_compile

    available = prhs_compile.available_policies()
    return [p for p in POLICY_ORDER if p in available] + [p for p in available if p not in POLICY_ORDER]


def _new_report(args, settings, device, dtype_name) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    command_line = getattr(args, "command_line", None) or sys.argv
    return {
        "format": "prhs-compare/1",
        "command": shlex.join(command_line),
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{device} ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "dtype": dtype_name,
        "settings": settings,
        "policy_notes": {p: POLICY_NOTES[p] for p in settings["policies"] if p in POLICY_NOTES},
        "complete": False,
        "timing_s": {},
        "errors": [],
        "lu_kv": None,
        "latency": {},
        "accuracy": [],
        "summary": [],
    }


def _save(report: dict, out: str) -> str:
    """Write the JSON and the markdown table as they stand (a run cut short keeps both);
    returns the table."""
    report["summary"] = report_lib.summarize(report)
    write_json(out, report)
    table = report_lib.markdown(report, report["summary"])
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    return table


def _ints(text) -> list[int]:
    return [int(x) for x in str(text).split(",") if x]
