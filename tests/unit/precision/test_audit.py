"""Dtype audit of a live model (`precision/audit.py`): planted layers, routers, collapsed lines, HF MoE models."""

import pytest
import torch
from torch import nn

from nemo_rl_fp16.precision import (
    PrecisionMismatchError,
    PrecisionPolicy,
    audit_model,
    check_model,
    is_router_param,
)

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.layers = nn.ModuleList(nn.ModuleDict({"gate_proj": nn.Linear(4, 4), "gate": nn.Linear(4, 2)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(4, 8)


def test_audit_clean_and_planted_bf16_layer():
    fp16 = PrecisionPolicy.from_name("fp16")
    m = TinyMoE().to(F16)
    assert audit_model(m, fp16) == []
    m.layers[1]["gate_proj"].to(B16)
    lines = audit_model(m, fp16)
    assert lines == ["layers.1.gate_proj.{weight,bias}: found bfloat16, expected float16 (param_dtype)"]
    with pytest.raises(PrecisionMismatchError, match="layers.1.gate_proj"):
        check_model(m, fp16, "trainer")


def test_audit_router_dtype():
    pol = PrecisionPolicy.from_config({"name": "fp16", "router_dtype": "float32"})
    m = TinyMoE().to(F16)
    lines = audit_model(m, pol)
    assert lines == ["<all 4 router/gate parameters>: found float16, expected float32 (router_dtype)"]
    for layer in m.layers:
        layer["gate"].to(F32)
    assert audit_model(m, pol) == []
    # gate_proj is a dense MLP weight, not a router: in fp32 it breaks param_dtype (not router_dtype), and the
    # fp32 router/gate weights beside it stay clean
    m.layers[0]["gate_proj"].to(F32)
    assert audit_model(m, pol) == ["layers.0.gate_proj.{weight,bias}: found float32, expected float16 (param_dtype)"]
    assert not is_router_param("layers.0.gate_proj.weight") and is_router_param("layers.0.gate.weight")
    assert is_router_param("model.layers.3.mlp.shared_expert_gate.weight")
    assert not is_router_param("layers.0.gates.weight") and not is_router_param("gate_up_proj.weight")  # by component


def test_audit_whole_model_wrong_collapses_and_buffers():
    m = TinyMoE()
    m.register_buffer("rope", torch.zeros(3, dtype=B16))
    lines = audit_model(m, PrecisionPolicy.from_name("fp16"))
    assert lines[0].startswith("<all 7 parameters>: found float32, expected float16")
    assert any("rope: found bfloat16" in x for x in lines)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen2_moe", "qwen3_moe", "mixtral"])
def test_audit_hf_models(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1)
    if arch in ("qwen2_moe", "qwen3_moe"):
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    if arch == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).to(F16)
    fp16 = PrecisionPolicy.from_name("fp16")
    assert audit_model(model, fp16) == []
    if arch in ("qwen2_moe", "qwen3_moe", "mixtral"):
        fp32_router = PrecisionPolicy.from_config({"name": "fp16", "router_dtype": "float32"})
        lines = audit_model(model, fp32_router)
        # exactly the HF routers (Qwen2-MoE also gates its shared expert), not the experts' fused gate_up_proj
        assert lines == ROUTER_LINES[arch], lines
        routers = [n for n, _ in model.named_parameters() if is_router_param(n)]
        assert routers == ["model.layers.0.mlp.gate.weight"] + (
            ["model.layers.0.mlp.shared_expert_gate.weight"] if arch == "qwen2_moe" else [])


ROUTER_LINES = {
    "qwen2_moe": ["<all 2 router/gate parameters>: found float16, expected float32 (router_dtype)"],
    "qwen3_moe": ["model.layers.0.mlp.gate.weight: found float16, expected float32 (router_dtype)"],
    "mixtral": ["model.layers.0.mlp.gate.weight: found float16, expected float32 (router_dtype)"],
}
