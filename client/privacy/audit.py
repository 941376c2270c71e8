"""Append-only audit log of everything a site sends (or refuses to send).

One JSON object per line in `state_dir/audit/audit.jsonl`: time, run, round, message
type, keys, shapes, dtypes, bytes, the SHA-256 of the payload, and the metrics. Each
append is fsync'ed before the reply leaves. Every line also carries `prev`, the
SHA-256 of the line before it, so a rewritten or deleted line breaks the chain
(`verify_chain`), and a hospital's auditor can recompute any payload's hash from the
arrays the coordinator received (`payload_sha256`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from synth.atomic import append_durable

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

log = logging.getLogger(__name__)

GENESIS = "0" * 64


def _as_numpy(value: Any) -> np.ndarray:
    try:
        import torch
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().contiguous().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.ascontiguousarray(np.asarray(value))


def payload_sha256(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over the arrays in sorted key order: name, dtype, shape, then the raw bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = _as_numpy(arrays[key])
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        header = json.dumps({"key": key, "dtype": arr.dtype.str, "shape": list(arr.shape)}, sort_keys=True)
        h.update(header.encode())
        h.update(b"\0")
        h.update(arr.tobytes(order="C"))
    return h.hexdigest()


def _clean_metric(value: Any):
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return repr(value)
    return f if math.isfinite(f) else str(f)


@dataclass
class AuditRecord:
    time: float
    run_id: str
    round: int
    message_type: str              # "train" | "evaluate" | ...
    status: str                    # "sent" | "refused"
    keys: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    bytes: int
    sha256: str
    metric_names: list[str]
    metrics: dict = field(default_factory=dict)
    reason: str | None = None
    site: str | None = None
    prev: str = GENESIS

    @classmethod
    def describe(cls, *, run_id: str, round: int, message_type: str, arrays: Mapping[str, Any],
                 metrics: Mapping[str, Any] | None = None, status: str = "sent", reason: str | None = None,
                 site: str | None = None) -> AuditRecord:
        keys = sorted(arrays)
        arrs = [_as_numpy(arrays[k]) for k in keys]
        metrics = dict(metrics or {})
        return cls(time=time.time(), run_id=str(run_id), round=int(round), message_type=message_type,
                   status=status, keys=keys, shapes=[list(a.shape) for a in arrs], dtypes=[a.dtype.name for a in arrs],
                   bytes=int(sum(a.nbytes for a in arrs)), sha256=payload_sha256(arrays),
                   metric_names=sorted(metrics), metrics={k: _clean_metric(v) for k, v in sorted(metrics.items())},
                   reason=reason, site=site)


class AuditLog:
    """The site's append-only log; `append` returns after the line is on disk."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / "audit" / "audit.jsonl"

    def _last_line_hash(self) -> str:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return GENESIS
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            block = b""
            pos = size
            while pos > 0 and block.count(b"\n") < 2:
                step = min(4096, pos)
                pos -= step
                fh.seek(pos)
                block = fh.read(step) + block
        lines = [ln for ln in block.split(b"\n") if ln]
        return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS

    def append(self, record: AuditRecord) -> AuditRecord:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            if fcntl is not None:  # one writer at a time keeps the hash chain intact
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            record.prev = self._last_line_hash()
            line = json.dumps(asdict(record), sort_keys=True, separators=(",", ":")).encode() + b"\n"
            if self._ends_torn():  # a crash mid-append left half a line: keep it on its own line
                line = b"\n" + line
            append_durable(self.path, line)
            self.last_sha256 = hashlib.sha256(line.strip(b"\n")).hexdigest()
        log.info("audit: %s %s round %s run %s: %d tensor(s), %d bytes, sha256 %s", record.status,
                 record.message_type, record.round, record.run_id, len(record.keys), record.bytes, record.sha256[:12])
        return record

    def append_charge(self, entry, entries_after: int) -> str:
        """Record a privacy charge (a ledger entry being reserved); returns the line's SHA-256.

        The mechanism's parameters are in the record, so the site's whole epsilon can be
        recomputed from the audit log alone, and the ledger keeps the returned hash.
        """
        record = AuditRecord.describe(
            run_id=entry.run_id, round=entry.round, message_type=f"charge:{entry.kind}", arrays={},
            status="charged", site=None,
            metrics={"attempt": entry.attempt, "noise-multiplier": entry.noise_multiplier,
                     "sample-rate": entry.sample_rate, "steps": entry.steps, "epsilon": entry.epsilon_after,
                     "delta": entry.delta, "ledger-entries": entries_after, "kind": entry.kind,
                     "task": entry.task, "backbone": entry.backbone})
        self.append(record)
        return self.last_sha256

    def line_hashes(self) -> list[str]:
        """SHA-256 of every non-empty line, in order (what `prev` and ledger anchors refer to)."""
        if not self.path.exists():
            return []
        return [hashlib.sha256(raw).hexdigest() for raw in self.path.read_bytes().splitlines() if raw.strip()]

    def _ends_torn(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"

    def read(self) -> list[dict]:
        """All complete records; a torn line (crash mid-append) is skipped with a warning."""
        if not self.path.exists():
            return []
        out = []
        for i, raw in enumerate(self.path.read_bytes().split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                log.warning("%s: line %d is not a complete record (torn write?); skipped", self.path, i)
        return out

    def verify_chain(self) -> bool:
        """True when no line was rewritten, inserted or removed since it was appended."""
        prev = GENESIS
        if not self.path.exists():
            return True
        for raw in self.path.read_bytes().splitlines():
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                return False
            if rec.get("prev") != prev:
                return False
            prev = hashlib.sha256(raw).hexdigest()
        return True
