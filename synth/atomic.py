"""Atomic, durable file writes: a crash leaves the old file or the new one, never half of one.

The project's one way to write a file that others read (ledgers, checkpoints, reports,
keys, masks). It lives in `synth`, the package every other one already imports.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0o022)   # read once at import (os.umask is the only portable way), then restored
os.umask(_UMASK)
DEFAULT_MODE = 0o666 & ~_UMASK   # what open() would have given the file
PRIVATE_MODE = 0o600


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so that a rename or a new file in it survives power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a file name (nibabel,
    SimpleITK, safetensors, savefig); on success it is fsynced, given `mode` (default:
    what open() would give) and renamed over `path`, on failure removed.

    The temp file keeps the target's suffixes (writers pick the format from them) and
    starts at 0600, so a private key is never readable by others, even for an instant.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes) or ".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, DEFAULT_MODE if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int | None = None) -> None:
    """Write `data` (str as UTF-8) to `path` atomically and durably (see `atomic_path`)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def append_durable(path: str | os.PathLike, line: bytes) -> None:
    """Append one record to `path` (O_APPEND) and fsync it before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)
