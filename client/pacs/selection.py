"""The studies a site's labels CSV names (`pacs.studies.from_labels: true`): only those are retrieved.

The CSV may name a study by `study_instance_uid`, by `accession_number`, or both (a row
with both is matched by its StudyInstanceUID). Each cell becomes a PACS query key, so one
that could match more than itself (a DICOM wildcard `*` or `?`, a backslash, too long)
fails its own row with an error naming the file and line, like any bad labels cell;
the other rows are kept.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from client.ingest.labels import _reader, label_columns
from client.ingest.types import IngestError

from .types import _UID, PacsError

log = logging.getLogger(__name__)

STUDY_COLUMNS = ("study_instance_uid", "accession_number")
# DICOM SH (16 characters, no backslash or control character), and no C-FIND / QIDO wildcard
_ACCESSION = re.compile(r"[ -~]{1,16}")
_WILDCARDS = set("*?\\")


@dataclass(frozen=True)
class StudySelection:
    """Studies to retrieve, by StudyInstanceUID and by AccessionNumber."""
    study_uids: frozenset[str] = frozenset()
    accession_numbers: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.study_uids) + len(self.accession_numbers)


def _checked_accession(text: str) -> str:
    value = text.strip()
    if not _ACCESSION.fullmatch(value) or _WILDCARDS & set(value):
        raise PacsError(f"accession_number {value[:40]!r} is not one the PACS can match exactly "
                        f"(1 to 16 printable characters, no * ? or \\)")
    return value


def _checked_study_uid(text: str) -> str:
    value = text.strip()
    if len(value) > 64 or not _UID.fullmatch(value):
        raise PacsError(f"study_instance_uid {value[:80]!r} is not a DICOM UID")
    return value


def _row_key(row: dict[str, str]) -> tuple[str, str] | None:
    """('study', uid) or ('accession', number) for one row; None when it names no study."""
    uid, accession = row.get("study_instance_uid", "").strip(), row.get("accession_number", "").strip()
    if uid:
        return "study", _checked_study_uid(uid)
    if accession:
        return "accession", _checked_accession(accession)
    return None


def studies_from_labels(path: Path) -> StudySelection:
    """The studies the labels CSV names; refuses a CSV with neither study column."""
    try:
        columns = label_columns(path)
        rows = list(_reader(path))
    except IngestError as err:
        raise PacsError(str(err)) from None
    if not set(STUDY_COLUMNS) & set(columns):
        raise PacsError(f"{path}: pacs.studies.from_labels needs a study_instance_uid or accession_number "
                        f"column (columns: {', '.join(columns) or 'none'})")
    uids, accessions = set(), set()
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "") for k, v in raw.items() if k is not None}
        try:
            key = _row_key(row)
        except PacsError as err:
            log.error("%s: line %d: %s; this row's study is not retrieved", path, line, err)
            continue
        if key is not None:
            (uids if key[0] == "study" else accessions).add(key[1])
    log.info("labels %s name %d studies by StudyInstanceUID and %d by AccessionNumber",
             path, len(uids), len(accessions))
    return StudySelection(frozenset(uids), frozenset(accessions))


def selection_for(config) -> StudySelection | None:
    """The site's selection when `pacs.studies.from_labels` is set, else None (every study)."""
    if not config.pacs.studies.from_labels:
        return None
    if config.data.labels is None:
        raise PacsError(f"{config.source}: pacs.studies.from_labels: true needs data.labels "
                        f"(a CSV with a study_instance_uid or accession_number column)")
    return studies_from_labels(config.data.labels)
