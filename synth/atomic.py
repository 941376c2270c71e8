"""Atomic, durable file writes: a crash leaves the old file or the new one, never half of one.

The project's one way to write a file that others read (ledgers, checkpoints, reports,
keys, masks). It lives in `synth`, the package every other one already imports.
A save killed before its rename leaves only a temp file beside the target;
`clean_stale_temp_files` removes those once their writer is gone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o600
STALE_AFTER_S = 60.0        # a temp file untouched this long, and unlocked, has no writer left
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")   # what tempfile.mkstemp puts between prefix and suffix


def default_mode() -> int:
    """The mode open() gives a new file now: 0666 less the process umask.

    Read from /proc (Linux) so the process umask is never changed, not even for an
    instant another thread could create a file in; elsewhere, os.umask set and restored.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


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


def _temp_suffix(path: Path) -> str:
    return "".join(path.suffixes) or ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a file name (nibabel,
    SimpleITK, safetensors, savefig); on success it is fsynced, given `mode` (default:
    what open() would give) and renamed over `path`, on failure removed.

    The temp file keeps the target's suffixes (writers pick the format from them) and
    starts at 0600, so a private key is never readable by others, even for an instant.
    It stays flock'ed until renamed or removed: the lock is how `clean_stale_temp_files`
    tells a live writer from a killed one (the kernel drops it however a process dies).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_temp_suffix(path), dir=path.parent)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield Path(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, default_mode() if mode is None else mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def is_atomic_temp_name(name: str) -> bool:
    """True for the names `atomic_path` gives its temp files: `.<target>.<8 random><suffixes>`."""
    if not name.startswith("."):
        return False
    body = name[1:]
    for i, char in enumerate(body):
        if char != "." or i == 0:
            continue
        target, rest = body[:i], body[i + 1:]
        if _RANDOM_PART.fullmatch(rest[:8]) and rest[8:] == _temp_suffix(Path(target)):
            return True
    return False


def _remove_if_abandoned(path: Path, min_age_s: float, now: float) -> bool:
    """Unlink `path` if it is a regular file, old enough, and no process holds its lock."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age_s:
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:      # a live writer holds it
            return False
        if os.fstat(fd).st_ino != os.lstat(path).st_ino:   # replaced meanwhile: not the file we judged
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_stale_temp_files(folder: str | os.PathLike, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove, under `folder`, the temp files of atomic saves whose writer was killed.

    Safe to run while other processes save into `folder`: a file is removed only when its
    name is one `atomic_path` makes, it is a regular file, no process holds its lock (a
    writer holds it until its rename), and it was not modified for `min_age_s` (covering
    the instant between creating a temp file and locking it, and writers that recreate
    the file under the same name). Process ids are not used: they are reused, and mean
    nothing to another host sharing the folder. Without flock nothing is removed.
    """
    root = Path(folder)
    if fcntl is None or not root.is_dir():
        return []
    removed, now = [], time.time()
    for here, _dirs, files in os.walk(root):
        for name in files:
            path = Path(here) / name
            if is_atomic_temp_name(name) and _remove_if_abandoned(path, min_age_s, now):
                log.warning("removed %s, left by a save that was interrupted", path)
                removed.append(path)
    return removed


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
