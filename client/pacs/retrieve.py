"""Copy a site's CT from its PACS into the local cache, resuming where a previous run stopped."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from .cache import InstanceCache, cache_dir
from .selection import StudySelection, selection_for
from .types import Pacs, PacsError, SeriesRef

log = logging.getLogger(__name__)


@dataclass
class RetrievalReport:
    series: int = 0          # CT series the PACS listed
    instances: int = 0       # their instances
    cached: int = 0          # already in the cache before this run (not fetched again)
    fetched: int = 0         # retrieved by this run
    cache: Path | None = None
    unmatched: int = 0       # studies the labels CSV names (from_labels) that the PACS does not hold


def connect(config) -> Pacs:
    """The PACS connection the site YAML names (DICOMweb or DIMSE)."""
    pacs = config.pacs
    if pacs is None:
        raise PacsError(f"{config.source}: no pacs section")
    if pacs.dicomweb is not None:
        from .dicomweb import DicomWebPacs
        return DicomWebPacs(pacs.dicomweb, pacs.credentials)
    from .dimse import DimsePacs
    d = pacs.dimse
    return DimsePacs(d.host, d.port, d.called_ae, d.calling_ae)


def retrieve(config, progress: Callable[[Path], None] | None = None, pacs: Pacs | None = None) -> RetrievalReport:
    """List the CT series on the PACS (of the labels' studies with from_labels) and fetch what is not cached.

    `progress` is called with each newly cached file (after its rename); if it raises,
    retrieval stops there and the next run resumes from the cache.
    """
    selection = selection_for(config)      # a labels CSV that cannot select fails before the PACS is asked
    pacs = pacs or connect(config)
    cache = InstanceCache(cache_dir(config))
    report = RetrievalReport(cache=cache.root)
    all_series = _wanted_series(pacs, config.pacs.studies.modality, selection, report)
    log.info("PACS lists %d %s series to retrieve", len(all_series), config.pacs.studies.modality)
    for number, series in enumerate(all_series, 1):
        sop_uids = pacs.find_instances(series)
        missing = cache.missing(series, sop_uids)
        report.series += 1
        report.instances += len(sop_uids)
        report.cached += len(sop_uids) - len(missing)
        log.info("series %d/%d %s: %d instances, %d cached, fetching %d", number, len(all_series),
                 series.series_uid, len(sop_uids), len(sop_uids) - len(missing), len(missing))
        if missing:
            _fetch(pacs, cache, series, missing, whole=len(missing) == len(sop_uids), report=report,
                   progress=progress)
    log.info("PACS retrieval done: %d series, %d instances, %d fetched, %d already cached in %s",
             report.series, report.instances, report.fetched, report.cached, cache.root)
    return report


def retrieve_series(config, series: SeriesRef, pacs: Pacs | None = None) -> Path:
    """One series into the cache (what is not cached yet); returns its folder there."""
    pacs = pacs or connect(config)
    cache = InstanceCache(cache_dir(config))
    sop_uids = pacs.find_instances(series)
    if not sop_uids:
        raise PacsError(f"the PACS holds no instance of series {series.series_uid} in study {series.study_uid}")
    missing = cache.missing(series, sop_uids)
    log.info("series %s: %d instances, fetching %d", series.series_uid, len(sop_uids), len(missing))
    if missing:
        _fetch(pacs, cache, series, missing, whole=len(missing) == len(sop_uids),
               report=RetrievalReport(cache=cache.root), progress=None)
    return cache.root / series.series_uid


def _wanted_series(pacs: Pacs, modality: str, selection: StudySelection | None,
                   report: RetrievalReport) -> list[SeriesRef]:
    """Every series of the modality, or only those of the studies the labels name (each study once)."""
    if selection is None:
        return pacs.find_series(modality)
    study_uids = set(selection.study_uids)
    for accession in sorted(selection.accession_numbers):
        found = pacs.find_studies(accession)
        if not found:
            report.unmatched += 1
            log.warning("the PACS holds no study with accession number %s (named in the labels)", accession)
        study_uids.update(found)
    series = []
    for study_uid in sorted(study_uids):
        found = pacs.find_series(modality, study_uid)
        if not found and study_uid in selection.study_uids:
            report.unmatched += 1
            log.warning("the PACS holds no %s series of study %s (named in the labels)", modality, study_uid)
        series += found
    return series


def _fetch(pacs: Pacs, cache: InstanceCache, series: SeriesRef, missing: list[str], *, whole: bool,
           report: RetrievalReport, progress: Callable[[Path], None] | None) -> None:
    wanted = set(missing)

    def store(dataset: Dataset) -> None:
        if str(dataset.get("SOPInstanceUID", "")) not in wanted:
            log.warning("series %s: ignored an instance the PACS sent unasked", series.series_uid)
            return
        path = cache.store(series, dataset)
        wanted.discard(str(dataset.SOPInstanceUID))
        report.fetched += 1
        if progress is not None:
            progress(path)

    pacs.fetch(series, missing, store, whole)
    if wanted:
        raise PacsError(f"series {series.series_uid}: the PACS did not send {len(wanted)} of "
                        f"{len(missing)} instance(s)")
