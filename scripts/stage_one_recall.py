"""How well each stage one of two-stage retrieval covers the exact top-k, on a real model.

Runs the model once per task example (teacher-forced: prompt and answer), records the query
and key of every global attention layer, and for the last ``--steps`` query positions
compares, per step, the exact top-k of the group's attention mass (``budget - sink - local``
positions outside the sink and local windows) with what each stage one keeps as candidates
(``candidates x budget`` positions):

* ``pages_quest``: pages ranked by Quest's bound from their min/max summaries (``pages.py``);
* ``pages_mean``: pages ranked by the group's logit of the page's mean key (for comparison);
* ``pages_oracle``: pages ranked by their exact attention mass (the best any page ranking does);
* ``sketch``: positions ranked by the one-bit key sketch (``sketch.py``), centre and scale
  from the prompt's keys before the first step.

For each: the share of exact picks outside the candidates, and the attention mass the best
budget within the candidates keeps less than the exact top-k (``mass_gap``). The sketch and
the page scores use the project's own functions. CPU is enough (``--device``).

    python scripts/stage_one_recall.py --model gemma3-270m --context 4096 \\
        --out bench_results/stage_one_gemma3_270m.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from prhs_compile.bench.substrate import text_tasks
from prhs_compile.bench.models import load_model
from prhs_compile.bench.report import environment, write_json
from prhs_compile.kernels.pages import page_bounds, summaries_of
from prhs_compile.kernels.sketch import channel_stats, pack_bits, sketch_scores

TASKS = ("niah_single", "niah_multikey", "natural_text")


def record_attention(model, ids):
    """``[(q, k, scale)]`` of every SDPA call of one forward pass, in call order."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((q.detach().float(), k.detach().float(), kwargs.get("scale")))
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        F.scaled_dot_product_attention = sdpa
    return calls


def _top_mask(score, count, allowed):
    """Bool mask of the ``count`` best entries of ``score`` [..., n] among ``allowed``."""
    score = score.masked_fill(~allowed, float("-inf"))
    out = torch.zeros_like(allowed)
    top = score.topk(min(count, int(allowed.sum(-1).min())), dim=-1)
    return out.scatter_(-1, top.indices, top.values > float("-inf"))


def step_stage_ones(q, k, scale, n, first, args):
    """Per stage one: (share of exact picks outside its candidates, mass gap) at the step whose
    query row is ``n - 1`` (keys ``[:n]``); ``first`` is the first step's row (the sketch's
    centre and scale come from the keys before it)."""
    hkv, group = k.shape[0], q.shape[0] // k.shape[0]
    keys = k[:, :n]  # [Hkv, n, D]
    query = q[:, n - 1].reshape(hkv, group, -1)  # [Hkv, G, D]
    probs = torch.softmax(torch.einsum("hgd,hnd->hgn", query, keys) * scale, -1)
    mass = probs.sum(1)  # [Hkv, n] group mass
    rank = torch.arange(n)
    middle = (rank >= args.sink) & (rank < n - args.local)
    windows = ~middle
    picks = args.budget - args.sink - args.local
    exact = _top_mask(mass, picks, middle.expand(hkv, n))
    kept_exact = (mass * (exact | windows)).sum(-1) / group

    size = args.page_size
    pages = -(-n // size)
    valid = torch.ones(1, n, dtype=torch.bool)
    low, high = summaries_of(keys[None], valid, size, pages)  # [1, Hkv, pages, D]
    pickable = F.pad(middle, (0, pages * size - n)).view(pages, size).any(-1)
    page_mass = F.pad(mass, (0, pages * size - n)).view(hkv, pages, size).sum(-1)
    means = F.pad(keys, (0, 0, 0, pages * size - n)).view(hkv, pages, size, -1).sum(2)
    means = means / F.pad(torch.ones(n), (0, pages * size - n)).view(pages, size).sum(-1)[:, None]
    q_rows = q[None, :, n - 1:n]  # [1, Hq, 1, D]
    page_scores = {
        "pages_quest": page_bounds(q_rows, low, high)[0],
        "pages_mean": torch.einsum("hgd,hpd->hp", query, means),
        "pages_oracle": page_mass,
    }
    centre, spread = channel_stats(k[None, :, :first], torch.ones(1, first, dtype=torch.bool))
    sketch = sketch_scores(q_rows, pack_bits(keys[None], centre), spread)[0]  # [Hkv, n]

    out = {}
    for c in args.candidates:
        for name, score in page_scores.items():
            chosen = _top_mask(score, -(-c * args.budget // size), pickable.expand(hkv, pages))
            out[f"c{c}/{name}"] = chosen.repeat_interleave(size, -1)[:, :n] & middle
        out[f"c{c}/sketch"] = _top_mask(sketch, c * args.budget, middle.expand(hkv, n))
    result = {}
    for key, candidates in out.items():
        best = _top_mask(mass, picks, candidates)
        kept = (mass * (best | windows)).sum(-1) / group
        result[key] = (float(((exact & ~candidates).sum(-1) / picks).mean()), float((kept_exact - kept).mean()))
    return result, float(1 - kept_exact.mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--candidates", default="2,4")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", default="", help="layer indices of the calls to measure (default: the global layers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.candidates = [int(c) for c in args.candidates.split(",")]
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, args.device)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    layers = [int(x) for x in args.layers.split(",") if x] or [i for i, t in enumerate(types) if t == "full_attention"]
    sums, exact_dropped, count = {}, [], 0
    jobs = [(task, seed) for task in TASKS for seed in range(args.examples)]
    for task, seed in tqdm(jobs, desc="examples", file=sys.stderr):
        example = getattr(text_tasks, task)(tokenizer, args.context, seed)
        ids = torch.tensor([example.prompt_ids + example.answer_ids], device=args.device)
        calls = record_attention(model, ids)
        total = ids.shape[1]
        rows = list(range(max(1, total - args.steps), total))
        for layer in layers:
            q, k, scale = calls[layer]
            scale = scale if scale is not None else q.shape[-1] ** -0.5
            for row in rows:
                result, dropped = step_stage_ones(q[0], k[0], scale, row + 1, rows[0], args)
                exact_dropped.append(dropped)
                count += 1
                for key, (outside, gap) in result.items():
                    acc = sums.setdefault(key, [0.0, 0.0])
                    acc[0] += outside
                    acc[1] += gap
    report = {
        "command": " ".join(["python", "scripts/stage_one_recall.py", *(argv or sys.argv[1:])]),
        "model": args.model, **environment(torch, args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "layers": layers, "steps_measured": count,
        "exact_dropped_mean": sum(exact_dropped) / len(exact_dropped),
        "stage_ones": {key: {"outside_candidates": o / count, "mass_gap": g / count} for key, (o, g) in sums.items()},
        "seconds": time.perf_counter() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, report)
    print(f"{args.model}, {args.context} tokens, budget {args.budget}, page {args.page_size}: exact top-k drops "
          f"{report['exact_dropped_mean']:.4f}")
    print("| stage one | candidates | exact picks outside the candidates | mass gap against the exact top-k |")
    print("|---|---|---|---|")
    for key, value in report["stage_ones"].items():
        c, name = key.split("/")
        print(f"| {name} | {c[1:]} | {value['outside_candidates']:.3f} | {value['mass_gap']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
