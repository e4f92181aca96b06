"""Non-finite guards and one-line errors a user can cause (disk full, read-only, not an HF model)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16.assembly import build_run
from nemo_rl_fp16.cli import EXIT_CODES
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.guards import NonFiniteError, check_weights
from nemo_rl_fp16.hf_export import write_hf_checkpoint
from nemo_rl_fp16.trainer import RLTrainer

QUIET = Console(quiet=True)
ROOT = Path(__file__).resolve().parents[2]


def _trainer(tmp_path, *extra):
    rc = typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}/run", f"warm_start.cache_dir={tmp_path.parent}/ws",
                                           "data.prompts_per_step=4", *extra]))
    return RLTrainer(rc, build_run(rc, console=QUIET), QUIET)


# --------------------------------------------------------------------------------- non-finite


def test_nonfinite_reward_names_reward_and_sample(tmp_path):
    t = _trainer(tmp_path)
    inner = t.run.reward
    calls = []

    def flaky(text, answer):
        calls.append(text)
        return float("nan") if len(calls) == 6 else inner(text, answer)

    t.run = dataclasses.replace(t.run, reward=flaky)
    with pytest.raises(NonFiniteError, match=r"reward 'exact_match' returned nan for sample 5 \(prompt 0, response"):
        t.step(0)


def test_bf16_nonfinite_gradient_stops_at_once_weights_untouched(tmp_path):
    t = _trainer(tmp_path, "precision=bf16")
    calls = []
    t.policy.grad_hook = lambda grads: (calls.append(1), grads[0].view(-1).__setitem__(0, float("nan")))
    before = {k: v.clone() for k, v in t.policy.state_dict()["model"].items()}
    with pytest.raises(NonFiniteError, match="step 0: non-finite .* without loss scaling"):
        t.step(0)
    assert len(calls) == 1  # no retries: bf16 has no overflow to retry
    assert all(torch.equal(before[k], v) for k, v in t.policy.state_dict()["model"].items())


def test_no_checkpoint_refit_or_export_with_nonfinite_weights(tmp_path):
    t = _trainer(tmp_path)
    t.state.step = 3
    master = dict(t.policy.master.named_parameters()) if hasattr(t.policy, "master") else None
    assert master, "torch trainer keeps fp32 master weights"
    name = next(iter(master))
    with torch.no_grad():
        master[name].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"checkpoint refused at step 3: 1 weight tensor.*{name}"):
        t.save(tmp_path / "ckpts")
    assert not (tmp_path / "ckpts").exists() or not list((tmp_path / "ckpts").iterdir())
    with pytest.raises(NonFiniteError, match="refit refused at step 3"):
        t.refit(3)
    with pytest.raises(NonFiniteError, match="HF export refused at step 3"):
        write_hf_checkpoint(t.run.model_cfg, tmp_path / "hf", t.run.tokenizer,
                                 state_dict=t.policy.rollout_state_dict(), step=3)
    assert not (tmp_path / "hf").exists()
    with torch.no_grad():  # finite in fp32 but inf once cast to the fp16 the rollout engine runs
        master[name].view(-1)[0] = 1e6
    with pytest.raises(NonFiniteError, match="refit refused at step 3.*beyond torch.float16 range"):
        t.refit(3)


def test_check_weights_passes_finite_and_names_step():
    check_weights({"a": torch.ones(3), "i": torch.arange(3)}, "refit", 1, torch.float16)
    with pytest.raises(NonFiniteError, match="at step 9.*'?b"):
        check_weights({"a": torch.ones(3), "b": torch.tensor([1.0, math.nan])}, "checkpoint", 9)


# --------------------------------------------------------------------------------- storage


def test_exit_codes_are_documented():
    text = (ROOT / "docs" / "runs.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in text, code
