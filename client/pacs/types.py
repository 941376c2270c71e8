"""What every PACS connection speaks: series references, the connection protocol, its error."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class PacsError(RuntimeError):
    """The PACS could not be queried or an instance not retrieved; names the PACS, never a secret."""


def checked_uid(value: object, what: str) -> str:
    """A UID from the PACS, refused unless it is one (it becomes a file name in the cache)."""
    uid = str(value or "").strip()
    if len(uid) > 64 or not _UID.fullmatch(uid):
        raise PacsError(f"the PACS answered an invalid {what}: {uid[:80]!r}")
    return uid


@dataclass(frozen=True)
class SeriesRef:
    study_uid: str
    series_uid: str


Store = Callable[[Dataset], None]


class Pacs(Protocol):
    """One connection to a PACS: list CT series (of all studies or one), find studies by accession, retrieve."""

    def find_series(self, modality: str, study_uid: str | None = None) -> list[SeriesRef]: ...

    def find_studies(self, accession_number: str) -> list[str]: ...

    def find_instances(self, series: SeriesRef) -> list[str]: ...

    def fetch(self, series: SeriesRef, sop_uids: Sequence[str], store: Store, whole_series: bool) -> None: ...
