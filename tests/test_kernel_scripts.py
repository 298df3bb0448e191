"""The GPU scripts that time the select engine's kernels run end to end on tiny shapes
(``--smoke``: the Triton interpreter on CPU), so that a GPU call never finds one broken."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; a GPU runs the script")
@pytest.mark.parametrize("script", ["topk_probe.py", "engine_sweep.py", "pages_sweep.py"])
def test_kernel_script_smoke(script, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    # From outside the checkout, so the installed package is what runs (as on the GPU).
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all("error" not in r for r in rows)
    assert all(r.get("same_picks") is not False and r.get("same_keys") is not False
               for r in rows)


def test_topk_sass_counts_every_phase_of_the_compiled_kernel(tmp_path):
    """``scripts/topk_sass.py`` compiles the top-k for sm_90a with Triton's bundled ptxas (no
    GPU needed) and finds one timer read per checkpoint: a changed kernel breaks it here."""
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "topk_sass.py"),
                           "--variant", "guess", "--out", str(out)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    if "no ptxas/cuobjdump" in proc.stderr + proc.stdout:
        pytest.skip("this Triton bundles no CUDA tools")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    report = json.loads(out.read_text())
    assert report["registers"] and report["instructions"] > 1000
    names = [p["phase"] for p in report["phases"]]
    assert names[:4] == ["launch", "compose reusing", "first pass", "candidates"]
    assert "threshold of the picks" in names and "cores selected" not in names
    assert all(p["instructions"] > 0 for p in report["phases"])
    assert report["memory before the launch wait"] == 0, report  # kernels/pdl.py



def test_gate_sass_compiles_the_gate_without_spills(tmp_path):
    """``scripts/gate_sass.py`` compiles the bounds-and-gate kernel for sm_90a (no GPU
    needed). The row's last program runs the gate alone, so its instruction count is its
    time: a version with [KV head, group, head dim] tiles spilled 46 KB a thread (61K
    instructions, 20 us at B=1 on an H100); this one must not spill."""
    out = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gate_sass.py"),
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    if "no ptxas/cuobjdump" in proc.stderr + proc.stdout:
        pytest.skip("this Triton bundles no CUDA tools")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    report = json.loads(out.read_text())
    assert report["spill_bytes"] == [0, 0] and report["spill traffic"] == 0, report
    assert 1000 < report["instructions"] < 10000, report
    # Launched with PDL on Hopper, it may start before the kernel before it ends: no load or
    # store may come before its wait (kernels/pdl.py).
    assert report["memory before the launch wait"] == 0, report
