"""Physical eviction for the one-shot policies: ``prhs_compile.evict_kv``.

After a prefill through the backend with ``sage_kv`` / ``snapkv``, the evicted cache holds
only the positions every later decode step attends to, so decoding over it must give the
same logits as decoding with the policy over the full cache.
"""

import pytest
import torch
import transformers
from tiny_models import tiny_model

import prhs_compile

OPTIONS = {"budget": 16, "sink": 2, "local": 4, "inductor": False}
PROMPT, STEPS = 40, 6


def _compiled(model, policy):
    return torch.compile(model, backend="prhs", options={"policy": policy, **OPTIONS})


def _decode(model, cache, tokens, mask=None):
    """Teacher-forced decode of ``tokens`` [B, T]; the logits of every step [B, T, V]."""
    logits = []
    for t in range(tokens.shape[1]):
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tokens[:, t : t + 1], past_key_values=cache, attention_mask=mask)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("policy", ["sage_kv", "snapkv"])
def test_decoding_over_the_evicted_cache_equals_the_policy_over_the_full_cache(policy, device):
    # On CUDA the decode steps over the full cache run the Triton select step and attend.
    model = tiny_model("llama").to(device)
    compiled = _compiled(model, policy)
    prompt = torch.randint(0, 128, (1, PROMPT), device=device)
    tokens = torch.randint(0, 128, (1, STEPS), device=device)
    tol = 1e-5 if device == "cpu" else 1e-4  # Triton attend vs SDPA kernels in fp32
    with torch.no_grad():
        full = transformers.DynamicCache(config=model.config)
        compiled(input_ids=prompt, past_key_values=full)
        expected = _decode(compiled, full, tokens)
        dense = _decode(model, transformers.DynamicCache(config=model.config), torch.cat([prompt, tokens], 1))[:, PROMPT:]
        assert not torch.allclose(expected, dense, atol=1e-3)  # the budget really drops positions

        for decoder in (model, compiled):  # the eager model (dense SDPA) and the compiled one
            cache = transformers.DynamicCache(config=model.config)
            compiled(input_ids=prompt, past_key_values=cache)
            report = prhs_compile.evict_kv(cache)
            assert (report.policy, report.positions_before, report.positions_after) == (policy, PROMPT, 16)
            assert report.layers == [0, 1]
            kv = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (64 // 4) * 4  # bytes/position
            assert (report.bytes_before, report.bytes_after) == (kv * PROMPT, kv * 16)
            assert report.bytes_saved == kv * (PROMPT - 16)
            got = _decode(decoder, cache, tokens)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
            # The window rolls: the cache stays at the budget and reports the true length.
            assert cache.layers[0].keys.shape[2] == 16 and cache.get_seq_length() == PROMPT + STEPS


def test_eviction_with_left_padding():
    model = tiny_model("llama")
    compiled = _compiled(model, "sage_kv")
    prompt = torch.randint(0, 128, (2, PROMPT))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[0, :5] = 0  # row 0 is left-padded
    tokens = torch.randint(0, 128, (2, STEPS))
    with torch.no_grad():
        full = transformers.DynamicCache(config=model.config)
        compiled(input_ids=prompt, past_key_values=full, attention_mask=mask)
        expected = _decode(compiled, full, tokens, mask)
        cache = transformers.DynamicCache(config=model.config)
        compiled(input_ids=prompt, past_key_values=cache, attention_mask=mask)
        prhs_compile.evict_kv(cache, attention_mask=mask)
        got = _decode(model, cache, tokens, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_chunk_of_several_tokens_lands_at_its_true_positions_and_keeps_every_querys_window():
    model = tiny_model("llama")
    compiled = _compiled(model, "sage_kv")
    prompt, chunk = torch.randint(0, 128, (1, PROMPT)), torch.randint(0, 128, (1, 3))
    with torch.no_grad():
        full = transformers.DynamicCache(config=model.config)
        model(input_ids=torch.cat([prompt, chunk], 1), past_key_values=full)
        cache = transformers.DynamicCache(config=model.config)
        compiled(input_ids=prompt, past_key_values=cache)
        prhs_compile.evict_kv(cache)
        out = model(input_ids=chunk, past_key_values=cache)
    assert torch.isfinite(out.logits).all()
    # sink 2 + selection 10 + window local 4 + 2 (the chunk's first query keeps its window)
    assert cache.layers[0].keys.shape[2] == 18 and cache.get_seq_length() == PROMPT + 3
    # The window holds the last 6 positions as a full cache has them: layer 0's keys depend
    # on nothing but the tokens and their positions (rotary). Computed through chunks of
    # different lengths they may differ by rounding (matmul blocking), not more.
    torch.testing.assert_close(cache.layers[0].keys[:, :, -6:], full.layers[0].keys[:, :, -6:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.layers[0].values[:, :, -6:], full.layers[0].values[:, :, -6:], rtol=1e-5, atol=1e-6)


def test_eviction_refuses_what_it_cannot_do_losslessly():
    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, PROMPT))
    with torch.no_grad():
        # A policy whose selection changes every step.
        cache = transformers.DynamicCache(config=model.config)
        _compiled(model, "prhs")(input_ids=prompt, past_key_values=cache)
        with pytest.raises(ValueError, match=r"no sage_kv or snapkv selection state matches layer 0.*\['prhs'\]"):
            prhs_compile.evict_kv(cache)
        prhs_compile.clear_states()
        torch._dynamo.reset()
        compiled = _compiled(model, "sage_kv")
        # A prompt within the budget: nothing to evict.
        short = transformers.DynamicCache(config=model.config)
        compiled(input_ids=prompt[:, :12], past_key_values=short)
        with pytest.raises(ValueError, match="holds 12 valid positions, within the budget 16"):
            prhs_compile.evict_kv(short)
        assert short.layers[0].keys.shape[2] == 12  # untouched
        # A cache the state was not built on (another prompt ran since).
        cache = transformers.DynamicCache(config=model.config)
        compiled(input_ids=prompt, past_key_values=cache)
        compiled(input_ids=prompt.flip(1), past_key_values=transformers.DynamicCache(config=model.config))
        with pytest.raises(ValueError, match="no sage_kv or snapkv selection state matches layer 0"):
            prhs_compile.evict_kv(cache)
        cache = transformers.DynamicCache(config=model.config)
        compiled(input_ids=prompt, past_key_values=cache)
        with pytest.raises(ValueError, match=r"attention_mask must be the 2-D \[batch, length\] = \[1, 40\]"):
            prhs_compile.evict_kv(cache, attention_mask=torch.ones(1, 39))
        prhs_compile.evict_kv(cache)
        with pytest.raises(ValueError, match="already evicted"):
            prhs_compile.evict_kv(cache)
    with pytest.raises(ValueError, match="needs a transformers DynamicCache, got dict"):
        prhs_compile.evict_kv({})
    static = transformers.StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(ValueError, match="StaticLayer: evict_kv compacts plain DynamicLayer"):
        prhs_compile.evict_kv(static)
