"""`policy/factory.py`: `build_policy` builds the engine `policy.backend` names with the recipe's values."""

import pytest
import torch

from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.interfaces import PolicyEngine
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.policy.factory import build_policy
from nemo_rl_fp16.policy.torch_policy import TorchPolicy
from nemo_rl_fp16.precision import PrecisionPolicy


def _rc(tmp_path, *over):
    return typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}/run", "warm_start.enabled=false", *over]))


def test_torch_backend_gets_the_recipe_values_and_the_initial_weights(tmp_path):
    rc = _rc(tmp_path, "policy.lr=3e-4", "policy.micro_batch_size=3", "policy.max_grad_norm=0.5")
    pol = PrecisionPolicy.from_name("fp16")
    init = build_model(rc.model.model_dump(), torch.float32, seed=11).state_dict()
    eng = build_policy(rc, rc.model.model_dump(), pol, "cpu", init)
    assert isinstance(eng, TorchPolicy) and isinstance(eng, PolicyEngine)
    assert eng.precision is pol and eng.micro_batch_size == 3
    assert eng.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    assert eng.weights.max_grad_norm == 0.5
    master = eng.master.state_dict()
    assert set(master) == set(init) and all(torch.equal(master[k], init[k]) for k in init)
    other = build_policy(rc, rc.model.model_dump(), pol, "cpu", build_model(rc.model.model_dump(), torch.float32,
                                                                             seed=12).state_dict())
    assert not torch.equal(other.master.state_dict()["lm_head.weight"], master["lm_head.weight"])
