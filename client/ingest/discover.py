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
CACHE_SHOWN = "pacs"   # how sources in the PACS cache are shown: pacs/<SeriesInstanceUID>


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


Roots = tuple[tuple[Path, str], ...]   # (folder scanned, how its paths are shown)


def _relative(path: Path, roots: Roots) -> str:
    """`path` relative to the scanned folder holding it, prefixed as that folder is shown."""
    for folder, shown in roots:
        try:
            relative = path.relative_to(folder)
        except ValueError:
            continue
        return str(Path(shown) / relative) if shown else (str(relative) or ".")
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


def _pacs_cache(config) -> Path | None:
    """The folder of instances retrieved from the PACS (client.pacs), if the site names one."""
    if getattr(config, "pacs", None) is None:
        return None
    from client.pacs import cache_dir

    folder = cache_dir(config)
    return folder if folder.is_dir() else None


def _read_headers(files: list[Path], cached: list[Path]) -> tuple[list, list, list[Path]]:
    """Headers of the folder's files, then of the PACS cache's, less series the folder has too."""
    found = [dicom.read_slice_header(path) for path in files if not nifti.is_nifti(path)]
    in_folder = {f.series_uid for f in found if f.series_uid}
    from_pacs = [dicom.read_slice_header(path) for path in cached]
    both = {f.series_uid for f in from_pacs if f.series_uid in in_folder}
    if both:
        log.info("%d series are both in data.images and in the PACS cache: reading the folder's copy", len(both))
    found += [f for f in from_pacs if f.series_uid not in both]
    ct_slices = [f for f in found if isinstance(f, dicom.SliceHeader)]
    verdicts = [f for f in found if not isinstance(f, dicom.SliceHeader)]
    return ct_slices, verdicts, [path for path in files if nifti.is_nifti(path)]


def scan_site(config) -> SiteScan:
    """Walk data.images and the PACS cache (if any) and classify every file; read headers only."""
    scan = SiteScan()
    if config.data.labels is not None:
        try:
            table = read_labels(config.data.labels)
            scan.labels, scan.label_errors = table.labels, table.errors
        except IngestError as err:
            scan.label_errors.append(str(err))
    series_to_case = {label.series_uid: label.case_id for label in scan.labels.values() if label.series_uid}
    exclude = tuple(p.resolve() for p in (config.data.masks, config.state_dir) if p is not None)

    images, cache = config.data.images, _pacs_cache(config)
    roots: Roots = tuple((folder, shown) for folder, shown in ((images, ""), (cache, CACHE_SHOWN))
                         if folder is not None)
    files = _walk_files(images, exclude) if images is not None else []
    cached = _walk_files(cache, ()) if cache is not None else []
    ct_slices, verdicts, nifti_files = _read_headers(files, cached)
    log.info("scanned %d files under %s", len(files) + len(cached), ", ".join(str(r[0]) for r in roots))

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
                                       _relative(folder, roots)))
        else:
            rel = _relative(first.path, roots)
            candidates.append(Rejected(rel, first.status, reason, rel))

    for uid, slices in ct_series.items():
        patient = slices[0].patient_id
        case_id = series_to_case.get(uid, default_case_id(patient, uid))
        folder = Path(os.path.commonpath([str(s.path.parent) for s in slices]))
        source = _relative(folder, roots)
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
            candidates.append(Rejected(case_id, "error", str(err), _relative(path, roots)))
            continue
        candidates.append(CaseSource(case_id=case_id, kind="nifti", files=(path,),
                                     source=_relative(path, roots), patient_id=""))

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
