"""The README's latency table from ``prhs-bench latency`` JSON: the PrHS step at each
retrieval rate, net of the state restore, with its speed-up over dense SDPA of the same run,
and optionally the figures of an earlier run beside them (before -> after).

    python scripts/latency_table.py AFTER.json [AFTER2.json ...] [--before BEFORE.json ...] [--budget 2048 | 1/8]

Several AFTER files are merged (a grid run in parts); a shape in none of them is left out.
"""

from __future__ import annotations

import argparse
import json

RATES = ("prhs@0", "prhs@0.1", "prhs@0.5", "prhs@1")


def shapes(paths):
    out = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                out[(r["batch"], r["context"], r["budget"])] = r["methods"]
    return out


def net(method) -> float:
    return method["ms"] - method.get("restore_ms", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("after", nargs="+")
    parser.add_argument("--before", nargs="+", default=None,
                        help="the earlier run's JSON (several: merged, as the AFTER files)")
    parser.add_argument("--budget", default="2048",
                        help="the budget of the rows shown: a count, or 1/N of the context")
    args = parser.parse_args()
    after = shapes(args.after)
    before = shapes(args.before) if args.before else {}
    print("| B | context | budget | dense SDPA | attend | top-k | " + " | ".join(f"r={r[5:]}" for r in RATES) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(RATES))
    for (b, ctx, budget), m in sorted(after.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if args.budget.startswith("1/"):
            wanted = ctx // int(args.budget[2:])
        else:
            wanted = int(args.budget)
        if budget != wanted:
            continue
        dense = m["dense_sdpa"]["ms"]
        cells = [str(b), f"{ctx // 1024}K", str(budget), f"{dense:.3f}", f"{m['attend']['ms']:.3f}", f"{m['topk']['ms']:.3f}"]
        old = before.get((b, ctx, budget))
        for rate in RATES:
            if "ms" not in m.get(rate, {}):  # a rate whose set-up failed (its error is in the JSON)
                cells.append("failed")
                continue
            now = net(m[rate])
            text = f"{now:.3f} ({dense / now:.2f}x)"
            if old and "ms" in old.get(rate, {}):
                text = f"{net(old[rate]):.3f} -> " + text
            cells.append(text)
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
