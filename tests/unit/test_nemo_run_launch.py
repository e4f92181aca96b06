"""launchers/nemo_run_launch.py: NeMo-Run task + Local/Slurm executors, dry runs only (no cluster)."""

import importlib.util
import io
from pathlib import Path

import pytest

pytest.importorskip("nemo_run")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nrl():
    spec = importlib.util.spec_from_file_location("nemo_run_launch", ROOT / "launchers" / "nemo_run_launch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the Slurm dry run's local tunnel (invoke) polls stdin


def test_builds_task_and_both_executors(nrl, tmp_path):
    task = nrl.build_task(["recipe=grpo_fp16", "trainer.max_steps=3"])
    assert (task.entrypoint, task.path, task.m) == ("python", "nemo_rl_fp16.cli", True)
    assert task.args == ["rl", "recipe=grpo_fp16", "trainer.max_steps=3"]
    assert nrl.local_executor().ntasks_per_node == 1
    ex = nrl.slurm_executor(account="acct", partition="batch", nodes=2, ntasks_per_node=1, gpus_per_node=8,
                            time="01:00:00", container_image="/img.sqsh", container_mounts=["/data:/data"],
                            job_dir=str(tmp_path / "jobs"))
    assert (ex.account, ex.partition, ex.nodes, ex.ntasks_per_node, ex.gpus_per_node, ex.time) == (
        "acct", "batch", 2, 1, 8, "01:00:00")
    assert ex.container_image == "/img.sqsh" and ex.container_mounts == ["/data:/data"]


def test_dryrun_local_and_slurm(nrl, tmp_path, capsys):
    assert nrl.main(["--dryrun", "recipe=sanity_tiny", "trainer.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "task: python -m nemo_rl_fp16.cli rl recipe=sanity_tiny trainer.max_steps=1" in out
    assert "executor: LocalExecutor" in out
    assert not (tmp_path / "outputs").exists()  # nothing ran
    assert nrl.main(["--executor", "slurm", "--account", "acct", "--partition", "batch", "--gpus-per-node", "8",
                     "--container-image", "/img.sqsh", "--container-mounts", "/data:/data",
                     "--job-dir", str(tmp_path / "jobs"), "--dryrun", "recipe=grpo_fp16"]) == 0
    out = capsys.readouterr().out
    assert "executor: SlurmExecutor" in out and "#SBATCH" in out and "--container-image" in out


def test_bad_override_fails_before_building(nrl, capsys):
    assert nrl.main(["--dryrun", "recipe=sanity_tiny", "trainer.max_stepz=1"]) == 2
    assert "unknown key 'trainer.max_stepz'" in capsys.readouterr().err
    assert nrl.main(["--executor", "slurm", "recipe=sanity_tiny"]) == 2
