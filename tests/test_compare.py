"""``prhs-bench compare --quick`` end to end on CPU with a small random byte-level model."""

import json

import pytest
import torch
from tiny_models import save_byte_level_checkpoint

import prhs_compile
from prhs_compile.bench import cli
from prhs_compile.bench.evals.compare import annotate
from prhs_compile.bench.evals.compare_lukv import lu_kv_grid


def test_compare_quick_reports_every_policy(tmp_path):
    # Two layers: compiles dominate the run, and their cost grows with the layers.
    save_byte_level_checkpoint(tmp_path / "model", max_position_embeddings=1024)
    out = tmp_path / "compare.json"

    # One budget and two tasks (a generated answer, teacher-forced scoring) keep it fast: every
    # cell costs a Dynamo trace. Budget 16 is too small for Quest's pages: a cell that cannot run.
    argv = ["compare", "--quick", "--model", str(tmp_path / "model"), "--budgets", "16",
            "--tasks", "niah_single,natural_text", "--out", str(out)]
    assert cli.main(argv) == 0

    report = json.loads(out.read_text())
    policies = prhs_compile.available_policies()
    assert report["complete"] and report["errors"] == []
    assert report["command"].startswith("prhs-bench compare --quick")
    assert {"torch", "triton", "transformers", "device"} <= set(report)

    # A row for every policy and budget (dense once), every task of the one quick context.
    rows = report["accuracy"]
    cells = {(r["policy"], r["budget"]) for r in rows}
    assert cells == {("dense", None)} | {(p, 16) for p in policies if p != "dense"}
    assert len(rows) == len(cells) * 2
    for r in rows:
        if r["accuracy"] is None:  # only a cell that cannot run, with the reason
            assert (r["policy"], r["budget"]) == ("quest", 16) and "less than one page" in r["reason"]
            continue
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["dropped_mean_all_layers"] is not None, r  # verify reported for every policy
        if r["policy"] == "dense":
            assert r["dropped_mean_all_layers"] < 1e-4 and r["retrieval_rate"] is None
            assert "never retrieves" in r["null_reasons"]["retrieval_rate"]
        else:
            assert 0.0 < r["dropped_mean_all_layers"] < 1.0 and r["sparse_layers"] == 2

    # LU-KV: profiled first, one allocation per budget, passed to lu_kv.
    table = json.loads((tmp_path / "compare.lukv.json").read_text())["table"]
    assert set(table) == {"16"} and all(len(table["16"][str(layer)]) == 2 for layer in range(2))

    # Latency: dense SDPA plus every policy and budget, at both attention shapes.
    latency = report["latency"]["rows"]
    for shape in ("substrate", "llama3-8b"):
        timed = {(r["policy"], r["budget"]) for r in latency if r["shape"] == shape and r.get("step_ms")}
        assert timed == ({("dense_sdpa", None)} | cells) - {("quest", 16)}
    # Timed steps continue the primed prompt: no state reset (the stream wraps only after 512).
    assert all(r["resets"] == 0 and r["steps_timed"] < 512 for r in latency if "resets" in r)
    lu_kv = [r for r in latency if r["policy"] == "lu_kv" and r["shape"] == "llama3-8b"]
    assert lu_kv and all(len(r["head_budgets"].split(",")) == 8 for r in lu_kv)  # the table tiled over 8 KV heads

    summary = {(s["policy"], s["budget"]) for s in report["summary"]}
    assert summary == cells
    markdown = (tmp_path / "compare.md").read_text()
    assert "| dense SDPA |" in markdown and "| lu_kv | 16 |" in markdown


def test_dropped_mass_counts_dense_layers_as_dropping_nothing():
    row = {"policy": "quest", "budget": 64, "dropped_mean": 0.3, "sparse_layers": 4, "retrieval_rate": 1.0}
    assert annotate(row, num_layers=6)["dropped_mean_all_layers"] == 0.3 * 4 / 6
    dense_everywhere = annotate({**row, "dropped_mean": None, "sparse_layers": 0}, num_layers=6)
    assert dense_everywhere["dropped_mean_all_layers"] == 0.0 and dense_everywhere["retrieval_rate"] is None
    assert "no layer ran a sparse decode step" in dense_everywhere["null_reasons"]["dropped_mean"]
    dense = annotate({**row, "policy": "dense", "budget": None, "dropped_mean": 1e-8, "sparse_layers": 6}, 6)
    assert dense["retrieval_rate"] is None and "never selects" in dense["null_reasons"]["retrieval_rate"]


def test_lu_kv_grid_spans_the_budgets_above_the_windows():
    # Full run: budget 64 has sink 4 + local 16; 256 and 1024 have 4 + 32 (profiled apart).
    assert lu_kv_grid([64], window=20, prompt_len=4096, spread=4) == [32, 64, 128, 256]
    assert lu_kv_grid([256, 1024], window=36, prompt_len=4096, spread=4) == [128, 256, 512, 1024, 2048]
    # The oracle must retrieve at least one position beyond the windows.
    assert lu_kv_grid([16, 32], window=8, prompt_len=256, spread=2) == [9, 16, 32, 64]
    # Calibration prompts too short for a budget: the budget is left out (reported unallocated).
    assert lu_kv_grid([64], window=20, prompt_len=64, spread=4) == [32]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_policy_latency_times_every_policy_through_the_ops(device):
    from prhs_compile.bench.speed import policy_latency as lat
    from prhs_compile.bench.evals.accuracy import backend_options

    shape = lat.AttentionShape("small", q_heads=8, kv_heads=2, head_dim=64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    stream = lat.DecodeStream(shape, context=512, dtype=dtype, device=device, copies=2)
    timer = lat.Timer(device, rep_ms=5)
    advance_ms = lat.advance_cost(stream, timer)
    assert advance_ms > 0 and stream.calls == 0  # timed, then rewound
    layer, num_layers = 2, 3  # past Quest's two dense layers
    per_head = {0: [128, 128], 1: [128, 128], 2: [64, 192]}
    rates = {}
    for policy in prhs_compile.available_policies():
        extra = {"head_budgets": per_head} if policy == "lu_kv" else {}
        budget = None if policy == "dense" else 128
        options = backend_options(policy, budget, sink=4, local=32, extra=extra, verify=False, inductor=False)
        plan = lat.select_plan(options, layer, num_layers, stream.length)
        row = lat.time_policy(plan, shape, stream, timer, advance_ms)
        assert row["step_ms"] > 0 and row["attend_ms"] > 0, (policy, row)
        # The cursor wraps once per DECODE_STEPS calls, and a wrap is a new sequence.
        assert row["resets"] <= row["steps_timed"] // lat.DECODE_STEPS, (policy, row)
        if device == "cuda":  # every policy's step is capturable (no host synchronisation)
            assert row["timer"] == lat.Timer.GRAPH, (policy, row)
        assert row["slots"] == (stream.length if policy == "dense" else 192 if policy == "lu_kv" else 128)
        rates[policy] = row["retrieval_rate"]
    assert rates["oracle"] == 1.0 and rates["streaming"] == 0.0
    assert 0.0 < rates["prhs"] < 1.0  # the query walk drifts slowly: PrHS reuses its sets
    assert lat.time_dense_sdpa(shape, stream, timer, advance_ms)["step_ms"] > 0


def test_decode_stream_advances_at_a_device_cursor_and_rotates_cache_copies():
    from prhs_compile.bench.speed import policy_latency as lat

    shape = lat.AttentionShape("small", q_heads=4, kv_heads=2, head_dim=16)
    stream = lat.DecodeStream(shape, context=64, dtype=torch.float32, device="cpu", copies=3)
    assert all(torch.equal(k, stream.k) and k is not stream.k for k, _ in stream.kv[1:])
    for call in range(lat.DECODE_STEPS + 2):
        q, mask, k, v = stream.advance()
        t = call % lat.DECODE_STEPS  # wraps after DECODE_STEPS
        assert torch.equal(q, stream.step_q[t]) and int(mask.sum()) == 64 + t + 1
        assert k is stream.kv[call % 3][0] and v is stream.kv[call % 3][1]
    stream.rewind()
    assert int(stream.advance()[1].sum()) == 65
