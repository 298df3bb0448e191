"""Where the top-k's time goes at low retrieval rates: ``topk_picks`` as the gated PrHS step
launches it (keys formed from the pass over K's scores, ``pending=``), timed alone in CUDA
graphs with one part of its work left out or changed at a time.

    python scripts/topk_probe.py [--out topk_probe.json] [--smoke] [--timeline]
                                 [--shapes N] [--variants N] [--only NAME ...]

Llama-3-8B attention shape (32 query heads, 8 KV heads, D=128, bf16), budget 2048 (sink 4,
local 64), PrHS's dilation (m = middle // 3, r = 1). Shapes: one retrieving slot at B=1,
32K; 13 of 128 at B=16, 32K; 8 of 8 at B=1, 128K. Variants (each checked to pick the same
set as the first variant with its dilation on or off):

* ``guess+dilate``: the step's default (a guessed threshold that holds, dilation);
* ``guess``: no dilation (party 0 thresholds the candidates only: the dilation's cost);
* ``dilate``, ``plain``: no guess (the radix rounds over the row, with and without dilation);
* ``guess+dilate, parties<=N``: the row split among at most N programs (barriers of fewer
  parties, longer passes each);
* ``guess+dilate, N warps``: programs of N warps (the one program that thresholds the
  candidates holds fewer of them per thread with more warps);
* ``guess+dilate, tags``: that program tags the candidates for the final compaction
  whatever the share's length (at the probe's shapes the default does not: each party's
  share is under ``CONFIG["tags_from_share"]``, so party 0 passes the threshold on at once
  and each party counts its picks in its share of the row).

``--timeline`` (GPU only) also runs the first variant once per shape with each program
stamping the GPU's global timer at the top-k's checkpoints (``topk_triton.TIMELINE_STAMPS``)
and reports, per phase, party 0's time and the slowest other party's: which link of the
slot's chain the others wait for at its barriers.

The K pass (``retrieve_keys(defer=True)``) runs once per shape; only the top-k is timed, so
each variant's time is its launch alone. ``--smoke`` runs tiny shapes on CPU under
``TRITON_INTERPRET=1`` (checks the script; its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math

from tqdm import tqdm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--timeline", action="store_true",
                        help="per-phase times of the default variant (GPU)")
    parser.add_argument("--shapes", type=int, default=None, help="only the first N shapes")
    parser.add_argument("--variants", type=int, default=None, help="only the first N variants")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="only the variant of this name (repeatable; the first given is "
                             "the one the others' picks are checked against, and the one "
                             "whose timeline --timeline takes)")
    args = parser.parse_args()

    import torch

    from prhs_compile.bench.speed.problems import decode_problem
    from prhs_compile.bench.speed.timing import Timer
    from prhs_compile.kernels import topk_triton as tk
    from prhs_compile.kernels.retrieve_triton import retrieve_keys

    device = torch.device("cpu" if args.smoke else "cuda")
    timer = Timer(device, "cudagraph" if device.type == "cuda" else "plain", 10)
    Hq, Hkv, D, S, sink, local = 32, 8, 128, args.budget, 4, 64
    shapes = [(1, 32768, 1), (16, 32768, 13), (1, 131072, 8)]
    parties, warps = [4], [16, 4]
    if args.smoke:
        S, shapes, parties, warps = 256, [(2, 1024, 1)], [2], [4]
    scale = 1 / math.sqrt(D)
    middle = S - sink - local
    radius, cores = 1, middle // 3
    default = dict(tk.CONFIG)
    variants = [("guess+dilate", True, True, {}), ("guess", True, False, {}),
                ("dilate", False, True, {}), ("plain", False, False, {})]
    variants += [(f"guess+dilate, parties<={n}", True, True, {"max_parties": n})
                 for n in parties]
    variants += [(f"guess+dilate, {w} warps", True, True, {"num_warps": w}) for w in warps]
    variants += [("guess+dilate, tags", True, True, {"tags_from_share": 0})]
    shapes, variants = shapes[:args.shapes], variants[:args.variants]
    if args.only:
        known = {v[0]: v for v in variants}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            parser.error(f"--only {unknown[0]!r}: no such variant; the variants are "
                         + ", ".join(repr(n) for n in known))
        variants = [known[name] for name in args.only]
    rows, timelines = [], []

    def save():  # after every row, so that an interrupted run keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
                json.dump({"device": name, "torch": torch.__version__, "budget": S,
                           "sink": sink, "local": local, "dilation": [cores, radius],
                           "config": default, "rows": rows, "timelines": timelines}, f,
                          indent=1)

    bar = tqdm(total=len(shapes) * len(variants), desc="top-k probe")
    for B, L, n_active in shapes:
        q, k, operand, bounds = decode_problem(B, L, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                               sink=sink, local=local, budget=S, device=device)
        flags = torch.zeros(B * Hkv, dtype=torch.int32, device=device)
        flags[torch.randperm(B * Hkv, generator=torch.Generator().manual_seed(L))[:n_active]] = 1
        found = retrieve_keys(q, k, operand, bounds, scale, flags, want_window_mass=True,
                              defer=True)
        references = {}  # per dilation on/off: the first variant's set
        for name, guessed, dilate, config in variants:
            tk.CONFIG.update(dict(default, **config))
            guess = torch.zeros(B, Hkv, dtype=torch.int32, device=device) if guessed else None
            out = torch.full((B, Hkv, middle), -1, dtype=torch.int32, device=device)

            def run(timeline=None):
                return tk.topk_picks(found.keys, bounds, middle, out=out, active=flags,
                                     dilation_m=cores if dilate else 0,
                                     dilation_r=radius if dilate else 0, width=middle,
                                     guess=guess, pending=found.pending, timeline=timeline)

            try:
                run()  # a guess comes from the call before
                picks = run()[0].view(B * Hkv, -1)[flags.bool()].clone()
                same = bool(torch.equal(picks, references.setdefault(dilate, picks)))
                ms = timer(run)
                rows.append(dict(batch=B, context=L, active=n_active, variant=name,
                                 us=1e3 * ms, same_picks=same))
            except Exception as exc:  # one variant's failure must not lose the others
                rows.append(dict(batch=B, context=L, active=n_active, variant=name,
                                 error=f"{type(exc).__name__}: {exc}"[:300]))
            save()
            bar.write(json.dumps(rows[-1]))
            bar.update()
            if name == variants[0][0] and args.timeline and device.type == "cuda":
                # right after the step's variant, compiled already: a run that stops at its
                # time limit keeps the timeline of every shape it reached
                try:
                    timeline = _timeline(torch, tk, run, flags)
                except Exception as exc:  # the variants still to come are worth having
                    timeline = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                timelines.append(dict(batch=B, context=L, active=n_active, **timeline))
                save()
                bar.write(json.dumps(timelines[-1]))
        tk.CONFIG.update(default)
        q = k = found = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    for B, L, n_active in shapes:
        print(f"B={B} L={L} active={n_active}: " + ", ".join(
            f"{r['variant']} " + (f"{r['us']:.1f} us" if "us" in r else r["error"]) for r in rows
            if (r["batch"], r["context"], r["active"]) == (B, L, n_active)))
    for t in timelines:
        if "error" in t:
            print(f"B={t['batch']} L={t['context']} active={t['active']}: timeline failed: "
                  f"{t['error']}")
            continue
        print(f"B={t['batch']} L={t['context']} active={t['active']}: {t['parties']} parties, "
              f"{t['span_us']:.1f} us; per phase, party 0 / slowest other party (us): " +
              ", ".join(f"{name} {a:.1f}/{b:.1f}" for name, a, b in
                        zip(t["phases"], t["party0_us"], t["others_max_us"])))
    return 0


def _phase_times(stamps, phases):
    """us of each phase of one program's checkpoints; 0 for a phase it did not stamp (the
    next one then counts from the last checkpoint it did stamp)."""
    last, out = stamps[0], []
    for point, _ in phases:
        now = stamps[point]
        out.append(float(now - last) / 1e3 if now > 0 else 0.0)
        last = now if now > 0 else last
    return out


def _timeline(torch, tk, run, flags):
    """The checkpoints of a call of ``run`` (the first variant's launch, whose guess, if it
    has one, the calls before set): per phase, the time of party 0 of the first retrieving
    slot and the longest of its other parties."""
    stamps = tk.timeline_buffer(flags.device)
    run(stamps)
    torch.cuda.synchronize()
    # The timer counts ns since an epoch (about 1.8e18): relative to the first stamp in
    # int64 first, since a double holds such counts only to 256 ns.
    raw = stamps.cpu()
    base = raw[raw > 0].min()
    t = torch.where(raw > 0, raw - base + 1, 0).double()
    worked = t[:, 2] > 0  # programs that took a slot (the others stamp 0, 1 and 7 only)
    # Each program works on at most one slot here (fewer active slots than groups of
    # parties), and the slots' parties are consecutive programs: the first slot's are
    # programs 0 .. parties - 1.
    n = int(worked.sum())
    parties = n // max(int(flags.sum()), 1)
    phases = [_phase_times(row, tk.TIMELINE_PHASES) for row in t[:max(parties, 1)].tolist()]
    start = t[:, 0][t[:, 0] > 0].min()
    others = [max(p[i] for p in phases[1:]) if parties > 1 else 0.0 for i in range(len(tk.TIMELINE_PHASES))]
    return {"parties": parties, "span_us": float((t[:, 7].max() - start) / 1e3),
            "phases": [name for _, name in tk.TIMELINE_PHASES], "party0_us": phases[0],
            "others_max_us": others}


if __name__ == "__main__":
    raise SystemExit(main())
