"""Slurm launcher: write an sbatch script that brings up a Ray cluster and runs one recipe.

    nemo-rl-fp16 launch slurm recipe=grpo_fp16 nodes=8 gpus_per_node=8 time=04:00:00 \
        account=ACCT partition=batch image=/images/nemo_rl_fp16.sqsh mounts=/data:/data \
        trainer.max_steps=500 [submit=false] [script=PATH]

The generated script (one job, `--ntasks-per-node=1`):
1. starts a Ray head on the first node (`srun --nodelist=HEAD ... ray start --head --block`) and a
   Ray worker on every other node, each as a background `srun` step (`--overlap`, so the later
   steps can share the nodes), inside the enroot/pyxis container when `image=` is given;
2. polls `ray status` on the head until it reports every node and GPU, failing with a clear
   message after `ray_wait_s` seconds;
3. runs `nemo-rl-fp16 rl recipe=... key=value ...` (or `nemo llm rl ...` with `launcher=nemo`) on
   the head, with `RAY_ADDRESS` exported and `cluster.nodes`/`cluster.gpus_per_node` set;
4. stops Ray on every node from an EXIT trap (also on failure or `scancel`) and exits with the
   run's exit code. stdout+stderr go to `<log_dir>/%x-%j.out` (job name, job id).

Arguments that are not launcher keys (`LAUNCH_KEYS`) are recipe overrides; the recipe and its
overrides are validated (`load_recipe`) before anything is written.

Every value in the script is either shell-quoted (`shlex.quote`; commands pass their arguments
as `bash -c 'SETUP && exec "$@"' bash ARG...`, so no value is ever re-parsed by a shell) or, on
`#SBATCH` lines, which sbatch reads without a shell, checked against `SBATCH_SAFE` (job name,
time, account, partition, log folder, also when derived from the recipe or `output_dir`).
`setup=` is shell code by design: it runs only inside each step's `bash -c`, on one line. The script is written to
`script=PATH` or `<output_dir>/launch/<job_name>.sbatch`; the `sbatch` command is printed and run
only with `submit=true` (and `sbatch` on PATH).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nemo_rl_fp16.config import ConfigError

#: what may appear in an `#SBATCH` value (sbatch parses those lines itself, without a shell)
SBATCH_SAFE = re.compile(r"^[A-Za-z0-9._/:%+@,=~-]+$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: launcher keys (everything else is a recipe override), with their help text.
LAUNCH_KEYS = {
    "recipe": "recipe name or YAML path (default grpo_fp16)",
    "nodes": "number of nodes (default: the recipe's cluster.nodes)",
    "gpus_per_node": "GPUs per node (default: the recipe's cluster.gpus_per_node)",
    "time": "wall-clock limit, e.g. 04:00:00",
    "account": "Slurm account (--account)",
    "partition": "Slurm partition (--partition)",
    "job_name": "job name (default nemo-rl-fp16-<recipe>)",
    "image": "container image for enroot/pyxis (srun --container-image)",
    "mounts": "container mounts, comma separated src:dst[,src:dst] (srun --container-mounts)",
    "workdir": "working directory of the run (default: the submit directory)",
    "log_dir": "folder of the per-job logs %x-%j.out (default <output_dir>/launch/logs)",
    "cpus_per_task": "CPUs per node task (--cpus-per-task; default: not set)",
    "ray_port": "Ray head port (default 6379)",
    "ray_wait_s": "seconds to wait for all Ray nodes/GPUs before failing (default 600)",
    "ray_poll_s": "seconds between `ray status` polls (default 5)",
    "launcher": "command on the head: nemo-rl-fp16 (default) | nemo (`nemo llm rl ...`)",
    "setup": "shell line run in each step before ray/the run (e.g. 'source /opt/venv/bin/activate')",
    "script": "where to write the sbatch script (default <output_dir>/launch/<job_name>.sbatch)",
    "submit": "true = run sbatch on the script (default false: print the command only)",
}


@dataclass
class SlurmJob:
    """Everything the sbatch script needs (see module doc)."""

    recipe: str = "grpo_fp16"
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 8
    time: str = "04:00:00"
    account: str | None = None
    partition: str | None = None
    job_name: str = "nemo-rl-fp16"
    image: str | None = None
    mounts: str | None = None
    workdir: str | None = None
    log_dir: str = "logs"
    cpus_per_task: int | None = None
    ray_port: int = 6379
    ray_wait_s: int = 600
    ray_poll_s: int = 5
    launcher: str = "nemo-rl-fp16"
    setup: str | None = None

    def rl_command(self) -> list[str]:
        """The run's argv on the head node (recipe + cluster size + overrides).

        Returns:
            list[str]: `nemo-rl-fp16 rl` (or `nemo llm rl`), `recipe=...`, `cluster.nodes`,
                `cluster.gpus_per_node`, `cluster.ray.enabled=true`, then the user's overrides.
        """
        head = ["nemo", "llm", "rl"] if self.launcher == "nemo" else ["nemo-rl-fp16", "rl"]
        # the Ray cluster this script starts is where the recipe's trainer ranks and rollout engines go
        cluster = [f"cluster.nodes={self.nodes}", f"cluster.gpus_per_node={self.gpus_per_node}",
                   "cluster.ray.enabled=true"]
        return [*head, f"recipe={self.recipe}", *cluster, *self.overrides]


def _q(s: object) -> str:
    return shlex.quote(str(s))


def _exec_line(setup: str | None, argv: Sequence[str]) -> str:
    """`bash -c 'SETUP && exec "$@"' bash ARGV...`: argv quoted once, never re-parsed by a shell."""
    body = f'{setup} && exec "$@"' if setup else 'exec "$@"'
    return f"bash -c {_q(body)} bash " + " ".join(argv)


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script for `job` (pure function: golden-tested).

    Args:
        job (SlurmJob): the validated job (`parse_args`).

    Returns:
        str: the whole bash script: `#SBATCH` lines, Ray head and workers via srun, the run on the head.

    Raises:
        ConfigError: a job name, time, account, partition or log folder that cannot go on an `#SBATCH` line.
    """
    sb = [f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}", "#SBATCH --ntasks-per-node=1"]
    if job.gpus_per_node > 0:
        sb.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        sb.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    sb.append(f"#SBATCH --time={job.time}")
    if job.account:
        sb.append(f"#SBATCH --account={job.account}")
    if job.partition:
        sb.append(f"#SBATCH --partition={job.partition}")
    sb += [f"#SBATCH --output={job.log_dir}/%x-%j.out", f"#SBATCH --error={job.log_dir}/%x-%j.out",
           "#SBATCH --exclusive"]
    for key in ("job_name", "time", "account", "partition", "log_dir"):
        value = getattr(job, key)
        if value is not None and not SBATCH_SAFE.fullmatch(str(value)):
            raise ConfigError(f"{key}={value!r} cannot go on an #SBATCH line: use only letters, digits and . _ / : % + @ , = ~ -")
    container = []
    if job.image:
        container.append(_q(f"--container-image={job.image}"))
        if job.mounts:
            container.append(_q(f"--container-mounts={job.mounts}"))
        container.append('--container-workdir="$WORKDIR"')
    rl = " ".join(_q(a) for a in job.rl_command())
    gpus = f"--num-gpus={int(job.gpus_per_node)}"
    head_start = _exec_line(job.setup, ["ray", "start", "--head", '--node-ip-address="$HEAD_IP"', '--port="$RAY_PORT"',
                                        gpus, "--block"])
    worker_start = _exec_line(job.setup, ["ray", "start", '--address="$RAY_ADDRESS"', gpus, "--block"])
    status = _exec_line(job.setup, ["ray", "status", '--address="$RAY_ADDRESS"'])
    stop = _exec_line(job.setup, ["ray", "stop", "--force"])
    run = _exec_line(job.setup, [_q(a) for a in job.rl_command()])
    return f"""#!/bin/bash
# Generated by `nemo-rl-fp16 launch slurm` (nemo_rl_fp16/commands/launch.py): Ray head on the first node,
# Ray workers on the others, then the RL run on the head. Submit with: sbatch THIS_FILE
{chr(10).join(sb)}

set -uo pipefail

NNODES={int(job.nodes)}
GPUS_PER_NODE={int(job.gpus_per_node)}
TOTAL_GPUS=$((NNODES * GPUS_PER_NODE))
RAY_PORT={int(job.ray_port)}
RAY_WAIT_S={int(job.ray_wait_s)}
RAY_POLL_S={int(job.ray_poll_s)}
WORKDIR={_q(job.workdir) if job.workdir else '"${SLURM_SUBMIT_DIR:-$PWD}"'}
cd "$WORKDIR" || exit 1

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${{#NODES[@]}}" -ne "$NNODES" ]; then
  echo "error: expected $NNODES nodes in SLURM_JOB_NODELIST, got ${{#NODES[@]}}" >&2
  exit 1
fi
HEAD_NODE=${{NODES[0]}}
HEAD_IP=$(srun --overlap --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" hostname --ip-address | awk '{{print $1}}')
HEAD_IP=${{HEAD_IP:-$HEAD_NODE}}
export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
CONTAINER=({" ".join(container)})
STEP=(srun --overlap --nodes=1 --ntasks=1 "${{CONTAINER[@]}}")
echo "[launch] job $SLURM_JOB_ID: ${{NODES[*]}}; ray head $RAY_ADDRESS; $TOTAL_GPUS GPUs"

PIDS=()
cleanup() {{
  echo "[launch] stopping ray on all nodes"
  srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 "${{CONTAINER[@]}}" \\
    {stop} || true
  for pid in "${{PIDS[@]}}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}}
trap cleanup EXIT
trap 'exit 143' TERM INT  # scancel / time limit: exit through the EXIT trap

# 1. Ray head on the first node, workers on the rest (each a background job step).
"${{STEP[@]}}" --nodelist="$HEAD_NODE" \\
  {head_start} &
PIDS+=($!)
for node in "${{NODES[@]:1}}"; do
  "${{STEP[@]}}" --nodelist="$node" \\
    {worker_start} &
  PIDS+=($!)
done

# 2. Wait (bounded) until `ray status` reports every node and GPU.
ray_ready() {{
  local out nodes gpus
  out=$("${{STEP[@]}}" --nodelist="$HEAD_NODE" {status} 2>/dev/null) \\
    || return 1
  nodes=$(printf '%s\\n' "$out" | awk '/^Active:/{{a=1; next}} /^(Pending|Recent failures):/{{a=0}} a && /node_/{{n++}} END{{print n+0}}')
  gpus=$(printf '%s\\n' "$out" | sed -n 's#.*/\\([0-9][0-9]*\\)\\(\\.[0-9]*\\)\\{{0,1\\}} GPU.*#\\1#p' | head -n 1)
  echo "[launch] ray status: $nodes/$NNODES nodes, ${{gpus:-0}}/$TOTAL_GPUS GPUs"
  [ "$nodes" -ge "$NNODES" ] && [ "${{gpus:-0}}" -ge "$TOTAL_GPUS" ]
}}
deadline=$((SECONDS + RAY_WAIT_S))
until ray_ready; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "error: ray cluster not ready after ${{RAY_WAIT_S}}s (want $NNODES nodes, $TOTAL_GPUS GPUs); see the ray start output above" >&2
    exit 3
  fi
  sleep "$RAY_POLL_S"
done

# 3. The run, on the head node.
echo {_q("[launch] running: " + rl)}
"${{STEP[@]}}" --nodelist="$HEAD_NODE" {run}
rc=$?
echo "[launch] run exited with $rc"
exit $rc
"""


def parse_args(args: Sequence[str]) -> tuple[SlurmJob, str | None, bool]:
    """(job, script path or None, submit) from `key=value` arguments; validates the recipe.

    Args:
        args (Sequence[str]): `key=value` words: launcher keys (`LAUNCH_KEYS`: nodes, gpus_per_node,
            time, account, partition, image, mounts, script, submit, ...) and recipe overrides.

    Returns:
        tuple[SlurmJob, str | None, bool]: the job, the script path (default
            `<output_dir>/launch/<job_name>.sbatch`), and whether to submit it.

    Raises:
        ConfigError: a word without `=`, `dry_run`, a bad recipe or override, a non-integer or too
            small count, an unsafe `#SBATCH` value, a multi-line value, `mounts` without `image`, or a
            parallel layout that does not fit the job (`plan.parallel_layout`); all before writing.
    """
    from nemo_rl_fp16.config import load_recipe, typed

    kv: dict[str, str] = {}
    overrides: list[str] = []
    for a in args:
        key, sep, value = a.partition("=")
        if not sep:
            raise ConfigError(f"argument '{a}' is not key=value (e.g. nodes=8 or trainer.max_steps=3)")
        (kv.__setitem__(key, value) if key in LAUNCH_KEYS else overrides.append(a))
    for key in ("dry_run", "+dry_run"):
        if any(o.startswith(key + "=") for o in overrides):
            raise ConfigError("launch has no dry_run; it only writes the script unless submit=true")
    recipe = kv.get("recipe", "grpo_fp16")
    rc = typed(load_recipe(recipe, overrides))  # fail on bad overrides before writing anything

    def _int(key: str, default: int, lo: int) -> int:
        raw = kv.get(key)
        if raw is None:
            return default
        try:
            v = int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw} is not an integer") from None
        if v < lo:
            raise ConfigError(f"{key}={raw} must be >= {lo}")
        return v

    submit_raw = kv.get("submit", "false").lower()
    if submit_raw not in _TRUE | _FALSE:
        raise ConfigError(f"submit={kv['submit']} is not a boolean (true|false)")
    launcher = kv.get("launcher", "nemo-rl-fp16")
    if launcher not in ("nemo-rl-fp16", "nemo"):
        raise ConfigError(f"launcher={launcher} is not one of: nemo-rl-fp16, nemo")
    time = kv.get("time", "04:00:00")
    for key in ("account", "partition", "job_name", "log_dir", "time"):  # these go on #SBATCH lines
        if key in kv and not SBATCH_SAFE.fullmatch(kv[key]):
            raise ConfigError(f"{key}={kv[key]!r} cannot go on an #SBATCH line: use only letters, digits and "
                              ". _ / : % + @ , = ~ -")
    for key in ("image", "mounts", "workdir", "setup", "script"):
        if key in kv and (not kv[key] or any(c in kv[key] for c in "\n\r\0")):
            raise ConfigError(f"{key}={kv[key]!r} must be one non-empty line")
    if "mounts" in kv and "image" not in kv:
        raise ConfigError("mounts= needs image= (container mounts are srun --container-mounts)")
    out_dir = Path(rc.output_dir)
    job = SlurmJob(
        recipe=recipe, overrides=overrides,
        nodes=_int("nodes", rc.cluster.nodes, 1),
        gpus_per_node=_int("gpus_per_node", rc.cluster.gpus_per_node, 0),
        time=time, account=kv.get("account"), partition=kv.get("partition"),
        job_name=kv.get("job_name", f"nemo-rl-fp16-{rc.recipe}"),
        image=kv.get("image"), mounts=kv.get("mounts"), workdir=kv.get("workdir"),
        log_dir=_derived_log_dir(kv, out_dir),
        cpus_per_task=_int("cpus_per_task", 0, 0) or None,
        ray_port=_int("ray_port", 6379, 1), ray_wait_s=_int("ray_wait_s", 600, 1),
        ray_poll_s=_int("ray_poll_s", 5, 1), launcher=launcher, setup=kv.get("setup"),
    )
    from nemo_rl_fp16.memory_budget import memory_problems, plan_memory
    from nemo_rl_fp16.plan import parallel_layout, run_device

    head = 2 if job.launcher == "nemo-rl-fp16" else 3
    run_cfg = typed(load_recipe(recipe, job.rl_command()[head + 1:]))
    layout = parallel_layout(run_cfg)  # the run's layout fits the job
    device = run_device(run_cfg)  # and its GPUs (the check `plan.check_run` makes; the rest needs the cluster)
    too_big = memory_problems(plan_memory(run_cfg, layout, device), run_cfg) if device == "cuda" else []
    if too_big:
        raise ConfigError("\n".join(too_big))
    script = kv.get("script") or str(out_dir / "launch" / f"{job.job_name}.sbatch")
    return job, script, submit_raw in _TRUE


def _derived_log_dir(kv: dict[str, str], out_dir: Path) -> str:
    if "log_dir" in kv:
        return kv["log_dir"]
    log_dir = str(out_dir / "launch" / "logs")
    if not SBATCH_SAFE.fullmatch(log_dir):
        raise ConfigError(f"the log folder derived from output_dir ({log_dir!r}) cannot go on an #SBATCH line; "
                          "pass log_dir= with only letters, digits and . _ / : % + @ , = ~ -")
    return log_dir


def launch_slurm(args: Sequence[str]) -> int:
    """`nemo-rl-fp16 launch slurm ...`: write the script, print (and optionally run) sbatch.

    Args:
        args (Sequence[str]): as `parse_args`.

    Returns:
        int: 0 when only written, else sbatch's exit status.

    Raises:
        ConfigError: as `parse_args`, or `submit=true` without `sbatch` on PATH.
    """
    job, script, submit = parse_args(args)
    path = Path(script)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_sbatch(job))
    path.chmod(0o755)
    Path(job.log_dir).mkdir(parents=True, exist_ok=True)  # Slurm does not create the log folder
    cmd = ["sbatch", str(path)]
    print(f"wrote {path}")
    print(" ".join(_q(c) for c in cmd))
    if not submit:
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("submit=true but sbatch is not on PATH (run on a Slurm login node, or submit=false)")
    return subprocess.run(cmd, check=False).returncode
