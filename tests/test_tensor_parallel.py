"""Tensor parallelism on CPU: two processes over gloo, a tiny Llama loaded with
``tp_plan="auto"`` (each rank holds 4 of the 8 query heads and 2 of the 4 KV heads), compiled
with ``backend="prhs"`` on every rank (``tests/workers/tensor_parallel.py``)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("accelerate", reason="transformers' tp_plan needs accelerate")


def test_each_rank_rewrites_its_own_heads_exactly_and_sparsely(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "workers", "tensor_parallel.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29533", worker, str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2
        # The sharded model is the model; with a covering budget prhs changes nothing.
        assert r["sharded_vs_unsharded"] < 1e-4
        assert r["exact_vs_unsharded"] < 1e-4 and r["same_tokens"]
        # Sparse per-head budgets (global head numbers, sliced per rank) really select.
        assert r["sparse_vs_dense"] > 1e-4
        # Each rank counts its own 2 KV heads per step; gathered, the model's 4.
        steps = r["decode_steps"]
        assert steps == 3
        assert r["local_slots"] == {"0": steps * 2, "1": steps * 2}
        assert r["gathered_slots"] == {"0": steps * 4, "1": steps * 4}
    # Each rank's plans carry its own heads' share of the global LU-KV table.
    assert ranks[0]["head_budgets"] == [[0, "8,12"], [1, "20,16"]]
    assert ranks[1]["head_budgets"] == [[0, "16,20"], [1, "12,8"]]
