"""The validation stage through the CLI: a bad CPU kernel switch is one line, exit 2, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("var,value", [("NEMO_RL_CPU_KERNELS", "fast"), ("NEMO_RL_CPU_ISA", "sse")])
def test_bad_cpu_kernel_switch_is_one_line_exit_2_before_any_work(tmp_path, var, value):
    env = {**os.environ, var: value, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", "rl", "recipe=sanity_tiny",
                        f"output_dir={tmp_path}/run"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and var in r.stderr and value in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, over, item, key", [
    ("moe_30b_a3b_fp16", ["policy.use_distributed_optimizer=false", "cluster.gpu_memory_gb=60"], "optimizer",
     "policy.use_distributed_optimizer=true"),
    ("dense_14b_fp16", ["cluster.gpu_memory_gb=20"], "optimizer", "cluster.ray.trainer_workers"),
])
def test_layout_over_gpu_memory_is_one_line_exit_2_before_any_work(tmp_path, recipe, over, item, key):
    """The plan's memory refusal (issue 20): one line naming the largest item and the key that shrinks it.
    (Sequence parallelism off: without Transformer Engine it is refused first, on this machine.)"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", "rl", f"recipe={recipe}", f"output_dir={tmp_path}/run",
                        "policy.sequence_parallel=false", *over], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "'cluster.gpu_memory_gb'" in r.stderr and f"largest item: {item} " in r.stderr
    assert f"shrink {item} with {key}" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
