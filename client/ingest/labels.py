"""The site's labels CSV: one row per case, patient-level task labels from synth.vocabulary.

Columns (docs/hospital-data.md): `case_id` (required), `patient_id`, `series_uid`
(maps a DICOM series to this case_id), and any of the task columns below. An empty
cell means "not known". A bad cell fails its own row with an error naming the file,
line and column; the other rows are kept.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from synth.vocabulary import ATTRIBUTES, HOST_ORGANS, LESION_TYPE_BY_NAME, T_STAGES

from .types import IngestError

log = logging.getLogger(__name__)

# study_instance_uid and accession_number select the studies a PACS-backed site fetches (client/pacs)
ID_COLUMNS = ("case_id", "patient_id", "series_uid", "study_instance_uid", "accession_number")
TASK_COLUMNS = ("tumor_present", "organ", "t_stage", "survival_months", "survival_event",
                *ATTRIBUTES, "lesion_type")
_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n"}


@dataclass(frozen=True)
class CaseLabels:
    """Patient-level labels of one case; None means unknown."""

    case_id: str
    patient_id: str | None = None
    series_uid: str | None = None
    tumor_present: bool | None = None
    organ: str | None = None
    t_stage: str | None = None
    survival_months: float | None = None
    survival_event: bool | None = None
    shape: str | None = None
    density: str | None = None
    heterogeneity: str | None = None
    surface: str | None = None
    invasion: str | None = None
    lesion_type: str | None = None

    @property
    def attributes(self) -> dict[str, str]:
        """The report attributes that are known."""
        return {k: getattr(self, k) for k in ATTRIBUTES if getattr(self, k) is not None}


@dataclass
class LabelsTable:
    labels: dict[str, CaseLabels] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def series_to_case(self) -> dict[str, str]:
        return {label.series_uid: label.case_id for label in self.labels.values() if label.series_uid}


class _BadCell(Exception):
    def __init__(self, column: str, problem: str):
        super().__init__(f"column {column}: {problem}")


def _word(text: str) -> str:
    return text.strip().lower().replace("-", "_").replace(" ", "_")


def _parse_bool(column: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _BadCell(column, f"{text!r} is not a yes/no value (use 1/0, true/false, yes/no)")


def _parse_choice(column: str, text: str, allowed: tuple[str, ...], normal=_word) -> str:
    value = normal(text)
    if value not in allowed:
        raise _BadCell(column, f"{text!r} is not one of {', '.join(allowed)}")
    return value


def _parse_months(column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _BadCell(column, f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise _BadCell(column, f"{text!r} must be a number >= 0")
    return value


def _parse_cell(column: str, text: str) -> Any:
    if column in ("case_id", "patient_id", "series_uid"):
        return text.strip()
    if column in ("tumor_present", "survival_event"):
        return _parse_bool(column, text)
    if column == "organ":
        return _parse_choice(column, text, HOST_ORGANS)
    if column == "t_stage":
        return _parse_choice(column, text, T_STAGES, normal=lambda t: t.strip().upper())
    if column == "survival_months":
        return _parse_months(column, text)
    if column == "lesion_type":
        return _parse_choice(column, text, tuple(LESION_TYPE_BY_NAME))
    return _parse_choice(column, text, ATTRIBUTES[column])


def _check_row(labels: CaseLabels) -> None:
    """Cross-column consistency: contradictions would train a head on noise."""
    if (labels.survival_months is None) != (labels.survival_event is None):
        raise _BadCell("survival_event" if labels.survival_event is None else "survival_months",
                       "survival needs both survival_months and survival_event")
    lesion = LESION_TYPE_BY_NAME.get(labels.lesion_type) if labels.lesion_type else None
    if lesion and labels.organ and lesion.organ != labels.organ:
        raise _BadCell("organ", f"{labels.organ!r} does not host lesion_type "
                                f"{labels.lesion_type!r} (its organ is {lesion.organ!r})")
    if lesion and not lesion.malignant and labels.t_stage:
        raise _BadCell("t_stage", f"{labels.t_stage} given for benign lesion_type "
                                  f"{labels.lesion_type!r}")
    if labels.tumor_present is False:
        described = [c for c in ("t_stage", "lesion_type", *ATTRIBUTES) if getattr(labels, c)]
        if described:
            raise _BadCell(described[0], "set although tumor_present is no")


def _reader(path: Path) -> csv.DictReader:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise IngestError(f"{path}: cannot read labels: {err}") from None
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return csv.DictReader(text.splitlines(), dialect=dialect)


def label_columns(path: Path) -> list[str]:
    """The header of the labels CSV (what the site config checks before any row is read)."""
    return [c.strip() for c in (_reader(path).fieldnames or [])]


def read_labels(path: Path) -> LabelsTable:
    """Parse and validate the labels CSV; bad rows are reported in `errors` and left out."""
    table = LabelsTable()
    reader = _reader(path)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "case_id" not in columns:
        raise IngestError(f"{path}: no case_id column (columns: {', '.join(columns) or 'none'})")
    known = set(ID_COLUMNS) | set(TASK_COLUMNS)
    for column in columns:
        if column not in known:
            table.errors.append(f"{path}: column {column!r} is not a known label column "
                                f"and is ignored (known: {', '.join(ID_COLUMNS + TASK_COLUMNS)})")
    names = {f.name for f in fields(CaseLabels)}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "") for k, v in row.items() if k is not None}
        case_id = row.get("case_id", "").strip()
        where = f"{path}: line {line}"
        if not case_id:
            table.errors.append(f"{where}: empty case_id")
            continue
        try:
            values = {c: _parse_cell(c, t) for c, t in row.items()
                      if c in names and t.strip() != ""}
            labels = CaseLabels(**values)
            _check_row(labels)
        except _BadCell as bad:
            table.errors.append(f"{where} (case {case_id}): {bad}")
            continue
        if case_id in table.labels:
            table.errors.append(f"{where}: case_id {case_id!r} appears twice; first row kept")
            continue
        table.labels[case_id] = labels
    return table


def labels_for(config) -> dict[str, CaseLabels]:
    """Validated labels of a site by case_id (empty without a labels CSV); problems are logged."""
    if config.data.labels is None:
        return {}
    table = read_labels(config.data.labels)
    for error in table.errors:
        log.error("%s", error)
    return table.labels
