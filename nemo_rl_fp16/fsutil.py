"""Atomic file writes: a crash never leaves a half-written config, report or cache file.

Write to a temp file in the target's folder, fsync, then `os.replace` (atomic on POSIX within a
filesystem). Checkpoints and HF exports, which are folders of several files, do the same at folder
level (`checkpoint.fsync_file`, `checkpoint.replace_dir`). A write that fails on a full disk is told
apart (`is_disk_full`, `StorageError`, `mount_point` for the message); `sha256_file` checksums a file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any] | bytes | str) -> Path:
    """Write `path` atomically from bytes/str or a callback that writes to a binary file object.

    The data goes to a temp file in `path`'s folder (created if missing), is fsynced, then
    `os.replace`d onto `path`; on any error the temp file is removed and the error propagates.

    Args:
        path: the target file; replaced if it exists.
        write: the content (str is UTF-8 encoded) or a callable taking the open binary file.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode() if isinstance(write, str) else write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class StorageError(OSError):
    """The disk filled up (or went read-only) while writing; nothing partial was kept."""


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds `path`, for "no space left on ..." messages.

    Args:
        path: a file or folder; it need not exist yet (its nearest existing parent is used).

    Returns:
        The absolute path of the mount point (`os.path.ismount`) at or above `path`.
    """
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """Did `exc` come from a full disk?

    torch.save reports it as an `inline_container.cc` enforce fail ("unexpected pos"), so a write
    failure with under 64 MiB left counts as one.

    Args:
        exc: the exception a write raised.
        where: a folder on the filesystem written to (its free space is read).

    Returns:
        True for ENOSPC / EDQUOT, a "No space left" message, or under 64 MiB free at `where`.
    """
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        return shutil.disk_usage(where).free < (64 << 20)
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB chunks.

    Args:
        path: the file.

    Returns:
        The hex digest (64 characters).
    """
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
