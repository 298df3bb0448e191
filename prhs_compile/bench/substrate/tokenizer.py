"""Byte-level tokenizer of the evaluation substrate, saved as a standard HF tokenizer.

Token ids 0..255 are the raw bytes, so a context of N tokens is N bytes of text and the task
generators can build token ids directly from bytes without calling any tokenizer. A few
special tokens follow the bytes (ids 256..): padding, begin/end of sequence, and the markers
that delimit the facts, questions and answers of the retrieval tasks (see ``tasks.py``).

The tokenizer is built with the ``tokenizers`` library (a BPE model with the 256 byte symbols
and no merges, behind the byte-level pre-tokenizer) and wrapped in
``PreTrainedTokenizerFast``, so ``save_pretrained`` writes a ``tokenizer.json`` that
``AutoTokenizer.from_pretrained(path)`` loads offline with no custom code.
"""

from __future__ import annotations

from functools import lru_cache

# Special tokens, in id order after the 256 bytes. The names use ``<|...|>`` so that they
# cannot collide with text that occurs in Python source (``<k>`` or ``<v>`` could).
PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
KEY = "<|key|>"      # opens a fact:      <|key|> key <|value|> value <|end|>
VALUE = "<|value|>"  # separates a key (or a variable name) from what it is bound to
QUERY = "<|query|>"  # opens a question:  <|query|> key <|value|>   -> answer follows
END = "<|end|>"      # closes a fact (and, in training, an answer)
SPECIAL_TOKENS = (PAD, BOS, EOS, KEY, VALUE, QUERY, END)

PAD_ID, BOS_ID, EOS_ID, KEY_ID, VALUE_ID, QUERY_ID, END_ID = range(256, 256 + len(SPECIAL_TOKENS))
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # ids the tokenizer can produce
SPECIAL_IDS = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """The printable character that stands for each byte inside the byte-level pipeline.

    The ``tokenizers`` ByteLevel pre-tokenizer and decoder represent every byte by a visible
    unicode character: bytes that are printable latin-1 characters stand for themselves and
    the others (controls, space, a few latin-1 gaps) are shifted to code points 256 and up,
    in byte order. The vocabulary must use the same symbols, so they are computed here.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\xa1"), ord("\xac") + 1))
    printable |= set(range(ord("\xae"), ord("\xff") + 1))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return tuple(symbols)


def build_tokenizer(model_max_length: int = 65536):
    """A ``PreTrainedTokenizerFast`` whose ids are bytes (0..255) then ``SPECIAL_TOKENS``.

    Encoding text adds ``<|bos|>`` in front (as Llama tokenizers do, and as every training
    sequence starts); pass ``add_special_tokens=False`` for the bare bytes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {sym: b for b, sym in enumerate(_byte_symbols())}
    # No merges: every byte is its own token, whatever the text.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # use_regex=False: no splitting into words (it would not change the ids, only cost time).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Added in order, so they get ids 256, 257, ... matching PAD_ID, BOS_ID, ...
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.token_to_id(SPECIAL_TOKENS[-1]) == 256 + len(SPECIAL_TOKENS) - 1
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[KEY, VALUE, QUERY, END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def encode_bytes(text: str | bytes) -> list[int]:
    """Token ids of ``text`` without specials: its UTF-8 bytes (no tokenizer needed)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return list(data)


def decode_ids(ids) -> str:
    """Readable text of token ids: bytes decoded as UTF-8, specials by name (for debugging)."""
    out, buf = [], bytearray()
    for i in ids:
        i = int(i)
        if i < 256:
            buf.append(i)
            continue
        out.append(buf.decode("utf-8", errors="replace"))
        buf = bytearray()
        out.append(SPECIAL_TOKENS[i - 256] if i - 256 < len(SPECIAL_TOKENS) else f"<|unused{i}|>")
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def save_tokenizer(path) -> None:
    """Write the tokenizer files (tokenizer.json, tokenizer_config.json, ...) into ``path``."""
    build_tokenizer().save_pretrained(str(path))
