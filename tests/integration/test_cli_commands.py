"""The console script, as a user runs it (subprocess)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXE = shutil.which("nemo-rl-fp16", path=str(Path(sys.executable).parent))


def cli(*args):
    cmd = [EXE] if EXE else [sys.executable, "-m", "nemo_rl_fp16.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_dry_run_prints_config_and_plan():
    r = cli("rl", "recipe=sanity_tiny", "trainer.max_steps=3", "dry_run=true")
    assert r.returncode == 0, r.stderr
    assert "trainer:\n  max_steps: 3\n" in r.stdout
    assert "# plan (rl)" in r.stdout and "layout" in r.stdout and "param=fp16" in r.stdout


def test_dry_run_checks_what_the_real_run_needs():
    """The cluster recipe names a hub id and a data file that are not on this machine: the dry run
    refuses exactly as the real run would (one line each, exit 2), instead of passing."""
    r = cli("rl", "recipe=grpo_fp16", "device=cpu", "rollout.backend=torch", "dry_run=true")  # (vLLM: not here)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "error: bad value for 'model.name_or_path': 'Qwen/Qwen2.5-Math-1.5B' does not exist; allowed: a local HF "
        "model folder (no hub downloads); download it first or fix the path",
        "error: bad value for 'data.path': 'data/deepscaler_sanity.jsonl' does not exist; allowed: a JSONL file "
        "(no hub downloads); download it first or fix the path",
    ]


def test_unknown_key_is_one_line_error():
    r = cli("rl", "recipe=grpo_fp16", "trainer.max_stepz=3", "dry_run=true")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown key 'trainer.max_stepz' (value 3); did you mean 'trainer.max_steps'?"
    ]
    assert r.stdout == ""


def test_undeclared_precision_ablation_refused():
    r = cli("rl", "recipe=sanity_tiny", "precision.rollout=bf16", "dry_run=true")
    assert r.returncode == 3 and "allow_mismatch" in r.stderr
    r = cli("rl", "recipe=sanity_tiny", "precision.rollout=bf16", "precision.allow_mismatch=true", "dry_run=true")
    assert r.returncode == 0 and "DELIBERATE MISMATCH" in r.stdout


def test_help_lists_commands_and_recipes_command():
    r = cli("--help")
    assert r.returncode == 0
    for c in ("rl", "mismatch", "demo", "rehearse", "recipes"):
        assert c in r.stdout
    r = cli("recipes")
    assert r.returncode == 0 and "sanity_tiny" in r.stdout.split()


@pytest.mark.parametrize("command", ["mismatch", "demo", "rehearse"])
def test_other_commands_dry_run(command):
    r = cli(command, "dry_run=true")
    assert r.returncode == 0, r.stderr
    assert "plan" in r.stdout


@pytest.mark.parametrize("command", ["rl", "rehearse"])
def test_misspelled_dry_run_is_refused_not_taken_as_false(tmp_path, command):
    """`dry_run=ture` must not start the real run (it did: any value but true/1/yes/on meant false)."""
    recipe = "sanity_tiny" if command == "rl" else "dense_14b_fp16"
    r = cli(command, f"recipe={recipe}", f"output_dir={tmp_path / 'out'}", "dry_run=ture")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: bad value for 'dry_run': 'ture'; allowed: true or false (also 1/0, yes/no, on/off)"]
    assert not (tmp_path / "out").exists()
