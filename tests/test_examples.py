"""The examples run as a user would run them, on a fresh machine."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_generate_prints_ids_time_and_stats():
    # default model: the committed substrate checkpoint, asked for a needle (7-digit answer)
    text = run_example("generate.py", "--no-inductor", "--prompt-len", "1024", "--budget", "128", "--verify")
    assert "generated ids: [" in text and "needle answer:" in text
    assert "ms per token" in text
    assert "prhs stats: 6 decode steps" in text


def test_inspect_graph_prints_the_rewritten_calls():
    text = run_example("inspect_graph.py")
    assert "torch.ops.prhs.select.default" in text and "torch.ops.prhs.attend.default" in text
    assert "layer 1: decode (query length 1: select-then-attend)" in text


def test_evict_decodes_the_same_tokens_over_the_evicted_cache():
    text = run_example("evict.py", "--prompt-len", "1024", "--budget", "128")
    assert "6 layers cut from 1024 to 128 positions" in text and "87.5%" in text
    assert "same tokens: True" in text
