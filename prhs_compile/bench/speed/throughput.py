"""``prhs-bench throughput``: end-to-end decode throughput and compile time of a compiled model.

A Llama-3-8B-shaped ``LlamaForCausalLM`` (random bf16 weights; 32 layers, hidden 4096, 32 query
heads, 8 KV heads, head dim 128, MLP 14336, vocab 128256) decodes greedily from a static
cache that already holds ``--context`` tokens, ``--batch`` rows at once, under CUDA graphs
(``mode="reduce-overhead"``). Every configuration runs in the same process on the same model
and cache, one after the other:

=====================  =====================================================================
``inductor``           ``torch.compile(backend="inductor")``, the default backend: HF's SDPA
                       path over the whole cache (with a mask, HF expands K/V to all query
                       heads first: what a user of the default backend gets)
``inductor_gqa``       the same with ``TRANSFORMERS_SDPA_FORCE_GQA=1`` (set while it
                       compiles): HF passes the raw cache with ``enable_gqa=True``, no copy
                       of K/V per query head: the fair dense baseline
``dense_ops``          ``backend="prhs"`` with policy ``dense``: every position through
                       ``prhs.select`` / ``prhs.attend`` (the sparse path's own dense case)
``prhs``               ``backend="prhs"``, policy ``prhs`` at ``--budget`` (default options:
                       ``tau=0.8``), at the retrieval rate it really achieves on this model
``prhs_reuse10``       the same with ``tau=-1``: every selection serves ``max_reuse=10``
                       steps, a retrieval rate of 1/10 whatever the queries do (the paper
                       reports under 10% for real models; ``prhs_reuse16``: 1/16)
``prhs_every_step``    ``max_reuse=1``: a retrieval at every step (rate 1, the worst case)
``prhs_pages_*``       ``prhs_pages_reuse10``, ``prhs_pages_every_step``: the same rates with
                       two-stage retrieval (``retrieval="pages"``, default page size and
                       candidates): a retrieval reads the page summaries and the candidates'
                       rows instead of all of K
=====================  =====================================================================

The tokens fed back are the model's own greedy picks. With random weights these settle on a
few tokens, so consecutive queries barely move and ``prhs`` reuses almost always: its rate
is a property of this workload, not of a trained model (``distinct_tokens`` in the JSON
shows how many different tokens the timed steps fed); the two fixed-rate configurations
bracket it.

The cache is filled with random keys and values rather than by a prefill (a 32K prefill of
16 rows would take minutes and its content does not matter for speed); PrHS state starts
empty, so its first step retrieves everywhere and later steps follow the cache.

Reported per configuration: compile time (wall time of the first call: Dynamo, Inductor and
the rewrite), the time of the next calls until CUDA graphs are recorded, decode tokens/s over
``--steps`` timed steps (median of ``--repeats`` runs), the measured PrHS retrieval rate over
those steps, peak GPU memory; and the ratios against ``inductor`` and against the best
dense configuration of the run (``speedup_vs_best_dense``). Inductor's graph
partitioning is turned off in both backends: with it on, torch 2.11 crashes under CUDA graphs
on this model even with the default backend (see ``scripts/cuda_graphs_probe.py``).

``--quick``: a tiny model, a few steps, no CUDA graphs (runs on CPU): a smoke test whose
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time

from ...hf_compat import cache_keyword
from ..report import environment, write_json

log = logging.getLogger("prhs.bench.throughput")

LLAMA3_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
}
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768, help="tokens in the cache before decoding")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after the first (CUDA-graph recording)")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=64)
    parser.add_argument("--configs",
                        default="inductor,inductor_gqa,dense_ops,prhs,prhs_reuse10,prhs_every_step",
                        help="comma separated: " + ", ".join(CONFIGS))
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)


CONFIGS = {
    "inductor": None,
    "inductor_gqa": None,
    "dense_ops": {"policy": "dense"},
    "prhs": {},
    "prhs_reuse10": {"tau": -1.0, "max_reuse": 10},
    "prhs_reuse16": {"tau": -1.0, "max_reuse": 16},
    "prhs_every_step": {"max_reuse": 1},
    "prhs_pages_reuse10": {"tau": -1.0, "max_reuse": 10, "retrieval": "pages"},
    "prhs_pages_every_step": {"max_reuse": 1, "retrieval": "pages"},
}
DENSE = ("inductor", "inductor_gqa", "dense_ops")  # the dense baselines


def _build(torch, args, device, dtype):
    import transformers

    shape = dict(TINY if args.quick else LLAMA3_8B)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    config = transformers.LlamaConfig(**shape, max_position_embeddings=max(8192, 2 * args.context),
                                      rope_theta=500000.0)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    return model, config


def _fill_cache(torch, model, config, args, device):
    """A static cache with room for the context and every decode step of the run (warm-up,
    the first step, ``steps`` x ``repeats``, and a margin), whose first ``context`` positions
    hold random keys and values (allocated by one eager 1-token call, then overwritten; each
    configuration rewinds it to the context before it runs)."""
    import transformers

    total = args.context + (args.warmup + 1 + args.steps * args.repeats) + 8
    cache = transformers.StaticCache(config=config, max_cache_len=total)
    ids = torch.zeros(args.batch, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True,
              cache_position=torch.zeros(1, dtype=torch.long, device=device))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            t[:, :, : args.context].normal_(generator=gen)
    return cache


def _rewind(torch, cache, length: int) -> None:
    """Make the cache hold ``length`` tokens again. Newer transformers write (and build the
    mask) at each layer's own running length, older ones at the ``cache_position``
    argument: the benchmark passes both, so they must agree."""
    for layer in cache.layers:
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)


def _compile(torch, model, name, args):
    """The compiled forward, wrapped so that each call starts a new CUDA-graph step (the
    static cache mutates its counters in place)."""
    no_partition = {"graph_partition": False} if hasattr(torch._inductor.config, "graph_partition") else {}
    if CONFIGS[name] is None:  # the default backend
        options = {} if args.quick else {**torch._inductor.list_mode_options("reduce-overhead"), **no_partition}
        compiled = torch.compile(model.forward, backend="inductor", options=options)
    else:
        options = {"policy": "prhs", "budget": args.budget, "sink": args.sink, "local": args.local,
                   **CONFIGS[name]}
        if not args.quick:
            options.update(mode="reduce-overhead", inductor_config=no_partition)
        compiled = torch.compile(model.forward, backend="prhs", options=options)
    graphs = not args.quick

    def forward(**kwargs):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(**kwargs)

    return forward


def run(args) -> int:
    import torch

    import prhs_compile

    if not torch.cuda.is_available() and not args.quick:
        print("prhs-bench throughput needs a CUDA GPU (use --quick for a CPU smoke test)", file=sys.stderr)
        return 2
    if args.quick:
        args.batch, args.context, args.steps, args.repeats, args.warmup = 2, 96, 3, 1, 1
        args.budget, args.sink, args.local = 32, 2, 4
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from tqdm.auto import tqdm

    model, config = _build(torch, args, device, dtype)
    cache = _fill_cache(torch, model, config, args, device)
    report = {
        **environment(torch, device),
        "transformers": __import__("transformers").__version__,
        "quick": bool(args.quick), "batch": args.batch, "context": args.context,
        "steps": args.steps, "repeats": args.repeats, "budget": args.budget, "sink": args.sink,
        "local": args.local, "model": {k: getattr(config, k) for k in LLAMA3_8B},
        "dtype": str(dtype), "command": " ".join(sys.argv), "results": {},
    }

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bar = tqdm(total=len(names) * (2 + args.warmup + args.repeats), desc="throughput", unit="call",
               dynamic_ncols=True)
    # Cold compiles for every configuration: no Inductor cache hits, and a fresh Triton
    # kernel cache each, so compile times compare (the later configurations would otherwise
    # reuse the kernels of the earlier ones).
    torch._inductor.config.force_disable_caches = not args.quick
    for name in names:
        if not args.quick:
            os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"prhs-bench-{name}-")
        torch._dynamo.reset()
        prhs_compile.clear_states()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # transformers reads this when the graph is traced (at the first call).
        if name == "inductor_gqa":
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
        else:
            os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
        forward = _compile(torch, model, name, args)
        _rewind(torch, cache, args.context)
        position = args.context
        tokens = torch.randint(0, config.vocab_size, (args.batch, 1), device=device)

        fed = []

        def step():
            nonlocal position, tokens
            cache_position = torch.full((1,), position, dtype=torch.long, device=device)
            logits = forward(input_ids=tokens, **{cache_keyword(model): cache}, use_cache=True,
                             cache_position=cache_position).logits
            tokens = logits[:, -1:].argmax(-1)
            fed.append(tokens)
            position += 1

        result = {}
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                step()
                sync()
                result["compile_s"] = time.perf_counter() - t0
                bar.update(1)
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    step()
                    bar.update(1)
                sync()
                result["warmup_s"] = time.perf_counter() - t0
                prhs_compile.reset_stats()
                fed.clear()
                rates = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    sync()
                    rates.append(args.batch * args.steps / (time.perf_counter() - t0))
                    bar.update(1)
            result["tokens_per_s"] = statistics.median(rates)
            result["tokens_per_s_runs"] = rates
            result["ms_per_step"] = 1e3 * args.batch / result["tokens_per_s"]
            result["distinct_tokens"] = int(torch.cat(fed).unique().numel())
            if CONFIGS[name] is not None:
                stats = prhs_compile.stats()
                result["retrieval_rate"] = stats.retrieval_rate if stats.layers else None
                result["options"] = {"budget": args.budget, "sink": args.sink, "local": args.local,
                                     **CONFIGS[name]}
            if device.type == "cuda":
                result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as exc:  # noqa: BLE001 - record the reason, go on with the others
            log.exception("configuration %s failed", name)
            result["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
        bar.update(1)
        report["results"][name] = result
        write_json(args.out, report)
        print(f"{name}: {result}", flush=True)
        del forward
    bar.close()
    os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)

    base = report["results"].get("inductor", {})
    dense = {n: r["tokens_per_s"] for n, r in report["results"].items()
             if n in DENSE and "tokens_per_s" in r}
    best = max(dense, key=dense.get) if dense else None
    report["best_dense"] = best
    for name, result in report["results"].items():
        if "tokens_per_s" in result and "tokens_per_s" in base:
            result["speedup_vs_inductor"] = result["tokens_per_s"] / base["tokens_per_s"]
            result["compile_time_vs_inductor"] = result["compile_s"] / base["compile_s"]
        if "tokens_per_s" in result and best is not None:
            result["speedup_vs_best_dense"] = result["tokens_per_s"] / dense[best]
    write_json(args.out, report)
    print(_markdown(report))
    return 0


def _markdown(report) -> str:
    lines = [
        f"device: {report['device']}; torch {report['torch']}, triton {report['triton']}, "
        f"transformers {report['transformers']}; B={report['batch']}, context {report['context']}, "
        f"budget {report['budget']}, {report['steps']} steps x {report['repeats']} (median); "
        f"best dense: {report.get('best_dense')}",
        "",
        "| config | tokens/s | ms/step | vs best dense | vs inductor | retrieval rate | compile s "
        "| compile vs inductor | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "failed" in r:
            lines.append(f"| {name} | failed: {r['failed'][:80]} | | | | | | | |")
            continue

        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        lines.append(f"| {name} | {f('tokens_per_s', '.0f')} | {f('ms_per_step', '.2f')} | "
                     f"{f('speedup_vs_best_dense', '.2f')} | "
                     f"{f('speedup_vs_inductor', '.2f')} | {f('retrieval_rate', '.3f')} | "
                     f"{f('compile_s', '.1f')} | {f('compile_time_vs_inductor', '.2f')} | "
                     f"{f('peak_memory_gib', '.1f')} |")
    return "\n".join(lines)
