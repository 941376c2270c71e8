"""Find the cases of a site from headers only: DICOM series at any depth, NIfTI files, masks.

case_id rules (docs/hospital-data.md):
- NIfTI: the file name without .nii/.nii.gz.
- DICOM: the labels CSV's `case_id` on the row whose `series_uid` is the series'
  SeriesInstanceUID; otherwise `<PatientID>_<first 8 hex of SHA-256(SeriesInstanceUID)>`
  (PatientID reduced to [A-Za-z0-9_.-], "anon" when empty). Stable across runs and
  machines, and independent of file names and folder layout.

patient_id (one DP sample is one patient): the labels CSV's `patient_id`, else the DICOM
PatientID. A case with neither is an error, unless the site YAML says every scan is a
different patient (`data.one_scan_per_patient`); its patient id is then its case_id.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import dicom, nifti
from .labels import CaseLabels, read_labels
from .types import CaseSource, IngestError, Rejected

log = logging.getLogger(__name__)


@dataclass
class SiteScan:
    """Everything found under a site's data folders, usable or not."""

    cases: list[CaseSource] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    labels: dict[str, CaseLabels] = field(default_factory=dict)
    label_errors: list[str] = field(default_factory=list)
    masks_without_case: list[str] = field(default_factory=list)


_NO_PATIENT_FIX = ("; DP counts patients, so scans of one patient under different ids would each count as "
                   "a patient: add the case's patient_id to the labels CSV, or set "
                   "data.one_scan_per_patient: true if every scan is a different patient")
_NO_PATIENT = {
    "nifti": "no patient id (a NIfTI file has none, and no labels row gives one)" + _NO_PATIENT_FIX,
    "dicom": "no patient id (empty DICOM PatientID, and no labels row gives one)" + _NO_PATIENT_FIX,
}


def default_case_id(patient_id: str, series_uid: str) -> str:
    patient = re.sub(r"[^A-Za-z0-9_.-]+", "_", patient_id.strip()).strip("_") or "anon"
    return f"{patient}_{hashlib.sha256(series_uid.encode()).hexdigest()[:8]}"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _walk_files(root: Path, exclude: tuple[Path, ...]) -> list[Path]:
    """Every regular, non-hidden file under root (any depth), in a stable order."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (here / d).resolve() not in exclude)
        found.extend(here / f for f in sorted(files) if not f.startswith("."))
    return found


def _find_masks(masks_dir: Path | None) -> dict[str, Path]:
    if masks_dir is None:
        return {}
    masks: dict[str, Path] = {}
    for path in sorted(masks_dir.iterdir()):
        if path.is_file() and nifti.is_nifti(path):
            masks.setdefault(nifti.nifti_stem(path), path)
    return masks


def scan_site(config) -> SiteScan:
    """Walk data.images and classify every file; read headers only."""
    scan = SiteScan()
    root = config.data.images
    if config.data.labels is not None:
        try:
            table = read_labels(config.data.labels)
            scan.labels, scan.label_errors = table.labels, table.errors
        except IngestError as err:
            scan.label_errors.append(str(err))
    series_to_case = {label.series_uid: label.case_id for label in scan.labels.values() if label.series_uid}
    exclude = tuple(p.resolve() for p in (config.data.masks, config.state_dir) if p is not None)

    ct_slices: list[dicom.SliceHeader] = []
    verdicts: list[dicom.FileVerdict] = []
    nifti_files: list[Path] = []
    files = _walk_files(root, exclude)
    for path in files:
        if nifti.is_nifti(path):
            nifti_files.append(path)
            continue
        found = dicom.read_slice_header(path)
        (ct_slices if isinstance(found, dicom.SliceHeader) else verdicts).append(found)
    log.info("scanned %d files under %s", len(files), root)

    candidates: list[CaseSource | Rejected] = []
    # Problems that belong to a CT series make that series an error.
    series_errors: dict[str, list[str]] = defaultdict(list)
    for v in verdicts:
        if v.status == "error" and v.series_uid:
            series_errors[v.series_uid].append(v.reason)
    ct_series = dicom.group_by_series(ct_slices)

    # Non-CT objects and non-DICOM files: one entry per series and reason, or per file.
    skipped_groups: dict[tuple[str, str], list[dicom.FileVerdict]] = defaultdict(list)
    for v in verdicts:
        if v.status == "error" and v.series_uid in ct_series:
            continue
        key = (v.series_uid, v.reason) if v.series_uid else (str(v.path), v.reason)
        skipped_groups[key].append(v)
    for (_, reason), group in skipped_groups.items():
        first = group[0]
        if first.series_uid:
            case_id = series_to_case.get(first.series_uid,
                                         default_case_id(first.patient_id, first.series_uid))
            folder = Path(os.path.commonpath([str(v.path.parent) for v in group]))
            count = f" ({len(group)} file{'s' if len(group) > 1 else ''})"
            candidates.append(Rejected(case_id, first.status, reason + count,
                                       _relative(folder, root)))
        else:
            rel = _relative(first.path, root)
            candidates.append(Rejected(rel, first.status, reason, rel))

    for uid, slices in ct_series.items():
        patient = slices[0].patient_id
        case_id = series_to_case.get(uid, default_case_id(patient, uid))
        folder = Path(os.path.commonpath([str(s.path.parent) for s in slices]))
        source = _relative(folder, root)
        if uid in series_errors:
            candidates.append(Rejected(case_id, "error", "; ".join(series_errors[uid]), source))
            continue
        try:
            ordered = dicom.order_slices(slices)
        except IngestError as err:
            candidates.append(Rejected(case_id, "error", str(err), source))
            continue
        candidates.append(CaseSource(
            case_id=case_id, kind="dicom", files=tuple(s.path for s in ordered), source=source,
            patient_id=patient if patient.strip() else "", series_uid=uid))

    for path in nifti_files:
        case_id = nifti.nifti_stem(path)
        try:
            nifti.check_nifti_header(path)
        except IngestError as err:
            candidates.append(Rejected(case_id, "error", str(err), _relative(path, root)))
            continue
        candidates.append(CaseSource(case_id=case_id, kind="nifti", files=(path,),
                                     source=_relative(path, root), patient_id=""))

    masks = _find_masks(config.data.masks)
    seen: dict[str, str] = {}
    for item in sorted(candidates, key=lambda c: (c.case_id, c.source)):
        if isinstance(item, Rejected):
            scan.rejected.append(item)
            continue
        if item.case_id in seen:
            scan.rejected.append(Rejected(item.case_id, "error", f"case_id {item.case_id!r} is "
                                          f"already used by {seen[item.case_id]}", item.source))
            continue
        seen[item.case_id] = item.source
        labels = scan.labels.get(item.case_id)
        patient = labels.patient_id if labels and labels.patient_id else item.patient_id
        if not patient:
            if not getattr(config.data, "one_scan_per_patient", False):
                scan.rejected.append(Rejected(item.case_id, "error", _NO_PATIENT[item.kind], item.source))
                continue
            patient = item.case_id
        scan.cases.append(CaseSource(
            case_id=item.case_id, kind=item.kind, files=item.files, source=item.source,
            patient_id=patient, series_uid=item.series_uid, mask=masks.get(item.case_id)))
    scan.masks_without_case = sorted(set(masks) - set(seen))
    return scan


def discover_cases(config) -> list[CaseSource]:
    """The cases that pass the header checks (cheap: no pixel data is read)."""
    scan = scan_site(config)
    for r in scan.rejected:
        log.log(logging.WARNING if r.status == "error" else logging.INFO,
                "%s %s (%s): %s", r.status, r.case_id, r.source, r.reason)
    return scan.cases
