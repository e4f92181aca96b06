"""Runs you can trust, through the CLI: identity, one run per folder, locks, verified resume, kill -9, the README sequence."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.config import load_recipe
from nemo_rl_fp16.runs import RunError, RunLock

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[2]


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}  # this checkout, from any cwd


def _tiny(ws):
    return [f"warm_start.cache_dir={ws}", "logging.progress=false", "logging.tensorboard=false",
            "data.prompts_per_step=4", "trainer.max_steps=2", "trainer.save_every=1"]


def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=cwd)


def _steps(path):
    return [json.loads(x)["step"] for x in Path(path).read_text().splitlines()]


def _snapshot(folder):
    """Every file under `folder` with its bytes and mtime: proves nothing was touched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("bad", ["../../..", "a/b", "x y", ".hidden", "a\nb", "$(touch x)"])
def test_recipe_name_is_a_name_not_a_path(bad):
    r = cli("rl", "recipe=sanity_tiny", f"+recipe={bad}", "dry_run=true")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "a recipe name is letters, digits" in r.stderr, r.stderr


def test_resume_of_another_run_refused_naming_keys_and_untouched(tmp_path):
    out = tmp_path / "run"
    args = ["rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path / "ws")]
    assert cli(*args).returncode == 0
    before = _snapshot(out)
    for extra, key in [("precision=bf16", "precision.name"), ("algorithm.name=gspo", "algorithm.name"),
                       ("seed=5", "seed"), ("policy.lora.enabled=true", "policy.lora.enabled")]:
        r = cli(*args, extra)
        assert r.returncode == 2, (extra, r.stderr)
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: output_dir={out} is another run"), line
        assert key in line and "use another output_dir" in line and "trainer.resume=never" in line, line
        assert _snapshot(out) == before  # config.yaml, metrics, checkpoints: untouched
    # the same run with more steps continues
    r = cli(*args, "trainer.max_steps=3")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    r = cli(*args, "trainer.max_steps=3")  # a complete run says so
    assert r.returncode == 0 and "nothing to train" in r.stdout


def test_resume_never_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    args = ["rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path / "ws")]
    assert cli(*args, "trainer.max_steps=3").returncode == 0
    old = _snapshot(out)
    r = cli(*args, "trainer.resume=never", "precision=bf16")
    assert r.returncode == 0, r.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in r.stdout
    assert _snapshot(aside[0]) == old  # the old run, whole
    assert _steps(out / "metrics.jsonl") == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    r = cli(*args, "precision=bf16", "trainer.max_steps=3")  # auto now continues the new run, not the old
    assert r.returncode == 0 and "step_000002" in r.stdout
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]


def test_foreign_file_or_folder_refused(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("my: notes\n")
    for resume in ("auto", "never"):
        r = cli("rl", "recipe=sanity_tiny", f"output_dir={foreign}", f"trainer.resume={resume}", *_tiny(tmp_path))
        assert r.returncode == 2 and "is not a run folder" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (foreign / "config.yaml").read_text() == "my: notes\n" and sorted(os.listdir(foreign)) == ["config.yaml"]
    (tmp_path / "afile").write_text("x")
    r = cli("rl", "recipe=sanity_tiny", f"output_dir={tmp_path / 'afile'}", *_tiny(tmp_path))
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_checkpoint_of_another_run_refused(tmp_path):
    a = tmp_path / "a"
    assert cli("rl", "recipe=sanity_tiny", f"output_dir={a}", *_tiny(tmp_path / "ws")).returncode == 0
    r = cli("rl", "recipe=sanity_tiny", f"output_dir={tmp_path / 'b'}", "seed=9",
            f"trainer.resume={a / 'checkpoints' / 'step_000001'}", *_tiny(tmp_path / "ws"))
    assert r.returncode == 2 and "is another run" in r.stderr and "seed: 1234 -> 9" in r.stderr, r.stderr


def test_second_run_on_a_locked_folder_refuses_naming_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        r = cli("rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path / "ws"))
        assert r.returncode == 2, r.stderr
        assert f"in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in r.stderr
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written
        with pytest.raises(RunError, match="in use by another run"):
            RunLock(out).acquire()
    assert not (out / ".lock").exists()  # released


def _lock_holder(out: Path) -> int | None:
    try:
        return json.loads((out / ".lock").read_text()).get("pid")
    except (OSError, ValueError):  # not there yet, or being written
        return None


def test_concurrent_runs_one_refuses(tmp_path):
    """The second run refuses while the first holds the folder; the first finishes untouched.

    Deterministic on a loaded machine: once the first holds the lock (its pid in `.lock`) it is
    paused (SIGSTOP: alive, flock held) until the second has exited, so the second cannot arrive
    after the first released the lock, however slowly it starts.
    """
    import signal

    out = tmp_path / "run"
    args = [sys.executable, "-m", "nemo_rl_fp16.cli", "rl", "recipe=sanity_tiny", f"output_dir={out}",
            *_tiny(tmp_path / "ws"), "trainer.max_steps=4"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while _lock_holder(out) != first.pid:
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        try:
            second = cli(*args[3:])
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and f"(pid {first.pid} on host" in second.stderr, second.stderr
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]  # never interleaved


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    r = cli("rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path / "ws"))
    assert r.returncode == 0, r.stderr
    assert f"took over the lock of a dead run (pid {dead.pid})" in r.stdout
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": "other-host", "started": "then"}))
    r = cli("rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path / "ws"))
    assert r.returncode == 2 and "locked by pid 1 on host other-host" in r.stderr and "delete" in r.stderr


def test_corrupt_latest_checkpoint_stops_naming_the_intact_one(tmp_path):
    out = tmp_path / "run"
    args = ["rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path / "ws")]
    assert cli(*args).returncode == 0
    latest, older = out / "checkpoints" / "step_000002", out / "checkpoints" / "step_000001"
    f = latest / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    before = _snapshot(out)
    r = cli(*args, "trainer.max_steps=3")
    assert r.returncode == 4, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and f"latest checkpoint {latest} is corrupt (checksum mismatch" in line, line
    assert "step_000001 is intact" in line and f"trainer.resume={older}" in line, line
    assert _snapshot(out) == before  # no silent fallback, no restart from 0
    r = cli(*args, "trainer.max_steps=3", f"trainer.resume={older}")  # the way out it names
    assert r.returncode == 0 and "moved newer checkpoints step_000002" in r.stdout, r.stderr
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]


def test_only_checkpoint_truncated_never_restarts_from_zero(tmp_path):
    out = tmp_path / "run"
    args = ["rl", "recipe=sanity_tiny", f"output_dir={out}", *_tiny(tmp_path / "ws"), "trainer.save_every=0"]
    assert cli(*args).returncode == 0
    f = out / "checkpoints" / "step_000002" / "trainer_state.pt"
    f.write_bytes(f.read_bytes()[:100])
    r = cli(*args, "trainer.max_steps=3")
    assert r.returncode == 4 and "no older checkpoint is intact" in r.stderr and "trainer.resume=never" in r.stderr
    assert _steps(out / "metrics.jsonl") == [1, 2]


_KILL_DRIVER = r"""
import os, signal, sys, types
import nemo_rl_fp16.checkpoint as ck
target, nth = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}
def wrap(inner):
    def f(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return inner(*a, **k)
    return f
if target == "save_file":
    ck.save_file = wrap(ck.save_file)
elif target == "torch_save":
    ck.torch = types.SimpleNamespace(**{**vars(ck.torch), "save": wrap(ck.torch.save)})
elif target == "fsync":
    ck.fsync_file = wrap(ck.fsync_file)
elif target == "replace":  # the rename that makes a step visible
    ck.os = types.SimpleNamespace(**{**vars(ck.os), "replace": wrap(ck.os.replace)})
from nemo_rl_fp16.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _kill_points():
    import random

    rng = random.Random(14)  # "random" points, reproducible: which call, of which write, dies
    return [(t, rng.randint(1, 3 if t != "fsync" else 10)) for t in ("save_file", "torch_save", "fsync", "replace")]


@pytest.mark.parametrize("target,nth", _kill_points())
def test_kill_9_while_saving_then_resume_equals_uninterrupted(tmp_path, target, nth):
    common = ["rl", "recipe=sanity_tiny", *_tiny(tmp_path.parent / "ws_kill"), "trainer.max_steps=4"]
    ref = tmp_path / "ref"
    assert cli(*common, f"output_dir={ref}").returncode == 0
    out = tmp_path / "crash"
    r = subprocess.run([sys.executable, "-c", _KILL_DRIVER, target, str(nth), *common, f"output_dir={out}"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == -9, (r.returncode, r.stderr)  # it died inside a save
    r = cli(*common, f"output_dir={out}")
    assert r.returncode == 0, r.stderr
    strip = re.compile(r'"(time/[a-z_]+|run/wall_s)": [0-9.e+-]+,? ?')
    rows = lambda p: [strip.sub("", line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(out) == rows(ref)  # bitwise equal metrics, every step
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # temps cleaned
    a, b = (ckpt.load_checkpoint(d / "checkpoints" / "step_000004")["model_state"] for d in (ref, out))
    assert all((a[k] == b[k]).all() for k in a)


def _doc_rl_lines(md, heading):
    text = (ROOT / md).read_text()
    section = text.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    lines = [line.split("#")[0].split() for line in block.splitlines()]
    return [x[1:] for x in lines if x[:2] == ["nemo-rl-fp16", "rl"] and "dry_run=true" not in x]


def test_readme_and_quickstart_commands_in_sequence_do_what_they_say(tmp_path):
    cmds = _doc_rl_lines("README.md", "## Use") + _doc_rl_lines("docs/quickstart.md", "## One run at a time")
    assert len(cmds) >= 5, cmds
    seen = set()
    for args in cmds:
        r = cli(*args, *_tiny(tmp_path / "ws"), cwd=tmp_path, timeout=600)
        assert r.returncode == 0, (args, r.stderr)
        assert "resumed from" not in r.stdout, (args, r.stdout)  # a fresh run each, as the line says
        out = Path(tmp_path, load_recipe("sanity_tiny", [a for a in args if a != "rl" and not a.startswith("recipe=")]
                                         ).output_dir)
        assert out not in seen
        seen.add(out)
        assert _steps(out / "metrics.jsonl") == [1, 2]
        cfg = load_recipe(str(out / "config.yaml"))
        for a in args[1:]:
            key, value = a.split("=", 1)
            if key == "precision":
                assert cfg.precision.name == value
            elif "." in key:  # the run holds what the line asked for
                assert OmegaConf.select(cfg, key) == OmegaConf.select(OmegaConf.from_dotlist([a]), key), a
