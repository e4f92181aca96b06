"""Slurm launcher: golden checks of the generated sbatch script, `bash -n`, and a local dry run
of the script against stub `scontrol`/`srun`/`ray`/`nemo-rl-fp16` executables (no cluster)."""

import subprocess
from pathlib import Path

import pytest

from nemo_rl_fp16.cli import main
from nemo_rl_fp16.commands.launch import SlurmJob, parse_args, render_sbatch
from nemo_rl_fp16.config import ConfigError

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
                 "#SBATCH --output=outputs/grpo_fp16/bf16_grpo/launch/logs/%x-%j.out",
                 f"NNODES={nodes}", "GPUS_PER_NODE=8", "trap cleanup EXIT",
                 'CONTAINER=(--container-image=/images/rl.sqsh --container-mounts=/data:/data,/ckpt:/ckpt '
                 '--container-workdir="$WORKDIR")',
                 'STEP=(srun --overlap --nodes=1 --ntasks=1 "${CONTAINER[@]}")']:
        assert want in lines, want
    assert lines[0] == "#!/bin/bash"
    exec_ = 'bash -c \'exec "$@"\' bash '
    assert exec_ + 'ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-gpus=8 --block' in text
    assert exec_ + 'ray start --address="$RAY_ADDRESS" --num-gpus=8 --block' in text
    assert "\ntrap 'exit 143' TERM INT" in text
    assert "ray stop --force" in text and 'ray status --address="$RAY_ADDRESS"' in text
    rl = (f"nemo-rl-fp16 rl recipe=grpo_fp16 cluster.nodes={nodes} cluster.gpus_per_node=8 cluster.ray.enabled=true "
          "trainer.max_steps=7 precision=bf16")
    assert exec_ + rl in text
    (tmp_path / "s.sh").write_text(text)
    r = subprocess.run(["bash", "-n", str(tmp_path / "s.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_nemo_launcher_and_no_container(tmp_path):
    job = SlurmJob(recipe="sanity_tiny", nodes=2, gpus_per_node=0, launcher="nemo", setup="source /venv/bin/activate")
    text = render_sbatch(job)
    assert "#SBATCH --gpus-per-node" not in text and "#SBATCH --account" not in text
    assert "CONTAINER=()" in text and "--num-gpus=0 --block" in text
    assert "bash -c 'source /venv/bin/activate && exec \"$@\"' bash nemo llm rl recipe=sanity_tiny cluster.nodes=2" in text


@pytest.mark.parametrize("bad,msg", [
    (["trainer.max_stepz=1"], "unknown key"), (["nodes=0"], "nodes=0 must be >= 1"),
    (["nodes=x"], "not an integer"), (["submit=maybe"], "not a boolean"), (["launcher=srun"], "launcher="),
    (["account=a b"], "account="), (["dry_run=true"], "no dry_run"),
    (["nodes=1", "gpus_per_node=4"], "cluster.ray places 8 GPUs"),  # grpo_fp16's 8 + 8 colocated actors
    (["cluster.gpu_memory_gb=5"], r"bad value for 'cluster.gpu_memory_gb': 5; the plan needs .* largest item"),
])
def test_bad_arguments_fail_before_writing(tmp_path, bad, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args([*ARGS, f"script={tmp_path / 'x.sbatch'}", *bad])
    assert not (tmp_path / "x.sbatch").exists()


def test_cli_prints_sbatch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "slurm", "recipe=sanity_tiny", "nodes=1", "gpus_per_node=1", "submit=false"]) == 0
    path = Path("outputs/sanity_tiny/fp16_grpo/launch/nemo-rl-fp16-sanity_tiny.sbatch")
    assert path.exists() and f"sbatch {path}" in capsys.readouterr().out
    assert main(["launch", "slurm", "nodes=0"]) == 2
    assert capsys.readouterr().err.strip() == "error: nodes=0 must be >= 1"
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on PATH
    assert main(["launch", "slurm", "recipe=sanity_tiny", "submit=true"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


# ------------------------------------------------------------------ hostile values

def _payloads(canary):
    """Strings a shell would run if they were not quoted: each would create a file in `canary`."""
    c = str(canary)
    return [f"$(touch {c}/p1)", f"`touch {c}/p2`", f"x; touch {c}/p3", f"x && touch {c}/p4",
            f"x)>{c}/p5&&(touch {c}/p6", f"x' ; touch {c}/p7 ; '", f'x" ; touch {c}/p8 ; "',
            f"x\ntouch {c}/p9", f"a b > {c}/p10", f"x | tee {c}/p11", f"x < /etc/passwd; touch {c}/p12"]


@pytest.mark.parametrize("key", ["account", "partition", "job_name", "time", "log_dir"])
def test_hostile_sbatch_values_refused(tmp_path, key):
    for bad in _payloads(tmp_path) + ["a b", "x\n#SBATCH --wrap=touch p", "", "acct\n"]:
        with pytest.raises(ConfigError, match="#SBATCH"):
            parse_args(["recipe=sanity_tiny", "nodes=1", "gpus_per_node=1", f"{key}={bad}",
                        f"script={tmp_path / 'x.sbatch'}"])
    assert not (tmp_path / "x.sbatch").exists()


def test_derived_values_checked_too(tmp_path):
    # output_dir with a newline or space: the derived log folder cannot go on an #SBATCH line
    for out in ["a b", "x\ny", "x;id"]:
        with pytest.raises(ConfigError, match="derived from output_dir"):
            parse_args(["recipe=sanity_tiny", "nodes=1", "gpus_per_node=1", f"output_dir={out}",
                        f"script={tmp_path / 'x.sbatch'}"])
    # a recipe name is a name: never a path, never shell
    for name in ["../../..", "x\ny", "$(id)"]:
        with pytest.raises(ConfigError, match="recipe"):
            parse_args(["recipe=sanity_tiny", "nodes=1", "gpus_per_node=1", f"+recipe={name}",
                        f"script={tmp_path / 'x.sbatch'}"])
    with pytest.raises(ConfigError, match="#SBATCH"):
        render_sbatch(SlurmJob(job_name="a;b"))
