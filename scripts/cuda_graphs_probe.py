"""Which part of ``mode="reduce-overhead"`` (CUDA graphs) fails, each variant in its own
process (a segfault kills only that process): a tiny Llama decodes 8 tokens twice with a
static cache under ``torch.compile``, and the result is compared with eager.

    python scripts/cuda_graphs_probe.py [--out probe.json]

Variants (``VARIANTS``): the default Inductor backend with Inductor's graph partitioning as
it comes and turned off; backend "prhs" with policy oracle (budget covering the context:
exact) with partitioning forced on, and as the backend sets it (off with CUDA graphs); policy
prhs (sparse). A crashed variant keeps the start and the end of its output (faulthandler's
traceback comes first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VARIANTS = {
    "inductor": {"backend": "inductor"},
    "inductor_no_partition": {"backend": "inductor", "graph_partition": False},
    "prhs_oracle_partition": {"backend": "prhs", "policy": "oracle", "graph_partition": True},
    "prhs_oracle": {"backend": "prhs", "policy": "oracle"},
    "prhs_sparse": {"backend": "prhs", "policy": "prhs"},
}

CHILD = r"""
import faulthandler, json, sys
faulthandler.enable()
import torch, transformers
import prhs_compile
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512)
model = transformers.LlamaForCausalLM(cfg).cuda().eval()
ids = torch.randint(0, 128, (1, 40), device="cuda")
def gen():
    return model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                          output_logits=True, return_dict_in_generate=True)
ref = gen()
inductor_config = {}
if "graph_partition" in spec:  # else: the backend's choice (prhs turns it off with CUDA graphs)
    inductor_config["graph_partition"] = spec["graph_partition"]
if spec["backend"] == "inductor":
    for key, value in inductor_config.items():
        setattr(torch._inductor.config, key, value)
    compiled = torch.compile(model.forward, backend="inductor", mode="reduce-overhead")
else:
    budget = 48 if spec["policy"] == "oracle" else 16
    options = {"policy": spec["policy"], "budget": budget, "sink": 2, "local": 4,
               "mode": "reduce-overhead", "inductor_config": inductor_config}
    compiled = torch.compile(model.forward, backend="prhs", options=options)
def forward(*args, **kwargs):
    # The static cache's counters are mutated in place: a new CUDA-graph step each call.
    torch.compiler.cudagraph_mark_step_begin()
    return compiled(*args, **kwargs)
model.forward = forward
gen()
out = gen()  # the second run replays the recorded graphs
same = bool(torch.equal(out.sequences, ref.sequences))
err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out.logits, ref.logits))
print("RESULT", json.dumps({"same_tokens": same, "max_logit_err": err}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=int, default=240)
    args = parser.parse_args()
    report = {}
    for name, spec in VARIANTS.items():
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                                  text=True, timeout=args.timeout, env=env)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = "timeout", (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
        result = None
        for line in text.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        crash = "" if result is not None else text if len(text) <= 6000 else f"{text[:4000]}\n...\n{text[-2000:]}"
        report[name] = {"returncode": rc, "result": result, "output": crash}
        print(f"{name:34s} rc={rc} {result}", flush=True)
        if crash:
            print(crash, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
