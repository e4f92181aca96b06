"""`nemo-rl-fp16 doctor` end to end: the report, its figure, and a bad precision refused in one line."""

from __future__ import annotations

import json
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


def test_doctor_command_writes_report(tmp_path):
    p = _cli("doctor", "recipe=mismatch_tiny", "precision=fp16,bf16", f"output_dir={tmp_path}",
             "mismatch.num_prompts=4", "rollout.max_new_tokens=8", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "doctor"
    report = json.loads((out / "report.json").read_text())
    assert list(report["precisions"]) == ["fp32", "fp16", "bf16"]
    assert report["samples"]["rows"] == 16
    assert (out / "divergence_vs_layer.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "`layers.1.mlp`" in md and "first flagged" in md
    bad = _cli("doctor", "recipe=mismatch_tiny", "precision=fp99", f"output_dir={tmp_path}/b", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "fp99" in bad.stderr
