"""HF <-> megatron-core name/shape mapping (pure functions: no megatron-core needed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nemo_rl_fp16.modeling.layout import ModelLayout
from nemo_rl_fp16.policy.megatron.convert import hf_to_megatron, megatron_to_hf, qkv_fuse, qkv_split

DENSE = dict(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
MOE = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
           num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False)


MIXTRAL = dict(model_type="mixtral", vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def _hf(cfg):
    kw = dict(cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))


def test_qkv_layout_is_grouped_interleaved():
    lay = ModelLayout.from_hf_config(DENSE)  # 4 heads, 2 groups, head_dim 16
    q = torch.arange(64.0)[:, None].expand(64, 3)
    k = 1000 + torch.arange(32.0)[:, None].expand(32, 3)
    v = 2000 + torch.arange(32.0)[:, None].expand(32, 3)
    fused = qkv_fuse(q, k, v, lay)
    # group 0: q heads 0,1 (rows 0..31), k head 0, v head 0; then group 1
    assert fused[:32, 0].tolist() == list(range(32))
    assert fused[32:48, 0].tolist() == [1000.0 + i for i in range(16)]
    assert fused[48:64, 0].tolist() == [2000.0 + i for i in range(16)]
    assert fused[64, 0].item() == 32.0
    assert all(torch.equal(a, b) for a, b in zip(qkv_split(fused, lay), (q, k, v), strict=True))


@pytest.mark.parametrize("cfg", [DENSE, {**DENSE, "tie_word_embeddings": True}, MOE, MIXTRAL],
                         ids=["qwen2", "qwen2_tied", "qwen3_moe", "mixtral"])
def test_hf_megatron_hf_round_trip_is_bitwise(cfg):
    hf = _hf(cfg)
    lay = ModelLayout.from_hf_config(hf.config)
    sd = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(sd, lay), lay)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
