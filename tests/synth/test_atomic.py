"""synth.atomic: the project's one way to write a file others read."""
from __future__ import annotations

import os
import stat

import pytest

from synth.atomic import DEFAULT_MODE, PRIVATE_MODE, append_durable, atomic_path, write_atomic


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
    assert stat.S_IMODE(os.stat(mask).st_mode) == DEFAULT_MODE


def test_append_durable_appends(tmp_path):
    log = tmp_path / "audit.jsonl"
    append_durable(log, b"a\n")
    append_durable(log, b"b\n")
    assert log.read_bytes() == b"a\nb\n"
