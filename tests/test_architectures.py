"""The backend over many Hugging Face decoder families, each built from a tiny random config.

For every family: with a budget that covers the context, ``backend="prhs"`` decodes the
same logits as the uncompiled model; with a small budget, the decode calls are either
rewritten and really select (logits differ from dense) or stay dense with a named reason.
Never a crash where the default backend runs. The graphs are compiled with the eager inner
compiler (the same rewrite, no Inductor) to keep the matrix fast.
"""

import pytest
import torch
import transformers

import prhs_compile

PROMPT, NEW, CACHE = 40, 4, 64
EAGER = {"inductor": False}


def _base(**extra):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg.update(extra)
    return cfg


_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (config class name, kwargs, what it exercises)
FAMILIES = {
    "llama": ("LlamaConfig", _base(), "dense, GQA"),
    "mistral": ("MistralConfig", _base(sliding_window=None), "dense, GQA"),
    "mixtral": ("MixtralConfig", _base(num_local_experts=4, num_experts_per_tok=2, sliding_window=None), "MoE"),
    "qwen2": ("Qwen2Config", _base(), "QKV bias"),
    "qwen2_moe": ("Qwen2MoeConfig", _base(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32), "MoE, shared expert"),
    "qwen3": ("Qwen3Config", _base(head_dim=16), "QK-norm"),
    "qwen3_moe": ("Qwen3MoeConfig", _base(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32), "QK-norm, MoE"),
    "gemma": ("GemmaConfig", _base(head_dim=16), "scaled embeddings"),
    "gemma3": ("Gemma3TextConfig", _base(head_dim=16, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention"]),
               "sliding-window layers, QK-norm"),
    "phi3": ("Phi3Config", _base(pad_token_id=0, bos_token_id=1, eos_token_id=2), "fused QKV"),
    "phi": ("PhiConfig", _base(num_key_value_heads=4, partial_rotary_factor=0.5), "partial rotary"),
    "gpt_neox": ("GPTNeoXConfig", _base(num_key_value_heads=None, rotary_pct=0.5), "partial rotary, no GQA"),
    "falcon": ("FalconConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True,
                                    bias=False), "fused QKV"),
    "falcon_mqa": ("FalconConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, multi_query=True,
                                        new_decoder_architecture=False, parallel_attn=True, bias=False),
                   "multi-query, one KV head broadcast"),
    "stablelm": ("StableLmConfig", _base(partial_rotary_factor=0.25), "partial rotary"),
    "starcoder2": ("Starcoder2Config", _base(sliding_window=None), "bias, GQA"),
    "olmo": ("OlmoConfig", _base(), "non-parametric norm"),
    "olmo2": ("Olmo2Config", _base(), "QK-norm after projection"),
    "granite": ("GraniteConfig", _base(attention_multiplier=0.2), "custom attention scale"),
    "cohere": ("CohereConfig", _base(), "parallel block"),
    "smollm3": ("SmolLM3Config", _base(no_rope_layers=[1, 0], pad_token_id=0), "NoPE layers"),
    "glm": ("GlmConfig", _base(head_dim=16, partial_rotary_factor=0.5, pad_token_id=0), "partial rotary"),
    "helium": ("HeliumConfig", _base(head_dim=16), "dense"),
    "granite_moe": ("GraniteMoeConfig", _base(num_local_experts=4, num_experts_per_tok=2), "MoE"),
    "olmoe": ("OlmoeConfig", _base(num_experts=4, num_experts_per_tok=2), "MoE, QK-norm"),
    "exaone4": ("Exaone4Config", _base(head_dim=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"]),
                "sliding-window layers"),
    "ministral": ("MinistralConfig", _base(head_dim=16, sliding_window=32,
                                            layer_types=["sliding_attention", "full_attention"]),
                  "sliding-window layers, GQA"),
    "glm4": ("Glm4Config", _base(head_dim=16, partial_rotary_factor=0.5, pad_token_id=0),
             "partial rotary, post norms"),
    "seed_oss": ("SeedOssConfig", _base(head_dim=16), "QKV bias"),
    "deepseek_v3": ("DeepseekV3Config", _base(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32,
                                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=24,
                                              n_routed_experts=4, num_experts_per_tok=2,
                                              n_shared_experts=1, moe_intermediate_size=32,
                                              first_k_dense_replace=1, n_group=1, topk_group=1),
                    "MLA: value dim != key dim, MoE"),
}


def _model(family):
    name, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def _decode(forward, model, ids):
    """Prefill and NEW - 1 greedy decode steps over a static cache: the logits of each."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE)
    steps, token, keyword = [], ids, prhs_compile.cache_keyword(model)
    with torch.no_grad():
        for _ in range(NEW):
            logits = forward(input_ids=token, **{keyword: cache}).logits[:, -1]
            steps.append(logits)
            token = logits.argmax(-1, keepdim=True)
    return torch.stack(steps, 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_exact_when_the_budget_covers_and_selects_or_says_why_not(family):
    model = _model(family)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    dense = _decode(model, model, ids)

    covering = {"policy": "oracle", "budget": PROMPT + NEW, "sink": 4, "local": 8, **EAGER}
    torch._dynamo.reset()
    exact = _decode(torch.compile(model, backend="prhs", options=covering), model, ids)
    torch.testing.assert_close(exact, dense, rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()
    prhs_compile.reset_stats()
    sparse_options = {"budget": 16, "sink": 2, "local": 4, **EAGER}
    sparse = _decode(torch.compile(model, backend="prhs", options=sparse_options), model, ids)
    stats = prhs_compile.stats()
    if stats.layers:  # some decode calls were rewritten: they really select
        assert stats.decode_steps == NEW - 1
        assert (sparse - dense).abs().max() > 1e-4
    else:  # every decode call stayed dense, each with its reason
        cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE)
        keyword = prhs_compile.cache_keyword(model)
        with torch.no_grad():
            model(input_ids=ids, **{keyword: cache})
            report = prhs_compile.explain(model, input_ids=ids[:, :1], **{keyword: cache},
                                          options=sparse_options)
        assert report.decisions and all(d.kind == "dense" and d.reason for d in report.decisions)
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
