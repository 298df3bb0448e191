"""``prhs-bench accuracy`` end to end on CPU with a small random byte-level model."""

import json
import subprocess
import sys

from tiny_models import save_byte_level_checkpoint


def test_accuracy_cli_writes_results_for_every_policy_budget_and_task(tmp_path):
    save_byte_level_checkpoint(tmp_path / "model", max_position_embeddings=2048)
    out = tmp_path / "acc.json"
    cmd = [sys.executable, "-m", "prhs_compile.bench.cli", "accuracy", "--model", str(tmp_path / "model"),
           "--policies", "dense,prhs", "--budgets", "64", "--contexts", "384", "--examples", "1",
           "--tasks", "niah_single,natural_text", "--dtype", "float32", "--verify", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["policy"], r["budget"], r["task"]) for r in rows} == {
        ("dense", None, "niah_single"), ("dense", None, "natural_text"),
        ("prhs", 64, "niah_single"), ("prhs", 64, "natural_text"),
    }
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["policy"] == "prhs":
            assert 0.0 < r["retrieval_rate"] <= 1.0 and 0.0 < r["dropped_mean"] < 1.0
