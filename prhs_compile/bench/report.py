"""What the benchmark commands share around their results: size arguments, the environment
a report records, and writing it as JSON, often, so an interrupted run keeps what it
measured."""

from __future__ import annotations

import json
import os
import time


def parse_sizes(text: str) -> list[int]:
    """``"8K,32K"`` -> ``[8192, 32768]`` (K = 1024)."""
    sizes = []
    for part in (p.strip().upper() for p in text.split(",")):
        if part:
            sizes.append(int(float(part[:-1]) * 1024) if part.endswith("K") else int(part))
    return sizes


def environment(torch, device) -> dict:
    """The head of a report: the device's name (``"cpu"`` off CUDA), torch and triton versions
    (triton None where it does not import)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.device(device).type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "triton": triton_version}


class Progress:
    """A tqdm bar of ``total`` measurements (none with ``enabled=False``); without a bar,
    ``row`` prints each finished row with its timings instead."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        self.started = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="bench", dynamic_ncols=True)

    def tick(self, desc: str) -> None:
        """One measurement done (``desc`` says which)."""
        if self.bar is not None:
            self.bar.set_postfix_str(desc, refresh=False)
            self.bar.update(1)

    def row(self, where: str, methods: dict) -> None:
        """A finished row of ``{method: {"ms": ...}}``, printed when there is no bar."""
        if self.bar is None:
            print(f"[{time.perf_counter() - self.started:7.1f}s] {where}: "
                  + ", ".join(f"{n} {m['ms']:.3f}" for n, m in methods.items() if "ms" in m), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
