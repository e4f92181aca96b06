"""Precision contract (`precision/policy.py`): presets, overrides, trainer vs rollout policies."""

import pytest
import torch

from nemo_rl_fp16.precision import (
    PrecisionMismatchError,
    PrecisionPolicy,
    get_dtype,
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
