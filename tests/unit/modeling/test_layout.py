"""ModelLayout: the layout read from an HF config (parameter count, refusal of unmapped model types)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nemo_rl_fp16.modeling.layout import ModelLayout

DENSE = dict(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
MOE = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
           num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False)


def _hf(cfg):
    kw = dict(cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))


def test_layout_from_config_and_parameter_count():
    hf = _hf(MOE)
    lay = ModelLayout.from_hf_config(MOE)
    assert lay == ModelLayout.from_hf_config(hf.config)
    assert (lay.num_experts, lay.moe_top_k, lay.qk_norm, lay.qkv_bias) == (4, 2, True, False)
    n = lay.num_parameters()
    assert n["total"] == sum(p.numel() for p in hf.parameters())
    dense = _hf(DENSE)
    assert ModelLayout.from_hf_config(DENSE).num_parameters()["total"] == sum(p.numel() for p in dense.parameters())
    assert ModelLayout.from_hf_config(DENSE).qkv_bias


def test_unsupported_model_type_is_refused():
    with pytest.raises(ValueError, match="no megatron mapping"):
        ModelLayout.from_hf_config({**DENSE, "model_type": "gpt2"})
