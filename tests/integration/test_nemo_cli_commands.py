"""`nemo llm rl ...` through NeMo-Run's CLI (subprocess): same dry run as the console script, bad keys named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


ARGS = ["recipe=sanity_tiny", "trainer.max_steps=3", "dry_run=true"]  # runs here: the dry run checks paths


@pytest.fixture(scope="module")
def nemo() -> Path:
    pytest.importorskip("nemo_run")
    script = Path(sys.executable).with_name("nemo")
    if not script.exists():
        pytest.skip(f"nemo_run is importable but there is no `nemo` script next to {sys.executable}")
    return script


def _nemo(script: Path, *args: str) -> subprocess.CompletedProcess:
    # stdin closed: a "Continue? [y/N]" prompt would abort instead of hanging.
    return subprocess.run(
        [str(script), "llm", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180
    )


def test_nemo_llm_rl_dry_run_matches_console_script(nemo, capsys):
    p = _nemo(nemo, "rl", *ARGS)
    # "No such command 'rl'": the installed metadata lacks entry point nemo_run.cli:llm -> reinstall
    # the package (pip install -e .); `nemo` reads the metadata of the installed distribution.
    assert p.returncode == 0, p.stderr
    assert "max_steps: 3" in p.stdout
    assert "Continue?" not in p.stdout + p.stderr

    from nemo_rl_fp16.cli import main

    capsys.readouterr()
    assert main(["rl", *ARGS]) == 0
    assert p.stdout == capsys.readouterr().out  # same output as `nemo-rl-fp16 rl ...`


def test_nemo_llm_rl_bad_key_fails_with_the_key(nemo):
    p = _nemo(nemo, "rl", "recipe=grpo_fp16", "trainer.max_stepz=3", "dry_run=true")
    assert p.returncode != 0
    assert "max_steps" in p.stderr
