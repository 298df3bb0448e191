"""Every reason an attention call stays dense, and the debug/log output that reports it."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import prhs_compile

OPTIONS = {"budget": 8, "sink": 1, "local": 2}


def decisions_of(fn, *args, **options):
    with torch.no_grad():
        return prhs_compile.explain(fn, *args, options={**OPTIONS, **options}).decisions


def qkv(q_len=1, kv_len=32, heads=4, kv_heads=2, dim=16, dtype=torch.float32):
    return (
        torch.randn(1, heads, q_len, dim, dtype=dtype),
        torch.randn(1, kv_heads, kv_len, dim, dtype=dtype),
        torch.randn(1, kv_heads, kv_len, dim, dtype=dtype),
    )


def valid(kv_len=32, filled=20):
    return (torch.arange(kv_len) < filled).reshape(1, 1, 1, kv_len)


def test_decode_with_gqa_and_a_bool_mask_is_rewritten():
    q, k, v = qkv()
    (d,) = decisions_of(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True), q, k, v, valid())
    assert d.kind == "decode"


@pytest.mark.parametrize(
    "make_call, reason",
    [
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.1, enable_gqa=True),
         "dropout_p=0.1: only dropout-free attention is rewritten"),
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m.expand(1, 4, 1, 32), enable_gqa=True),
         "attn_mask shape (1, 4, 1, 32): only [B or 1, 1, Tq, L] masks"),
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
         "is_causal=True with query length 1"),
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k[:, :, :8], v[:, :, :8], enable_gqa=True),
         "key length 8 <= max(budget, min_context)=8: selection would keep every position"),
        (lambda q, k, v, m: F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True),
         "dtypes query=torch.float64"),
    ],
    ids=["dropout", "per-head-mask", "is-causal-decode", "short-cache", "float64"],
)
def test_dense_with_reason(make_call, reason):
    (d,) = decisions_of(make_call, *qkv(), valid())
    assert d.kind == "dense"
    assert reason in d.reason


def test_one_kv_head_broadcast_over_the_query_heads_is_rewritten():
    """Multi-query attention without enable_gqa (Falcon's multi_query): SDPA broadcasts the
    single key/value head, which is GQA with one group."""
    q, k, v = qkv(kv_heads=1)
    (d,) = decisions_of(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, valid())
    assert d.kind == "decode"


def test_a_scale_that_dynamo_made_dynamic_stays_dense_instead_of_crashing():
    """Calling compiled code with a second scale value makes Dynamo pass the scale as a graph
    value: the call must stay dense with that reason, and be right."""
    def attn(q, k, v, mask, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="prhs", options={**OPTIONS, "inductor": False})
    q, k, v = qkv()
    with torch.no_grad():
        for scale in (0.25, 0.3, 0.35):
            out = compiled(q, k, v, valid(), scale)
        torch.testing.assert_close(out, attn(q, k, v, valid(), 0.35), rtol=1e-5, atol=1e-5)
        (d,) = prhs_compile.explain(attn, q, k, v, valid(), 0.4, options=OPTIONS).decisions
    assert d.kind in ("decode", "dense")
    if d.kind == "dense":
        assert "scale is a value computed in the graph" in d.reason


def test_head_dim_above_256_stays_dense():
    q, k, v = qkv(dim=320)
    (d,) = decisions_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, v)
    assert d.kind == "dense" and "head dim 320 / value dim 320: supported up to 256" in d.reason


def test_prefill_stays_dense_and_resets_state():
    q, k, v = qkv(q_len=32)
    (d,) = decisions_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), q, k, v)
    assert d.kind == "prefill" and "query length 32 > max_decode_query_len=1" in d.reason


def test_short_multi_token_decode_is_rewritten_when_allowed():
    q, k, v = qkv(q_len=3)
    mask = torch.ones(1, 1, 3, 32, dtype=torch.bool).tril(diagonal=29)
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)  # noqa: E731
    assert decisions_of(fn, q, k, v, mask)[0].kind == "prefill"
    explained = prhs_compile.explain(fn, q, k, v, mask, options={"policy": "dense", "max_decode_query_len": 4, "inductor": False})
    assert explained.decisions[0].kind == "decode"
    torch.testing.assert_close(explained.output, fn(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_float_additive_mask_is_interpreted_exactly():
    q, k, v = qkv()
    bias = torch.randn(1, 1, 1, 32).masked_fill(~valid(), torch.finfo(torch.float32).min)
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)  # noqa: E731
    explained = prhs_compile.explain(fn, q, k, v, bias, options={"policy": "oracle", "budget": 24, "sink": 1, "local": 2})
    assert explained.decisions[0].kind == "decode"
    torch.testing.assert_close(explained.output, fn(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_autograd_keeps_every_layer_dense():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 12))
    explained = prhs_compile.explain(model, input_ids=ids)  # grad mode on, parameters require grad
    assert explained.decisions and all(d.kind == "dense" and "autograd is recording" in d.reason for d in explained.decisions)


def test_explanation_prints_decisions_and_both_graphs():
    q, k, v = qkv()
    with torch.no_grad():
        explained = prhs_compile.explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, v, options=OPTIONS)
    text = str(explained)
    assert "layer 0: decode" in text and "=== graph 0: before ===" in text and "=== graph 0: after ===" in text
    assert "scaled_dot_product_attention" in explained.before[0]
    assert "torch.ops.prhs.select.default" in explained.after[0] and "scaled_dot_product_attention" not in explained.after[0]


def test_debug_option_logs_decisions_and_graphs(caplog):
    q, k, v = qkv()
    fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, enable_gqa=True),
                       backend="prhs", options={**OPTIONS, "debug": True, "inductor": False})
    with caplog.at_level(logging.DEBUG, logger="prhs"), torch.no_grad():
        fn(q, k, v)
    text = caplog.text
    assert "layer 0 decode: query length 1: select-then-attend" in text
    assert "graph before rewrite" in text and "graph after rewrite" in text


def test_torch_logs_prhs_turns_the_log_on():
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        f = torch.compile(lambda q, k: F.scaled_dot_product_attention(q, k, k, dropout_p=0.5),
                          backend="prhs", options={"inductor": False})
        f(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8))
        """
    )
    env = {**os.environ, "TORCH_LOGS": "+prhs"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "layer 0 stays dense: dropout_p=0.5" in out.stderr
    assert "graph after rewrite" in out.stderr


def test_cache_keyword_follows_the_installed_transformers():
    import inspect

    model = tiny_model("llama")
    takes_cache = "cache" in inspect.signature(type(model).forward).parameters
    want = "cache" if takes_cache else "past_key_values"
    assert prhs_compile.cache_keyword(model) == want
    assert prhs_compile.cache_keyword(torch.compile(model, backend="prhs")) == want
    assert prhs_compile.cache_keyword(model.forward) == want
