"""Copy a site's CT from its PACS into the local cache, resuming where a previous run stopped."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from .cache import InstanceCache, cache_dir
from .selection import StudySelection, selection_for
from .types import Pacs, PacsError, SeriesRef

if TYPE_CHECKING:
    from client.site_config import StudyQuery

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
    tls = pacs.tls
    if pacs.dicomweb is not None:
        from .dicomweb import DicomWebPacs
        return DicomWebPacs(pacs.dicomweb, pacs.credentials, ca=tls and tls.ca, client_cert=tls and tls.client_cert)
    from .dimse import DimsePacs
    d = pacs.dimse
    return DimsePacs(d.host, d.port, d.called_ae, d.calling_ae, ca=tls and tls.ca,
                     client_cert=tls and tls.client_cert)


def retrieve(config, progress: Callable[[Path], None] | None = None, pacs: Pacs | None = None) -> RetrievalReport:
    """List the CT series on the PACS (of the labels' studies with from_labels) and fetch what is not cached.

    `progress` is called with each newly cached file (after its rename); if it raises,
    retrieval stops there and the next run resumes from the cache.
    """
    selection = selection_for(config)      # a labels CSV that cannot select fails before the PACS is asked
    pacs = pacs or connect(config)
    cache = InstanceCache(cache_dir(config))
    report = RetrievalReport(cache=cache.root)
    all_series = _wanted_series(pacs, config.pacs.studies, selection, report)
    report.series = len({ref.series_uid for ref in all_series})
    log.info("PACS lists %d %s series to retrieve%s", report.series, config.pacs.studies.modality,
             f" (in {len(all_series)} parts: some are filed under several studies)"
             if len(all_series) > report.series else "")
    for number, series in enumerate(all_series, 1):
        sop_uids = pacs.find_instances(series)
        missing = cache.missing(series, sop_uids)
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


def _wanted_studies(pacs: Pacs, query: StudyQuery, selection: StudySelection | None,
                    report: RetrievalReport) -> list[str]:
    """The StudyInstanceUIDs to retrieve: those the labels name, else those in the date range (or all)."""
    if selection is None:
        found = pacs.find_studies(query.modality, study_dates=query.study_dates)
        kept = sorted({study.study_uid for study in found if query.admits_date(study.study_date)})
        if query.study_dates is not None:
            log.info("PACS: %d %s studies with StudyDate in %s", len(kept), query.modality, query.study_dates)
        return kept
    study_uids = set(selection.study_uids)
    for accession in sorted(selection.accession_numbers):
        found = [s.study_uid for s in pacs.find_studies(query.modality, accession_number=accession)
                 if s.accession_number == accession]      # exact: a PACS may match loosely
        if not found:
            report.unmatched += 1
            log.warning("the PACS holds no %s study with accession number %s (named in the labels)",
                        query.modality, accession)
        study_uids.update(found)
    return sorted(study_uids)


def _wanted_series(pacs: Pacs, query: StudyQuery, selection: StudySelection | None,
                   report: RetrievalReport) -> list[SeriesRef]:
    """The series of the modality (and body parts) in the wanted studies.

    A broken archive may file one SeriesInstanceUID under several studies: each part is
    listed here and retrieved into the same cache folder, so it is read as one series, as
    a folder export of it would be.
    """
    series = []
    for study_uid in _wanted_studies(pacs, query, selection, report):
        found = pacs.find_series(study_uid, query.modality)
        if not found and selection is not None and study_uid in selection.study_uids:
            report.unmatched += 1
            log.warning("the PACS holds no %s series of study %s (named in the labels)", query.modality, study_uid)
        series += admitted_series(query, study_uid, found)
    return series


def admitted_series(query: StudyQuery, study_uid: str, found: list[SeriesRef]) -> list[SeriesRef]:
    """The series of one study that pacs.studies.body_parts admits (the left-out ones logged)."""
    kept = [ref for ref in found if query.admits_body_part(ref.body_part)]
    if len(kept) < len(found):
        log.info("study %s: %d of %d series left out (BodyPartExamined missing or not one of %s)", study_uid,
                 len(found) - len(kept), len(found), ", ".join(query.body_parts))
    return kept


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
