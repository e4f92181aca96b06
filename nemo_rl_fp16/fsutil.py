"""Atomic file writes: a crash never leaves a half-written config, report or cache file.

Write to a temp file in the target's folder, fsync, then `os.replace` (atomic on POSIX within a
filesystem). Checkpoints, which are folders of several files, do the same at folder level in
`checkpoint.py`.
"""

from __future__ import annotations

import os
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
