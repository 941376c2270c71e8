"""What every PACS connection speaks: series references, the connection protocol, its error."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
class StudyRef:
    study_uid: str
    study_date: str = field(default="", compare=False)        # StudyDate as the PACS answered it
    accession_number: str = field(default="", compare=False)


@dataclass(frozen=True)
class SeriesRef:
    """A series of one study; the same SeriesInstanceUID may come in several studies of a broken archive."""
    study_uid: str
    series_uid: str
    body_part: str = field(default="", compare=False)         # BodyPartExamined as the PACS answered it


Store = Callable[[Dataset], None]


class Pacs(Protocol):
    """One connection to a PACS: one query per level (studies, series, instances) and retrieval.

    The PACS is asked with the keys given; callers check its answers again (PACS match loosely).
    """

    def find_studies(self, modality: str, *, study_dates: str | None = None,
                     accession_number: str | None = None) -> list[StudyRef]: ...

    def find_series(self, study_uid: str, modality: str) -> list[SeriesRef]: ...

    def find_instances(self, series: SeriesRef) -> list[str]: ...

    def fetch(self, series: SeriesRef, sop_uids: Sequence[str], store: Store, whole_series: bool) -> None: ...
