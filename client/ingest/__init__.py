"""Reading a hospital's CT: DICOM series and NIfTI files, masks and the labels CSV.

Public API:
- `discover_cases(config) -> list[CaseSource]`: usable cases, headers only.
- `scan_site(config) -> SiteScan`: the same plus everything skipped or broken, and why.
- `read_case(source) -> LoadedCase`: HU volume (SimpleITK Float32, LPS geometry) + mask.
- `labels_for(config) -> dict[case_id, CaseLabels]`, `read_labels(path) -> LabelsTable`.
- `source_digest(source)`: SHA-256 of a case's files, for content-keyed caches.
"""
from .discover import SiteScan, default_case_id, discover_cases, scan_site
from .labels import TASK_COLUMNS, CaseLabels, LabelsTable, labels_for, read_labels
from .read import read_case, source_digest
from .types import CaseSource, IngestError, LoadedCase, Rejected

__all__ = [
    "CaseSource", "LoadedCase", "Rejected", "IngestError", "SiteScan", "CaseLabels",
    "LabelsTable", "TASK_COLUMNS", "discover_cases", "scan_site", "read_case", "labels_for",
    "read_labels", "source_digest", "default_case_id",
]
