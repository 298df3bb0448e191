"""``prhs-bench train-substrate``: train the small long-context model the benchmarks use.

A ~5.7M-parameter ``LlamaForCausalLM`` (GQA: 8 query heads share 2 KV heads, head_dim 64,
RoPE) over the byte-level tokenizer of ``tokenizer.py``, trained on Python source text (the
stdlib minus the held-out modules, plus the installed torch, sympy and transformers) with
the retrieval episodes of ``tasks.py`` woven in, then saved as a standard HF checkpoint
(safetensors, bf16) with its tokenizer, so ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it offline.

Recipe, and why:

* Every training sequence is natural text (loss weight 1) with, in most sequences, many
  retrieval episodes woven in: facts at random line starts, later a question followed by its
  answer (loss weight ``Recipe.answer_weight``). One sequence thus trains dozens of
  retrievals at all distances, and the question-at-the-end format of the evaluation is a
  special case.
* Curriculum over context length, by share of the wall-clock budget: 1K first (retrieval
  circuits form fast there, and steps are cheap), then 4K, 8K and 16K. The last phase trains
  at 16K itself, so 16K evaluation needs no length extrapolation; a large RoPE base (1e6)
  keeps the slowest rotary channels nearly position-free over that range, which content
  matching across long distances uses.
* A constant number of tokens per step (the batch shrinks as sequences grow), AdamW, warmup,
  then a linear decay over the last quarter of the time budget: the schedule is a function
  of elapsed time, because the step count a budget affords is not known in advance.
* On CUDA: bf16 autocast over fp32 master weights, ``torch.compile`` of the loss with static
  shapes (one compilation per curriculum length; falls back to eager if compilation fails),
  causal SDPA with no mask so the flash kernel runs (``_train_attention``), data generated
  by worker processes.

Measured on one H100 (torch 2.11, transformers 5.17), default settings, 13-minute budget:
about 1.67M tokens/s on average (2.9M at 1K, 2.2M at 4K, 1.45M at 8K, 0.92M at 16K), 1.15B
tokens in 8.8K steps; greedy dense accuracy of the saved checkpoint 98-100% on every
retrieval task at 4K and 92-100% at 16K (50 examples each).

Outputs in ``--out``: the checkpoint, ``train_log.jsonl`` (losses, throughput, periodic quick
evals) and ``training_report.json`` (parameters, wall time, steps, tokens/s, final losses,
dense accuracy of the saved checkpoint per task and length, attention sparsity).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

RETRIEVAL = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")


@dataclass
class Recipe:
    """Everything that defines a run besides the seed (``--tiny`` swaps in a small one)."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    rope_theta: float = 1e6
    max_position_embeddings: int = 65536
    # (sequence length, share of the training time); shares are normalised.
    # Few phases: each new length costs one compilation (~20 s on an H100; dynamic shapes
    # crash Inductor on torch 2.11, so every length is compiled statically).
    phases: list = field(default_factory=lambda: [(1024, 0.15), (4096, 0.25), (8192, 0.25),
                                                  (16384, 0.35)])
    tokens_per_step: int = 131072
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    decay_share: float = 0.25  # last share of the time with linearly decaying LR
    weight_decay: float = 0.1
    answer_weight: float = 5.0
    eval_every_s: float = 60.0  # quick teacher-forced eval during training
    quick_eval_examples: int = 8
    final_eval_lengths: tuple = (4096, 16384)
    final_eval_examples: int = 50
    reserve_s: float = 45.0  # wall-clock kept for the final save, reload and evaluation (~30 s on an H100)
    max_steps: int = 0  # 0: no limit besides time


def tiny_recipe() -> Recipe:
    """A smoke-test configuration: a ~0.1M-parameter model, a few seconds on a CPU."""
    return Recipe(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, phases=[(128, 0.5), (256, 0.5)], tokens_per_step=2048,
                  lr=3e-3, warmup_steps=5, eval_every_s=1e9, quick_eval_examples=2,
                  final_eval_lengths=(256,), final_eval_examples=2, reserve_s=0.0, max_steps=40)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory of the checkpoint and reports")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget of the whole run (default 13; --tiny: 1)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke-test configuration (CPU, seconds)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the training step (auto: on for CUDA)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data worker processes (default: 6 on CUDA, 0 on CPU)")
    parser.add_argument("--tokens-per-step", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--final-eval-examples", type=int, default=None)
    parser.add_argument("--final-eval-lengths", default=None, help="comma-separated, e.g. 4096,16384")
    parser.add_argument("--phases", default=None,
                        help="curriculum as LEN:SHARE,... e.g. 1024:0.2,4096:0.3,16384:0.5")


def _recipe_from_args(args) -> Recipe:
    r = tiny_recipe() if args.tiny else Recipe()
    if args.tokens_per_step:
        r.tokens_per_step = args.tokens_per_step
    if args.lr:
        r.lr = args.lr
    if args.max_steps is not None:
        r.max_steps = args.max_steps
    if args.final_eval_examples is not None:
        r.final_eval_examples = args.final_eval_examples
    if args.final_eval_lengths:
        r.final_eval_lengths = tuple(int(x) for x in args.final_eval_lengths.split(","))
    if args.phases:
        r.phases = [(int(a), float(b)) for a, b in (p.split(":") for p in args.phases.split(","))]
    return r


# ----------------------------------------------------------------------------- model


def build_model(r: Recipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    config = LlamaConfig(
        vocab_size=-(-VOCAB_SIZE // 64) * 64,  # round up: friendlier matmul shapes; spare ids unused
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_layers,
        num_attention_heads=r.num_heads,
        num_key_value_heads=r.num_kv_heads,
        head_dim=r.head_dim,
        max_position_embeddings=r.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": r.rope_theta},
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"  # fused flash / memory-efficient kernels
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


TRAIN_ATTN = "prhs_train_causal"


def _train_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA that never takes a mask, for training on unpadded full-length sequences.

    Transformers (before torch 2.14) materialises the ``[B, 1, L, L]`` causal mask whenever
    the model runs under ``torch.compile``, which rules out the flash kernel (at 16K that is a
    4 GiB mask per step and half the speed). Registered under a name without a mask function,
    the model passes ``attention_mask=None`` and this calls SDPA with ``is_causal=True``.
    The saved checkpoint uses plain ``"sdpa"``: the name is never written to its config.
    """
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _use_train_attention(model) -> bool:
    """Switch ``model`` to ``_train_attention``; False (and plain sdpa) if this HF lacks the hook."""
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(TRAIN_ATTN, _train_attention)
        model.config._attn_implementation = TRAIN_ATTN
        return model.config._attn_implementation == TRAIN_ATTN
    except Exception:
        model.config._attn_implementation = "sdpa"
        return False


def _loss_terms(model, tokens, weights):
    """Weighted next-token loss and its parts (sums, so steps can be averaged later)."""
    inputs, targets, w = tokens[:, :-1], tokens[:, 1:], weights[:, 1:]
    logits = model(input_ids=inputs, use_cache=False).logits
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(w)
    loss = (nll * w).sum() / w.sum().clamp_min(1.0)
    text = (w == 1.0).float()
    answer = (w > 1.0).float()
    stats = torch.stack([(nll * text).sum(), text.sum(), (nll * answer).sum(), answer.sum()]).detach()
    return loss, stats


# ----------------------------------------------------------------------------- data


class _Stream(torch.utils.data.IterableDataset):
    """Endless training batches ``(tokens int16 [B, L+1], weights float32 [B, L+1])``.

    A module-level class (not a closure) so worker processes can receive it by pickling,
    as they must where the start method is spawn or forkserver (Python 3.14's default).
    """

    def __init__(self, length: int, batch: int, seed: int, answer_weight: float):
        self.length, self.batch, self.seed, self.answer_weight = length, batch, seed, answer_weight

    def __iter__(self):
        from .tasks import get_corpus, training_sequence

        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = random.Random(f"train:{self.seed}:{self.length}:{wid}")  # distinct stream per worker
        corpus = get_corpus("train")
        n = self.length + 1
        while True:
            toks = torch.empty(self.batch, n, dtype=torch.int16)
            ws = torch.empty(self.batch, n, dtype=torch.float32)
            for b in range(self.batch):
                t, w = training_sequence(self.length, rng, corpus, answer_weight=self.answer_weight)
                toks[b] = torch.tensor(t, dtype=torch.int16)
                ws[b] = torch.tensor(w, dtype=torch.float32)
            yield toks, ws


def _loader(length, batch, seed, answer_weight, workers, pin):
    kw = {"num_workers": workers, "batch_size": None, "pin_memory": pin}
    if workers > 0:
        kw.update(prefetch_factor=4, persistent_workers=False)
    return iter(torch.utils.data.DataLoader(_Stream(length, batch, seed, answer_weight), **kw))


# ----------------------------------------------------------------------------- evaluation


def _autocast(device):

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def quick_eval(model, length: int, n: int, device, seed: int = 1234) -> dict:
    """Teacher-forced accuracy per task at ``length`` (equal to greedy exact match, given
    the answer order) and natural-text next-token accuracy / log-likelihood."""

    from .tasks import continuation_logprob, make_examples, score, teacher_forced

    out = {}
    was_training = model.training
    model.eval()
    per_batch = max(1, 65536 // length)
    with torch.no_grad(), _autocast(device):
        for task in RETRIEVAL + ("natural_text",):
            opts = {"continuation": 128} if task == "natural_text" else {}
            exs = make_examples(task, n, length, seed=seed, **opts)
            scores, logps = [], []
            for i in range(0, n, per_batch):
                chunk = exs[i : i + per_batch]
                ids = torch.tensor([teacher_forced(e)[0] for e in chunk], device=device)
                k = len(chunk[0].answer_ids)
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=k).logits
                pred = logits.argmax(-1).tolist()
                for e, p, lg in zip(chunk, pred, logits):
                    scores.append(score(task, p, e))
                    if task == "natural_text":  # logits hold only the answer positions
                        logps.append(continuation_logprob(lg, e, start=0))
            out[task] = sum(scores) / len(scores)
            if logps:
                out["natural_text_logprob"] = sum(logps) / len(logps)
    model.train(was_training)
    return out


def greedy_eval(model, lengths, n: int, device, seed: int = 4321, batch_tokens: int = 131072) -> dict:
    """Dense accuracy of greedy decoding (``generate``) per task and length, as the benchmark
    harness measures it; natural text by teacher forcing."""

    from .tasks import make_examples, score

    results = {}
    model.eval()
    for length in lengths:
        per_batch = max(1, batch_tokens // length)
        res = {}
        for task in RETRIEVAL:
            exs = make_examples(task, n, length, seed=seed)
            scores = []
            for i in range(0, n, per_batch):
                chunk = exs[i : i + per_batch]
                ids = torch.tensor([e.prompt_ids for e in chunk], device=device)
                with torch.no_grad(), _autocast(device):
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=len(chunk[0].answer_ids), do_sample=False,
                                         num_beams=1)
                for e, g in zip(chunk, gen[:, ids.shape[1] :].tolist()):
                    scores.append(score(task, g, e))
            res[task] = sum(scores) / len(scores)
        res.update({k: v for k, v in quick_eval(model, length, n, device, seed).items()
                    if k.startswith("natural_text")})
        results[str(length)] = res
    return results


def attention_sparsity(path, length: int, device, seed: int = 99) -> dict:
    """How concentrated the trained model's attention is, from the saved checkpoint.

    For the last 16 queries of a multikey prompt, per layer and head: the attention mass held
    by the top 64 keys and by the top 1% of keys, and how many keys hold 90% / 99% of the
    mass (medians over heads and queries), plus the largest mass any head puts on the asked
    needle (retrieval heads find it).
    """
    from transformers import AutoModelForCausalLM

    from .tasks import niah_multikey

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager",
                                                 dtype=torch.float32).to(device).eval()
    ex = niah_multikey(length, seed)
    ids = torch.tensor([ex.prompt_ids], device=device)
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    s, e = ex.meta["needle_spans"][0]
    top1pct = max(1, length // 100)
    per_layer = []
    for a in att:
        p = a[0, :, -16:, :].float()  # [heads, queries, keys]
        srt = p.sort(-1, descending=True).values
        cum = srt.cumsum(-1)
        per_layer.append({
            "top64_mass": srt[..., :64].sum(-1).median().item(),
            "top1pct_mass": srt[..., :top1pct].sum(-1).median().item(),
            "keys_for_90pct": (cum < 0.9).sum(-1).add(1).float().median().item(),
            "keys_for_99pct": (cum < 0.99).sum(-1).add(1).float().median().item(),
            "max_needle_mass_last_query": p[:, -1, s:e].sum(-1).max().item(),
        })
    mean = {k: sum(d[k] for d in per_layer) / len(per_layer) for k in per_layer[0]}
    del model
    return {"length": length, "mean_over_layers": mean, "per_layer": per_layer}


# ----------------------------------------------------------------------------- training


def _lr_at(r: Recipe, step: int, frac: float) -> float:
    """Warmup by steps, then constant, then linear decay over the last ``decay_share`` of time."""
    warm = min(1.0, (step + 1) / max(1, r.warmup_steps))
    if frac <= 1.0 - r.decay_share:
        return r.lr * warm
    t = min(1.0, (frac - (1.0 - r.decay_share)) / r.decay_share)
    return r.lr * warm * (1.0 - (1.0 - r.min_lr_ratio) * t)


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Matrices of the blocks decay; norms and the embedding table do not.
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run(args) -> int:
    import transformers
    from tqdm.auto import tqdm

    from .tasks import get_corpus
    from .tokenizer import save_tokenizer

    t_start = time.time()
    r = _recipe_from_args(args)
    minutes = args.minutes if args.minutes is not None else (1.0 if args.tiny else 13.0)
    deadline = t_start + 60.0 * minutes
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (6 if cuda else 0)
    use_compile = args.compile == "on" or (args.compile == "auto" and cuda)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_f = open(out / "train_log.jsonl", "w")

    def log(rec):
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if cuda:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    get_corpus("train"), get_corpus("eval")  # read once here; forked workers share them

    model = build_model(r).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    fused = {"fused": True} if cuda else {}
    opt = torch.optim.AdamW(_param_groups(model, r.weight_decay), lr=r.lr, betas=(0.9, 0.95), eps=1e-8, **fused)
    custom_attn = _use_train_attention(model)
    if use_compile:
        # One static graph per curriculum length (see ``phases``); allow that many.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 4 * len(r.phases)))
    step_fn = torch.compile(_loss_terms, dynamic=False) if use_compile else _loss_terms
    log({"event": "start", "params": n_params, "device": str(device), "recipe": asdict(r),
         "compile": use_compile, "train_attention": custom_attn, "minutes": minutes, "seed": args.seed})

    train_budget = max(1.0, deadline - r.reserve_s - time.time())
    total_share = sum(s for _, s in r.phases)
    phase_ends, acc = [], 0.0
    for _, s in r.phases:
        acc += s / total_share
        phase_ends.append(acc)

    step, tokens_seen, t_train0 = 0, 0, time.time()
    stats_acc = torch.zeros(4, device=device)
    loss_acc, n_acc = torch.zeros((), device=device), 0
    last_log, last_eval = time.time(), time.time()
    phase_stats, recent = [], []
    compile_error = None
    # The bar counts seconds of the training budget; redrawn at most every few seconds so a
    # log file of a 13-minute run stays readable.
    bar = tqdm(total=round(train_budget), unit="s", desc="train-substrate", dynamic_ncols=True,
               mininterval=2.0, bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")
    stop = False
    for phase, (length, _) in enumerate(r.phases):
        if stop:
            break
        batch = max(1, r.tokens_per_step // length)
        data = _loader(length, batch, args.seed * 1000 + phase, r.answer_weight, workers, cuda)
        p_t0, p_steps, p_tokens = time.time(), 0, 0
        while True:
            frac = (time.time() - t_train0) / train_budget
            if frac >= phase_ends[phase] and phase < len(r.phases) - 1:
                break
            if frac >= 1.0 or (r.max_steps and step >= r.max_steps):
                stop = True
                break
            if r.max_steps and phase < len(r.phases) - 1 and step >= r.max_steps * phase_ends[phase]:
                break  # a step-limited run (--tiny) still visits every phase
            toks, ws = next(data)
            toks = toks.to(device, non_blocking=True).long()
            ws = ws.to(device, non_blocking=True)
            lr = _lr_at(r, step, frac)
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(device):
                try:
                    loss, stats = step_fn(model, toks, ws)
                    loss.backward()
                except Exception as exc:  # compilation trouble: keep training, eagerly
                    if step_fn is _loss_terms:
                        raise
                    compile_error = f"{type(exc).__name__}: {exc}"[:2000]
                    log({"event": "compile_failed", "step": step, "error": compile_error})
                    step_fn = _loss_terms
                    opt.zero_grad(set_to_none=True)
                    loss, stats = step_fn(model, toks, ws)
                    loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            p_steps += 1
            p_tokens += toks.shape[0] * (toks.shape[1] - 1)
            tokens_seen += toks.shape[0] * (toks.shape[1] - 1)
            stats_acc += stats
            loss_acc += loss.detach()
            n_acc += 1
            now = time.time()
            if now - last_log >= (2.0 if args.tiny else 10.0) or step == 1:
                s = stats_acc.tolist()  # one sync per log interval, not per step
                rec = {"event": "train", "step": step, "t": round(now - t_start, 1), "len": length,
                       "batch": batch, "lr": lr, "loss": loss_acc.item() / max(1, n_acc),
                       "text_loss": s[0] / max(1.0, s[1]), "answer_loss": s[2] / max(1.0, s[3]),
                       "tokens_per_s": p_tokens / max(1e-9, now - p_t0)}
                recent.append(rec)
                log(rec)
                bar.set_postfix(step=step, len=length, loss=f"{rec['loss']:.3f}",
                                ans=f"{rec['answer_loss']:.3f}", tok_s=f"{rec['tokens_per_s'] / 1e6:.2f}M",
                                refresh=False)
                stats_acc.zero_()
                loss_acc.zero_()
                n_acc, last_log = 0, now
            if now - last_eval >= r.eval_every_s:
                ev = quick_eval(model, length, r.quick_eval_examples, device)
                log({"event": "quick_eval", "step": step, "t": round(time.time() - t_start, 1), "len": length, **ev})
                bar.write(f"step {step} len {length}: " + " ".join(f"{k}={v:.2f}" for k, v in ev.items()))
                last_eval = time.time()
            bar.update(max(0.0, min(bar.total, now - t_train0) - bar.n))
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - p_t0
        phase_stats.append({"len": length, "batch": batch, "steps": p_steps, "tokens": p_tokens,
                            "seconds": round(dt, 1), "tokens_per_s": p_tokens / max(1e-9, dt)})
        log({"event": "phase_end", **phase_stats[-1]})
        del data
    bar.close()
    train_s = time.time() - t_train0

    # Save in bf16 (the committed checkpoint is small), then evaluate what was saved.
    model.config._attn_implementation = "sdpa"
    model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(str(out))
    save_tokenizer(out)
    if not (out / "model.safetensors").exists():
        raise RuntimeError(f"no model.safetensors written to {out}")
    del model, opt
    if cuda:
        torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM

    eval_dtype = torch.bfloat16 if cuda else torch.float32
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=eval_dtype).to(device)
    final = greedy_eval(saved, r.final_eval_lengths, r.final_eval_examples, device)
    del saved
    for length, res in final.items():
        log({"event": "final_eval", "len": int(length), **res})
    try:
        sparsity = attention_sparsity(out, min(4096, max(r.final_eval_lengths)), device)
    except Exception as exc:  # a diagnostic: never lose the checkpoint over it
        sparsity = {"error": f"{type(exc).__name__}: {exc}"}

    last = recent[-5:]
    report = {
        "params": n_params,
        "checkpoint_bytes": (out / "model.safetensors").stat().st_size,
        "wall_time_s": round(time.time() - t_start, 1),
        "train_time_s": round(train_s, 1),
        "steps": step,
        "tokens": tokens_seen,
        "tokens_per_s": tokens_seen / max(1e-9, train_s),
        "phases": phase_stats,
        "final_loss": sum(x["loss"] for x in last) / max(1, len(last)),
        "final_text_loss": sum(x["text_loss"] for x in last) / max(1, len(last)),
        "final_answer_loss": sum(x["answer_loss"] for x in last) / max(1, len(last)),
        "dense_accuracy": final,
        "attention_sparsity": sparsity,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "compiled": step_fn is not _loss_terms,
        "compile_error": compile_error,
        "seed": args.seed,
        "tiny": bool(args.tiny),
        "recipe": asdict(r),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "corpus": {split: {"bytes": len(c), "files": len(c.files), "sha256": c.sha256}
                   for split, c in (("train", get_corpus("train")), ("eval", get_corpus("eval")))},
        "epochs_of_train_text": tokens_seen / len(get_corpus("train")),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log({"event": "done", "wall_time_s": report["wall_time_s"]})
    log_f.close()
    print(json.dumps({"out": str(out), "params": n_params, "steps": step,
                      "tokens_per_s": round(report["tokens_per_s"]), "dense_accuracy": final}, indent=2))
    return 0
