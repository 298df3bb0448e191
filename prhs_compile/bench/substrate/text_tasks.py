"""Long-context tasks in plain English for pretrained models, built with the model's own tokenizer.

The byte-level tasks of ``tasks.py`` speak the substrate's special-token format; a pretrained
model (e.g. Gemma 3 270M) gets these instead. Every prompt is exactly ``context_length``
tokens of the given tokenizer (BOS included); ``Example.answer_ids`` are the tokens of the
answer, ``meta["answer"]`` its text, and ``meta["tokenized"]`` marks the ids as the model's.

==================== ============================================= ===================================
task                 prompt                                        answer
==================== ============================================= ===================================
passkey              the passkey retrieval test (Mohtashami and    `` 58302``
                     Jaggi, 2023): repeated filler sentences with
                     "The pass key is N. Remember it." at a depth
niah_single          RULER-style needle in prose: "The special     the 7-digit number
                     magic number for KEY is: N." once
niah_multikey        ``n_keys`` such needles with distinct keys;   the asked key's number
                     the question asks one
natural_text         held-out text; scored teacher-forced (next-   the next ``continuation`` tokens
                     token accuracy, and KL / top-1 agreement
                     against dense in ``accuracy.evaluate``)
==================== ============================================= ===================================

Text sources, all shipped with Python (no download): needle haystacks are the prose of the
interpreter's help topics (``pydoc_data/topics.py``: the language reference as plain text);
``natural_text`` is the held-out standard-library source of ``tasks.get_corpus("eval")``
(the same text as the substrate's ``natural_text``).
"""

from __future__ import annotations

import random
from functools import lru_cache

from . import tasks as task_lib

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important info there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")
# Keys of the needles: common nouns (single words read naturally and tokenize into few pieces).
KEYS = ("apple", "river", "garden", "candle", "mirror", "window", "violin", "harbor", "forest", "lantern",
        "pepper", "castle", "saddle", "meadow", "rocket", "turtle", "basket", "tunnel", "falcon", "pillow",
        "copper", "island", "ladder", "marble", "nectar", "orchid", "parrot", "quartz", "ribbon", "spider")
NEEDLE_DEPTH_MARGIN = 0.05  # needles sit in [5%, 95%] of the haystack


@lru_cache(maxsize=1)
def prose() -> str:
    """The help topics of the interpreter (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@lru_cache(maxsize=8)
def _token_ids(tokenizer, source: str) -> tuple[int, ...]:
    text = prose() if source == "prose" else task_lib.get_corpus("eval").data.decode("utf-8", errors="replace")
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _haystack(tokenizer, source: str, n: int, rng: random.Random) -> list[int]:
    """``n`` consecutive tokens of a source, from a random offset (wrapping around)."""
    ids = _token_ids(tokenizer, source)
    if n <= 0:
        return []
    start = rng.randrange(len(ids))
    out = list(ids[start:start + n])
    while len(out) < n:
        out += ids[: n - len(out)]
    return out


def _line_break_after(tokenizer, hay: list[int], pos: int) -> int:
    """The first index after ``pos`` that follows a token ending a line (needles start a
    line); ``pos`` itself when none is near."""
    for i in range(pos, min(len(hay), pos + 256)):
        if tokenizer.decode([hay[i]]).endswith("\n"):
            return i + 1
    return pos


def _example(task, tokenizer, context_length, seed, intro, hay_source, needles, depths, ask, answer, meta):
    """BOS + intro + haystack with ``needles`` woven in at ``depths`` + question, exactly
    ``context_length`` tokens."""
    rng = random.Random(f"text:{task}:{context_length}:{seed}:hay")
    head, tail = _bos(tokenizer) + _ids(tokenizer, intro), _ids(tokenizer, ask)
    needle_ids = [_ids(tokenizer, n) for n in needles]
    n_hay = context_length - len(head) - len(tail) - sum(map(len, needle_ids))
    if n_hay < 16:
        raise ValueError(f"{task}: context_length={context_length} is too short for its needles and question "
                         f"(needs at least {context_length - n_hay + 16} tokens)")
    hay = PASSKEY_FILLER if hay_source == "filler" else None
    hay_ids = (_ids(tokenizer, PASSKEY_FILLER * (n_hay // 8 + 2))[:n_hay] if hay is not None
               else _haystack(tokenizer, hay_source, n_hay, rng))
    cuts = sorted((_line_break_after(tokenizer, hay_ids, int(d * n_hay)) if hay is None else int(d * n_hay), i)
                  for i, d in enumerate(depths))
    body, cur, spans = list(head), 0, [None] * len(needles)
    for pos, i in cuts:
        pos = max(cur, pos)
        body += hay_ids[cur:pos]
        spans[i] = (len(body), len(body) + len(needle_ids[i]))
        body += needle_ids[i]
        cur = pos
    body += hay_ids[cur:] + tail
    assert len(body) == context_length, (len(body), context_length)
    meta = {"task": task, "context_length": context_length, "seed": seed, "tokenized": True,
            "answer": answer.strip(), "needle_spans": spans, "depths": depths, "haystack": hay_source, **meta}
    return task_lib.Example(task, body, _ids(tokenizer, answer), meta)


def _rng(task, context_length, seed) -> random.Random:
    return random.Random(f"text:{task}:{context_length}:{seed}")


def _depth(rng) -> float:
    return NEEDLE_DEPTH_MARGIN + (1 - 2 * NEEDLE_DEPTH_MARGIN) * rng.random()


def _number(rng, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def passkey(tokenizer, context_length: int, seed: int = 0) -> task_lib.Example:
    rng = _rng("passkey", context_length, seed)
    key, depth = _number(rng, 5), _depth(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return _example("passkey", tokenizer, context_length, seed, PASSKEY_INTRO, "filler", [needle], [depth],
                    "\nWhat is the pass key? The pass key is", f" {key}", {"depth": depth})


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}.\n"


def _question(key: str) -> str:
    return (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is:")


def niah_single(tokenizer, context_length: int, seed: int = 0) -> task_lib.Example:
    rng = _rng("niah_single", context_length, seed)
    key, value, depth = rng.choice(KEYS), _number(rng, 7), _depth(rng)
    return _example("niah_single", tokenizer, context_length, seed, NIAH_INTRO, "prose", [_needle(key, value)],
                    [depth], _question(key), f" {value}", {"keys": [key], "depth": depth})


def niah_multikey(tokenizer, context_length: int, seed: int = 0, *, n_keys: int = 4) -> task_lib.Example:
    if not 1 <= n_keys <= len(KEYS):
        raise ValueError(f"niah_multikey: n_keys={n_keys} is invalid: expected in [1, {len(KEYS)}]")
    rng = _rng("niah_multikey", context_length, seed)
    keys = rng.sample(KEYS, n_keys)
    values = [_number(rng, 7) for _ in keys]
    depths = [_depth(rng) for _ in keys]
    target = rng.randrange(n_keys)
    return _example("niah_multikey", tokenizer, context_length, seed, NIAH_INTRO, "prose",
                    [_needle(k, v) for k, v in zip(keys, values)], depths, _question(keys[target]),
                    f" {values[target]}", {"keys": keys, "target": target, "depth": depths[target]})


def natural_text(tokenizer, context_length: int, seed: int = 0, *, continuation: int = 64) -> task_lib.Example:
    """``context_length`` tokens of held-out stdlib source; the answer is the next
    ``continuation`` tokens (teacher-forced)."""
    if continuation < 1:
        raise ValueError(f"natural_text: continuation={continuation} is invalid: expected >= 1")
    rng = _rng("natural_text", context_length, seed)
    bos = _bos(tokenizer)
    text = _haystack(tokenizer, "source", context_length - len(bos) + continuation, rng)
    cut = context_length - len(bos)
    meta = {"task": "natural_text", "context_length": context_length, "seed": seed, "tokenized": True,
            "source": "held-out Python standard-library source", "scoring": "token_accuracy"}
    return task_lib.Example("natural_text", bos + text[:cut], text[cut:], meta)


TASKS = {"passkey": passkey, "niah_single": niah_single, "niah_multikey": niah_multikey, "natural_text": natural_text}


def score(generated_text: str, example: task_lib.Example) -> float:
    """1.0 when the generated text starts with the answer (after whitespace), else 0.0."""
    return float(generated_text.strip().startswith(example.meta["answer"]))
