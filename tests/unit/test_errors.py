"""Non-finite guards and one-line errors a user can cause (disk full, read-only, not an HF model)."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.assembly import build_run
from nemo_rl_fp16.cli import EXIT_CODES
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.guards import NonFiniteError, check_weights
from nemo_rl_fp16.hf_export import write_hf_checkpoint
from nemo_rl_fp16.trainer import RLTrainer

QUIET = Console(quiet=True)
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _trainer(tmp_path, *extra):
    rc = typed(load_recipe("sanity_tiny", [f"output_dir={tmp_path}/run", f"warm_start.cache_dir={tmp_path.parent}/ws",
                                           "data.prompts_per_step=4", *extra]))
    return RLTrainer(rc, build_run(rc, console=QUIET), QUIET)


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def _tiny(tmp_path):
    return [f"warm_start.cache_dir={tmp_path.parent}/ws", "logging.progress=false", "logging.tensorboard=false",
            "data.prompts_per_step=4"]


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


def test_diverged_policy_stops_with_one_line_and_an_intact_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = cli("rl", "recipe=sanity_tiny", "policy.lr=1.0", f"output_dir={out}", *_tiny(tmp_path),
            "trainer.max_steps=20", "trainer.save_every=1")
    assert r.returncode == 5, r.stderr  # EXIT_NONFINITE
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: step "), r.stderr
    for d in ckpt.step_dirs(out / "checkpoints"):  # whatever was saved is finite and intact
        data = ckpt.load_checkpoint(d)
        check_weights(data["model_state"], "test", data["step"], torch.float16)


# --------------------------------------------------------------------------------- storage


def _mount_tmpfs(path, size):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.decode().strip()}")


def test_disk_full_is_one_line_naming_last_intact_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "9m")  # one sanity_tiny checkpoint is ~3.6 MB: the third save does not fit
    try:
        out = mnt / "run"
        r = cli("rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path), "trainer.max_steps=6",
                "trainer.save_every=1", "trainer.keep_last=5")
        assert r.returncode == 6, r.stderr  # EXIT_STORAGE
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: no space left on {mnt}"), line
        last = ckpt.step_dirs(out / "checkpoints")[-1]
        assert f"last checkpoint step {int(last.name[5:])} intact ({last})" in line, line
        ckpt.verify_checkpoint(last)
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial temp
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_read_only_output_dir_is_one_line(tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "1m")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
        for out in (mnt, mnt / "sub"):
            r = cli("rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path))
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert f"output_dir={out}" in r.stderr and "Read-only file system" in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_not_an_hf_model_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, msg in [(tmp_path / "empty", "is not an HF model folder (no config.json)"),
                      (tmp_path / "missing", "does not exist")]:
        r = cli("rl", "recipe=sanity_tiny", f"model.name_or_path={path}", "model.config=null",
                f"output_dir={tmp_path}/run", *_tiny(tmp_path))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()


def test_traceback_flag_and_env_show_the_trace(tmp_path):
    (tmp_path / "afile").write_text("x")
    args = ("rl", "recipe=sanity_tiny", f"output_dir={tmp_path / 'afile'}")
    r = cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", "--traceback", *args], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "RunError" in r.stderr
    r = cli(*args, env={"NEMO_RL_TRACEBACK": "1"})
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr


def test_exit_codes_are_documented():
    text = (ROOT / "docs" / "runs.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in text, code
