"""`rollout/factory.py`: `build_rollout_engine` builds the engine `rollout.backend` names, or refuses in one line."""

import importlib.util

import pytest
import torch

from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.interfaces import RolloutEngine
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.modeling.tokenizer import build_tokenizer
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.rollout.factory import build_rollout_engine
from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine


def _rc(tmp_path, *over):
    return typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}/run", "warm_start.enabled=false", *over]))


def test_torch_backend_in_the_rollout_precision_from_the_given_weights(tmp_path):
    rc = _rc(tmp_path)
    tok = build_tokenizer(rc)
    pol = PrecisionPolicy.from_name("bf16")
    init = build_model(rc.model.model_dump(), torch.float32, seed=3).state_dict()
    eng = build_rollout_engine(rc, pol, rc.model.model_dump(), tok, "cpu", initial_state_dict=init,
                               model_dir=tmp_path / "hf")
    assert isinstance(eng, TorchRolloutEngine) and isinstance(eng, RolloutEngine)
    assert eng.audit() == []  # its live dtypes are the policy's
    live = eng.model.state_dict()
    assert live["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(live["lm_head.weight"], init["lm_head.weight"].to(torch.bfloat16))
    assert not (tmp_path / "hf").exists()  # only vLLM needs the HF folder


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the refusal without vLLM")
def test_vllm_without_vllm_is_refused_with_the_fix(tmp_path):
    rc = _rc(tmp_path)
    rc = rc.model_copy(update={"rollout": rc.rollout.model_copy(update={"backend": "vllm"})})
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm needs vLLM \(pip install 'nemo_rl_fp16\[vllm\]'"):
        build_rollout_engine(rc, PrecisionPolicy.from_name("fp16"), rc.model.model_dump(), build_tokenizer(rc), "cpu",
                             initial_state_dict=None, model_dir=tmp_path / "hf")


def test_unknown_backend_is_refused_naming_the_allowed_ones(tmp_path):
    rc = _rc(tmp_path)
    rc = rc.model_copy(update={"rollout": rc.rollout.model_copy(update={"backend": "sglang"})})
    with pytest.raises(ConfigError, match=r"rollout.backend=sglang is not available; use rollout.backend=torch\|vllm"):
        build_rollout_engine(rc, PrecisionPolicy.from_name("fp16"), rc.model.model_dump(), build_tokenizer(rc), "cpu",
                             initial_state_dict=None, model_dir=tmp_path / "hf")
