"""Long-context tasks of the evaluation substrate, deterministic by seed, at any length.

Every example is token ids of the byte-level tokenizer (``tokenizer.py``): ids 0..255 are
bytes, specials follow. A prompt is ``<|bos|>`` + haystack text with facts woven in at line
starts + a question; it is exactly ``context_length`` tokens long. The model answers by
continuing the prompt; ``score`` compares its output with ``Example.answer_ids``.

Formats (K: a key, 6 lowercase letters; V: a value, 7 digits; N: a variable name, 6 letters):

==================== ====================================== ============================= ==================================
task                 facts in the haystack                  question (end of the prompt)  answer
==================== ====================================== ============================= ==================================
niah_single          ``<|key|>K<|value|>V<|end|>`` once     ``<|query|>K<|value|>``       ``V``
niah_multikey        n_keys facts with distinct keys         ask one of them               its ``V``
niah_multivalue      n_values facts with the same key        ``<|query|>K<|value|>``       ``V1,V2,...`` (order of appearance;
                                                                                           scored as a set)
variable_tracking    chains ``N0 := V``, ``Ni := N(i-1)``   ``<|query|>Nh<|value|>``      ``N(h-1)<|value|>...N0<|value|>V``
                     (as facts), n_chains chains, n_hops
natural_text         none (held-out stdlib text)            --                            the next ``continuation`` tokens
==================== ====================================== ============================= ==================================

Defaults: ``n_keys=8``, ``n_values=4``, ``n_chains=2``, ``n_hops=4``, ``continuation=256``;
needle depths are uniform at random unless ``depth=`` is given.

Variable tracking resolves a variable by chasing its chain of assignments; each hop is the
same operation as a needle retrieval (find ``name<|value|>`` and copy what follows), and the
answer spells out the hops, ending at the number.

Haystack text is Python standard library source (code, comments and docstrings: real text on
every machine). The modules in ``EVAL_MODULES`` are held out: they give the haystacks of the
evaluation examples (``split="eval"``, the default) and the ``natural_text`` continuations;
training (``split="train"``, ``training_sequence``) uses every other stdlib ``.py`` file plus
the Python source of the installed ``torch``, ``sympy`` and ``transformers`` (present wherever
this project runs; without them a small model memorises the stdlib, where Linux distributions
often leave out the test suite, and stops generalising to held-out text). The
random choices (keys, values, depths, the haystack offset as a fraction) do not depend on the
corpus, so an example differs between Python versions only in its haystack bytes;
``meta["corpus_sha256"]`` names the text used.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import string
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .tokenizer import BOS_ID, END_ID, KEY_ID, QUERY_ID, VALUE_ID

# Held-out modules: long, present as single files from Python 3.10 to 3.14, and slow to
# change. A missing one is skipped; if too little text is left, see ``_eval_files``.
EVAL_MODULES = (
    "argparse.py",
    "difflib.py",
    "doctest.py",
    "mailbox.py",
    "tarfile.py",
    "turtle.py",
    "pydoc.py",
    "configparser.py",
    "ipaddress.py",
    "statistics.py",
    "pickletools.py",
    "optparse.py",
)
# Directories never read: installed third-party packages, bytecode, and the codec tables of
# ``encodings`` (megabytes of hex tables, not text); ``_sysconfigdata*`` is machine-specific.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "encodings"}
_MIN_EVAL_BYTES = 256 * 1024
# Extra training text: installed packages the project depends on (found without importing).
TRAIN_PACKAGES = ("torch", "sympy", "transformers")

KEY_LEN = 6
VALUE_LEN = 7
COMMA = ord(",")


@dataclass(frozen=True)
class Example:
    """One task instance: feed ``prompt_ids``, expect ``answer_ids`` to follow."""

    task: str
    prompt_ids: list[int]
    answer_ids: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def metadata(self) -> dict:  # alias: both names read naturally at call sites
        return self.meta


# ----------------------------------------------------------------------------- corpus


class Corpus:
    """Concatenated source files with cheap wrap-around slicing and line-start lookup."""

    def __init__(self, name: str, files: list[tuple[str, bytes]]):
        if not files:
            raise RuntimeError(f"no Python source found for the {name} corpus")
        self.name = name
        self.files = tuple(f for f, _ in files)
        # Files are separated by a blank line so that a window across two files still
        # reads as text; the file boundaries are kept to name the source of a slice.
        parts, self._starts, pos = [], [], 0
        for _, data in files:
            self._starts.append(pos)
            chunk = data.rstrip(b"\n") + b"\n\n"
            parts.append(chunk)
            pos += len(chunk)
        self.data = b"".join(parts)
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    def __len__(self) -> int:
        return len(self.data)

    def text(self, start: int, n: int) -> bytes:
        """``n`` bytes from ``start``, wrapping around the end (any ``n`` is possible)."""
        start %= len(self.data)
        out = self.data[start : start + n]
        while len(out) < n:  # wrap: the corpus repeats
            out += self.data[: n - len(out)]
        return out

    def line_start_at(self, frac: float) -> int:
        """Offset of the first line start at or after ``frac`` of the corpus."""
        pos = int(frac * len(self.data))
        if pos == 0 or self.data[pos - 1] == 10:
            return pos
        nl = self.data.find(b"\n", pos)
        return 0 if nl < 0 or nl + 1 >= len(self.data) else nl + 1

    def file_at(self, offset: int) -> str:
        return self.files[bisect.bisect_right(self._starts, offset % len(self.data)) - 1]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    """All stdlib ``.py`` files we may read, as sorted relative POSIX paths (fixed order)."""
    return tuple(f for f in _walk_py(stdlib_dir()) if not f.rsplit("/", 1)[-1].startswith("_sysconfigdata"))


def _read(rel: str, root: Path | None = None) -> bytes:
    try:
        return ((root or stdlib_dir()) / rel).read_bytes()
    except OSError:
        return b""


def _walk_py(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def _package_files() -> list[tuple[str, bytes]]:
    """Source files of ``TRAIN_PACKAGES`` as ``("pkg/rel/path.py", bytes)``, fixed order."""
    import importlib.util

    files = []
    for name in TRAIN_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)  # locates the package, does not import it
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        files += [(f"{name}/{rel}", d) for rel in _walk_py(root) if (d := _read(rel, root))]
    return files


def _eval_files() -> list[str]:
    present = set(_stdlib_files())
    files = [m for m in EVAL_MODULES if m in present]
    if sum(len(_read(f)) for f in files) < _MIN_EVAL_BYTES:
        # A stripped-down Python (or a renamed module set): fall back to every file, so the
        # tasks still work; held-out-ness is lost, which the corpus name records.
        return list(_stdlib_files())
    return files


@lru_cache(maxsize=2)
def get_corpus(split: str = "eval") -> Corpus:
    """The held-out (``"eval"``) stdlib text, or the training (``"train"``) text."""
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', not {split!r}")
    held_out = _eval_files()
    if split == "eval":
        return Corpus(split, [(f, d) for f in held_out if (d := _read(f))])
    names = [f for f in _stdlib_files() if f not in set(held_out)] or held_out
    return Corpus(split, [(f"stdlib/{f}", d) for f in names if (d := _read(f))] + _package_files())


# ----------------------------------------------------------------------------- pieces

_LETTERS = string.ascii_lowercase.encode()
_DIGITS = string.digits.encode()


def _word(rng: random.Random, n: int = KEY_LEN) -> list[int]:
    return [rng.choice(_LETTERS) for _ in range(n)]


def _number(rng: random.Random, n: int = VALUE_LEN) -> list[int]:
    return [rng.choice(_DIGITS[1:])] + [rng.choice(_DIGITS) for _ in range(n - 1)]


def _unique_words(rng: random.Random, k: int, taken: set | None = None) -> list[list[int]]:
    taken = set() if taken is None else taken
    out = []
    while len(out) < k:
        w = _word(rng)
        if bytes(w) not in taken:
            taken.add(bytes(w))
            out.append(w)
    return out


def fact(key: list[int], value: list[int]) -> list[int]:
    return [KEY_ID, *key, VALUE_ID, *value, END_ID]


def question(key: list[int]) -> list[int]:
    return [QUERY_ID, *key, VALUE_ID]


def _snap(hay: bytes, pos: int) -> int:
    """First line start at or after ``pos`` in ``hay`` (facts go on their own line)."""
    if pos <= 0:
        return 0
    if pos >= len(hay) or hay[pos - 1] == 10:
        return min(pos, len(hay))
    nl = hay.find(b"\n", pos)
    return len(hay) if nl < 0 else nl + 1


def _weave(hay: bytes, inserts: list[tuple[float, list[int]]]) -> tuple[list[int], list[int]]:
    """Insert token runs into ``hay`` at line starts near the given depth fractions.

    Returns the tokens and, for each insert (in the given order), where it starts. Inserts
    that land on the same line start keep their given order.
    """
    order = sorted(range(len(inserts)), key=lambda i: (inserts[i][0], i))
    tokens: list[int] = []
    starts = [0] * len(inserts)
    cur = 0
    for i in order:
        pos = max(cur, _snap(hay, int(inserts[i][0] * len(hay))))
        tokens.extend(hay[cur:pos])
        starts[i] = len(tokens)
        tokens.extend(inserts[i][1])
        cur = pos
    tokens.extend(hay[cur:])
    return tokens, starts


def _assemble(
    task: str,
    context_length: int,
    seed: int,
    rng: random.Random,
    split: str,
    facts: list[list[int]],
    depths: list[float],
    relevant: list[int],
    ask: list[int],
    answer: list[int],
    meta: dict,
) -> Example:
    """Haystack + facts at ``depths`` + question, exactly ``context_length`` tokens."""
    corpus = get_corpus(split)
    n_hay = context_length - 1 - sum(map(len, facts)) - len(ask)
    if n_hay < 0:
        raise ValueError(f"{task}: context_length {context_length} is too short for its facts")
    start = corpus.line_start_at(rng.random())  # drawn last: corpus-independent choices first
    body, starts = _weave(corpus.text(start, n_hay), list(zip(depths, facts)))
    prompt = [BOS_ID, *body, *ask]
    assert len(prompt) == context_length
    spans = [(1 + s, 1 + s + len(f)) for s, f in zip(starts, facts)]
    meta = {
        "task": task,
        "context_length": context_length,
        "seed": seed,
        "split": split,
        "corpus_sha256": corpus.sha256,
        "haystack_file": corpus.file_at(start),
        "fact_spans": spans,  # [start, end) of every fact in the prompt, in creation order
        "needle_spans": [spans[i] for i in relevant],  # the facts the answer depends on
        "depths": depths,
        **meta,
    }
    return Example(task, prompt, answer, meta)


def _rng(task: str, context_length: int, seed: int) -> random.Random:
    # A string seed is hashed with SHA-512 by ``random``: stable across runs and versions.
    return random.Random(f"{task}:{context_length}:{seed}")


def _text(ids: list[int]) -> str:
    return bytes(ids).decode("ascii")


# ----------------------------------------------------------------------------- tasks


def niah_single(context_length: int, seed: int = 0, *, split: str = "eval", depth: float | None = None) -> Example:
    """One needle ``K -> V`` at ``depth`` (fraction of the haystack; random if None)."""
    rng = _rng("niah_single", context_length, seed)
    key, value = _word(rng), _number(rng)
    d = rng.random() if depth is None else float(depth)
    meta = {"keys": [_text(key)], "values": [_text(value)], "depth": d}
    return _assemble("niah_single", context_length, seed, rng, split, [fact(key, value)], [d], [0],
                     question(key), value, meta)


def niah_multikey(context_length: int, seed: int = 0, *, split: str = "eval", n_keys: int = 8,
                  depth: float | None = None) -> Example:
    """``n_keys`` needles with distinct keys; the question asks one (the others distract)."""
    rng = _rng("niah_multikey", context_length, seed)
    keys = _unique_words(rng, n_keys)
    values = [_number(rng) for _ in keys]
    depths = [rng.random() for _ in keys]
    target = rng.randrange(n_keys)
    if depth is not None:
        depths[target] = float(depth)
    meta = {"keys": [_text(k) for k in keys], "values": [_text(v) for v in values], "target": target,
            "depth": depths[target]}
    return _assemble("niah_multikey", context_length, seed, rng, split,
                     [fact(k, v) for k, v in zip(keys, values)], depths, [target],
                     question(keys[target]), values[target], meta)


def niah_multivalue(context_length: int, seed: int = 0, *, split: str = "eval", n_values: int = 4) -> Example:
    """One key bound ``n_values`` times; the answer lists all values in order of appearance."""
    rng = _rng("niah_multivalue", context_length, seed)
    key = _word(rng)
    values = [_number(rng) for _ in range(n_values)]
    depths = sorted(rng.random() for _ in values)  # values[i] is the i-th to appear
    answer: list[int] = []
    for i, v in enumerate(values):
        answer += ([COMMA] if i else []) + v
    meta = {"keys": [_text(key)], "values": [_text(v) for v in values], "unordered": True}
    return _assemble("niah_multivalue", context_length, seed, rng, split,
                     [fact(key, v) for v in values], depths, list(range(n_values)),
                     question(key), answer, meta)


def variable_tracking(context_length: int, seed: int = 0, *, split: str = "eval", n_chains: int = 2,
                      n_hops: int = 4) -> Example:
    """Chains ``N0 := V; N1 := N0; ...; Nh := N(h-1)``; resolve ``Nh`` of the first chain.

    The facts of a chain appear in assignment order at random depths; the other chains
    are distractors of the same shape.
    """
    rng = _rng("variable_tracking", context_length, seed)
    taken: set = set()
    facts, depths, chains = [], [], []
    for _ in range(n_chains):
        names = _unique_words(rng, n_hops + 1, taken)
        number = _number(rng)
        chains.append((names, number))
        facts.append(fact(names[0], number))
        facts += [fact(names[i], names[i - 1]) for i in range(1, n_hops + 1)]
        depths += sorted(rng.random() for _ in range(n_hops + 1))
    names, number = chains[0]
    answer: list[int] = []
    for i in range(n_hops - 1, -1, -1):  # N(h-1) <|value|> ... N0 <|value|> V
        answer += names[i] + [VALUE_ID]
    answer += number
    meta = {"chains": [[_text(n) for n in ns] + [_text(v)] for ns, v in chains], "n_hops": n_hops,
            "values": [_text(number)]}
    return _assemble("variable_tracking", context_length, seed, rng, split, facts, depths,
                     list(range(n_hops + 1)), question(names[-1]), answer, meta)


def natural_text(context_length: int, seed: int = 0, *, split: str = "eval", continuation: int = 256) -> Example:
    """``context_length`` tokens of held-out stdlib text; the answer is what follows.

    Scored by next-token accuracy (``score``) or mean log-likelihood (``continuation_logprob``)
    of the continuation under teacher forcing, not by generation.
    """
    rng = _rng("natural_text", context_length, seed)
    corpus = get_corpus(split)
    start = corpus.line_start_at(rng.random())
    text = corpus.text(start, context_length - 1 + continuation)
    prompt = [BOS_ID, *text[: context_length - 1]]
    meta = {"task": "natural_text", "context_length": context_length, "seed": seed, "split": split,
            "corpus_sha256": corpus.sha256, "haystack_file": corpus.file_at(start),
            "continuation_file": corpus.file_at(start + context_length - 1), "scoring": "token_accuracy"}
    return Example("natural_text", prompt, list(text[context_length - 1 :]), meta)


TASKS = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
    "natural_text": natural_text,
}
RETRIEVAL_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")


def make_examples(task: str, n: int, context_length: int, seed: int = 0, **options) -> list[Example]:
    """``n`` examples of ``task``; example ``i`` uses seed ``seed * 1_000_003 + i``."""
    gen = TASKS[task]
    return [gen(context_length, seed * 1_000_003 + i, **options) for i in range(n)]


# ----------------------------------------------------------------------------- scoring


def _split_values(ids: list[int]) -> list[bytes]:
    return bytes(i if i < 256 else 0 for i in ids).split(b",")


def score(task: str, generated_ids, example: Example) -> float:
    """1.0 if the model's output matches the answer, else 0.0 (``natural_text``: a fraction).

    ``generated_ids`` are the tokens produced after the prompt (extra tokens past the
    answer's length are ignored). Retrieval tasks are exact match, except that
    ``niah_multivalue`` accepts the values in any order (as RULER scores it). For
    ``natural_text`` pass the teacher-forced argmax predictions of the continuation
    (see ``teacher_forced``): the score is the fraction predicted right.
    """
    gen = [int(i) for i in generated_ids][: len(example.answer_ids)]
    if task == "natural_text":
        return sum(a == b for a, b in zip(gen, example.answer_ids)) / max(1, len(example.answer_ids))
    if len(gen) < len(example.answer_ids):
        return 0.0
    if example.meta.get("unordered"):
        return float(sorted(_split_values(gen)) == sorted(_split_values(example.answer_ids)))
    return float(gen == list(example.answer_ids))


def teacher_forced(example: Example) -> tuple[list[int], int]:
    """Model input for scoring the answer in one forward pass, and where to read it.

    ``logits[start + i]`` predicts ``answer_ids[i]``. For the exact-match tasks, the argmax
    at every answer position being right is the same event as greedy decoding producing the
    answer, so this is a cheap way to get greedy accuracy (in the answer's given order).
    """
    return list(example.prompt_ids) + list(example.answer_ids[:-1]), len(example.prompt_ids) - 1


def continuation_logprob(logits, example: Example, start: int | None = None) -> float:
    """Mean log-likelihood (nats/token) of the answer given the teacher-forced ``logits``.

    ``logits``: ``[len(input), vocab]`` for the input of ``teacher_forced(example)``; pass
    ``start=0`` when they hold only the answer positions (``logits_to_keep``).
    """
    import torch

    if start is None:
        start = teacher_forced(example)[1]
    n = len(example.answer_ids)
    logp = torch.log_softmax(logits[start : start + n].float(), dim=-1)
    target = torch.tensor(example.answer_ids, device=logp.device)
    return logp.gather(-1, target[:, None]).mean().item()


# ----------------------------------------------------------------------------- training mix


def _episode(rng: random.Random, taken: set) -> tuple[list[list[int]], list[int], list[int]]:
    """Facts, question and answer of one training episode (formats as the eval tasks).

    Kinds: a single needle (the facts of the other episodes in the sequence act as the
    distractors of multikey), a key bound 2..5 times, and an assignment chain of 1..5 hops.
    """
    kind = rng.random()
    if kind < 0.3:
        key, value = _unique_words(rng, 1, taken)[0], _number(rng)
        return [fact(key, value)], question(key), value
    if kind < 0.7:  # the hardest kind (retrieve every occurrence, in order): the largest share
        key = _unique_words(rng, 1, taken)[0]
        values = [_number(rng) for _ in range(rng.randint(2, 5))]
        answer: list[int] = []
        for i, v in enumerate(values):
            answer += ([COMMA] if i else []) + v
        return [fact(key, v) for v in values], question(key), answer
    hops = rng.randint(1, 5)
    names, number = _unique_words(rng, hops + 1, taken), _number(rng)
    facts = [fact(names[0], number)] + [fact(names[i], names[i - 1]) for i in range(1, hops + 1)]
    answer = []
    for i in range(hops - 1, -1, -1):
        answer += names[i] + [VALUE_ID]
    return facts, question(names[-1]), answer + number


def _fact_weights(f: list[int]) -> list[float]:
    # Keys and values are random: no loss on them. The markers after them are predictable.
    return [0.0] + [0.0] * KEY_LEN + [1.0] + [0.0] * (len(f) - KEY_LEN - 3) + [1.0]


def training_sequence(length: int, rng: random.Random, corpus: Corpus | None = None, *,
                      answer_weight: float = 4.0, episode_every: tuple[int, int] = (256, 2048),
                      p_plain: float = 0.15) -> tuple[list[int], list[float]]:
    """``length + 1`` tokens of training text with episodes woven in, and per-token loss weights.

    Train on ``tokens[:-1] -> tokens[1:]`` with ``weights[1:]``. The haystack is training
    corpus text (loss weight 1). With probability ``p_plain`` there are no episodes;
    otherwise about one episode per ``episode_every`` tokens (the spacing drawn per
    sequence). An episode's facts sit at random line starts before its question, which is
    followed by the answer and ``<|end|>`` (loss weight ``answer_weight``) and more text, so
    one sequence trains many retrievals at many distances.
    """
    corpus = corpus or get_corpus("train")
    n_tokens = length + 1
    inserts: list[tuple[float, int, list[int], list[float]]] = []
    budget = int(0.4 * n_tokens)  # keep most of every sequence natural text
    if rng.random() >= p_plain:
        n_ep = max(1, round(length / rng.uniform(*episode_every)))
        taken: set = set()
        for _ in range(n_ep):
            facts, ask, answer = _episode(rng, taken)
            size = sum(map(len, facts)) + len(ask) + len(answer) + 1
            if size > budget:
                break
            budget -= size
            q = rng.uniform(0.02, 1.0)
            for d, f in zip(sorted(rng.uniform(0.0, q) for _ in facts), facts):
                inserts.append((d, 0, f, _fact_weights(f)))
            qa = ask + answer + [END_ID]
            w = [0.0] * (len(ask) - 1) + [1.0] + [answer_weight] * (len(answer) + 1)
            inserts.append((q, 1, qa, w))  # 1: after facts that snap to the same line
    n_hay = n_tokens - 1 - sum(len(i[2]) for i in inserts)
    hay = corpus.text(corpus.line_start_at(rng.random()), n_hay)
    inserts.sort(key=lambda t: (t[0], t[1]))
    tokens, weights, cur = [BOS_ID], [0.0], 0
    for d, _, ids, w in inserts:
        pos = max(cur, _snap(hay, int(d * n_hay)))
        tokens.extend(hay[cur:pos])
        weights.extend([1.0] * (pos - cur))
        tokens.extend(ids)
        weights.extend(w)
        cur = pos
    tokens.extend(hay[cur:])
    weights.extend([1.0] * (n_hay - cur))
    assert len(tokens) == n_tokens == len(weights)
    return tokens, weights
