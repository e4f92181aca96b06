"""The executor the vLLM engine asks for, read at vLLM's boundary: the arguments `vllm.LLM` receives.

Only `vllm.LLM` is replaced (a stand-in that records its keyword arguments and stops the start);
everything before it — model folder checks, CPU defaults, the executor choice — is the engine's
own code. Inside a Ray actor the same check runs in `tests/integration/test_ray_vllm_executor.py`.
"""

import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.rollout.vllm_engine import VllmRolloutEngine, executor_backend


class _Started(Exception):
    """Raised by the stand-in `LLM` with the keyword arguments it received."""


def _llm_kwargs(tmp_path, monkeypatch, tp: int) -> dict:
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2, 2, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))

    def llm(**kw):
        raise _Started(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=llm))
    with pytest.raises(_Started) as got:
        VllmRolloutEngine(tmp_path, PrecisionPolicy.from_name("fp16"), pad_token_id=0, eos_token_id=1,
                          tensor_parallel_size=tp,
                          refit="reload")
    return got.value.args[0]


@pytest.mark.parametrize("tp", [1, 2])
def test_outside_ray_vllm_keeps_its_own_executor_choice(tmp_path, monkeypatch, tp):
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
    kw = _llm_kwargs(tmp_path, monkeypatch, tp)
    assert kw["tensor_parallel_size"] == tp and "distributed_executor_backend" not in kw
    assert executor_backend(tp) is None
