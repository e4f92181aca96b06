"""Errors a user can cause, through the CLI: one line each (diverged policy, disk full, read-only output, not an HF folder), traceback on request."""

import os
import subprocess
import sys

import pytest
import torch

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.guards import check_weights

pytestmark = pytest.mark.integration


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def _tiny(tmp_path):
    return [f"warm_start.cache_dir={tmp_path.parent}/ws", "logging.progress=false", "logging.tensorboard=false",
            "data.prompts_per_step=4"]


def test_diverged_policy_stops_with_one_line_and_an_intact_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = cli("rl", "recipe=sanity_tiny", "policy.lr=1.0", f"output_dir={out}", *_tiny(tmp_path),
            "trainer.max_steps=20", "trainer.save_every=1")
    assert r.returncode == 5, r.stderr  # EXIT_NONFINITE
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: step "), r.stderr
    for d in ckpt.step_dirs(out / "checkpoints"):  # whatever was saved is finite and intact
        data = ckpt.load_checkpoint(d)
        check_weights(data["model_state"], "test", data["step"], torch.float16)


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
