"""The fp16 preflight through the CLI: refuse mode exits 2 with one line before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_refuse_exits_2_with_one_line_before_any_training(tmp_path):
    out = tmp_path / "run"
    p = _cli("rl", "recipe=sanity_tiny", "warm_start.enabled=false", "trainer.max_steps=2", "logging.progress=false",
             "precision.preflight=refuse", "precision.loss_scale.initial_scale=1e-6", "precision.loss_scale.min_scale=1e-6", f"output_dir={out}", cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "precision.preflight=refuse" in lines[0] and "initial_scale=" in lines[0], lines
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    ok = _cli("preflight", "recipe=sanity_tiny", "warm_start.enabled=false", f"output_dir={tmp_path}/pf", cwd=tmp_path)
    assert ok.returncode == 0 and "preflight (fp16)" in ok.stdout and (tmp_path / "pf/preflight/report.json").exists()
