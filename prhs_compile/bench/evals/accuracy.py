"""``prhs-bench accuracy``: task accuracy of policies and budgets through ``backend="prhs"``.

Every example runs the way a user decodes: the model compiled with the ``prhs`` backend, a
static cache, prefill of the prompt (dense), then one decode step per answer token (sparse,
greedy). ``natural_text`` feeds the true continuation token by token (teacher forcing through
the decode graph) and scores next-token accuracy, so its decode steps are sparse too.

The project's own substrate model speaks the byte-level task format directly. Any other
causal LM (a named model such as ``gemma3-270m``, a ``.gguf`` file, a hub id or path; see
``models.py``) gets the plain-English tasks of ``text_tasks.py`` built with its own tokenizer
(``passkey``, ``niah_single``, ``niah_multikey``, ``natural_text``); the other byte-level tasks
reach it as text. Either way it is scored on the decoded text.

``natural_text`` rows also carry the fidelity of the sparse decode to dense: at every
teacher-forced step, KL(dense || sparse) of the next-token distribution and whether the two
argmaxes agree. The dense distributions come from one uncompiled forward of the model over
prompt and continuation (cached per example), so no cell pays for a dense decode.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from prhs_compile.bench import models as model_lib
from prhs_compile.bench.substrate import tasks as task_lib
from prhs_compile.bench.substrate import text_tasks
from prhs_compile.hf_compat import cache_keyword
from prhs_compile.bench.substrate.tokenizer import VOCAB_SIZE, decode_ids


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help=model_lib.model_help())
    parser.add_argument("--policies", default="dense,oracle,prhs", help="comma-separated policy names")
    parser.add_argument("--budgets", default="64,256,1024", help="comma-separated budgets (ignored by dense)")
    parser.add_argument("--contexts", default="4096", help="comma-separated context lengths (tokens)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: every task the model "
                        f"speaks: {','.join(task_lib.TASKS)} for the byte-level substrate, "
                        f"{','.join(text_tasks.TASKS)} for others)")
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
    """How task examples reach a model and how its output is read back."""

    native: bool  # the model speaks the byte-level task format
    tokenizer: object = None

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks this model is evaluated on by default."""
        return tuple(task_lib.TASKS) if self.native else tuple(text_tasks.TASKS)

    def example(self, task: str, context: int, seed: int, **options):
        """One example of ``task``: a text task through the model's tokenizer where one exists."""
        if not self.native and self.tokenizer is None:
            raise ValueError(f"task {task!r} needs a tokenizer: this model is not byte-level and has none")
        if not self.native and task in text_tasks.TASKS:
            return text_tasks.TASKS[task](self.tokenizer, context, seed, **options)
        if task not in task_lib.TASKS:
            known = sorted(set(task_lib.TASKS) | (set() if self.native else set(text_tasks.TASKS)))
            raise ValueError(f"task {task!r} is unknown: expected one of {known}")
        return task_lib.TASKS[task](context, seed, **options)

    def examples(self, task: str, n: int, context: int, seed: int, **options) -> list:
        """``n`` examples; example ``i`` uses seed ``seed * 1_000_003 + i`` (as ``tasks.make_examples``)."""
        return [self.example(task, context, seed * 1_000_003 + i, **options) for i in range(n)]

    def encode(self, ids: list[int], example=None) -> list[int]:
        if self.native or (example is not None and example.meta.get("tokenized")):
            return list(ids)
        return self.tokenizer(decode_ids(ids), add_special_tokens=False)["input_ids"]

    def answer_matches(self, task: str, generated: list[int], example) -> float:
        if self.native:
            return task_lib.score(task, generated, example)
        text = self.tokenizer.decode(generated)
        if example.meta.get("tokenized"):
            return text_tasks.score(text, example)
        want = decode_ids(example.answer_ids)
        if example.meta.get("unordered"):
            return float(sorted(text.strip().split(",")[: want.count(",") + 1]) == sorted(want.split(",")))
        return float(text.strip().startswith(want.strip()))


def load(model_id: str, device: str, dtype):
    """The model (``models.load_model``: named, GGUF or checkpoint) and how to talk to it."""
    model, tokenizer = model_lib.load_model(model_id, device, dtype)
    native = model.config.vocab_size >= VOCAB_SIZE and model.config.vocab_size < 1024
    return model, Codec(native, None if native else tokenizer)  # no tokenizer: random prompts only


def run_example(compiled, cache, codec: Codec, example, device, step_logits: list | None = None) -> float:
    """Prefill, then one decode step per answer token; returns the example's score.

    With ``step_logits`` (a list), the next-token logits of every step are appended to it
    (fp32, on the CPU): the prefill's last position, then each decode step."""
    prompt = codec.encode(example.prompt_ids, example)
    forced = example.task == "natural_text"
    target = codec.encode(example.answer_ids, example) if (forced or not codec.native) else list(example.answer_ids)
    # Text scoring may need a few more tokens than the answer's (a byte-level answer re-tokenised
    # by another tokenizer can come out longer; a text task's answer may follow a space).
    extra = 0 if forced or codec.native else (2 if example.meta.get("tokenized") else 8)
    steps = len(target) + extra
    cache.reset()
    ids = torch.tensor([prompt], device=device)
    produced = []
    with torch.no_grad():
        logits = compiled(input_ids=ids, **{cache_keyword(compiled): cache}, use_cache=True).logits[:, -1]
        for step in range(steps):
            if step_logits is not None:
                step_logits.append(logits[0].float().cpu())
            token = logits.argmax(-1)
            produced.append(int(token))
            if step + 1 == steps:
                break
            feed = torch.tensor([[target[step]]], device=device) if forced else token[:, None]
            logits = compiled(input_ids=feed, **{cache_keyword(compiled): cache}, use_cache=True).logits[:, -1]
    if forced:
        return sum(a == b for a, b in zip(produced, target)) / max(1, len(target))
    return codec.answer_matches(example.task, produced, example)


_DENSE_LOGPROBS: dict = {}


def dense_logprobs(model, codec: Codec, example, device) -> torch.Tensor:
    """Log-probabilities ``[steps, vocab]`` of the uncompiled model at the teacher-forced
    steps of ``example`` (prompt end, then each continuation token but the last), cached
    per (model, example)."""
    prompt, target = codec.encode(example.prompt_ids, example), codec.encode(example.answer_ids, example)
    key = (id(model), tuple(prompt), tuple(target))
    if key not in _DENSE_LOGPROBS:
        ids = torch.tensor([prompt + target[:-1]], device=device)
        with torch.no_grad():  # only the positions that predict the continuation: not [L, vocab]
            logits = model(input_ids=ids, logits_to_keep=len(target), use_cache=False).logits[0]
        _DENSE_LOGPROBS[key] = torch.log_softmax(logits.float().cpu(), dim=-1)
    return _DENSE_LOGPROBS[key]


def fidelity(dense_logp: torch.Tensor, step_logits: list) -> tuple[list[float], list[bool]]:
    """Per step: KL(dense || sparse) in nats and whether the two argmaxes agree."""
    sparse_logp = torch.log_softmax(torch.stack(step_logits[: len(dense_logp)]), dim=-1)
    dense_logp = dense_logp[: len(sparse_logp)]
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1).clamp_min(0.0)
    agree = dense_logp.argmax(-1) == sparse_logp.argmax(-1)
    return kl.tolist(), agree.tolist()


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
    continuation). ``natural_text`` rows add ``kl_mean``, ``kl_max`` and ``top1_agreement``
    against dense over every teacher-forced step; every row adds the retrieval rate of each
    layer that decoded sparse (``layer_retrieval_rate``)."""
    import prhs_compile

    rows = []
    task_options = task_options or {}
    for policy, budget in cells(policies, budgets):
        for context in contexts:
            task_examples = {t: codec.examples(t, examples, context, seed, **task_options.get(t, {})) for t in task_names}
            longest = max(len(codec.encode(e.prompt_ids, e)) + len(codec.encode(e.answer_ids, e)) + 8
                          for ex in task_examples.values() for e in ex)
            torch._dynamo.reset()
            prhs_compile.clear_states()
            options = backend_options(policy, budget, sink=sink, local=local, extra=extra, verify=verify, inductor=inductor)
            compiled = torch.compile(model, backend="prhs", options=options)
            cache = allocated_static_cache(model, longest, device)
            for task, exs in task_examples.items():
                prhs_compile.reset_stats()
                start = time.perf_counter()
                scores, kls, agree = [], [], []
                for example in exs:
                    steps = [] if task == "natural_text" else None
                    scores.append(run_example(compiled, cache, codec, example, device, step_logits=steps))
                    if steps is not None:
                        kl, same = fidelity(dense_logprobs(model, codec, example, device), steps)
                        kls += kl
                        agree += same
                    if progress is not None:
                        progress.update(1)
                stats = prhs_compile.stats()
                row = {
                    "policy": policy, "budget": budget, "context": context, "task": task,
                    "accuracy": sum(scores) / len(scores), "examples": len(scores),
                    "retrieval_rate": stats.retrieval_rate if stats.layers else None,
                    "dropped_mean": mean([s.dropped_mean for s in stats.layers.values()]),
                    "sparse_layers": len(stats.layers),  # layers that ran sparse decode steps
                    "layer_retrieval_rate": {str(layer): s.retrieval_rate for layer, s in sorted(stats.layers.items())},
                    "seconds": time.perf_counter() - start,
                }
                two_stage = [t for t in (s.two_stage() for s in stats.layers.values()) if t]
                if two_stage:  # retrieval="pages" in verify mode: beside what exact retrieval would drop
                    groups = sum(t["retrieved_groups"] for t in two_stage)
                    row["two_stage"] = {key: sum(t[key] * t["retrieved_groups"] for t in two_stage) / groups
                                        for key in ("dropped_mean", "exact_dropped_mean", "outside_candidates",
                                                    "missed_share")}
                if kls:
                    row.update(kl_mean=sum(kls) / len(kls), kl_max=max(kls), top1_agreement=sum(agree) / len(agree),
                               fidelity_steps=len(kls))
                rows.append(row)
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
    task_names = [t for t in args.tasks.split(",") if t] if args.tasks else list(codec.task_names)
    known = set(task_lib.TASKS) | (set() if codec.native else set(text_tasks.TASKS))
    unknown = [t for t in task_names if t not in known]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; available for this model: {sorted(known)}")
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
    print(f"{'policy':>9} {'budget':>6} {'context':>7} {'task':>18} {'acc':>5} {'retr.rate':>9} {'dropped':>8} {'KL':>8} {'top-1':>6}")
    for r in rows:
        rate = "-" if r["retrieval_rate"] is None else f"{r['retrieval_rate']:.3f}"
        dropped = "-" if r["dropped_mean"] is None else f"{r['dropped_mean']:.3f}"
        kl = f"{r['kl_mean']:.4f}" if "kl_mean" in r else "-"
        top1 = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-"
        print(f"{r['policy']:>9} {r['budget']!s:>6} {r['context']:>7} {r['task']:>18} {r['accuracy']:>5.2f} {rate:>9} {dropped:>8} {kl:>8} {top1:>6}")
    print(f"wrote {args.out}" + (f" and {png}" if plotted else " (matplotlib missing: no plot)"))
    return 0
