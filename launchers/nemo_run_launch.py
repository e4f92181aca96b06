#!/usr/bin/env python
"""Submit an RL run through NeMo-Run: `run.Script` for the rl command + `LocalExecutor` or `SlurmExecutor`.

    python launchers/nemo_run_launch.py --executor local recipe=sanity_tiny trainer.max_steps=3
    python launchers/nemo_run_launch.py --executor slurm --account ACCT --partition batch --nodes 1 \
        --gpus-per-node 8 --time 04:00:00 --container-image /images/rl.sqsh \
        --container-mounts /data:/data --job-dir /lustre/me/nemo_run recipe=grpo_fp16 --dryrun

Positional `recipe=NAME` and `key=value` arguments are the rl command's (validated with the
package's recipe loader before anything is built). `--dryrun` prints what NeMo-Run would submit
(the task, the executor and, for Slurm, the sbatch script) without running or submitting.

Scope: one rl process per job (`ntasks_per_node=1`), i.e. the single-process trainer on one node.
A multi-node job that needs a Ray cluster (head + workers) is what `nemo-rl-fp16 launch slurm`
generates (nemo_rl_fp16/commands/launch.py, docs/scaling.md). For a Slurm cluster you reach over SSH, pass
`--ssh-host`/`--ssh-user` (a `run.SSHTunnel`); otherwise the tunnel is local (run on the login node).
Needs the `nemo` extra (`pip install 'nemo_rl_fp16[nemo]'`: nemo-run==0.11.1, leptonai<0.47).
"""

from __future__ import annotations

import argparse
import sys

import nemo_run as run


def build_task(rl_args: list[str], python: str = "python") -> run.Script:
    """`python -m nemo_rl_fp16.cli rl <rl_args>` as a NeMo-Run script task."""
    return run.Script(path="nemo_rl_fp16.cli", args=["rl", *rl_args], entrypoint=python, m=True)


def local_executor(ntasks_per_node: int = 1) -> run.LocalExecutor:
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node)


def slurm_executor(*, account: str, partition: str | None, nodes: int = 1, ntasks_per_node: int = 1,
                   gpus_per_node: int | None = None, time: str = "04:00:00", container_image: str | None = None,
                   container_mounts: list[str] | None = None, job_dir: str = "nemo_run_jobs",
                   ssh_host: str | None = None, ssh_user: str | None = None,
                   env_vars: dict[str, str] | None = None) -> run.SlurmExecutor:
    tunnel = (run.SSHTunnel(host=ssh_host, user=ssh_user or "", job_dir=job_dir) if ssh_host
              else run.LocalTunnel(job_dir=job_dir))
    return run.SlurmExecutor(account=account, partition=partition, nodes=nodes, ntasks_per_node=ntasks_per_node,
                             gpus_per_node=gpus_per_node, time=time, container_image=container_image,
                             container_mounts=list(container_mounts or []), env_vars=dict(env_vars or {}),
                             exclusive=True, tunnel=tunnel, packager=run.Packager())  # code lives in the image


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--ntasks-per-node", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--container-image")
    p.add_argument("--container-mounts", default="", help="comma separated src:dst")
    p.add_argument("--job-dir", default="nemo_run_jobs", help="where NeMo-Run keeps job files (on the cluster)")
    p.add_argument("--ssh-host")
    p.add_argument("--ssh-user")
    p.add_argument("--python", default="python", help="interpreter on the target (inside the container)")
    p.add_argument("--name", default="nemo-rl-fp16")
    p.add_argument("--dryrun", action="store_true", help="print what would be submitted; run nothing")
    p.add_argument("rl_args", nargs="*", help="recipe=NAME and key=value overrides of the rl command")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    from nemo_rl_fp16.cli import split_args
    from nemo_rl_fp16.config import ConfigError, load_recipe

    try:  # validate the recipe + overrides here, before anything is submitted
        recipe, overrides, _ = split_args("rl", ns.rl_args)
        load_recipe(recipe, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ns.executor == "slurm":
        if not ns.account:
            print("error: --executor slurm needs --account", file=sys.stderr)
            return 2
        mounts = [m for m in ns.container_mounts.split(",") if m]
        executor = slurm_executor(account=ns.account, partition=ns.partition, nodes=ns.nodes,
                                  ntasks_per_node=ns.ntasks_per_node, gpus_per_node=ns.gpus_per_node, time=ns.time,
                                  container_image=ns.container_image, container_mounts=mounts, job_dir=ns.job_dir,
                                  ssh_host=ns.ssh_host, ssh_user=ns.ssh_user)
    else:
        executor = local_executor(ns.ntasks_per_node)
    task = build_task(ns.rl_args, ns.python)
    if ns.dryrun:
        print(f"task: {task.entrypoint} -m {task.path} {' '.join(task.args)}")
        print(f"executor: {type(executor).__name__}")
    run.run(task, executor=executor, name=ns.name, dryrun=ns.dryrun, direct=False, tail_logs=not ns.dryrun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
