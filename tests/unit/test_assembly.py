"""`assembly.py`: one run's pieces from a typed recipe (device, tokenizer, starting weights, the engines).

Note for the issue-15 merge: the engine factories move next to their engines and run assembly
gets its own module; the imports below follow them, the assertions stay.
"""

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16.assembly import build_run, initial_weights, resolve_device
from nemo_rl_fp16.config import ConfigError, load_recipe, typed
from nemo_rl_fp16.data import get_dataset
from nemo_rl_fp16.modeling import build_model
from nemo_rl_fp16.policy import TorchPolicy
from nemo_rl_fp16.policy.reference import ReferencePolicy
from nemo_rl_fp16.rollout import TorchRolloutEngine

QUIET = Console(quiet=True)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _rc(tmp_path, *over):
    return typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}/run", "warm_start.enabled=false",
                                             "logging.progress=false", "logging.tensorboard=false",
                                             "data.prompts_per_step=4", *over]))


@NO_CUDA
def test_resolve_device_cpu_auto_and_cuda_refused_here(tmp_path):
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu"
    assert resolve_device(_rc(tmp_path)) == "cpu"
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda")
    msg = str(e.value)
    assert "bad value for 'device': cuda" in msg and "set device=cpu" in msg and len(msg.splitlines()) == 1


def test_initial_weights_are_the_seeded_init_or_none_for_a_checkpoint(tmp_path):
    rc = _rc(tmp_path, "seed=7")
    w = initial_weights(rc, None, [], QUIET)
    torch.manual_seed(7)
    ref = build_model(rc.model.model_dump(), torch.float32).state_dict()
    assert set(w) == set(ref) and all(torch.equal(w[k], ref[k]) and w[k].dtype == torch.float32 for k in ref)
    other = initial_weights(_rc(tmp_path, "seed=8"), None, [], QUIET)
    assert not torch.equal(other["lm_head.weight"], w["lm_head.weight"])
    build_model(rc.model.model_dump(), torch.float32, seed=0).save_pretrained(tmp_path / "ckpt")
    from_ckpt = _rc(tmp_path, "model.config=null", f"model.name_or_path={tmp_path}/ckpt")
    assert initial_weights(from_ckpt, None, [], QUIET) is None  # both engines load the checkpoint itself


def test_build_run_fp16_both_engines_start_from_the_same_weights(tmp_path):
    rc = _rc(tmp_path)
    setup = build_run(rc, console=QUIET)
    assert isinstance(setup.policy, TorchPolicy) and isinstance(setup.rollout, TorchRolloutEngine)
    assert setup.reference is None and setup.device == "cpu" and setup.close is None  # kl_coef 0: no reference
    assert setup.problems == get_dataset(rc.data.model_dump(), seed=rc.seed)
    assert setup.prompt_ids == [setup.tokenizer(p.prompt)["input_ids"] for p in setup.problems]
    assert setup.train_policy.param_dtype == setup.rollout_policy.param_dtype == torch.float16
    assert setup.policy.micro_batch_size == rc.policy.micro_batch_size
    assert setup.policy.optimizer.param_groups[0]["lr"] == rc.policy.lr
    trained = setup.policy.rollout_state_dict()
    live = setup.rollout.model.state_dict()
    assert {p.dtype for p in setup.rollout.model.parameters()} == {torch.float16}
    assert all(torch.equal(live[k], v.to(live[k].dtype)) for k, v in trained.items())
    assert setup.reward("12", "12") == 1.0 and setup.reward("13", "12") == 0.0


def test_build_run_reference_and_declared_ablation(tmp_path):
    setup = build_run(_rc(tmp_path, "algorithm.kl_coef=0.01", "precision.rollout=bf16",
                          "precision.allow_mismatch=true"), console=QUIET)
    # the KL reference is forward-only (issue 20): π's starting weights in param_dtype, nothing trainable
    assert isinstance(setup.reference, ReferencePolicy) and setup.reference is not setup.policy
    ref, pol = setup.reference.compute.state_dict(), setup.policy.compute.state_dict()
    assert ref.keys() == pol.keys() and all(torch.equal(ref[k], pol[k]) for k in pol)  # the anchor is the initial π
    assert not any(p.requires_grad for p in setup.reference.compute.parameters())
    assert setup.train_policy.param_dtype == torch.float16 and setup.rollout_policy.param_dtype == torch.bfloat16
    assert {p.dtype for p in setup.rollout.model.parameters()} == {torch.bfloat16}


def test_build_run_refuses_backends_this_machine_lacks(tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm needs vLLM \(pip install"):
        build_run(_rc(tmp_path, "rollout.backend=vllm"), console=QUIET)
