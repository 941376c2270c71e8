"""The site's privacy ledger: one Opacus accountant for everything released from its patients.

Privacy loss adds up over every release that touches the same patients -- every
training step and every evaluation, of every task, backbone, run and attempt -- so the
accountant's history (noise multiplier, sample rate, steps) is persisted in
`state_dir/privacy/ledger-site.json` and restored into Opacus' own accountant class every
time (we never compute epsilon ourselves). A backbone is not a new set of patients:
ledgers of older versions, one per backbone (`ledger-bb-*.json`), are folded into the
site ledger when it is opened (`open_site`).

Every charge is also appended to the site's audit log (a "charge" record carrying the
mechanism's parameters) and the ledger entry keeps that record's line hash: the two
files vouch for each other (`client.privacy.tamper`).

A round goes through two durable writes:

1. `reserve(...)`: checks the budget (a round that would exceed it raises
   `BudgetExceeded` and is never trained), then writes the round's full cost into the
   history with status "reserved" *before* any training. A crash during training
   therefore leaves the cost counted: spent privacy is never forgotten.
2. `commit(reservation, accountant)`: after training, checks that the accountant the
   PrivacyEngine actually stepped ends exactly where the reservation said, and marks
   the entry "committed" -- before the reply leaves the site.

Idempotency: entries are keyed by (run_id, round, attempt). Recording a (run_id,
round) that is already in the ledger raises `DuplicateRound`, unless the caller says
it is a replay (`replay=True`: the coordinator re-asks for a round that was cut
short or whose reply was lost); a replay gets the next attempt number and its cost is
added again, because the earlier attempt may already have been trained or released.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from synth.atomic import PRIVATE_MODE, write_atomic

from .audit import AuditLog

fcntl: ModuleType | None
try:  # POSIX advisory lock: two processes of one site never lose each other's rounds
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

log = logging.getLogger(__name__)

FORMAT = "pasta-fed.privacy-ledger/1"
MECHANISMS = ("rdp", "prv")
SITE_KEY = "site"                 # the one ledger of a site's patients
KINDS = ("train", "evaluate")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

HistoryItem = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as Opacus keeps it


class BudgetExceeded(RuntimeError):
    """A round would take the site past its epsilon budget; it must not be trained."""

    def __init__(self, spent: float, requested: float, max_epsilon: float, delta: float, what: str = "round"):
        self.spent, self.requested, self.max_epsilon, self.delta = spent, requested, max_epsilon, delta
        super().__init__(
            f"privacy budget exceeded: {what} refused, not trained. Spent epsilon={spent:.4f}, "
            f"epsilon after this {what} would be {requested:.4f}, max_epsilon={max_epsilon:.4f} "
            f"(delta={delta:g})"
        )


class DuplicateRound(ValueError):
    """The same (run_id, round) was recorded twice without saying it is a replay."""


class LedgerError(ValueError):
    """The ledger file is unreadable or inconsistent with what was trained."""


def ledger_key(backbone_sha256: str) -> str:
    """The per-backbone key of earlier versions (`ledger-bb-<16 hex>.json`); kept to find and fold them."""
    sha = backbone_sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{16,64}", sha):
        raise ValueError(f"backbone_sha256 must be hex (16-64 digits), got {backbone_sha256!r}")
    return f"bb-{sha[:16]}"


def ledger_path(state_dir: str | os.PathLike, model_key: str) -> Path:
    if not _KEY_RE.match(model_key):
        raise ValueError(f"model_key {model_key!r} must match {_KEY_RE.pattern}")
    return Path(state_dir) / "privacy" / f"ledger-{model_key}.json"


def merge_history(history: Sequence[Sequence], noise_multiplier: float, sample_rate: float,
                  steps: int) -> list[HistoryItem]:
    """History after `steps` more steps, merged the way Opacus' accountants merge repeated steps."""
    out = [(float(n), float(q), int(s)) for n, q, s in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        n, q, s = out.pop()
        out.append((n, q, s + int(steps)))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def make_accountant(mechanism: str, history: Sequence[Sequence] = ()) -> IAccountant:
    """A fresh Opacus accountant of `mechanism` restored from `history` via load_state_dict."""
    from opacus.accountants import create_accountant  # lazy: opacus takes seconds to import

    if mechanism not in MECHANISMS:
        raise ValueError(f"accountant mechanism {mechanism!r} unknown; valid: {', '.join(MECHANISMS)}")
    acc = create_accountant(mechanism=mechanism)
    acc.load_state_dict({"history": [(float(n), float(q), int(s)) for n, q, s in history],
                         "mechanism": mechanism})
    return acc


def epsilon_of(mechanism: str, history: Sequence[Sequence], delta: float) -> float:
    """Epsilon of a history under Opacus' accountant (0 for an empty history)."""
    if not history:
        return 0.0
    return float(make_accountant(mechanism, history).get_epsilon(delta=delta))


@dataclass
class LedgerEntry:
    run_id: str
    round: int
    attempt: int
    task: str | None
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    status: str          # "reserved" (cost counted, training not confirmed) | "committed" | "mismatch"
    time: float
    committed_time: float | None = None
    kind: str = "train"              # "train" (DP-SGD steps) | "evaluate" (Gaussian noise on counts)
    backbone: str | None = None      # SHA-256 of the frozen backbone the release was computed with
    audit_sha256: str | None = None  # hash of the audit log's "charge" line for this entry
    source: str | None = None        # the file an entry was folded in from (older per-backbone ledgers)

    def public(self) -> dict:
        """The fields `pasta-fed client ledger --json` shows for each release."""
        return {k: getattr(self, k) for k in
                ("run_id", "round", "attempt", "kind", "task", "backbone", "noise_multiplier", "sample_rate",
                 "steps", "epsilon_after", "status")}


@dataclass(frozen=True)
class Reservation:
    """A round whose cost is on disk; hand `accountant()` to the PrivacyEngine, then commit."""
    ledger_path: Path
    mechanism: str
    run_id: str
    round: int
    attempt: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    history_before: tuple[HistoryItem, ...]
    history_after: tuple[HistoryItem, ...]
    epsilon_after: float
    kind: str = "train"

    def accountant(self) -> IAccountant:
        """The ledger's accountant as it was before this round; Opacus appends this round's steps."""
        return make_accountant(self.mechanism, self.history_before)


@dataclass
class PrivacyLedger:
    path: Path
    model_key: str
    mechanism: str = "rdp"
    history: list[HistoryItem] = field(default_factory=list)
    entries: list[LedgerEntry] = field(default_factory=list)
    audit: AuditLog | None = field(default=None, repr=False, compare=False)

    # ---- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str | os.PathLike, model_key: str, mechanism: str = "rdp",
             audited: bool = True) -> PrivacyLedger:
        """Load a ledger from `state_dir`, or start an empty one (written on first reserve).

        `audited`: every charge also goes to the state_dir's audit log (the site's way).
        """
        path = ledger_path(state_dir, model_key)
        audit = AuditLog(state_dir) if audited else None
        if path.exists():
            ledger = cls.load(path)
            if ledger.mechanism != mechanism:
                raise LedgerError(f"{path}: ledger uses accountant {ledger.mechanism!r}, asked for "
                                  f"{mechanism!r}; one accountant per model for its whole life")
            ledger.audit = audit
            return ledger
        if mechanism not in MECHANISMS:
            raise ValueError(f"accountant mechanism {mechanism!r} unknown; valid: {', '.join(MECHANISMS)}")
        return cls(path=path, model_key=model_key, mechanism=mechanism, audit=audit)

    @classmethod
    def open_site(cls, state_dir: str | os.PathLike, mechanism: str = "rdp") -> PrivacyLedger:
        """The site's one ledger, with any older per-backbone ledgers folded in (their cost kept)."""
        ledger = cls.open(state_dir, SITE_KEY, mechanism)
        legacy = sorted(p for p in ledger.path.parent.glob("ledger-bb-*.json"))
        if legacy:
            ledger._fold(legacy)
        return ledger

    def _fold(self, paths: Sequence[Path]) -> None:
        """Add the histories and entries of older per-backbone ledgers, then retire their files."""
        with self._locked():
            self.reload()
            for path in paths:
                old = PrivacyLedger.load(path)
                if old.mechanism != self.mechanism:
                    raise LedgerError(f"{path}: uses accountant {old.mechanism!r}, the site ledger "
                                      f"{self.path} uses {self.mechanism!r}; cannot compose them")
                for n, q, s in old.history:
                    self.history = merge_history(self.history, n, q, s)
                for entry in old.entries:
                    entry.source = path.name
                    entry.backbone = entry.backbone or old.model_key
                    self.entries.append(entry)
                log.warning("%s: folded into the site ledger %s (one budget for the site's patients)",
                            path, self.path)
            self._write()
            for path in paths:
                os.replace(path, path.with_name(path.name + ".folded"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrivacyLedger:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{path}: cannot read privacy ledger: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise LedgerError(f"{path}: not a privacy ledger (format {found!r}, expected {FORMAT!r})")
        try:
            history = [(float(n), float(q), int(s)) for n, q, s in raw["history"]]
            entries = [LedgerEntry(**e) for e in raw["entries"]]
            ledger = cls(path=path, model_key=str(raw["model_key"]), mechanism=str(raw["mechanism"]),
                         history=history, entries=entries)
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{path}: malformed privacy ledger: {exc}") from exc
        make_accountant(ledger.mechanism, history)  # validates the mechanism
        return ledger

    def reload(self) -> None:
        if self.path.exists():
            other = PrivacyLedger.load(self.path)
            self.history, self.entries, self.mechanism = other.history, other.entries, other.mechanism

    # ---- reading -------------------------------------------------------------------
    def accountant(self) -> IAccountant:
        """A fresh Opacus accountant restored from the persisted history."""
        return make_accountant(self.mechanism, self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (reserved rounds included) at `delta`."""
        return epsilon_of(self.mechanism, self.history, delta)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon after a hypothetical round, without committing anything."""
        return epsilon_of(self.mechanism, merge_history(self.history, noise_multiplier, sample_rate, steps), delta)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int,
                     max_epsilon: float, delta: float) -> bool:
        return self.epsilon_if(noise_multiplier, sample_rate, steps, delta) > max_epsilon

    def attempts(self, run_id: str, round: int, kind: str = "train") -> list[LedgerEntry]:
        return [e for e in self.entries if e.run_id == run_id and e.round == round and e.kind == kind]

    def by_backbone(self, delta: float) -> dict[str, float]:
        """Epsilon of each backbone's releases alone: a report, never the budget (that is `epsilon`)."""
        histories: dict[str, list[HistoryItem]] = {}
        for e in self.entries:
            key = e.backbone or "unknown"
            histories[key] = merge_history(histories.get(key, []), e.noise_multiplier, e.sample_rate, e.steps)
        return {key: epsilon_of(self.mechanism, hist, delta) for key, hist in histories.items()}

    def summary(self, delta: float, max_epsilon: float | None = None, site: str | None = None) -> dict:
        """Spent privacy at one delta: the strictest of `delta` (the site's) and every delta a
        release was charged at, the one the next round from that coordinator is checked at.
        Each row's `epsilon_after` is recomputed at that same delta."""
        shown = min([delta, *(e.delta for e in self.entries)])
        eps = self.epsilon(shown)
        history: list[HistoryItem] = []
        rows = []
        for e in self.entries:
            history = merge_history(history, e.noise_multiplier, e.sample_rate, e.steps)
            rows.append({**e.public(), "epsilon_after": epsilon_of(self.mechanism, history, shown),
                         "charged_delta": e.delta})
        return {"site": site, "model_key": self.model_key, "mechanism": self.mechanism, "delta": shown,
                "site_delta": delta, "epsilon": eps, "max_epsilon": max_epsilon,
                "remaining_epsilon": None if max_epsilon is None else max(0.0, max_epsilon - eps),
                "by_backbone": self.by_backbone(shown), "history": rows}

    # ---- writing -------------------------------------------------------------------
    def reserve(self, *, run_id: str, round: int, noise_multiplier: float, sample_rate: float, steps: int,
                max_epsilon: float, delta: float, task: str | None = None, replay: bool = False,
                kind: str = "train", backbone: str | None = None) -> Reservation:
        """Check the budget and durably charge a release's cost before it is computed.

        The charge is appended to the audit log first, then the ledger entry (holding that
        line's hash) is written: a crash in between leaves a charge the ledger lacks, which
        `tamper.check_state` reports and `client audit --rebuild-ledger` adds back.
        """
        _check_round_args(noise_multiplier, sample_rate, steps, max_epsilon, delta)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._locked():
            self.reload()
            previous = self.attempts(run_id, round, kind)
            if previous and not replay:
                raise DuplicateRound(
                    f"round {round} of run {run_id!r} is already in the privacy ledger {self.path} "
                    f"({len(previous)} attempt(s), last {previous[-1].status}); pass replay=True to "
                    f"train it again and pay its cost again")
            spent = self.epsilon(delta)
            after_hist = merge_history(self.history, noise_multiplier, sample_rate, steps)
            eps_after = epsilon_of(self.mechanism, after_hist, delta)
            if eps_after > max_epsilon:
                log.warning("refused round %s of run %s: epsilon %.4f -> %.4f > max %.4f",
                            round, run_id, spent, eps_after, max_epsilon)
                raise BudgetExceeded(spent, eps_after, max_epsilon, delta)
            entry = LedgerEntry(run_id=str(run_id), round=int(round), attempt=len(previous) + 1, task=task,
                                noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate),
                                steps=int(steps), delta=float(delta), epsilon_after=eps_after,
                                status="reserved", time=time.time(), kind=kind, backbone=backbone)
            if self.audit is not None:
                entry.audit_sha256 = self.audit.append_charge(entry, entries_after=len(self.entries) + 1)
            before = tuple(self.history)
            self.history = after_hist
            self.entries.append(entry)
            self._write()
        log.info("reserved %s round %s (run %s, attempt %d): %d steps, sigma=%.4f, q=%.5f, epsilon -> %.4f",
                 kind, round, run_id, entry.attempt, steps, noise_multiplier, sample_rate, eps_after)
        return Reservation(ledger_path=self.path, mechanism=self.mechanism, run_id=entry.run_id,
                           round=entry.round, attempt=entry.attempt, noise_multiplier=entry.noise_multiplier,
                           sample_rate=entry.sample_rate, steps=entry.steps, history_before=before,
                           history_after=tuple(after_hist), epsilon_after=eps_after, kind=kind)

    def commit(self, reservation: Reservation, accountant: IAccountant | None = None) -> LedgerEntry:
        """Mark a reserved round as trained; `accountant` (the one Opacus stepped) must match it."""
        if accountant is not None:
            got: list[HistoryItem] = []
            for n, q, s in accountant.history:
                got = merge_history(got, float(n), float(q), int(s))
            if tuple(got) != reservation.history_after:
                self._charge_mismatch(reservation, got)
                raise LedgerError(
                    f"{self.path}: the accountant used in training (history {got}) does not match the reserved "
                    f"round (sigma={reservation.noise_multiplier}, q={reservation.sample_rate}, "
                    f"steps={reservation.steps}); both the reserved and the trained cost are now counted")
        with self._locked():
            self.reload()
            for entry in self.entries:
                if (entry.run_id, entry.round, entry.attempt, entry.kind) == (
                        reservation.run_id, reservation.round, reservation.attempt, reservation.kind):
                    if entry.status == "committed":
                        raise DuplicateRound(f"round {entry.round} of run {entry.run_id!r} attempt "
                                             f"{entry.attempt} is already committed in {self.path}")
                    entry.status = "committed"
                    entry.committed_time = time.time()
                    self._write()
                    return entry
        raise LedgerError(f"{self.path}: no reserved entry for run {reservation.run_id!r} round "
                          f"{reservation.round} attempt {reservation.attempt}")

    def _charge_mismatch(self, reservation: Reservation, trained: list[HistoryItem]) -> None:
        """Training did not match its reservation: add what the engine counted on top (never undercount)."""
        before = list(reservation.history_before)
        extra = trained[len(before):] if trained[:len(before)] == before else trained
        with self._locked():
            self.reload()
            for n, q, steps in extra:
                self.history = merge_history(self.history, n, q, steps)
            for entry in self.entries:
                if (entry.run_id, entry.round, entry.attempt, entry.kind) == (
                        reservation.run_id, reservation.round, reservation.attempt, reservation.kind):
                    entry.status = "mismatch"
            self._write()

    def record_round(self, *, run_id: str, round: int, noise_multiplier: float, sample_rate: float, steps: int,
                     max_epsilon: float, delta: float, task: str | None = None,
                     replay: bool = False, kind: str = "train", backbone: str | None = None) -> LedgerEntry:
        """Reserve and commit in one go (for a round whose steps are known to have happened)."""
        res = self.reserve(run_id=run_id, round=round, noise_multiplier=noise_multiplier,
                           sample_rate=sample_rate, steps=steps, max_epsilon=max_epsilon, delta=delta,
                           task=task, replay=replay, kind=kind, backbone=backbone)
        return self.commit(res)

    # ---- internals -----------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "model_key": self.model_key, "mechanism": self.mechanism,
                "history": [list(h) for h in self.history], "entries": [asdict(e) for e in self.entries]}

    def _write(self) -> None:
        write_atomic(self.path, json.dumps(self.to_json(), indent=1) + "\n", PRIVATE_MODE)

    def locked(self):
        """The ledger's inter-process lock, for code that must read and write it as one step."""
        return self._locked()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_round_args(noise_multiplier, sample_rate, steps, max_epsilon, delta) -> None:
    if not (noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not (max_epsilon > 0):
        raise ValueError(f"max_epsilon must be > 0, got {max_epsilon}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def list_ledgers(state_dir: str | os.PathLike) -> list[Path]:
    """Every ledger file in a site's state_dir, newest first (a site has one since the site ledger)."""
    folder = Path(state_dir) / "privacy"
    if not folder.is_dir():
        return []
    return sorted(folder.glob("ledger-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
