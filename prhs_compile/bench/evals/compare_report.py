"""The summary of a ``prhs-bench compare`` report: one row per (policy, budget), as JSON and
as a markdown table that can be pasted into the README."""

from __future__ import annotations

from prhs_compile.bench.evals.accuracy import mean


def summarize(report: dict) -> list[dict]:
    """Per (policy, budget): mean accuracy over tasks at each context, mean dropped mass and
    retrieval rate over every (context, task) row, and the decode-step latency of each
    attention shape at the largest timed context."""
    accuracy = report.get("accuracy", [])
    latency = report.get("latency", {}).get("rows", [])
    largest = max((r["context"] for r in latency), default=None)
    cells = list(dict.fromkeys((r["policy"], r["budget"]) for r in accuracy + latency if r["policy"] != "dense_sdpa"))
    summary = []
    for policy, budget in cells:
        rows = [r for r in accuracy if (r["policy"], r["budget"]) == (policy, budget)]
        summary.append({
            "policy": policy,
            "budget": budget,
            "accuracy": {c: mean([r["accuracy"] for r in rows if r["context"] == c]) for c in report["settings"]["contexts"]},
            "dropped_mean": mean([r.get("dropped_mean_all_layers") for r in rows]),
            "retrieval_rate": mean([r.get("retrieval_rate") for r in rows]),
            "latency_ms": _latency_at(latency, policy, budget, largest),
            "select": _latency_at(latency, policy, budget, largest, "select"),
            "timer": _latency_at(latency, policy, budget, largest, "timer"),
        })
    return summary


def markdown(report: dict, summary: list[dict]) -> str:
    settings = report["settings"]
    contexts = settings["contexts"]
    latency = report.get("latency", {})
    shapes = [s["name"] for s in latency.get("shapes", [])]
    largest = max((r["context"] for r in latency.get("rows", [])), default=None)
    head = ["policy", "budget", *(f"acc. {_k(c)}" for c in contexts), "dropped mass", "retrieval rate"]
    head += [f"{_SHAPE_LABELS.get(s, s)} {_k(largest)} (ms)" for s in shapes]
    lines = [
        f"`{report['command']}`",
        "",
        (f"{report['model']}, {settings['examples']} example(s) per task and context, {report['dtype']}, "
         f"{report['device']}, torch {report['torch']}, triton {report['triton'] or '-'}"),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    if shapes:
        dense = [_latency_at(latency["rows"], "dense_sdpa", None, largest).get(s) for s in shapes]
        blanks = ["-"] * (len(contexts) + 2)
        lines.append("| dense SDPA | - | " + " | ".join(blanks + [_num(x, 3) for x in dense]) + " |")
    for s in summary:
        cells = [s["policy"], "-" if s["budget"] is None else str(s["budget"])]
        cells += [_num(s["accuracy"][c], 2) for c in contexts]
        cells += [_num(s["dropped_mean"], 3), _num(s["retrieval_rate"], 2)]
        cells += [_num(s["latency_ms"].get(shape), 3) + _marks(s, shape, latency) for shape in shapes]
        lines.append("| " + " | ".join(cells) + " |")
    timing = f"timer: {latency['timer']}" if "timer" in latency else f"not measured: {latency.get('skipped', 'not run yet')}"
    lines += ["", _FOOTNOTE.format(text_tokens=settings["text_tokens"], timing=timing)]
    if _on_gpu(latency):
        lines += ["", _MARKS_NOTE]
    return "\n".join(lines) + "\n"


_MARKS_NOTE = ("†: `select` ran the torch reference (scores the whole cache in many small kernels); "
               "unmarked policies ran the Triton select step. ‡: the step could not be captured in a CUDA "
               "graph and was timed eagerly (launches included).")

_SHAPE_LABELS = {"substrate": "substrate", "llama3-8b": "Llama-3-8B shape"}

_FOOTNOTE = (
    "Accuracy: mean over the tasks (natural_text: next-token accuracy over {text_tokens} teacher-forced "
    "tokens). Dropped mass: exact attention mass outside the selection (verify mode), mean over decode "
    "steps, layers (layers a policy keeps dense count as 0) and query heads, averaged over contexts and "
    "tasks. Retrieval rate: share of (step, layer, KV head) slots that scored the keys at a decode step. "
    "Latency: one decode step (select + attend) of one attention layer through torch.ops.prhs, batch 1; "
    "{timing}. '-': not measured or not applicable (the JSON says why)."
)


def _latency_at(rows, policy, budget, context, field: str = "step_ms") -> dict:
    return {r["shape"]: r.get(field) for r in rows if (r["policy"], r["budget"], r["context"]) == (policy, budget, context)}


def _on_gpu(latency) -> bool:
    return "do_bench" in latency.get("timer", "")


def _marks(summary_row, shape, latency) -> str:
    """'†' on a GPU latency that the torch reference of ``select`` produced, '‡' on one timed
    eagerly because the step could not be captured in a CUDA graph."""
    if summary_row["latency_ms"].get(shape) is None or not _on_gpu(latency):
        return ""
    marks = " †" if summary_row["select"].get(shape) == "reference" else ""
    if str(summary_row.get("timer", {}).get(shape, "")).startswith("eager"):
        marks += " ‡"
    return marks


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _k(context) -> str:
    if context is None:
        return ""
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)
