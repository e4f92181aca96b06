"""The generated Slurm batch script run end to end with stub srun/ray/scontrol: ray cluster up, the run, cleanup; hostile values run nothing."""

import json
import os
import subprocess
import sys

import pytest

from nemo_rl_fp16.commands.launch import SlurmJob, launch_slurm, parse_args, render_sbatch
from nemo_rl_fp16.config import ConfigError

pytestmark = pytest.mark.integration


ARGS = ["recipe=grpo_fp16", "time=04:00:00", "account=acct", "partition=batch",
        "image=/images/rl.sqsh", "mounts=/data:/data,/ckpt:/ckpt", "trainer.max_steps=7", "precision=bf16"]


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


def _payloads(canary):
    """Strings a shell would run if they were not quoted: each would create a file in `canary`."""
    c = str(canary)
    return [f"$(touch {c}/p1)", f"`touch {c}/p2`", f"x; touch {c}/p3", f"x && touch {c}/p4",
            f"x)>{c}/p5&&(touch {c}/p6", f"x' ; touch {c}/p7 ; '", f'x" ; touch {c}/p8 ; "',
            f"x\ntouch {c}/p9", f"a b > {c}/p10", f"x | tee {c}/p11", f"x < /etc/passwd; touch {c}/p12"]


_PY_STUB = """#!{py}
import json, os, sys
with open(os.environ["LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
name = os.path.basename(sys.argv[0])
if name == "srun":  # drop srun's own --options, run the command (like a job step)
    args = sys.argv[1:]
    while args and args[0].startswith("-"):
        args.pop(0)
    os.execvp(args[0], args)
if name == "ray" and sys.argv[1] == "status":
    print("Active:"); print(" 1 node_1"); print("Pending:"); print("Resources"); print(" 0.0/1.0 GPU")
if name == "hostname":
    print("10.0.0.1")
"""


def _run_with_stubs(tmp_path, job):
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name in ("srun", "ray", "hostname", "nemo-rl-fp16"):
        (bin_ / name).write_text(_PY_STUB.format(py=sys.executable))
        (bin_ / name).chmod(0o755)
    (bin_ / "scontrol").write_text('#!/bin/bash\necho "$3" | tr , "\\n"\n')
    (bin_ / "scontrol").chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "n0"}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return r, [json.loads(x) for x in log.read_text().splitlines()]


@pytest.mark.parametrize("where", ["image", "mounts", "workdir", "override"])
def test_hostile_values_reach_argv_verbatim_and_run_nothing(tmp_path, where):
    canary = tmp_path / "canary"
    canary.mkdir()
    for i, bad in enumerate(_payloads(canary)):
        wd = tmp_path / f"wd{i}"
        kw = {"image": "/img.sqsh"}
        if where == "image":
            kw["image"] = bad
        elif where == "mounts":
            kw["mounts"] = bad
        elif where == "workdir":
            wd = tmp_path / bad.replace("/", "_")
            kw["workdir"] = str(wd)
        wd.mkdir(exist_ok=True)
        kw.setdefault("workdir", str(wd))
        overrides = [f"data.path={bad}", f"output_dir={bad}"] if where == "override" else ["trainer.max_steps=1"]
        job = SlurmJob(recipe="sanity_tiny", nodes=1, gpus_per_node=1, ray_wait_s=5, ray_poll_s=1,
                       overrides=overrides, log_dir=str(tmp_path / "logs"), **kw)
        r, calls = _run_with_stubs(tmp_path, job)
        assert r.returncode == 0, (bad, r.stderr)
        assert sorted(os.listdir(canary)) == [], (where, bad)  # nothing injected ran
        names = {c[0] for c in calls}
        assert names == {"srun", "hostname", "ray", "nemo-rl-fp16"}, names
        runs = [c for c in calls if c[0] == "nemo-rl-fp16"]
        assert runs == [["nemo-rl-fp16", "rl", "recipe=sanity_tiny", "cluster.nodes=1", "cluster.gpus_per_node=1",
                         "cluster.ray.enabled=true", *overrides]], (bad, runs)
        srun = [c for c in calls if c[0] == "srun" and "--container-image=" + kw["image"] in c]
        assert srun and all(f"--container-mounts={kw['mounts']}" in c for c in srun if "mounts" in kw)
        ray = {tuple(c[1:]) for c in calls if c[0] == "ray"}  # the background `ray start` may be killed unlogged
        assert ray <= {("start", "--head", "--node-ip-address=10.0.0.1", "--port=6379", "--num-gpus=1", "--block"),
                       ("status", "--address=10.0.0.1:6379"), ("stop", "--force")}, ray
        assert ("stop", "--force") in ray and ("status", "--address=10.0.0.1:6379") in ray


def test_setup_runs_only_inside_each_step(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    setup = f"touch {canary}/step_$$"  # setup is shell code by design: it runs in the steps only
    job = SlurmJob(recipe="sanity_tiny", nodes=1, gpus_per_node=1, ray_wait_s=5, ray_poll_s=1, image="/i",
                   workdir=str(tmp_path), setup=setup, log_dir=str(tmp_path / "logs"))
    r, calls = _run_with_stubs(tmp_path, job)
    assert r.returncode == 0, r.stderr
    steps = [c for c in calls if c[0] == "srun" and "bash" in c]
    assert steps and all(c[c.index("bash") + 1:c.index("bash") + 3] == ["-c", f'{setup} && exec "$@"'] for c in steps)
    assert len(os.listdir(canary)) == len(steps)  # once per step, never in the batch script itself
    with pytest.raises(ConfigError, match="one non-empty line"):
        parse_args(["recipe=sanity_tiny", "nodes=1", "gpus_per_node=1", "setup=a\nb", f"script={tmp_path}/x"])
