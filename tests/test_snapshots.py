"""Inline snapshots of the rewritten attention calls of real HF architectures.

Only the attention lines are pinned (the rest of a decoder graph is HF's business and changes
between releases). Update with ``EXPECTTEST_ACCEPT=1 pytest tests/test_snapshots.py``.
"""

import re

import expecttest
import torch
import transformers
from tiny_models import tiny_model
from transformers import StaticCache

import prhs_compile

OPTIONS = {"budget": 16, "sink": 2, "local": 4}

# The prefill graphs differ between transformers releases (whether the causal mask is
# materialised, cache slicing); they are pinned for the release CI installs
# (.ci/constraints.txt). Decode graphs are the same from 5.17 to 5.23 and always checked.
PREFILL_PINNED = transformers.__version__.startswith("5.23.")


def attention_lines(code: str) -> str:
    """The SDPA and prhs op calls of a graph, without FX's ``x = None`` bookkeeping. The
    cache tensors are named by layer and kind (Dynamo names them after the forward's
    arguments, which transformers releases rename: ``l_past_key_values_...``,
    ``l_kwargs_past_key_values_...``, ``l_kwargs_cache_...``)."""
    lines = []
    for line in code.splitlines():
        if "torch.ops.prhs." in line or "scaled_dot_product_attention" in line:
            line = re.sub(r";  .* = None$", "", line.strip())
            line = re.sub(r"\bl_(?:kwargs_)?(?:past_key_values|cache)_layers_(\d+)_(keys|values)\b",
                          r"cache_layers_\1_\2", line)
            lines.append(line)
    return "\n".join(lines)


def prefill_and_decode(arch: str, **options) -> tuple[str, str, str]:
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=32)
    options = {**OPTIONS, **options}
    with torch.no_grad():
        # ``cache=`` where the installed transformers takes it, else ``past_key_values=``.
        keyword = prhs_compile.cache_keyword(model)
        prefill = prhs_compile.explain(model, input_ids=ids, **{keyword: cache}, options=options)
        token = prefill.output.logits[:, -1:].argmax(-1)
        decode = prhs_compile.explain(model, input_ids=token, **{keyword: cache}, options=options)
    decisions = "\n".join(str(d) for d in prefill.decisions + decode.decisions)
    return attention_lines(prefill.after[0]), attention_lines(decode.after[0]), decisions


def with_hf_names_numbered(lines: str) -> str:
    """``attention_lines`` with the names of the tensors HF computes (queries, expanded keys
    and values, masks) replaced by ``t0, t1, ...`` in order of appearance: for models whose
    attention inputs are not cache tensors, so that renamed locals do not break a snapshot."""
    ours = re.compile(r"^(?:_prhs_state_\d+_\d+|select_default(?:_\d+)?|attend_default(?:_\d+)?|"
                      r"cache_layers_\d+_(?:keys|values)|torch|ops|prhs|default|select|attend|"
                      r"None|True|False|scale|attn_mask|dropout_p|is_causal|enable_gqa)$")
    names: dict[str, str] = {}

    def rename(match):
        word = match.group(0)
        if ours.match(word):
            return word
        return names.setdefault(word, f"t{len(names)}")

    out = []
    for line in lines.splitlines():
        head, _, rest = line.partition(" = ")
        parts = rest.split("'")  # odd parts are plan strings: left as they are
        parts[::2] = [re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*\b", rename, part) for part in parts[::2]]
        out.append(f"{head} = " + "'".join(parts))
    return "\n".join(out)


class TestRewriteSnapshots(expecttest.TestCase):
    def assertPrefill(self, actual, expected):
        if PREFILL_PINNED:
            self.assertExpectedInline(actual, expected, skip=1)

    def test_llama(self):
        prefill, decode, decisions = prefill_and_decode("llama")
        self.assertPrefill(prefill, """\
attn_output = torch._C._nn.scaled_dot_product_attention(q_embed, key, value, attn_mask = None, dropout_p = 0.0, scale = 0.25, is_causal = True, enable_gqa = True)
prefill_default = torch.ops.prhs.prefill.default(q_embed, key, None, True, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8])
attn_output_5 = torch._C._nn.scaled_dot_product_attention(q_embed_1, key_1, value_1, attn_mask = None, dropout_p = 0.0, scale = 0.25, is_causal = True, enable_gqa = True)
prefill_default_1 = torch.ops.prhs.prefill.default(q_embed_1, key_1, None, True, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8])""")
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")
        self.assertExpectedInline(decisions, """\
layer 0: prefill (query length 12 > max_decode_query_len=1: dense attention, selection state reset)
layer 1: prefill (query length 12 > max_decode_query_len=1: dense attention, selection state reset)
layer 0: decode (query length 1: select-then-attend)
layer 1: decode (query length 1: select-then-attend)""")

    def test_mistral(self):
        prefill, decode, decisions = prefill_and_decode("mistral")
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")

    def test_qwen3_qk_norm(self):
        prefill, decode, decisions = prefill_and_decode("qwen3")
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")

    def test_gemma3_sliding_window_layers(self):
        prefill, decode, decisions = prefill_and_decode("gemma3")
        self.assertPrefill(prefill, """\
attn_output = torch._C._nn.scaled_dot_product_attention(q_embed, key, value, attn_mask = attention_mask, dropout_p = 0.0, scale = 0.0625, is_causal = False)
prefill_default = torch.ops.prhs.prefill.default(q_embed, k_embed, attention_mask, False, 0.0625, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8])
attn_output_5 = torch._C._nn.scaled_dot_product_attention(q_embed_1, key_1, value_1, attn_mask = None, dropout_p = 0.0, scale = 0.0625, is_causal = True, enable_gqa = True)
prefill_default_1 = torch.ops.prhs.prefill.default(q_embed_1, key_1, None, True, 0.0625, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8])""")
        self.assertExpectedInline(decode, """\
attn_output = torch._C._nn.scaled_dot_product_attention(q_embed, key, value, attn_mask = attention_mask_2, dropout_p = 0.0, scale = 0.0625, is_causal = False)
select_default = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.0625, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default, attention_mask_1, 0.0625)""")
        self.assertExpectedInline(decisions, """\
layer 0: prefill (query length 12 > max_decode_query_len=1: dense attention, selection state reset)
layer 1: prefill (query length 12 > max_decode_query_len=1: dense attention, selection state reset)
layer 0: dense (key length 8 <= max(budget, min_context)=16: selection would keep every position)
layer 1: decode (query length 1: select-then-attend)""")

    def test_phi3(self):
        prefill, decode, decisions = prefill_and_decode("phi3")
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")

    def test_gpt_neox_partial_rotary_no_gqa(self):
        prefill, decode, decisions = prefill_and_decode("gpt_neox")
        self.assertPrefill(prefill, """\
attn_output = torch._C._nn.scaled_dot_product_attention(q_embed_1, key, value, attn_mask = None, dropout_p = 0.0, scale = 0.25, is_causal = True)
prefill_default = torch.ops.prhs.prefill.default(q_embed_1, key, None, True, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8])
attn_output_6 = torch._C._nn.scaled_dot_product_attention(q_embed_3, key_1, value_1, attn_mask = None, dropout_p = 0.0, scale = 0.25, is_causal = True)
prefill_default_1 = torch.ops.prhs.prefill.default(q_embed_3, key_1, None, True, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8])""")
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed_1, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed_1, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_3, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_3, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")

    def test_falcon_fused_qkv(self):
        prefill, decode, decisions = prefill_and_decode("falcon")
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")

    def test_deepseek_v3_mla(self):
        """MLA: keys and values expanded from the latent cache each step (value dim 24, key
        dim 16) go to select and attend."""
        prefill, decode, decisions = prefill_and_decode("deepseek_v3")
        assert decisions.count("decode (query length 1: select-then-attend)") == 2
        self.assertExpectedInline(with_hf_names_numbered(decode), """\
select_default = torch.ops.prhs.select.default(t0, t1, t2, t3, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(t0, t1, t2, select_default, t3, 0.25)
select_default_1 = torch.ops.prhs.select.default(t4, t5, t6, t3, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], None)
attend_default_1 = torch.ops.prhs.attend.default(t4, t5, t6, select_default_1, t3, 0.25)""")

    def test_llama_prhs_cross_layer_sharing(self):
        prefill, decode, decisions = prefill_and_decode("llama", layer_share={1: 0}, psaw_start_layer=1)
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=prhs;layer=0;budget=16;sink=2;local=4;psaw_start=1;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3, _prhs_state_0_4, _prhs_state_0_5, _prhs_state_0_6, _prhs_state_0_7, _prhs_state_0_8], None)
attend_default = torch.ops.prhs.attend.default(q_embed, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=prhs;layer=1;budget=16;sink=2;local=4;psaw_start=1;num_layers=2;share_from=0', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3, _prhs_state_1_4, _prhs_state_1_5, _prhs_state_1_6, _prhs_state_1_7, _prhs_state_1_8], select_default)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")

    def test_llama_oracle_policy(self):
        prefill, decode, decisions = prefill_and_decode("llama", policy="oracle")
        self.assertExpectedInline(decode, """\
select_default = torch.ops.prhs.select.default(q_embed, cache_layers_0_keys, cache_layers_0_values, attention_mask_1, 0.25, 'policy=oracle;layer=0;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_0_0, _prhs_state_0_1, _prhs_state_0_2, _prhs_state_0_3], None)
attend_default = torch.ops.prhs.attend.default(q_embed, cache_layers_0_keys, cache_layers_0_values, select_default, attention_mask_1, 0.25)
select_default_1 = torch.ops.prhs.select.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, attention_mask_1, 0.25, 'policy=oracle;layer=1;budget=16;sink=2;local=4;num_layers=2', [_prhs_state_1_0, _prhs_state_1_1, _prhs_state_1_2, _prhs_state_1_3], None)
attend_default_1 = torch.ops.prhs.attend.default(q_embed_1, cache_layers_1_keys, cache_layers_1_values, select_default_1, attention_mask_1, 0.25)""")
