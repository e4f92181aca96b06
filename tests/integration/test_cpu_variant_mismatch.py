"""The offline mismatch command's fp16/bf16 figures do not depend on the CPU variant (two `nemo-rl-fp16 mismatch` runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nemo_rl_fp16.precision.cpu_numerics as cn

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


AVX2_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            cn.ISA_ENV: "avx2"}


def _mismatch_report(tmp: Path, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AVX2_ENV}
    env.update(extra_env, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "nemo_rl_fp16.cli", "mismatch", "recipe=mismatch_tiny", f"output_dir={tmp}",
           "mismatch.num_prompts=16", "rollout.max_new_tokens=40", "logging.progress=false"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return json.loads((tmp / "report.json").read_text())


def test_mismatch_figures_do_not_depend_on_the_cpu_variant(tmp_path):
    """The offline mismatch under this host's kernels and under a forced AVX2 variant (BLAS caps +
    the detection override): fp16 and bf16 figures bitwise equal (package kernels); fp32 (native
    BLAS, the control) only required to stay orders below fp16 on both."""
    native = _mismatch_report(tmp_path / "host", {})
    avx2 = _mismatch_report(tmp_path / "avx2", AVX2_ENV)
    assert avx2["numerics"]["isa"] == "avx2" and avx2["numerics"]["aten_capability"] == "AVX2"
    for name in ("fp16", "bf16"):
        assert native["runs"][name] == avx2["runs"][name], name
    for rep in (native, avx2):
        assert rep["runs"]["fp32"]["mismatch/kl_k3"] * 100 <= rep["runs"]["fp16"]["mismatch/kl_k3"]
        assert rep["runs"]["bf16"]["mismatch/kl_k3"] >= 10 * rep["runs"]["fp16"]["mismatch/kl_k3"]
