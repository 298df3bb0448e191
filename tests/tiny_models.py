"""Tiny random-init configurations of real Hugging Face decoder architectures.

No weights can be downloaded in tests, and the rewrite only depends on the graph shape, so
each architecture is built from its own config class with a few small layers.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128


def _common(**extra):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    base.update(extra)
    return base


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_common()),
    "mistral": lambda: transformers.MistralConfig(**_common(sliding_window=None)),
    "qwen3": lambda: transformers.Qwen3Config(**_common(head_dim=16)),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_common(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    ),
    "phi3": lambda: transformers.Phi3Config(**_common(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_common(num_key_value_heads=None), rotary_pct=0.5
    ),
    # MLA: a latent cache expanded to per-head keys and values, value dim 24 != key dim 16.
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_common(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                  qk_nope_head_dim=8, v_head_dim=24, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
                  n_group=1, topk_group=1)
    ),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False,
    ),
}


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    config = CONFIGS[arch]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    # Random weights emit any token: never stop early at an "end of sequence", so runs of
    # different batch layouts always produce the same number of tokens.
    model.generation_config.eos_token_id = None
    return model.eval()


def save_byte_level_checkpoint(path, max_position_embeddings: int):
    """A tiny random Llama with the project's byte-level tokenizer, saved as a checkpoint
    (what the ``prhs-bench`` commands load by path)."""
    from prhs_compile.bench.substrate.tokenizer import VOCAB_SIZE, save_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    save_tokenizer(path)
    return path
