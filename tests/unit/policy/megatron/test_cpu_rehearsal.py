"""megatron-core's CUDA calls redirected to the CPU: scoped for tests, for the process in a rehearsal, never under CUDA."""

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.pipeline_parallel import schedules  # noqa: E402
from megatron.core.tensor_parallel import random as mrandom  # noqa: E402

from nemo_rl_fp16.policy.megatron import cpu_rehearsal  # noqa: E402
from nemo_rl_fp16.policy.megatron.cpu_rehearsal import (  # noqa: E402
    check_cuda_clean,
    cpu_redirects,
    enable_for_process,
    redirected,
)


@pytest.fixture
def restore(monkeypatch):
    """Whatever the test installs for the process is undone at teardown (monkeypatch restores each attribute)."""
    for obj, name, _ in cpu_rehearsal._patches():
        monkeypatch.setattr(obj, name, getattr(obj, name))


def test_scoped_redirects_send_megatron_cuda_calls_to_the_cpu_and_undo_them(restore):
    before = (torch.cuda.current_device, mrandom._get_cuda_rng_state, schedules.torch, torch.Tensor.cuda)
    assert not redirected()
    with cpu_redirects():
        assert redirected()
        assert torch.cuda.current_device() == "cpu"
        torch.manual_seed(3)
        assert torch.equal(mrandom._get_cuda_rng_state(), torch.get_rng_state())  # the tracker sees the CPU RNG
        assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
        t = torch.ones(1)
        assert t.cuda() is t
        with pytest.raises(RuntimeError, match="separate processes"):
            check_cuda_clean()  # a CUDA megatron model refuses to build here
    assert (torch.cuda.current_device, mrandom._get_cuda_rng_state, schedules.torch, torch.Tensor.cuda) == before
    assert not redirected()
    check_cuda_clean()  # nothing left behind


def test_process_redirects_stay_and_a_scoped_block_inside_does_not_undo_them(restore):
    enable_for_process()
    assert redirected()
    enable_for_process()  # idempotent
    with cpu_redirects():  # a test fixture inside a rehearsal process: nothing to install, nothing to undo
        pass
    assert redirected()
    with pytest.raises(RuntimeError, match="separate processes"):
        check_cuda_clean()


def test_process_redirects_refused_once_cuda_is_initialised(restore, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already initialised CUDA"):
        enable_for_process()
    assert not redirected()


def test_cpu_megatron_policy_turns_the_redirects_on_for_its_process(restore):
    """The package applies them itself (no test fixture): a TP=1 megatron policy builds and scores on CPU."""
    from conftest import reset_megatron, synthetic_batch

    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.precision import resolve_policies

    cfg = {"config": {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "max_position_embeddings": 32, "tie_word_embeddings": False}}
    reset_megatron()
    try:
        assert not redirected()
        pol = MegatronPolicy(cfg, resolve_policies("fp16")[0], lr=1e-3, device="cpu")
        assert redirected()
        lp = pol.logprobs(synthetic_batch(32, 2, 3, 4), 1.0)
        assert lp.shape == (2, 4) and torch.isfinite(lp).all()
    finally:
        reset_megatron()
