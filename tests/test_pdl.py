"""Programmatic dependent launch (``kernels/pdl.py``): when the step's kernels use it, and on
a Hopper GPU, that a CUDA graph of decode steps launched with it gives what the same steps
launched without it give, step after step (each kernel may start before the one before it
ends, and must still read its inputs and write its outputs after it)."""

import pytest
import torch

from prhs_compile.kernels import pdl


@pytest.fixture
def fresh_mode():
    """``pdl``'s cached answers forgotten before and after (the test fakes the device)."""
    pdl._mode.cache_clear()
    yield
    pdl._mode.cache_clear()


def test_pdl_is_off_on_cpu_before_hopper_in_the_interpreter_and_when_disabled(monkeypatch,
                                                                              fresh_mode):
    def device(capability, hip=None):
        monkeypatch.setattr(pdl.torch.cuda, "get_device_capability", lambda index: capability)
        monkeypatch.setattr(pdl.torch.version, "hip", hip)
        pdl._mode.cache_clear()

    monkeypatch.delenv("PRHS_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": pdl.OFF}
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no grid dependency control")
    cuda = torch.device("cuda", 0)
    device((9, 0))
    assert pdl.launch_options(cuda) == {"PDL": pdl.EARLY, "launch_pdl": True}
    monkeypatch.setenv("PRHS_PDL", "exit")
    assert pdl.launch_options(cuda) == {"PDL": pdl.AT_EXIT, "launch_pdl": True}
    monkeypatch.setenv("PRHS_PDL", "0")
    assert pdl.launch_options(cuda) == {"PDL": pdl.OFF}
    monkeypatch.setenv("PRHS_PDL", "sometimes")
    with pytest.raises(ValueError, match="PRHS_PDL='sometimes'.*exit"):
        pdl.pdl(cuda)
    monkeypatch.setenv("PRHS_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl(cuda) == pdl.OFF
    monkeypatch.delenv("TRITON_INTERPRET")
    assert pdl.pdl(cuda) == pdl.EARLY
    device((9, 4), hip="6.2")  # ROCm reports its own versions as capabilities
    assert pdl.pdl(cuda) == pdl.OFF
    device((8, 0))
    assert pdl.pdl(cuda) == pdl.OFF


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA GPU of compute capability 9 or more")
@pytest.mark.parametrize("mode", ["1", "exit"])
def test_a_cuda_graph_of_steps_with_pdl_matches_steps_without(monkeypatch, mode):
    """PrHS steps (bounds and gate, K pass, top-k, attend) at the Llama-3-8B shape, 8 steps
    whose queries drift so that some slots reuse and some retrieve: replays of one CUDA graph
    launched with PDL against eager steps launched without it, indices, outputs and state."""
    import prhs_compile  # noqa: F401  (registers the ops)
    from prhs_compile.kernels.plan import SelectPlan
    from prhs_compile.kernels.tickets import reserve_tickets
    from prhs_compile.kernels.select_reference import (COUNTERS_INDEX, RETRIEVALS, SLOTS,
                                                        state_spec)

    B, Hq, Hkv, D, L = 2, 32, 8, 128, 8192
    plan = SelectPlan(policy="prhs", layer=0, budget=1024, sink=4, local=64, tau=0.95)
    text = plan.encode()
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    queries = [torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)]
    for _ in range(7):
        queries.append(queries[-1] + 0.3 * torch.randn(queries[-1].shape, device="cuda",
                                                       dtype=torch.bfloat16, generator=gen))
    # Each step one token longer (row 1 a shorter sequence), as decoding goes.
    masks = []
    for t in range(len(queries)):
        mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device="cuda")
        mask[0, ..., :7000 + t] = True
        mask[1, ..., :6000 + t] = True
        masks.append(mask)
    fresh = [torch.full(shape, fill, dtype=dtype, device="cuda")
             for shape, dtype, fill in state_spec(plan, B, Hq, Hkv, D).values()]
    # The shared ticket buffer, as allocating the selection state reserves it: without it
    # each launch zeroes tickets of its own (a fill launched without PDL before it).
    reserve_tickets(torch.device("cuda"), 4096)

    def step(q, mask, state):
        idx = torch.ops.prhs.select(q, k, v, mask, D ** -0.5, text, state)
        return idx, torch.ops.prhs.attend(q, k, v, idx, mask, D ** -0.5)

    monkeypatch.setenv("PRHS_PDL", "0")
    eager_state = [t.clone() for t in fresh]
    eager = [step(q, mask, eager_state) for q, mask in zip(queries, masks)]
    eager_states = [t.clone() for t in eager_state]

    monkeypatch.setenv("PRHS_PDL", mode)
    assert pdl.pdl(torch.device("cuda")) == {"1": pdl.EARLY, "exit": pdl.AT_EXIT}[mode]
    static_q, static_mask = queries[0].clone(), masks[0].clone()
    state = [t.clone() for t in fresh]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiles the kernels outside the capture
        step(static_q, static_mask, [t.clone() for t in fresh])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, out = step(static_q, static_mask, state)
    for t, s in zip(state, fresh):
        t.copy_(s)
    for q, mask, (want_idx, want_out) in zip(queries, masks, eager):
        static_q.copy_(q)
        static_mask.copy_(mask)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(idx.sort(-1).values, want_idx.sort(-1).values)
        torch.testing.assert_close(out, want_out)  # bf16: the same kernels but for the wait
    for a, b in zip(state, eager_states):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)
    counters = state[COUNTERS_INDEX]
    # Some slots retrieved after the first step, and some reused theirs.
    assert B * Hkv < counters[RETRIEVALS] < counters[SLOTS], counters
