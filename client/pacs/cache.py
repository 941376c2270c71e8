"""The local copy of PACS instances: state_dir/pacs-cache/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.

Keyed by SOPInstanceUID so a retrieval resumes where it stopped; each instance is
written to a temp file and renamed (synth.atomic), so an interrupted retrieval never
leaves half an instance that ingestion would read as a damaged slice.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset

from synth.atomic import atomic_path, clean_stale_temp_files

from .types import PacsError, SeriesRef, checked_uid

log = logging.getLogger(__name__)

CACHE_FOLDER = "pacs-cache"


def cache_dir(config) -> Path:
    """Where a site's PACS instances are kept (inside its state_dir, never its data)."""
    return Path(config.state_dir) / CACHE_FOLDER


class InstanceCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(self.root)

    def path(self, series_uid: str, sop_uid: str) -> Path:
        series = checked_uid(series_uid, "SeriesInstanceUID")
        return self.root / series / f"{checked_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def missing(self, series: SeriesRef, sop_uids: list[str]) -> list[str]:
        """The instances of `series` not cached yet, in the PACS' order."""
        return [uid for uid in sop_uids if not self.path(series.series_uid, uid).is_file()]

    def store(self, series: SeriesRef, dataset: Dataset) -> Path:
        """Write one retrieved instance atomically; refuse one the PACS sent for another series."""
        if str(dataset.get("SeriesInstanceUID", "")) != series.series_uid:
            raise PacsError(f"the PACS sent an instance of series {dataset.get('SeriesInstanceUID')!r} "
                            f"when asked for {series.series_uid}")
        target = self.path(series.series_uid, dataset.get("SOPInstanceUID"))
        with atomic_path(target) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        return target
