"""Run identity, the run-folder lock, and the resume decision, all made before anything is written.

A run folder (`output_dir`) holds exactly one run. What a run *is* is its fingerprint: every
training-relevant key of the resolved recipe (model, data, precision, algorithm, seed, optimizer,
...), i.e. every key except the operational ones in `NOT_IDENTITY` (where to write, how often to
log or save, how long to train, the cluster shape). A key that is not listed there is part of the
identity, so a newly added key can never be silently ignored on resume.

Start of a run (`prepare_run_dir`), in this order:
1. `output_dir` must be a folder or not exist (a file, or an unwritable place: one line, exit 2);
2. `RunLock` takes `<output_dir>/.lock` (flock + pid/host inside) before anything else is written;
   a second run gets one line naming the holder; a lock left by a dead process is taken over;
3. the folder is read, never written: `run.json` (the identity of the run that owns it) against
   this config. `trainer.resume=auto` resumes only the same identity, else exit 2 naming the keys
   that differ and the two ways out; `never` moves an old run aside (`<output_dir>.prev-<time>`)
   and says where; a non-empty folder that is not a run folder is refused, never overwritten;
4. the checkpoint to resume from is verified (checksums) before any work: a corrupt latest one
   stops the run naming the intact older one and how to use it;
5. only then are stale temp folders cleaned and `run.json` written.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_rl_fp16 import checkpoint as ckpt
from nemo_rl_fp16.config import ConfigError
from nemo_rl_fp16.fsutil import atomic_write

RUN_FILE, LOCK_FILE = "run.json", ".lock"
IDENTITY_FORMAT = "nemo_rl_fp16.run/1"
#: entries a run folder may hold before its run.json exists (written by the lock and the launcher)
_OURS_BEFORE_RUN = {LOCK_FILE, "launch"}
#: keys (and key prefixes) that are not part of a run's identity: where and how often to write,
#: how long to train, on which machines. Everything else is.
NOT_IDENTITY = (
    "recipe", "output_dir", "device", "logging", "cluster", "mismatch",
    "trainer.max_steps", "trainer.save_every", "trainer.log_every", "trainer.resume", "trainer.keep_last",
    "trainer.eval_every", "trainer.headroom_every", "trainer.export_hf",
    "warm_start.cache_dir", "rollout.gpu_memory_utilization", "rollout.enforce_eager",
    "policy.activation_checkpointing",
)


class RunError(ConfigError):
    """The run folder cannot be used as asked (another run's folder, locked, not a folder); exit 2."""


# --------------------------------------------------------------------------------- identity


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _is_identity_key(key: str) -> bool:
    return not any(key == p or key.startswith(p + ".") for p in NOT_IDENTITY)


def run_identity(cfg: dict) -> dict:
    """The identity of a resolved recipe: every key except those in `NOT_IDENTITY`, fingerprinted.

    Args:
        cfg: the resolved recipe as plain python (`OmegaConf.to_container(cfg, resolve=True)`).

    Returns:
        {"format": `IDENTITY_FORMAT`, "fingerprint": sha256 hex of the sorted keys as JSON,
        "keys": {dotted key: value}} (empty sections appear as {}).
    """
    keys = {k: v for k, v in sorted(_flatten(cfg).items()) if _is_identity_key(k)}
    blob = json.dumps(keys, sort_keys=True, default=str).encode()
    return {"format": IDENTITY_FORMAT, "fingerprint": hashlib.sha256(blob).hexdigest(), "keys": keys}


def identity_diff(old: dict, new: dict) -> list[str]:
    """The identity keys on which two runs differ.

    Args:
        old: the identity in the folder or checkpoint (`run_identity` layout).
        new: this run's identity.

    Returns:
        "key: <old value> -> <new value>" for every differing key, sorted by key; a key missing
        on one side shows as <unset>. Empty when the keys agree.
    """
    a, b = old.get("keys", {}), new.get("keys", {})
    unset = "<unset>"
    return [f"{k}: {a.get(k, unset)!r} -> {b.get(k, unset)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, unset) != b.get(k, unset)]


def _differs_message(what: str, diff: list[str], out: Path) -> str:
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    return (f"{what} is another run: {len(diff)} training key(s) differ ({shown}); "
            f"use another output_dir (e.g. output_dir={out}_2), or trainer.resume=never to start afresh "
            f"(the old run is moved aside, not deleted)")


# --------------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """One run per folder: `<out>/.lock`, held with flock and naming its holder (pid, host, start).

    The kernel drops a flock when its process dies (also on kill -9), so a lock left by a dead
    run is detected and taken over; the pid/host record gives the second run a message naming the
    holder, and covers filesystems whose flock is not shared between hosts. Use as a context
    manager (`acquire` on enter, `release` on exit).

    Args:
        out: the run's `output_dir` (must exist; see `check_output_dir`).
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None
        self.took_over: dict | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        """Take the lock (non-blocking) and write this process's record into it.

        A lock whose holder is dead (same host, pid gone or reused) is taken over; `took_over`
        then holds the old record.

        Returns:
            self.

        Raises:
            RunError: another live run holds the folder, a holder on another host, the folder is
                not writable, or the lock file keeps changing (one line each).
        """
        host = socket.gethostname()
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # the first write into the folder: read-only, no permission, ...
                raise RunError(f"output_dir={self.path.parent} is not writable ({e.strerror}); "
                               "pass a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                h = self._holder()
                raise RunError(
                    f"output_dir {self.path.parent} is in use by another run (pid {h.get('pid', '?')} on host "
                    f"{h.get('host', '?')}, since {h.get('started', '?')}); wait for it to end or use another output_dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and flock: retry
                os.close(fd)
                continue
            h = self._holder()
            if h.get("pid") and h["pid"] != os.getpid():
                if h.get("host") != host:
                    os.close(fd)
                    raise RunError(
                        f"output_dir {self.path.parent} is locked by pid {h['pid']} on host {h.get('host')} "
                        f"(since {h.get('started')}); if that run is gone, delete {self.path} and rerun"
                    )
                if _pid_alive(int(h["pid"])) and _same_process(h):
                    os.close(fd)
                    raise RunError(
                        f"output_dir {self.path.parent} is in use by another run (pid {h['pid']} on host {host}, "
                        f"since {h.get('started')}); wait for it to end or use another output_dir"
                    )
                self.took_over = h  # stale: its process is gone
            record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "proc_start": _proc_start(os.getpid())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunError(f"cannot take the lock {self.path}: it keeps changing; is another run starting there?")

    def release(self) -> None:
        """Delete the lock file and drop the flock; a no-op when not held."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _proc_start(pid: int) -> str | None:
    """Start time of a process (Linux /proc), so a reused pid is not mistaken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _same_process(holder: dict) -> bool:
    start = holder.get("proc_start")
    return start is None or _proc_start(int(holder["pid"])) in (None, start)


# --------------------------------------------------------------------------------- folder


def check_output_dir(out: Path) -> None:
    """Check that `output_dir` is a folder or can be made one.

    Writes nothing but the folder itself (whether it is writable shows when `RunLock` creates
    its file).

    Args:
        out: the run's `output_dir`.

    Raises:
        RunError: a file is in the way, or the folder cannot be created (one line).
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"output_dir={out} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"output_dir={out} cannot be created ({e.strerror}); pass a writable folder") from None


def read_identity(out: Path) -> dict | None:
    """The run identity `<out>/run.json` (training keys and format version).

    Args:
        out: the run's `output_dir`.

    Returns:
        The record as `run_identity` wrote it, or None when there is no run.json.

    Raises:
        RunError: the file exists but is unreadable or not a run identity.
    """
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != IDENTITY_FORMAT or "keys" not in record:
            raise ValueError("not a run identity")
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}); this folder's run cannot be identified; "
                       "use another output_dir") from None
    return record


def _foreign_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in _OURS_BEFORE_RUN)


def move_aside(out: Path) -> Path:
    """Move every entry of `out` into a new sibling `<out>.prev-<time>`.

    The lock and `launch/` (the launcher's script and job logs, which a running job may be
    writing) stay. `run.json` goes first, so a kill half-way leaves a folder that is refused,
    never resumed.

    Args:
        out: the run's `output_dir`.

    Returns:
        The new folder, `<out>.prev-<YYYYmmdd-HHMMSS>` (with `-<n>` appended if that exists).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.parent / f"{out.name}.prev-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = out.parent / f"{out.name}.prev-{stamp}-{n}"
    aside.mkdir()
    entries = sorted(out.iterdir(), key=lambda p: p.name != RUN_FILE)
    for p in entries:
        if p.name not in _OURS_BEFORE_RUN:
            os.replace(p, aside / p.name)
    return aside


@dataclass
class RunStart:
    """What `prepare_run_dir` decided: the checkpoint to resume from, the old run moved aside."""

    identity: dict
    resume_from: Path | None = None
    moved_aside: Path | None = None
    recovered: list[str] | None = None


def _checkpoint_identity(path: Path) -> dict | None:
    try:
        record = json.loads((path / ckpt.META_FILE).read_text())
    except (OSError, ValueError):
        return None
    run = record.get("meta", {}).get("run")
    return run if isinstance(run, dict) and "keys" in run else None


def prepare_run_dir(out: Path, resume: str, identity: dict) -> RunStart:
    """Decide how this run uses `out` (see module doc); the caller holds `RunLock(out)`.

    Nothing in `out` is changed before every check passed; then stale temp folders are cleaned,
    an interrupted re-save is finished, checkpoints newer than an explicit resume step of this
    run are moved to `checkpoints/superseded-<time>`, and `run.json` is written (when absent).

    Args:
        out: the run's `output_dir` (an existing folder).
        resume: `trainer.resume`: "auto", "never" or a `step_NNNNNN` checkpoint folder.
        identity: this run's `run_identity`.

    Returns:
        The decision: `resume_from` (verified checkpoint or None), `moved_aside` (where an old run
        went under `never`), `recovered` (what the cleanup did).

    Raises:
        RunError: another run's folder, a foreign folder, an unreadable run.json, a missing
            explicit checkpoint folder, or an explicit checkpoint of another run (or one without
            a run identity).
        CheckpointError: the checkpoint to resume from is corrupt (naming the intact older one).
    """
    start = RunStart(identity)
    root = out / "checkpoints"
    old = read_identity(out)
    if old is None and _foreign_entries(out):
        raise RunError(
            f"output_dir={out} is not empty ({', '.join(_foreign_entries(out)[:5])}) and is not a run folder "
            f"(no {RUN_FILE}); nothing was touched; use another (new or empty) output_dir"
        )
    if resume == "never":
        if old is not None:
            start.moved_aside = move_aside(out)
            old = None
    elif old is not None and old["fingerprint"] != identity["fingerprint"]:
        diff = identity_diff(old, identity)
        if diff:
            raise RunError(_differs_message(f"output_dir={out}", diff, out))
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not path.is_dir():
            raise RunError(f"trainer.resume={resume}: no such checkpoint folder; use auto, never or a step_NNNNNN dir")
        ckpt.verify_checkpoint(path)
        theirs = _checkpoint_identity(path)
        if theirs is None:
            raise RunError(f"trainer.resume={resume} holds no run identity (written by an older version); "
                           "it cannot be checked against this config, so it is not resumed")
        diff = identity_diff(theirs, identity)
        if diff:
            raise RunError(_differs_message(f"checkpoint {path}", diff, out))
        start.resume_from = path
    elif resume == "auto" and old is not None:
        start.resume_from = ckpt.find_resume_checkpoint(root)
    # every check passed: now the folder may change
    start.recovered = ckpt.clean_stale(root) if root.is_dir() else []
    if start.resume_from is not None and start.resume_from.parent.resolve() == root.resolve():
        # explicit resume from an older step of this run: newer steps belong to an abandoned future
        step = int(start.resume_from.name.split("_")[-1])
        newer = [d for d in ckpt.step_dirs(root) if int(d.name.split("_")[-1]) > step]
        if newer:
            dest = root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.mkdir()
            for d in newer:
                os.replace(d, dest / d.name)
            start.recovered.append(f"moved newer checkpoints {', '.join(d.name for d in newer)} to {dest}")
    if old is None:
        atomic_write(out / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True, default=str))
    return start


def storage_error_message(exc: BaseException, out: Path, last: Path | None) -> str | None:
    """One line for a full / read-only disk hit mid-run, naming the last intact checkpoint.

    Args:
        exc: the exception the run stopped with.
        out: the run's `output_dir`.
        last: the last intact checkpoint, if any.

    Returns:
        The message, or None when `exc` is not a storage error.
    """
    code = getattr(exc, "errno", None)
    text = str(exc)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text
    ro = code == errno.EROFS or "Read-only file system" in text
    if isinstance(exc, ckpt.StorageError):
        full = True
    if not (full or ro):
        return None
    where = ckpt.mount_point(out)
    what = f"no space left on {where}" if full else f"{where} is read-only"
    step = f"last checkpoint step {int(last.name.split('_')[-1])} intact ({last})" if last else "no checkpoint yet"
    fname = getattr(exc, "filename", None) or getattr(exc, "path", None)
    at = f" writing {fname}" if fname else ""
    return (f"{what}{at}; {step}; free space (or fix the folder) and rerun the same command: "
            f"trainer.resume=auto continues from the last checkpoint")


def check_model_folders(model_name_or_path: str | None, tokenizer: str | None) -> None:
    """`model.name_or_path` / `model.tokenizer` must be local HF folders (no hub downloads).

    Part of the validation stage (`plan.environment_problems`), so the dry run checks it too.

    Args:
        model_name_or_path: `model.name_or_path` (None: a `model.config` model, not checked).
        tokenizer: `model.tokenizer` (None: the tokenizer is read from `model_name_or_path`).

    Raises:
        RunError: a folder is missing, has no config.json, or holds no tokenizer file
            (tokenizer.json, tokenizer_config.json, tokenizer.model or vocab.json); one line.
    """
    if model_name_or_path is not None:
        p = Path(model_name_or_path)
        if not p.is_dir():
            raise RunError(f"model.name_or_path={p} is not a folder; pass a local HF model folder "
                           "(config.json + weights, as written by save_pretrained); no hub downloads here")
        if not (p / "config.json").is_file():
            raise RunError(f"model.name_or_path={p} is not an HF model folder (no config.json); pass a folder "
                           "written by save_pretrained")
    tok = Path(tokenizer) if tokenizer is not None else (Path(model_name_or_path) if model_name_or_path else None)
    if tok is not None:
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not tok.is_dir() or not any((tok / n).is_file() for n in names):
            key = "model.tokenizer" if tokenizer is not None else "model.name_or_path"
            raise RunError(f"{key}={tok} holds no tokenizer (none of {', '.join(names)}); pass a folder "
                           "with the tokenizer files (save_pretrained of the tokenizer)")
