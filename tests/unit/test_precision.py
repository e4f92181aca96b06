"""Precision contract: presets, loss scaler trajectories, dtype audit."""

import pytest
import torch
from torch import nn

from nemo_rl_fp16.precision import (
    DynamicLossScaler,
    PrecisionMismatchError,
    PrecisionPolicy,
    audit_model,
    check_model,
    get_dtype,
    is_router_param,
    resolve_policies,
)

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "name,low,scaling", [("fp16", F16, True), ("bf16", B16, False), ("fp32", F32, False)]
)
def test_presets(name, low, scaling):
    p = PrecisionPolicy.from_name(name)
    assert (p.param_dtype, p.compute_dtype, p.router_dtype, p.kv_cache_dtype) == (low, low, low, low)
    assert p.master_dtype == F32 and p.logits_dtype == F32 and p.grad_reduce_dtype == F32
    assert p.loss_scale.enabled is scaling


def test_unknown_preset_and_dtype():
    with pytest.raises(ValueError, match="fp8"):
        PrecisionPolicy.from_name("fp8")
    with pytest.raises(ValueError, match="allowed"):
        get_dtype("float8")
    assert get_dtype("torch.bfloat16") == B16 and get_dtype(F16) == F16


def test_from_config_overrides_fields_and_loss_scale():
    p = PrecisionPolicy.from_config(
        {"name": "fp16", "router_dtype": "float32", "param_dtype": None,
         "loss_scale": {"initial_scale": 1024.0, "hysteresis": None}}
    )
    assert p.router_dtype == F32 and p.param_dtype == F16
    assert p.loss_scale.initial_scale == 1024.0 and p.loss_scale.hysteresis == 2


def test_rollout_ablation_requires_allow_mismatch():
    with pytest.raises(PrecisionMismatchError, match="allow_mismatch") as e:
        resolve_policies({"name": "fp16", "rollout": "bf16"})
    assert any("param_dtype: trainer float16, rollout bfloat16" in p for p in e.value.problems)
    train, rollout = resolve_policies({"name": "fp16", "rollout": "bf16", "allow_mismatch": True})
    assert train.param_dtype == F16 and rollout.param_dtype == B16
    train, rollout = resolve_policies({"name": "bf16"})
    assert train is rollout


# ------------------------------------------------------------------ loss scaler


def _run(scaler, seq):
    out = []
    for inf in seq:
        scaler.update(inf)
        out.append(scaler.scale)
    return out


def test_scaler_hysteresis_then_backoff():
    s = DynamicLossScaler(initial_scale=1024, min_scale=1, growth_interval=3, hysteresis=2)
    # first overflow only uses up hysteresis, the second halves, later ones keep halving
    # (megatron does not refill hysteresis until the scale grows)
    assert _run(s, [True, True, True, False, False, False]) == [1024, 512, 256, 256, 256, 512]


def test_scaler_growth_refills_hysteresis():
    s = DynamicLossScaler(initial_scale=8, growth_interval=2, hysteresis=2)
    assert _run(s, [False, False, True, False, True, True]) == [8, 16, 16, 16, 8, 4]


def test_scaler_min_scale_floor_and_growth_tracker_reset():
    s = DynamicLossScaler(initial_scale=4, min_scale=2, growth_interval=3, hysteresis=1)
    assert _run(s, [True, True, True]) == [2, 2, 2]
    # overflow resets the growth tracker: two clean, one inf, two clean -> no growth yet
    assert _run(s, [False, False, True, False, False, False]) == [2, 2, 2, 2, 2, 4]


def test_scaler_tensor_found_inf_and_state_round_trip():
    a = DynamicLossScaler(initial_scale=256, growth_interval=4, hysteresis=3)
    _run(a, [False, torch.tensor(True), False])
    b = DynamicLossScaler(initial_scale=1, growth_interval=4, hysteresis=3)
    b.load_state_dict(a.state_dict())
    seq = [True, True, False, False, False, False, True]
    assert _run(a, seq) == _run(b, seq)


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_retry_after_overflow_runs_at_a_strictly_lower_scale(hysteresis):
    """The loop retries an overflowed update on the same batch: whatever the hysteresis, the retry's
    scale is below the overflowed attempt's (hysteresis 2 used to retry at the same scale)."""
    s = DynamicLossScaler(initial_scale=1024, min_scale=1, hysteresis=hysteresis)
    used = s.scale
    s.update(True)
    assert s.scale == (512 if hysteresis == 1 else 1024)  # megatron semantics of update() unchanged
    assert s.back_off_below(used) and s.scale == 512
    used = s.scale  # the retry overflows too: the next one is lower again, and hysteresis is spent
    s.update(True)
    assert s.scale == 256 and s.back_off_below(used) and s.scale == 256


def test_retry_backoff_stops_at_min_scale():
    s = DynamicLossScaler(initial_scale=4, min_scale=2, hysteresis=2)
    s.update(True)
    assert s.back_off_below(4.0) and s.scale == 2
    s.update(True)
    assert not s.back_off_below(2.0) and s.scale == 2  # cannot go lower: the loop skips instead


def test_scaler_rejects_bad_settings():
    with pytest.raises(ValueError):
        DynamicLossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError):
        DynamicLossScaler(initial_scale=1, min_scale=2)


# ------------------------------------------------------------------ audit


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
