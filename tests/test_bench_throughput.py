"""Smoke test of ``prhs-bench throughput --quick`` (tiny model on CPU; its numbers mean
nothing, the GPU figures come from scripts/gpu_bench.sh)."""

import argparse
import json

from prhs_compile.bench.speed import throughput


def test_throughput_quick_reports_every_configuration(tmp_path):
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    out = tmp_path / "throughput.json"
    names = "inductor,inductor_gqa,dense_ops,prhs,prhs_every_step,prhs_pages_every_step"
    args = parser.parse_args(["--quick", "--configs", names, "--out", str(out)])
    assert throughput.run(args) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == set(names.split(","))
    for name, r in results.items():
        assert "failed" not in r, r
        assert r["tokens_per_s"] > 0 and r["compile_s"] > 0
    assert results["prhs_every_step"]["retrieval_rate"] == 1.0  # a retrieval at every step
    assert results["prhs_pages_every_step"]["retrieval_rate"] == 1.0
    assert results["prhs"]["speedup_vs_inductor"] > 0
    # Every ratio is also given against the best dense configuration of the run.
    assert report["best_dense"] in ("inductor", "inductor_gqa", "dense_ops")
    assert all(r["speedup_vs_best_dense"] > 0 for r in results.values())
