"""``prhs-bench frontier``: PrHS's accuracy/retrieval frontier on a real model, beside the other policies.

For each budget: PrHS at every ``--taus`` value and at the per-layer tau ``calibrate``
suggests, ``oracle`` and the other policies, and dense once. Every cell runs the
``prhs-bench accuracy`` harness (``accuracy.evaluate``, verify mode) on the model's tasks, and
the report puts side by side: task accuracy, KL(dense || sparse) and top-1 agreement of the
next-token distribution on natural text, dropped attention mass, and the retrieval rate
overall and per sparse layer. It then picks the recommended PrHS setting: the lowest
retrieval rate among the settings within the examples' noise of dense on every task
(``recommend``). Writes JSON (after every cell, so an interrupted run keeps what it has),
a markdown table beside it (``.md``) and a plot (``.png``, with matplotlib).

The calibration prompt is a ``natural_text`` example with a negative seed: no evaluation
example uses it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from prhs_compile.bench.evals import accuracy
from prhs_compile.bench.models import model_help
from prhs_compile.bench.report import environment, write_json

OTHER_POLICIES = "oracle,streaming,sage_kv,snapkv,quest,h2o,hshare,lu_kv"
TOP1_AIM, RATE_AIM = 0.98, 0.25  # the aim a recommendation is checked against
# Settings that only add cells (``--resume`` may add them); ``added_cells`` lists those of
# every run that wrote to a report.
ADDED_CELLS = ("pages_taus", "pages_candidates", "two_stage_retrieval", "added_cells")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="gemma3-270m", help=model_help())
    parser.add_argument("--budgets", default="256,1024")
    parser.add_argument("--taus", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="PrHS tau values (each a cell per budget)")
    parser.add_argument("--policies", default=OTHER_POLICIES, help="other policies run at every budget (dense runs once)")
    parser.add_argument("--pages-taus", default="",
                        help="PrHS tau values also run with two-stage retrieval (--two-stage-retrieval), "
                             "beside oracle with it; default: none")
    parser.add_argument("--pages-candidates", type=int, default=4,
                        help="candidates of those two-stage cells (stage one keeps this x budget positions)")
    parser.add_argument("--two-stage-retrieval", default="pages", choices=["pages", "sketch"],
                        help="stage one of those cells: page summaries or the one-bit key sketch")
    parser.add_argument("--contexts", default="2048", help="comma-separated context lengths (tokens of the model)")
    parser.add_argument("--tasks", default=None, help="default: every task the model speaks")
    parser.add_argument("--examples", type=int, default=2, help="examples per (task, context)")
    parser.add_argument("--text-tokens", type=int, default=64, help="teacher-forced natural_text steps per example")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=32)
    parser.add_argument("--calibration", default=None,
                        help="calibration JSON (prhs-bench calibrate); default: calibrate here, written beside --out")
    parser.add_argument("--calibration-steps", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True, help="results JSON (.md and .png beside it)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells an existing --out JSON of the same settings already holds, run the rest")
    parser.add_argument("--render", action="store_true",
                        help="only re-derive the recommendations, table and plot of an existing --out JSON")


def cells(budgets, taus, policies, pages_taus=(), pages_candidates: int = 4, retrieval: str = "pages") -> list[dict]:
    """Every cell of the frontier: ``label``, ``policy``, ``budget`` and extra backend options.
    With ``pages_taus``, PrHS at those taus and oracle also run two-stage retrieval
    (``retrieval``: "pages" or "sketch")."""
    out = [{"label": "dense", "policy": "dense", "budget": None, "extra": {}}]
    pages = {"retrieval": retrieval, "candidates": pages_candidates}
    for budget in budgets:
        out += [{"label": f"prhs tau={tau:g}", "policy": "prhs", "budget": budget, "extra": {"tau": tau}} for tau in taus]
        out.append({"label": "prhs calibrated tau", "policy": "prhs", "budget": budget, "extra": {"layer_tau": None}})
        out += [{"label": p, "policy": p, "budget": budget, "extra": {}} for p in policies]
        if pages_taus:
            out += [{"label": f"prhs tau={tau:g} {retrieval} c={pages_candidates}", "policy": "prhs", "budget": budget,
                     "extra": {"tau": tau, **pages}} for tau in pages_taus]
            out.append({"label": f"oracle {retrieval} c={pages_candidates}", "policy": "oracle", "budget": budget,
                        "extra": dict(pages)})
    return out


def summarize(rows: list[dict], examples: int) -> dict:
    """One cell's rows (every context and task) -> per-task accuracy and the cell's means."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    text = [r for r in rows if "kl_mean" in r]
    layer_rates: dict[str, list] = {}
    for r in rows:
        for layer, rate in r.get("layer_retrieval_rate", {}).items():
            layer_rates.setdefault(layer, []).append(rate)
    return {
        "accuracy": {t: accuracy.mean([r["accuracy"] for r in rows if r["task"] == t]) for t in tasks},
        "examples_per_task": examples * len({r["context"] for r in rows}),
        "kl_mean": accuracy.mean([r["kl_mean"] for r in text]),
        "kl_max": max((r["kl_max"] for r in text), default=None),
        "top1_agreement": accuracy.mean([r["top1_agreement"] for r in text]),
        "dropped_mean": accuracy.mean([r["dropped_mean"] for r in rows]),
        "retrieval_rate": accuracy.mean([r["retrieval_rate"] for r in rows]),
        "layer_retrieval_rate": {layer: sum(v) / len(v) for layer, v in layer_rates.items()},
        "sparse_layers": sorted(int(layer) for layer in layer_rates),
        "two_stage": _two_stage_mean([r["two_stage"] for r in rows if r.get("two_stage")]),
    }


def _two_stage_mean(parts: list[dict]) -> dict | None:
    """Two-stage retrieval's verify figures of a cell (mean over its rows), or None."""
    if not parts:
        return None
    return {key: sum(p[key] for p in parts) / len(parts) for key in parts[0]}


def _exact_prhs(cell: dict) -> bool:
    """PrHS with exact retrieval: the cells the recommendation and the plot's line are made of."""
    return cell["policy"] == "prhs" and cell.get("extra", {}).get("retrieval", "exact") == "exact"


def noise(p: float, n: int) -> float:
    """How far an accuracy over ``n`` examples may sit below dense's ``p`` by chance: two
    standard errors of a binomial at ``p``, and never less than one example."""
    return max(1.0 / n, 2.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n))


def within_noise(cell: dict, dense: dict) -> tuple[bool, list[str]]:
    """Whether a cell matches dense on every task within noise (natural_text too, by its
    next-token accuracy over every scored token), and what fails."""
    n = cell["summary"]["examples_per_task"]
    failures = []
    for task, want in dense["summary"]["accuracy"].items():
        got = cell["summary"]["accuracy"].get(task)
        steps = n * cell.get("text_tokens", 1) if task == "natural_text" else n
        if got is None or got < want - noise(want, steps):
            failures.append(f"{task} {got} < dense {want:.2f} - noise")
    return not failures, failures


def recommend(done: list[dict], dense: dict, min_top1: float | None = None) -> dict | None:
    """The PrHS cell with the lowest retrieval rate among those within noise of dense on
    every task (ties: the higher top-1 agreement), and with ``min_top1``, whose top-1
    agreement reaches it too; None when no PrHS cell qualifies."""
    candidates = []
    for cell in done:
        if not _exact_prhs(cell) or cell["summary"]["retrieval_rate"] is None:
            continue
        ok, _ = within_noise(cell, dense)
        if ok and (min_top1 is None or (cell["summary"]["top1_agreement"] or 0) >= min_top1):
            candidates.append(cell)
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (c["summary"]["retrieval_rate"], -(c["summary"]["top1_agreement"] or 0)))
    s = best["summary"]
    return {"label": best["label"], "budget": best["budget"], "options": best["options"],
            "retrieval_rate": s["retrieval_rate"], "layer_retrieval_rate": s["layer_retrieval_rate"],
            "top1_agreement": s["top1_agreement"], "kl_mean": s["kl_mean"],
            "aim_met": bool(s["retrieval_rate"] <= RATE_AIM and (s["top1_agreement"] or 0) >= TOP1_AIM),
            "aim": f"retrieval rate <= {RATE_AIM} at top-1 agreement >= {TOP1_AIM}"}


def markdown(report: dict) -> str:
    done = report["cells"]
    tasks = list(dict.fromkeys(t for c in done for t in c["summary"]["accuracy"]))
    layers = sorted({layer for c in done if c["policy"] != "dense" for layer in c["summary"]["sparse_layers"]})
    show_layers = layers if len(layers) <= 6 else []
    head = ["setting", "budget", *tasks, "KL", "top-1", "dropped mass", "retrieval rate", *(f"L{layer}" for layer in show_layers)]
    s = report["settings"]
    commands = report.get("commands") or [report["command"]]  # a resumed report: every run that wrote to it
    lines = [*(f"`{c}`" + ("  " if i < len(commands) - 1 else "") for i, c in enumerate(commands)), "",
             f"{report['model']}, contexts {s['contexts']}, {s['examples']} example(s) per task and context, "
             f"{s['text_tokens']} teacher-forced natural_text steps per example, {report['dtype']}, {report['device']}, "
             f"torch {report['torch']}, sink {s['sink']}, local {s['local']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in done:
        m = c["summary"]
        row = [c["label"], "-" if c["budget"] is None else str(c["budget"])]
        row += [_num(m["accuracy"].get(t), 2) for t in tasks]
        row += [_num(m["kl_mean"], 4), _num(m["top1_agreement"], 3), _num(m["dropped_mean"], 3),
                "-" if c["policy"] == "dense" else _num(m["retrieval_rate"], 2)]
        row += ["-" if c["policy"] == "dense" else _num(m["layer_retrieval_rate"].get(str(layer)), 2) for layer in show_layers]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    paged = [c for c in done if c["summary"].get("two_stage")]
    if paged:
        lines += ["Two-stage retrieval against the exact one on the same steps (verify mode, groups that retrieved):",
                  "", "| setting | budget | dropped mass, two-stage | dropped mass, exact top-k | exact picks outside "
                  "the candidates | retrievals missing any |", "|---|---|---|---|---|---|"]
        for c in paged:
            t = c["summary"]["two_stage"]
            lines.append(f"| {c['label']} | {c['budget']} | {t['dropped_mean']:.4f} | {t['exact_dropped_mean']:.4f} | "
                         f"{t['outside_candidates']:.3f} | {t['missed_share']:.3f} |")
        lines.append("")
    for key, what in (("recommended", "Lowest retrieval rate within the examples' noise of dense on every task"),
                      ("recommended_top1", f"Lowest retrieval rate within noise and at top-1 agreement >= {TOP1_AIM}")):
        rec = report.get(key)
        if rec:
            lines.append(f"{what}: {rec['label']} at budget {rec['budget']}: retrieval rate {rec['retrieval_rate']:.2f} "
                         f"(per layer {', '.join(f'L{k} {v:.2f}' for k, v in rec['layer_retrieval_rate'].items())}), "
                         f"top-1 agreement {rec['top1_agreement']:.3f}, KL {rec['kl_mean']:.4f} "
                         f"(aim {rec['aim']}: {'met' if rec['aim_met'] else 'missed'}).")
        else:
            lines.append(f"{what}: none.")
    return "\n".join(lines) + "\n"


def render(report: dict, stem: str) -> tuple[str, bool]:
    """Recommendations, the markdown table (``stem.md``) and the plot (``stem.png``) of a report."""
    dense = next((c for c in report["cells"] if c["policy"] == "dense"), None)
    if dense is not None:
        report["recommended"] = recommend(report["cells"], dense)
        report["recommended_top1"] = recommend(report["cells"], dense, TOP1_AIM)
    table = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(table)
    return table, plot(report, stem + ".png")


def _num(x, digits) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    budgets = [b for b in report["settings"]["budgets"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "top1_agreement", "top-1 agreement with dense"),
                              (axes[1], "kl_mean", "KL(dense || sparse), nats")):
        for budget, marker in zip(budgets, "os^D"):
            cells = [c for c in report["cells"] if c["budget"] == budget and c["summary"][metric] is not None
                     and c["summary"]["retrieval_rate"] is not None]
            prhs = sorted((c for c in cells if _exact_prhs(c)), key=lambda c: c["summary"]["retrieval_rate"])
            ax.plot([c["summary"]["retrieval_rate"] for c in prhs], [c["summary"][metric] for c in prhs],
                    marker=marker, label=f"prhs, budget {budget}")
            for c in prhs:
                ax.annotate(c["label"].replace("prhs ", ""), (c["summary"]["retrieval_rate"], c["summary"][metric]), fontsize=6)
            for c in cells:
                if not _exact_prhs(c):
                    ax.scatter([c["summary"]["retrieval_rate"]], [c["summary"][metric]], marker=marker, color="gray", s=14)
                    ax.annotate(f"{c['label']}@{budget}", (c["summary"]["retrieval_rate"], c["summary"][metric]), fontsize=6, color="gray")
        ax.set_xlabel("retrieval rate (share of sparse-layer slots that retrieved)")
        ax.set_ylabel(label)
        if metric == "kl_mean":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['model']}: PrHS frontier ({report['settings']['contexts']} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def calibration_for(model, codec, args, path: str) -> dict:
    """The per-layer tau: ``--calibration`` if given, else ``calibrate`` on a held-out
    natural_text prompt at the smallest budget and largest context (written to ``path``)."""
    from prhs_compile.calibrate import calibrate

    if args.calibration:
        with open(args.calibration) as f:
            return {"path": args.calibration, **json.load(f)}
    context, budget = max(_ints(args.contexts)), min(_ints(args.budgets))
    example = codec.example("natural_text", context, -1)
    ids = torch.tensor([codec.encode(example.prompt_ids, example)], device=args.device)
    local = min(args.local, budget // 4)
    result = calibrate(model, ids, steps=args.calibration_steps, budget=budget, sink=min(args.sink, budget // 4),
                       local=local, out=path)
    return {"path": path, **result}


def run(args) -> int:
    started = time.perf_counter()
    stem = os.path.splitext(args.out)[0]
    if args.render:
        with open(args.out) as f:
            report = json.load(f)
        table, plotted = render(report, stem)
        write_json(args.out, report)
        print(table)
        return 0
    model, codec = accuracy.load(args.model, args.device, getattr(torch, args.dtype))
    budgets, contexts = _ints(args.budgets), _ints(args.contexts)
    taus = [float(t) for t in args.taus.split(",") if t]
    pages_taus = [float(t) for t in args.pages_taus.split(",") if t]
    bad = [t for t in taus + pages_taus if not -1.0 <= t <= 1.0]
    if bad:
        raise SystemExit(f"--taus/--pages-taus {bad}: each tau must be in [-1, 1]")
    if args.pages_candidates < 1:
        raise SystemExit(f"--pages-candidates {args.pages_candidates}: must be >= 1")
    task_names = [t for t in args.tasks.split(",") if t] if args.tasks else list(codec.task_names)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    settings = {"budgets": budgets, "taus": taus, "contexts": contexts, "tasks": task_names,
                "examples": args.examples, "text_tokens": args.text_tokens, "sink": args.sink,
                "local": args.local, "seed": args.seed}
    if pages_taus:  # cells that only add to a report: a resumed run may add them
        settings.update(pages_taus=pages_taus, pages_candidates=args.pages_candidates,
                        two_stage_retrieval=args.two_stage_retrieval)
    previous = _previous_report(args, settings)
    if previous is not None:
        calibration = previous["calibration"]
        log(f"resuming {args.out}: {len(previous['cells'])} cell(s) done, calibration kept")
    else:
        log(f"calibrating (budget {min(budgets)}, {max(contexts)} tokens, {args.calibration_steps} steps)")
        calibration = calibration_for(model, codec, args, stem + ".calibration.json")
    log(f"suggested per-layer tau: {calibration['suggested_tau']}")
    command = " ".join(getattr(args, "command_line", ["prhs-bench", "frontier"]))
    added = {k: settings[k] for k in ADDED_CELLS if k in settings}
    if previous is not None:  # every run that wrote to the report, and the cells each added
        commands = previous.get("commands", [previous.get("command")]) + [command]
        before = previous["settings"]
        prior = before["added_cells"] if "added_cells" in before else [  # a report older than the list
            {k: before[k] for k in ADDED_CELLS if k in before}]
        settings = {**settings, "added_cells": [a for a in prior if a] + ([added] if added else [])}
    else:
        commands = [command]
        settings = {**settings, "added_cells": [added] if added else []}
    report = {
        "command": command, "commands": commands,
        "model": args.model, **environment(torch, args.device), "dtype": args.dtype,
        "settings": settings,
        "calibration": {"path": calibration["path"], "suggested_tau": calibration["suggested_tau"],
                        "share": calibration.get("share")},
        "cells": [], "rows": [], "complete": False,
    }
    plan = cells(budgets, taus, [p for p in args.policies.split(",") if p], pages_taus, args.pages_candidates,
                 args.two_stage_retrieval)
    lu_kv_table = _lu_kv_table(model, codec, args, settings, stem, previous) if any(
        c["policy"] == "lu_kv" for c in plan) else None
    if lu_kv_table:
        report["lu_kv"] = lu_kv_table
    done_before = {(c["label"], c["budget"]): c for c in (previous or {}).get("cells", [])}
    for i, cell in enumerate(plan):
        if (cell["label"], cell["budget"]) in done_before:
            key = (cell["label"], cell["budget"])
            report["cells"].append(done_before[key])
            report["rows"] += [r for r in previous["rows"] if (r["label"], r["budget"]) == key]
            continue
        extra = dict(cell["extra"])
        if "layer_tau" in extra:
            extra["layer_tau"] = calibration["suggested_tau"]
        if cell["policy"] == "lu_kv":
            extra["head_budgets"] = lu_kv_table["table_path"]
        phase = time.perf_counter()
        rows = accuracy.evaluate(
            model, codec, policies=[cell["policy"]], budgets=[cell["budget"]], contexts=contexts,
            task_names=task_names, examples=args.examples, sink=args.sink, local=args.local, extra=extra,
            verify=True, inductor=False, device=args.device, seed=args.seed,
            task_options={"natural_text": {"continuation": args.text_tokens}})
        done = {**cell, "options": accuracy.backend_options(cell["policy"], cell["budget"], sink=args.sink, local=args.local,
                                                              extra=extra, verify=False, inductor=False),
                "text_tokens": args.text_tokens, "summary": summarize(rows, args.examples),
                "seconds": time.perf_counter() - phase}
        report["cells"].append(done)
        report["rows"] += [{"label": cell["label"], **r} for r in rows]
        m = done["summary"]
        log(f"[{i + 1}/{len(plan)}] {cell['label']} @ {cell['budget']}: acc {m['accuracy']} top-1 {_num(m['top1_agreement'], 3)} "
            f"KL {_num(m['kl_mean'], 4)} rate {_num(m['retrieval_rate'], 3)} {m['layer_retrieval_rate']} ({done['seconds']:.0f} s)")
        write_json(args.out, report)
    # Cells of the resumed report this run did not plan (e.g. two-stage cells of another
    # --pages-candidates) stay in it.
    planned = {(c["label"], c["budget"]) for c in plan}
    for key, cell in done_before.items():
        if key not in planned:
            report["cells"].append(cell)
            report["rows"] += [r for r in previous["rows"] if (r["label"], r["budget"]) == key]
    report["complete"] = True
    report["seconds"] = time.perf_counter() - started
    table, plotted = render(report, stem)
    write_json(args.out, report)
    print(table)
    print(f"wrote {args.out}, {stem}.md" + (f" and {stem}.png" if plotted else " (matplotlib missing: no plot)")
          + f" in {report['seconds']:.0f} s")
    return 0


def _lu_kv_table(model, codec, args, settings: dict, stem: str, previous: dict | None) -> dict:
    """LU-KV's per-(layer, KV head) budgets for every budget of the frontier: the table a
    resumed run already profiled, else a profile on held-out prompts (``compare_lukv``)."""
    from prhs_compile.bench.evals import compare_lukv
    from prhs_compile.bench.evals.compare import FULL  # compare's LU-KV profile settings

    path = stem + ".lukv.json"
    if previous and previous.get("lu_kv") and os.path.exists(path):
        return previous["lu_kv"]
    lu_settings = {**settings, **{key: FULL[key] for key in ("lu_kv_prompts", "lu_kv_steps", "lu_kv_spread")},
                   "lu_kv_prompt_len": min(compare_lukv.PROMPT_LEN, max(settings["contexts"]))}
    log(f"LU-KV: profiling per-head budgets ({path})")
    _, summary = compare_lukv.table_for(model, codec, lu_settings, None, path, args.device)
    return {**summary, "table_path": path}


def _previous_report(args, settings: dict) -> dict | None:
    """The report ``--resume`` continues: the --out JSON when it exists, None otherwise.
    Settings that differ from this run's are an error (the cells would not be comparable)."""
    if not args.resume or not os.path.exists(args.out):
        return None
    with open(args.out) as f:
        previous = json.load(f)
    def comparable(s):  # the settings every cell shares (pages cells only add to a report)
        return {k: v for k, v in (s or {}).items() if k not in ADDED_CELLS}

    if previous.get("model") != args.model or comparable(previous.get("settings")) != comparable(settings):
        raise SystemExit(f"--resume: {args.out} was run with model {previous.get('model')!r} and settings "
                         f"{previous.get('settings')}, not {args.model!r} and {settings}")
    return previous


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]
