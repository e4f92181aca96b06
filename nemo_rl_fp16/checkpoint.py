"""Atomic checkpoints: save, find the latest complete one, verify and load (HF export: `hf_export.py`).

A multi-day RL run is killed at arbitrary moments (preemption, OOM, Slurm time limit), so a
checkpoint is either complete or invisible: files are written into `<root>/.tmp_step_<N>_<pid>`,
`meta.json` (sizes + sha256 of every file) is written last as the completeness marker, and the
directory is renamed to `<root>/step_<N:06d>` in one step. Loading re-verifies the checksums and
never returns partial data; resuming must reproduce the run, so the RNG states travel too
(`runtime.capture_rng`). Disk-full detection and file checksums: `fsutil.py`.
Re-saving an existing step swaps the old folder out (`.old_step_*`) before the new one is renamed
in; `clean_stale` (run at start, under the run lock) finishes such a swap if a kill interrupted
it and removes stale temp folders. A weight that is NaN/inf is never written (`NonFiniteError`),
and a full disk is reported as such (`StorageError`).

Layout of a step directory:
    model.safetensors   fp32 master weights (safetensors: no pickle, mmap-able)
    trainer_state.pt    {"trainer_state", "rng", "data_state"} via torch.save; loads with
                        torch.load(weights_only=True) (tensors, containers, python scalars)
    meta.json           {"format", "step", "files": {name: {"bytes", "sha256"}}, "meta"}
    dist/               instead of model.safetensors, for a policy with `save_sharded`
                        (interfaces.ShardedCheckpointing: the megatron backend's megatron-core
                        distributed checkpoint of model, optimizer, loss scale and RNG); every
                        file under it is listed in meta.json ("dist/<file>") like the others
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nemo_rl_fp16.fsutil import StorageError, is_disk_full, mount_point, sha256_file
from nemo_rl_fp16.guards import check_weights

FORMAT = "nemo_rl_fp16.checkpoint/1"
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "trainer_state.pt", "meta.json"
SHARDED_DIR = "dist"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.tmp_step_(\d+)_\d+$")
_OLD_RE = re.compile(r"^\.old_step_(\d+)_\d+$")
# what torch.load(weights_only=True) accepts (checked at save time, not discovered at resume)
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.Size, torch.device)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and the fix."""


def _check_serialisable(obj, where: str) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_serialisable(k, f"{where} key {k!r}")
            _check_serialisable(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_serialisable(v, f"{where}[{i}]")
    elif not isinstance(obj, _LEAVES):
        raise CheckpointError(
            f"cannot checkpoint {where}: {type(obj).__name__} does not load with torch.load(weights_only=True); "
            "convert it to a tensor, list or python scalar"
        )


def _safetensors_ready(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses aliased tensors, e.g. tied heads)."""
    out, seen = {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"cannot checkpoint model_state[{k!r}]: {type(v).__name__} is not a tensor")
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def fsync_file(path: Path) -> None:
    """Flush a file or directory to disk so a crash after rename cannot expose empty files.

    Best effort: a path that cannot be opened, or a filesystem that refuses fsync (some do on
    directories), is skipped silently.

    Args:
        path: the file or directory to fsync.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`; an existing `dst` is swapped out first, then deleted.

    A kill between the two renames leaves `.old_<dst>_<pid>` and the complete `src`; `clean_stale`
    finishes the swap at the next start, so the step is never lost. Both must be on one filesystem
    (`os.replace`); its `OSError` propagates.

    Args:
        src: the complete new folder (a `.tmp_step_*` folder).
        dst: the final name (`step_NNNNNN`); replaced if it exists.
    """
    if dst.exists():
        old = dst.parent / f".old_{dst.name}_{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_file(dst.parent)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor] | None,
    trainer_state: dict,
    rng: dict,
    data_state: dict,
    meta: dict | None = None,
    keep_last: int | None = 2,
    weights_dtype: torch.dtype | None = None,
    sharded: Callable[[Path], None] | None = None,
) -> Path:
    """Write `<root>/step_<N:06d>` atomically and prune to the newest `keep_last`.

    Layout and completeness marker: see the module docstring.

    Args:
        root: the checkpoint root (`checkpointing.dir`); created if missing.
        step: the RL step the state belongs to (the folder name's number).
        model_state: name -> tensor, the fp32 master weights (any device; copied to CPU,
            contiguous, tied/aliased tensors de-duplicated), saved as safetensors.
        trainer_state: the engine/loop state (optimizer, loss scaler, step counters); it must load
            with `torch.load(weights_only=True)`: tensors, containers, python scalars.
        rng: RNG states from `capture_rng`.
        data_state: the data order state (same restriction as `trainer_state`).
        meta: JSON-serialisable extras (recipe name, config, metrics) stored in meta.json.
        keep_last: after saving, delete all but the newest `keep_last` complete step dirs (never the
            one just written); None or 0 keeps all.
        weights_dtype: the dtype the weights are used in (e.g. float16); values beyond its finite
            range count as non-finite. None: only NaN/inf are refused.
        sharded: writes a distributed checkpoint into the (empty) folder it is given (the policy's
            `save_sharded`); it is called on `<tmp>/dist` before meta.json, and `model_state` is
            then None (no model.safetensors). The writer checks its own weights for NaN/inf.

    Returns:
        The final step directory `<root>/step_<N:06d>`.

    Raises:
        NonFiniteError: a weight of `model_state` is NaN/inf (or beyond `weights_dtype`'s range);
            nothing is written.
        StorageError: the disk filled up while writing; the partial step folder is removed.
        CheckpointError: state that `torch.load(weights_only=True)` could not read back, a
            non-tensor in `model_state`, or a `meta` that is not JSON-serialisable.
    """
    root = Path(root)
    if (model_state is None) == (sharded is None):
        raise CheckpointError("save_checkpoint needs exactly one of model_state and sharded")
    if model_state is not None:
        check_weights(model_state, "checkpoint", step, weights_dtype)
    root.mkdir(parents=True, exist_ok=True)
    bundle = {"trainer_state": trainer_state, "rng": rng, "data_state": data_state}
    _check_serialisable(bundle, "checkpoint")
    tensors = None if model_state is None else _safetensors_ready(model_state)
    try:
        meta_json = json.loads(json.dumps(meta or {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot checkpoint meta: not JSON-serialisable ({e}); pass plain python values"
        ) from None
    tmp = root / f".tmp_step_{step}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        names = [STATE_FILE]
        if tensors is not None:
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
            names.append(MODEL_FILE)
        else:
            (tmp / SHARDED_DIR).mkdir()
            sharded(tmp / SHARDED_DIR)
            names += sorted(str(f.relative_to(tmp)) for f in (tmp / SHARDED_DIR).rglob("*") if f.is_file())
            fsync_file(tmp / SHARDED_DIR)
        torch.save(bundle, tmp / STATE_FILE)
        files = {}
        for name in names:
            fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        record = {"format": FORMAT, "step": int(step), "time": time.time(), "files": files, "meta": meta_json}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        fsync_file(tmp / META_FILE)
        fsync_file(tmp)
        final = root / f"step_{step:06d}"
        replace_dir(tmp, final)
    except BaseException as e:
        # judged before the partial folder is removed (that frees the space again)
        full = isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CheckpointError) and is_disk_full(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise StorageError(errno.ENOSPC, f"no space left on {mount_point(root)} while writing checkpoint "
                               f"step {step}", str(tmp)) from None
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _read_meta(path: Path) -> dict:
    """Parse and sanity-check meta.json; CheckpointError (one line) otherwise."""
    mpath = path / META_FILE
    if not mpath.is_file():
        raise CheckpointError(
            f"{mpath} is missing: {path} is not a complete checkpoint; pass a complete step_NNNNNN dir"
        )
    try:
        record = json.loads(mpath.read_text())
        files = record["files"]
        int(record["step"])
        if not all(
            isinstance(files[n]["bytes"], int) and isinstance(files[n]["sha256"], str)
            for n in ((STATE_FILE,) if any(f.startswith(SHARDED_DIR + "/") for f in files) else (MODEL_FILE, STATE_FILE))
        ):
            raise ValueError("bad file entry")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{mpath} is unreadable ({type(e).__name__}: {e}): the checkpoint is corrupt; delete it or resume from an older step dir"
        ) from None
    return record


def _check_files(path: Path, record: dict, checksums: bool) -> None:
    for name, info in record["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(
                f"{f} is missing: the checkpoint is incomplete; delete it or pass trainer.resume=<older step dir>"
            )
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"size mismatch in {f} ({size} bytes, meta.json says {info['bytes']}): the checkpoint is corrupt; delete it or pass trainer.resume=<older step dir>"
            )
        if checksums and sha256_file(f) != info["sha256"]:
            raise CheckpointError(
                f"checksum mismatch in {f}: the checkpoint is corrupt; delete it or pass trainer.resume=<older step dir>"
            )


def _is_complete(path: Path) -> bool:
    """Cheap completeness test (meta.json present and sizes match); checksums are load's job."""
    try:
        _check_files(path, _read_meta(path), checksums=False)
        return True
    except CheckpointError:
        return False


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete `step_*` dirs under `root`, oldest first (temp and incomplete dirs skipped).

    Completeness is the cheap test (meta.json parses, every listed file exists with its recorded
    size); checksums are verified by `verify_checkpoint` / `load_checkpoint`.

    Args:
        root: the checkpoint root; a missing folder gives an empty list.

    Returns:
        The complete step directories, sorted by step number.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and _is_complete(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Every `step_*` dir under `root`, complete or not, oldest first.

    Args:
        root: the checkpoint root; a missing folder gives an empty list.

    Returns:
        The step directories, sorted by step number.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_RE.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found)]


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Full check of a step dir (meta.json, sizes, sha256) without loading it.

    Args:
        path: a `step_NNNNNN` directory.

    Returns:
        The parsed meta.json record: {"format", "step", "time", "files", "meta"}.

    Raises:
        CheckpointError: meta.json is missing or unreadable, or a file is missing, has the wrong
            size or the wrong sha256; the message names the file and the fix.
    """
    path = Path(path)
    record = _read_meta(path)
    _check_files(path, record, checksums=True)
    return record


def _reason(e: CheckpointError) -> str:
    return str(e).split(": the checkpoint is", 1)[0].split("; delete it", 1)[0].split("; pass a complete", 1)[0]


def find_resume_checkpoint(root: str | os.PathLike) -> Path | None:
    """The latest step dir under `root`, fully verified (for `trainer.resume=auto`).

    A corrupt or incomplete latest step is never skipped silently.

    Args:
        root: the checkpoint root.

    Returns:
        The newest `step_*` directory when it verifies; None when there is no `step_*` directory.

    Raises:
        CheckpointError: the newest step dir fails `verify_checkpoint`; the message names what is
            wrong, the newest intact older step (if any) and how to resume from it.
    """
    dirs = step_dirs(root)
    if not dirs:
        return None
    latest = dirs[-1]
    try:
        verify_checkpoint(latest)
        return latest
    except CheckpointError as e:
        bad = _reason(e)
    for older in reversed(dirs[:-1]):
        try:
            verify_checkpoint(older)
        except CheckpointError:
            continue
        raise CheckpointError(
            f"latest checkpoint {latest} is corrupt ({bad}); {older.name} is intact: move {latest} out of "
            f"{Path(root)} and rerun (trainer.resume=auto then continues from it), or pass trainer.resume={older}"
        )
    raise CheckpointError(
        f"latest checkpoint {latest} is corrupt ({bad}) and no older checkpoint is intact; "
        "start afresh with trainer.resume=never (moves this run aside)"
    )


def clean_stale(root: str | os.PathLike) -> list[str]:
    """Finish interrupted saves under `root` (call it holding the run lock).

    `.old_step_N_*` without `step_N` (killed between the two renames of a re-save): the complete
    new `.tmp_step_N_*` is renamed in, else the old folder is put back. Every other `.tmp_step_*`
    and `.old_step_*` is a leftover of a killed save and is removed.

    Args:
        root: an existing checkpoint root (a missing one raises `FileNotFoundError`).

    Returns:
        One line per action taken, e.g. "removed stale .tmp_step_3_1234"; empty when nothing was
        stale.
    """
    root = Path(root)
    done: list[str] = []
    entries = list(root.iterdir())
    for old in (p for p in entries if _OLD_RE.match(p.name)):
        step = int(_OLD_RE.match(old.name).group(1))
        final = root / f"step_{step:06d}"
        if final.exists():
            continue
        tmps = [p for p in entries if (m := _TMP_RE.match(p.name)) and int(m.group(1)) == step and p.exists()]
        good = next((t for t in tmps if _verifies(t)), None)
        os.replace(good or old, final)
        done.append(f"finished the interrupted re-save of {final.name}"
                    + ("" if good else " (kept the previous version)"))
    for p in root.iterdir():
        if _TMP_RE.match(p.name) or _OLD_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed stale {p.name}")
    fsync_file(root)
    return done


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The highest complete step dir under `root` (cheap completeness test, no checksums).

    Args:
        root: the checkpoint root.

    Returns:
        The newest complete step directory, or None when there is none.
    """
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """Verify and load a step dir; never returns partial data.

    Args:
        path: a `step_NNNNNN` directory (not the checkpoint root).
        verify: also compare every file's sha256 with meta.json (sizes are always checked).

    Returns:
        {"step": int, "model_state": name -> CPU tensor (dtype as saved, fp32 master weights; None
        for a sharded checkpoint), "trainer_state", "rng", "data_state" (as passed to
        `save_checkpoint`), "meta": dict, "path": Path, "sharded_dir": the verified `dist/` folder
        to pass to the policy's `load_sharded`, or None}.

    Raises:
        CheckpointError: `path` is missing, is a checkpoint root, or its meta.json / files are
            missing, truncated, corrupt or unreadable; the message names the file and the fix.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a directory; pass a step_NNNNNN checkpoint dir")
    if not (path / META_FILE).exists() and list_checkpoints(path):
        raise CheckpointError(f"{path} is a checkpoint root, not a step dir; pass e.g. {latest_checkpoint(path)}")
    record = _read_meta(path)
    _check_files(path, record, checksums=verify)
    sharded = any(f.startswith(SHARDED_DIR + "/") for f in record["files"])
    try:
        model_state = None if sharded else load_file(str(path / MODEL_FILE))
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path / MODEL_FILE} ({type(e).__name__}: {e}); the checkpoint is corrupt; delete it or pass trainer.resume=<older step dir>"
        ) from None
    try:
        bundle = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        parts = bundle["trainer_state"], bundle["rng"], bundle["data_state"]
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot read {path / STATE_FILE} ({type(e).__name__}: {msg}); the checkpoint is corrupt; delete it or pass trainer.resume=<older step dir>"
        ) from None
    return {
        "step": int(record["step"]),
        "model_state": model_state,
        "trainer_state": parts[0],
        "rng": parts[1],
        "data_state": parts[2],
        "meta": record.get("meta", {}),
        "path": path,
        "sharded_dir": path / SHARDED_DIR if sharded else None,
    }
