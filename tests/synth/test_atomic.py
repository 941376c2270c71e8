"""synth.atomic: the project's one way to write a file others read."""
from __future__ import annotations

import os
import signal
import stat
import tempfile
import time
from pathlib import Path

import pytest

from synth.atomic import PRIVATE_MODE, append_durable, atomic_path, clean_stale_temp_files, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_modes_and_suffixes(tmp_path):
    key, mask = tmp_path / "keys" / "site.key", tmp_path / "mask.nii.gz"
    write_atomic(key, b"secret", PRIVATE_MODE)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with atomic_path(mask) as tmp:
        assert tmp.name.endswith(".nii.gz")      # writers pick the format from the suffix
        tmp.write_bytes(b"x")
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE(os.stat(mask).st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_a_file_gets_the_umask_in_force_when_it_is_written(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("{}")
        assert os.umask(0o027) == 0o027          # writing did not change the process umask
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "report.json").st_mode) == 0o640


def test_append_durable_appends(tmp_path):
    log = tmp_path / "audit.jsonl"
    append_durable(log, b"a\n")
    append_durable(log, b"b\n")
    assert log.read_bytes() == b"a\nb\n"


_SAVER = """
import sys, time
from synth.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half of a checkpoint")
    print(tmp, flush=True)
    time.sleep(120)
"""


def _start_saver(target):
    """A process in the middle of an atomic save (written, not yet renamed); returns it and its temp file."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    return proc, Path(proc.stdout.readline().strip())


def test_a_save_killed_by_sigkill_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    target = tmp_path / "privacy" / "ledger-site.json"
    write_atomic(target, "the old ledger")
    proc, tmp = _start_saver(target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.exists() and tmp.parent == target.parent       # what a killed save leaves behind
    assert clean_stale_temp_files(tmp_path, min_age_s=0) == [tmp]
    assert sorted(p.name for p in target.parent.iterdir()) == ["ledger-site.json"]
    assert target.read_text() == "the old ledger"


def test_a_live_writers_temp_file_is_kept_however_old(tmp_path):
    target = tmp_path / "cache" / "case-1.safetensors"
    proc, tmp = _start_saver(target)
    try:
        os.utime(tmp, (time.time() - 7200, time.time() - 7200))
        assert clean_stale_temp_files(tmp_path, min_age_s=0) == []
        assert tmp.exists()
    finally:
        proc.kill()
        proc.wait()
    assert clean_stale_temp_files(tmp_path, min_age_s=0) == [tmp]


def test_only_old_unlocked_atomic_temp_files_are_removed(tmp_path):
    """A leftover from before temp files were locked is removed once old; nothing else is touched."""
    old = time.time() - 3600
    fd, leftover = tempfile.mkstemp(prefix=".report.json.", suffix=".json", dir=tmp_path)
    os.close(fd)
    fd, fresh = tempfile.mkstemp(prefix=".mask.nii.gz.", suffix=".nii.gz", dir=tmp_path)
    os.close(fd)
    keep = [tmp_path / n for n in (".noise-secret.4242", ".hidden", "report.json", ".report.json.abc.json",
                                   ".report.json.abcdefgh.txt")]
    for path in keep:
        path.write_text("x")
    (tmp_path / ".cache.json.abcdefgh.json").mkdir()          # the right name, but a folder
    for path in [Path(leftover), *keep]:
        os.utime(path, (old, old))
    assert clean_stale_temp_files(tmp_path) == [Path(leftover)]
    assert Path(fresh).exists() and all(p.exists() for p in keep)
    assert (tmp_path / ".cache.json.abcdefgh.json").is_dir()
