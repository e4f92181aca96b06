"""Slurm launcher: golden checks of the generated sbatch script, `bash -n`, and a local dry run
of the script against stub `scontrol`/`srun`/`ray`/`nemo-rl-fp16` executables (no cluster)."""

import os
import subprocess
from pathlib import Path

import pytest

from nemo_rl_fp16.cli import main
from nemo_rl_fp16.config import ConfigError
from nemo_rl_fp16.launch import SlurmJob, launch_slurm, parse_args, render_sbatch

ARGS = ["recipe=grpo_fp16", "time=04:00:00", "account=acct", "partition=batch",
        "image=/images/rl.sqsh", "mounts=/data:/data,/ckpt:/ckpt", "trainer.max_steps=7", "precision=bf16"]


def _script(tmp_path, *extra):
    job, script, submit = parse_args([*ARGS, f"script={tmp_path / 'job.sbatch'}", *extra])
    return job, render_sbatch(job), script, submit


@pytest.mark.parametrize("nodes", [1, 8])
def test_generated_script_golden_lines(tmp_path, nodes):
    job, text, script, submit = _script(tmp_path, f"nodes={nodes}", "gpus_per_node=8")
    assert not submit and script == str(tmp_path / "job.sbatch")
    lines = text.splitlines()
    for want in [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=04:00:00", "#SBATCH --account=acct", "#SBATCH --partition=batch",
                 "#SBATCH --job-name=nemo-rl-fp16-grpo_fp16",
                 "#SBATCH --output=outputs/grpo_fp16/launch/logs/%x-%j.out",
                 f"NNODES={nodes}", "GPUS_PER_NODE=8", "trap cleanup EXIT",
                 'CONTAINER=(--container-image=/images/rl.sqsh --container-mounts=/data:/data,/ckpt:/ckpt '
                 '--container-workdir="$WORKDIR")',
                 'STEP=(srun --overlap --nodes=1 --ntasks=1 "${CONTAINER[@]}")']:
        assert want in lines, want
    assert lines[0] == "#!/bin/bash"
    assert 'ray start --head --node-ip-address=$HEAD_IP --port=$RAY_PORT --num-gpus=8 --block' in text
    assert 'ray start --address=$RAY_ADDRESS --num-gpus=8 --block' in text
    assert "\ntrap 'exit 143' TERM INT" in text
    assert "ray stop --force" in text and 'ray status --address=$RAY_ADDRESS' in text
    rl = (f"nemo-rl-fp16 rl recipe=grpo_fp16 cluster.nodes={nodes} cluster.gpus_per_node=8 cluster.ray.enabled=true "
          "trainer.max_steps=7 precision=bf16")
    assert f"bash -c 'exec {rl}'" in text
    (tmp_path / "s.sh").write_text(text)
    r = subprocess.run(["bash", "-n", str(tmp_path / "s.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_nemo_launcher_and_no_container(tmp_path):
    job = SlurmJob(recipe="sanity_tiny", nodes=2, gpus_per_node=0, launcher="nemo", setup="source /venv/bin/activate")
    text = render_sbatch(job)
    assert "#SBATCH --gpus-per-node" not in text and "#SBATCH --account" not in text
    assert "CONTAINER=()" in text and "--num-gpus=0 --block" in text
    assert "'source /venv/bin/activate && exec nemo llm rl recipe=sanity_tiny cluster.nodes=2" in text


@pytest.mark.parametrize("bad,msg", [
    (["trainer.max_stepz=1"], "unknown key"), (["nodes=0"], "nodes=0 must be >= 1"),
    (["nodes=x"], "not an integer"), (["submit=maybe"], "not a boolean"), (["launcher=srun"], "launcher="),
    (["account=a b"], "account="), (["dry_run=true"], "no dry_run"),
    (["nodes=1", "gpus_per_node=4"], "cluster.ray places 8 GPUs"),  # grpo_fp16's 8 + 8 colocated actors
])
def test_bad_arguments_fail_before_writing(tmp_path, bad, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args([*ARGS, f"script={tmp_path / 'x.sbatch'}", *bad])
    assert not (tmp_path / "x.sbatch").exists()


STUBS = {
    # scontrol show hostnames a,b,c -> one per line
    "scontrol": 'echo "$3" | tr , "\\n"\n',
    # srun: log, drop the --opt=value flags, run the rest
    "srun": 'echo "srun $*" >> "$LOG"\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n',
    # ray: start --block sleeps, status reports FAKE_NODES nodes / FAKE_GPUS GPUs, stop logs
    "ray": ('echo "ray $*" >> "$LOG"\ncase "$1" in\n start) exec sleep 30 ;;\n'
            ' status) echo "Active:"; for i in $(seq "$FAKE_NODES"); do echo " 1 node_$i"; done;\n'
            '   echo "Pending:"; echo " (no pending nodes)"; echo "Resources"; echo " 0.0/${FAKE_GPUS}.0 GPU" ;;\n'
            'esac\n'),
    "hostname": 'echo "10.0.0.1 fe80::1"\n',
    "nemo-rl-fp16": 'echo "RUN RAY_ADDRESS=$RAY_ADDRESS $*" >> "$LOG"\nexit "${RUN_RC:-0}"\n',
}


def _dry_run(tmp_path, nodes, fake_nodes, **env):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in STUBS.items():
        (bin_ / name).write_text("#!/bin/bash\n" + body)
        (bin_ / name).chmod(0o755)
    ray = ["cluster.ray.trainer_workers=4", "cluster.ray.rollout_workers=4"]  # fits 2 nodes x 2 GPUs and more
    launch_slurm([*ARGS, *ray, f"nodes={nodes}", "gpus_per_node=2", f"script={tmp_path / 'job.sbatch'}",
                  f"log_dir={tmp_path / 'logs'}", "ray_wait_s=1", "ray_poll_s=1", f"workdir={tmp_path}"])
    log = tmp_path / "calls.log"
    full_env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "42",
                "SLURM_JOB_NODELIST": ",".join(f"n{i}" for i in range(nodes)),
                "FAKE_NODES": str(fake_nodes), "FAKE_GPUS": str(2 * fake_nodes), **env}
    r = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=full_env, capture_output=True, text=True,
                       timeout=20)
    return r, log.read_text()


def test_local_dry_run_starts_ray_runs_and_stops(tmp_path, capsys):
    r, calls = _dry_run(tmp_path, nodes=3, fake_nodes=3, RUN_RC="5")
    assert r.returncode == 5, r.stdout + r.stderr  # the run's exit code is the job's
    assert "wrote" in capsys.readouterr().out
    assert "ray start --head --node-ip-address=10.0.0.1 --port=6379 --num-gpus=2 --block" in calls
    assert calls.splitlines().count("ray start --address=10.0.0.1:6379 --num-gpus=2 --block") == 2  # n1, n2
    assert "--nodelist=n1" in calls and "--nodelist=n2" in calls
    assert ("RUN RAY_ADDRESS=10.0.0.1:6379 rl recipe=grpo_fp16 cluster.nodes=3 cluster.gpus_per_node=2 "
            "cluster.ray.enabled=true trainer.max_steps=7 precision=bf16 cluster.ray.trainer_workers=4 "
            "cluster.ray.rollout_workers=4") in calls
    assert "--container-image=/images/rl.sqsh" in calls and "--nodelist=n0" in calls
    assert calls.rstrip().endswith("ray stop --force")  # cleanup after the run
    assert "ray status: 3/3 nodes, 6/6 GPUs" in r.stdout


def test_local_dry_run_times_out_when_cluster_incomplete(tmp_path):
    r, calls = _dry_run(tmp_path, nodes=3, fake_nodes=2)
    assert r.returncode == 3
    assert "ray cluster not ready after 1s (want 3 nodes, 6 GPUs)" in r.stderr
    assert "RUN" not in calls and "ray stop --force" in calls


def test_cli_prints_sbatch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "slurm", "recipe=sanity_tiny", "nodes=1", "gpus_per_node=1", "submit=false"]) == 0
    path = Path("outputs/sanity_tiny/launch/nemo-rl-fp16-sanity_tiny.sbatch")
    assert path.exists() and f"sbatch {path}" in capsys.readouterr().out
    assert main(["launch", "slurm", "nodes=0"]) == 2
    assert capsys.readouterr().err.strip() == "error: nodes=0 must be >= 1"
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on PATH
    assert main(["launch", "slurm", "recipe=sanity_tiny", "submit=true"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
