"""The benchmarks' timer: what it times must see the work queued before it."""

import pytest
import torch


@pytest.mark.cuda
def test_the_cuda_graph_timer_waits_for_work_queued_before_it():
    """``triton.testing.do_bench_cudagraph`` calls the function on a fresh side stream, which
    does not wait for the default stream. A benchmark that writes a state, then clones it
    into a snapshot and times a restore (state <- snapshot) right away must still get the
    snapshot of the written state: here a sleep between the write and the clone leaves the
    side stream all the time it needs to restore the unwritten snapshot first."""
    from prhs_compile.bench.speed.timing import Timer

    state = torch.zeros(1 << 20, device="cuda")
    snapshot = torch.zeros_like(state)
    torch.cuda.synchronize()
    state.fill_(1.0)
    torch.cuda._sleep(100_000_000)  # about 50 ms of the default stream, before the clone
    snapshot.copy_(state)
    Timer("cuda", "cudagraph", 5)(lambda: state.copy_(snapshot))
    torch.cuda.synchronize()
    assert bool((snapshot == 1).all()) and bool((state == 1).all())
