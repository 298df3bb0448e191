"""``prhs-bench accuracy``: task accuracy of policies and budgets through ``backend="prhs"``.

Every example runs the way a user decodes: the model compiled with the ``prhs`` backend, a
static cache, prefill of the prompt (dense), then one decode step per answer token (sparse,
greedy). ``natural_text`` feeds the true continuation token by token (teacher forcing through
the decode graph) and scores next-token accuracy, so its decode steps are sparse too.

The project's own substrate model speaks the byte-level task format directly. Any other
causal LM (a hub id or path) gets the prompts as text through its own tokenizer and is scored
on the decoded text.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from prhs_compile.bench import tasks as task_lib
from prhs_compile.hf_compat import cache_keyword
from prhs_compile.bench.tokenizer import VOCAB_SIZE, decode_ids


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint path or hub id")
    parser.add_argument("--policies", default="dense,oracle,prhs", help="comma-separated policy names")
    parser.add_argument("--budgets", default="64,256,1024", help="comma-separated budgets (ignored by dense)")
    parser.add_argument("--contexts", default="4096", help="comma-separated context lengths (tokens)")
    parser.add_argument("--tasks", default=",".join(task_lib.TASKS), help="comma-separated task names")
    parser.add_argument("--examples", type=int, default=8, help="examples per (task, context)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--local", type=int, default=32)
    parser.add_argument("--options", default="{}", help="extra backend options as JSON, e.g. '{\"tau\": 0.9}'")
    parser.add_argument("--verify", action="store_true", help="record exact dropped mass (slower)")
    parser.add_argument("--inductor", action="store_true", help="lower with Inductor (default: eager graphs, same rewrite)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True, help="results JSON (a PNG plot is written beside it)")


@dataclasses.dataclass
class Codec:
    """How task token ids reach a model and how its output is read back."""

    native: bool  # the model speaks the byte-level task format
    tokenizer: object = None

    def encode(self, ids: list[int]) -> list[int]:
        if self.native:
            return list(ids)
        return self.tokenizer(decode_ids(ids), add_special_tokens=False)["input_ids"]

    def answer_matches(self, task: str, generated: list[int], example) -> float:
        if self.native:
            return task_lib.score(task, generated, example)
        text, want = self.tokenizer.decode(generated), decode_ids(example.answer_ids)
        if example.meta.get("unordered"):
            return float(sorted(text.strip().split(",")[: want.count(",") + 1]) == sorted(want.split(",")))
        return float(text.strip().startswith(want.strip()))


def load(model_id: str, device: str, dtype):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    native = model.config.vocab_size >= VOCAB_SIZE and model.config.vocab_size < 1024
    tokenizer = None if native else transformers.AutoTokenizer.from_pretrained(model_id)
    return model, Codec(native, tokenizer)


def run_example(compiled, cache, codec: Codec, example, device) -> float:
    """Prefill, then one decode step per answer token; returns the example's score."""
    prompt = codec.encode(example.prompt_ids)
    forced = example.task == "natural_text"
    target = codec.encode(example.answer_ids) if (forced or not codec.native) else list(example.answer_ids)
    steps = len(target) + (0 if codec.native else 8)  # text scoring may need a few more tokens
    cache.reset()
    ids = torch.tensor([prompt], device=device)
    produced = []
    with torch.no_grad():
        logits = compiled(input_ids=ids, **{cache_keyword(compiled): cache}, use_cache=True).logits[:, -1]
        for step in range(steps):
            token = logits.argmax(-1)
            produced.append(int(token))
            if step + 1 == steps:
                break
            feed = torch.tensor([[target[step]]], device=device) if forced else token[:, None]
            logits = compiled(input_ids=feed, **{cache_keyword(compiled): cache}, use_cache=True).logits[:, -1]
    if forced:
        return sum(a == b for a, b in zip(produced, target)) / max(1, len(target))
    return codec.answer_matches(example.task, produced, example)


def backend_options(policy, budget, *, sink, local, extra, verify, inductor) -> dict:
    """The backend options of one (policy, budget) cell: sink and local window shrink to a
    quarter of a small budget each, so the selected positions always have room."""
    options = {"policy": policy, "inductor": inductor, "verify": verify, **extra}
    if budget is not None:
        options.update(budget=budget, sink=min(sink, budget // 4), local=min(local, budget // 4))
    return options


def cells(policies, budgets) -> list[tuple[str, int | None]]:
    """(policy, budget) cells: dense once (no budget), every other policy at every budget."""
    return [(p, None) if p == "dense" else (p, b) for p in policies for b in (budgets if p != "dense" else [None])]


def evaluate(model, codec, *, policies, budgets, contexts, task_names, examples, sink, local, extra, verify, inductor, device, seed, progress=None, task_options=None):
    """Accuracy rows, one per (policy, budget, context, task); ``task_options`` maps a task
    name to keyword arguments of its generator (e.g. a shorter ``natural_text``
    continuation)."""
    import prhs_compile

    rows = []
    task_options = task_options or {}
    for policy, budget in cells(policies, budgets):
        for context in contexts:
            task_examples = {t: task_lib.make_examples(t, examples, context, seed=seed, **task_options.get(t, {})) for t in task_names}
            longest = max(len(codec.encode(e.prompt_ids)) + len(e.answer_ids) + 8 for ex in task_examples.values() for e in ex)
            torch._dynamo.reset()
            prhs_compile.clear_states()
            options = backend_options(policy, budget, sink=sink, local=local, extra=extra, verify=verify, inductor=inductor)
            compiled = torch.compile(model, backend="prhs", options=options)
            cache = allocated_static_cache(model, longest, device)
            for task, exs in task_examples.items():
                prhs_compile.reset_stats()
                start = time.perf_counter()
                scores = []
                for example in exs:
                    scores.append(run_example(compiled, cache, codec, example, device))
                    if progress is not None:
                        progress.update(1)
                stats = prhs_compile.stats()
                rows.append({
                    "policy": policy, "budget": budget, "context": context, "task": task,
                    "accuracy": sum(scores) / len(scores), "examples": len(scores),
                    "retrieval_rate": stats.retrieval_rate if stats.layers else None,
                    "dropped_mean": mean([s.dropped_mean for s in stats.layers.values()]),
                    "sparse_layers": len(stats.layers),  # layers that ran sparse decode steps
                    "seconds": time.perf_counter() - start,
                })
    return rows


def allocated_static_cache(model, length: int, device):
    """A ``StaticCache`` whose tensors already exist. Its layers allocate lazily at the first
    update, and a prefill on a cache not yet allocated traces a different graph (Dynamo
    guards on it) than the prefills after it: one eager token up front saves that compile."""
    import transformers

    cache = transformers.StaticCache(config=model.config, max_cache_len=length)
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), **{cache_keyword(model): cache}, use_cache=True)
    cache.reset()
    return cache


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def plot(rows, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = sorted({r["task"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(len(contexts), len(tasks), figsize=(3.2 * len(tasks), 2.8 * len(contexts)), squeeze=False)
    for i, context in enumerate(contexts):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for policy in sorted({r["policy"] for r in rows}):
                pts = sorted((r["budget"], r["accuracy"]) for r in rows if r["policy"] == policy and r["task"] == task and r["context"] == context and r["budget"] is not None)
                dense = [r["accuracy"] for r in rows if r["policy"] == policy and r["task"] == task and r["context"] == context and r["budget"] is None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
                elif dense:
                    ax.axhline(dense[0], linestyle="--", color="gray", label=policy)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{task} @ {context}", fontsize=8)
            ax.set_xlabel("budget")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run(args) -> int:
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    model, codec = load(args.model, args.device, dtype)
    policies = [p for p in args.policies.split(",") if p]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    task_names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in task_names if t not in task_lib.TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; available: {sorted(task_lib.TASKS)}")
    total = len(cells(policies, budgets)) * len(contexts) * len(task_names) * args.examples
    with tqdm(total=total, desc="accuracy", unit="example") as bar:
        rows = evaluate(model, codec, policies=policies, budgets=budgets, contexts=contexts, task_names=task_names,
                        examples=args.examples, sink=args.sink, local=args.local, extra=json.loads(args.options),
                        verify=args.verify, inductor=args.inductor, device=args.device, seed=args.seed, progress=bar)
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    png = args.out.rsplit(".", 1)[0] + ".png"
    plotted = plot(rows, png)
    print(f"{'policy':>9} {'budget':>6} {'context':>7} {'task':>18} {'acc':>5} {'retr.rate':>9} {'dropped':>8}")
    for r in rows:
        rate = "-" if r["retrieval_rate"] is None else f"{r['retrieval_rate']:.3f}"
        dropped = "-" if r["dropped_mean"] is None else f"{r['dropped_mean']:.3f}"
        print(f"{r['policy']:>9} {r['budget']!s:>6} {r['context']:>7} {r['task']:>18} {r['accuracy']:>5.2f} {rate:>9} {dropped:>8}")
    print(f"wrote {args.out}" + (f" and {png}" if plotted else " (matplotlib missing: no plot)"))
    return 0
