"""Tamper evidence: the privacy ledger and the audit log vouch for each other.

Each charge is written twice: a "charged" record in the hash-chained audit log, and a
ledger entry that keeps that record's line hash (`LedgerEntry.audit_sha256`). So:
- a rolled-back, replaced or deleted ledger lacks charges the audit log has;
- a truncated audit log, or one rewritten with a fresh chain, lacks lines the ledger
  points to; an edited line breaks the chain itself;
- both files replaced together are caught only by a hash kept outside the site's state:
  `pasta-fed client audit` prints the chain's head, and `--expect HASH` checks that a
  head noted earlier is still in the chain.
Training and evaluation stop (`StateMismatch`) until the operator repairs: missing
charges are added back to the ledger (the budget never goes down), lost anchors are
acknowledged, and the repair itself is an audit record.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .audit import GENESIS, AuditLog, AuditRecord
from .ledger import SITE_KEY, LedgerEntry, PrivacyLedger, ledger_path, merge_history

log = logging.getLogger(__name__)

LOST = "lost:"          # prefix of an anchor the operator acknowledged as gone from the audit log


class StateMismatch(RuntimeError):
    """The ledger and the audit log disagree; nothing is released until the operator repairs it."""


@dataclass
class StateReport:
    audit_path: Path
    ledger_path: Path
    lines: int = 0
    head: str = GENESIS
    charges: int = 0
    ledger_entries: int = 0
    problems: list[str] = field(default_factory=list)
    missing_in_ledger: list[dict] = field(default_factory=list)   # charged records without a ledger entry
    lost_anchors: list[LedgerEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"ok": self.ok, "audit_log": str(self.audit_path), "ledger": str(self.ledger_path),
                "audit_lines": self.lines, "audit_head": self.head, "charges": self.charges,
                "ledger_entries": self.ledger_entries, "problems": self.problems}


def _chain(audit: AuditLog) -> tuple[list[dict], list[str], str | None]:
    """Records, line hashes, and the first break of the chain (None when intact)."""
    records: list[dict] = []
    hashes: list[str] = []
    prev = GENESIS
    if not audit.path.exists():
        return records, hashes, None
    for number, raw in enumerate(audit.path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            return records, hashes, f"{audit.path}: line {number} is not a complete record"
        if rec.get("prev") != prev:
            return records, hashes, (f"{audit.path}: line {number} does not follow the line before it "
                                     f"(a line was edited, inserted or removed)")
        prev = hashlib.sha256(raw).hexdigest()
        records.append(rec)
        hashes.append(prev)
    return records, hashes, None


def _charge_key(run_id, round, attempt, kind) -> tuple:
    return str(run_id), int(round), int(attempt), str(kind)


def inspect_state(state_dir: str | os.PathLike, expect: str | None = None) -> StateReport:
    """Compare a site's ledger with its audit log; every disagreement is a problem."""
    audit = AuditLog(state_dir)
    path = ledger_path(state_dir, SITE_KEY)
    report = StateReport(audit_path=audit.path, ledger_path=path)
    records, hashes, broken = _chain(audit)
    report.lines, report.head = len(hashes), hashes[-1] if hashes else GENESIS
    if broken:
        report.problems.append(broken)
    ledger = PrivacyLedger.load(path) if path.exists() else None
    entries = ledger.entries if ledger is not None else []
    report.ledger_entries = len(entries)
    charged = [r for r in records if r.get("status") == "charged"]
    report.charges = len(charged)
    in_ledger = {_charge_key(e.run_id, e.round, e.attempt, e.kind) for e in entries}
    for rec in charged:
        m = rec.get("metrics", {})
        if _charge_key(rec["run_id"], rec["round"], m.get("attempt", 0), m.get("kind", "train")) not in in_ledger:
            report.missing_in_ledger.append(rec)
    if report.missing_in_ledger:
        what = "is missing" if ledger is None else "lacks"
        report.problems.append(f"{path} {what} {len(report.missing_in_ledger)} charge(s) recorded in {audit.path} "
                               f"(the ledger was rolled back, replaced or deleted)")
    known = set(hashes)
    report.lost_anchors = [e for e in entries if e.audit_sha256 and not e.audit_sha256.startswith(LOST)
                           and e.audit_sha256 not in known]
    if report.lost_anchors:
        report.problems.append(f"{audit.path} lacks the charge records of {len(report.lost_anchors)} ledger "
                               f"entr(y/ies) (the audit log was truncated, rewritten or deleted)")
    if expect and expect not in known:
        report.problems.append(f"{audit.path}: the head {expect[:16]}... noted earlier is not in the chain "
                               f"(the log was replaced)")
    return report


def check_state(state_dir: str | os.PathLike) -> None:
    """Raise StateMismatch when the ledger and the audit log disagree (run before every release)."""
    ledger = PrivacyLedger.open(state_dir, SITE_KEY, audited=False)
    with ledger.locked():             # a charge in flight is written under this lock
        report = inspect_state(state_dir)
    if not report.ok:
        raise StateMismatch("; ".join(report.problems) + "; nothing is released until the operator runs "
                            "'pasta-fed client audit --repair' (see docs/privacy.md)")


def repair_state(state_dir: str | os.PathLike, site: str | None = None) -> StateReport:
    """Add missing charges back to the ledger, acknowledge lost anchors, and audit the repair.

    Never lowers the budget: a charge known to either file stays counted. A broken chain
    is kept as evidence (renamed `audit.jsonl.broken-<time>`) and a new chain starts with
    the repair record; the ledger's anchors into the old file are acknowledged as lost.
    """
    report = inspect_state(state_dir)
    ledger = PrivacyLedger.open(state_dir, SITE_KEY)
    with ledger.locked():
        ledger.reload()
        if any("does not follow" in p or "not a complete record" in p for p in report.problems):
            kept = report.audit_path.with_name(f"{report.audit_path.name}.broken-{int(time.time())}")
            os.replace(report.audit_path, kept)
            log.warning("%s: broken audit chain kept as %s; a new chain starts", report.audit_path, kept)
            report.lost_anchors = [e for e in ledger.entries if e.audit_sha256 and not e.audit_sha256.startswith(LOST)]
        for rec in report.missing_in_ledger:
            m = rec["metrics"]
            ledger.history = merge_history(ledger.history, m["noise-multiplier"], m["sample-rate"], int(m["steps"]))
            ledger.entries.append(LedgerEntry(
                run_id=rec["run_id"], round=rec["round"], attempt=int(m["attempt"]), task=m.get("task"),
                noise_multiplier=m["noise-multiplier"], sample_rate=m["sample-rate"], steps=int(m["steps"]),
                delta=m["delta"], epsilon_after=m["epsilon"], status="restored", time=rec["time"],
                kind=m.get("kind", "train"), backbone=m.get("backbone"), audit_sha256=None))
        lost = {e.audit_sha256 for e in report.lost_anchors}
        for entry in ledger.entries:
            if entry.audit_sha256 is not None and entry.audit_sha256 in lost:
                entry.audit_sha256 = LOST + entry.audit_sha256
        ledger._write()
    if ledger.audit is None:  # PrivacyLedger.open(..., audited=True) always attaches it
        raise RuntimeError(f"{state_dir}: the site ledger has no audit log to record the repair in")
    ledger.audit.append(AuditRecord.describe(
        run_id="operator", round=0, message_type="repair", arrays={}, status="repaired", site=site,
        reason="; ".join(report.problems) or "nothing to repair",
        metrics={"restored-charges": len(report.missing_in_ledger), "lost-anchors": len(report.lost_anchors)}))
    log.warning("%s: repaired: %d charge(s) restored into the ledger, %d lost anchor(s) acknowledged",
                state_dir, len(report.missing_in_ledger), len(report.lost_anchors))
    return report
