"""What every benchmark does with its results: write them as JSON, often, so an interrupted
run keeps what it measured."""

from __future__ import annotations

import json
import os
import time


def write_json(path: str | None, report: dict) -> None:
    """Write ``report`` to ``path`` (creating its folder); nothing when ``path`` is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def finish(path: str | None, report: dict, started: float, table: str) -> None:
    """The end of a benchmark run: mark the report complete with its wall time, write it,
    print its table (and where it went)."""
    report["complete"] = True
    report["wall_s"] = time.perf_counter() - started
    write_json(path, report)
    print(table)
    if path:
        print(f"wrote {path}")
