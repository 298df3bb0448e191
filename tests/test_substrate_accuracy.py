"""The committed evaluation model retrieves needles through the compiled sparse path."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSTRATE = os.path.join(ROOT, "models", "substrate")


@pytest.mark.skipif(not os.path.isdir(SUBSTRATE), reason="models/substrate is not in this checkout")
def test_substrate_model_retrieves_at_2k_dense_and_sparse(tmp_path):
    out = tmp_path / "acc.json"
    cmd = [sys.executable, "-m", "prhs_compile.bench.cli", "accuracy", "--model", SUBSTRATE,
           "--policies", "dense,prhs", "--budgets", "128", "--contexts", "2048", "--examples", "2",
           "--tasks", "niah_single,niah_multikey", "--dtype", "float32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["policy"], r["task"]): r for r in json.loads(out.read_text())["results"]}
    for task in ("niah_single", "niah_multikey"):
        assert rows[("dense", task)]["accuracy"] == 1.0
        assert rows[("prhs", task)]["accuracy"] == 1.0  # 128 of 2048 positions per KV head
        assert rows[("prhs", task)]["retrieval_rate"] > 0
