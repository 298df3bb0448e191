"""How the benchmark commands time a call: one timer, and the KV-cache copies that keep
consecutive calls from being served out of L2."""

from __future__ import annotations

import math
import statistics
import time

# torch is imported inside the functions: a command module importing this file stays cheap
# to import (``prhs-bench --help``).


def wall_median(fn, calls: int) -> float:
    """Median milliseconds of ``calls`` calls of ``fn`` after one warm-up (CPU smoke tests)."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_cudagraph(fn, rep: int) -> float:
    """Median ms per call of ``fn`` replayed in a CUDA graph
    (``triton.testing.do_bench_cudagraph``), once the work already queued has finished.
    do_bench_cudagraph calls ``fn`` on a fresh side stream, which does not wait for the
    default stream: a set-up still running there (a state being written, then cloned into
    the snapshot that a timed restore copies back) races with the first calls. That race
    corrupted the latency benchmark's set-up at B >= 8, 128K (its stored positions, keys
    and top-k guesses), where the set-up's step runs for milliseconds."""
    import torch
    import triton.testing

    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


class Timer:
    """Median milliseconds per call of ``fn``: ``triton.testing.do_bench_cudagraph``
    (``kind="cudagraph"``, the call replayed inside a CUDA graph) or ``do_bench``
    (``kind="plain"``, L2 flushed between calls) on CUDA; a wall clock elsewhere."""

    def __init__(self, device, kind: str, rep: int):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.kind, self.rep = kind, rep
        if not self.cuda:
            self.name = "wall clock (median of 3 calls after 1 warm-up; CPU smoke test)"
        elif kind == "cudagraph":
            self.name = ("triton.testing.do_bench_cudagraph, median of 10 replays, "
                         f"rep={rep} ms, KV cache rotated past L2")
        else:
            self.name = f"triton.testing.do_bench, median, rep={rep} ms, L2 flushed"

    def __call__(self, fn) -> float:
        if not self.cuda:
            return wall_median(fn, 3)
        import triton.testing

        if self.kind == "cudagraph":
            return bench_cudagraph(fn, self.rep)
        return float(triton.testing.do_bench(fn, warmup=max(5, self.rep // 4), rep=self.rep,
                                             return_mode="median"))


def l2_bytes(device) -> int:
    """The device's L2 size (50 MiB when it does not say); 0 off CUDA."""
    import torch

    if torch.device(device).type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))


def copies_past_l2(kv_bytes: int, l2: int, cap: int) -> int:
    """How many copies of a ``kv_bytes`` cache together exceed 4x the L2 size (at most
    ``cap``; 1 when there is no L2 to defeat)."""
    return 1 if l2 == 0 else max(1, min(cap, math.ceil(4 * l2 / kv_bytes)))


def rotating(fns):
    """One callable cycling over per-copy callables (each call touches the next copy)."""
    calls = [0]

    def call():
        fn = fns[calls[0] % len(fns)]
        calls[0] += 1
        return fn()

    return call
