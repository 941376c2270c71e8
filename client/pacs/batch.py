"""`client predict` over whole studies: every CT series of each, fetched, predicted with the model
loaded once, and with --store each SEG and SR sent back as soon as its series is done.

A study the PACS cannot list, or a series that cannot be fetched, read or stored, is named
in `OUT/batch.json` with its problem and the others go on.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pasta_model.predict import predict_many, write_batch_report

from .retrieve import admitted_series, connect, retrieve_series
from .store import store_results
from .types import PacsError

log = logging.getLogger(__name__)


def store_report(config, report: dict) -> int:
    """Send one prediction's seg.dcm and sr.dcm to the site's PACS."""
    dicom = report.get("dicom", {})
    if "skipped" in dicom:
        raise PacsError(f"nothing to store: {dicom['skipped']}")
    return store_results(config, list(dicom.values()))


def fetch_studies(config, study_uids: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """Each study's CT series (pacs.studies.body_parts applied) into the cache.

    Returns ({SeriesInstanceUID: cached folder}, {study or series: problem}).
    """
    pacs, query = connect(config), config.pacs.studies
    folders: dict[str, Path] = {}
    problems: dict[str, str] = {}
    for number, study_uid in enumerate(study_uids, 1):
        try:
            found = admitted_series(query, study_uid, pacs.find_series(study_uid, query.modality))
            if not found:
                raise PacsError(f"study {study_uid}: the PACS holds no {query.modality} series to predict")
            log.info("study %d/%d %s: %d series", number, len(study_uids), study_uid, len(found))
            for ref in found:
                folders[ref.series_uid] = retrieve_series(config, ref, pacs)
        except PacsError as err:
            log.error("%s", err)
            problems[study_uid] = str(err)
    return folders, problems


def predict_studies(config, study_uids: list[str], checkpoint: str | Path, out_root: Path, *,
                    store: bool) -> dict[str, str]:
    """Every CT series of the studies into `out_root/<SeriesInstanceUID>/`; returns {name: "ok" | problem}."""
    folders, outcome = fetch_studies(config, study_uids)
    stored: list[int] = []

    def after(name: str, report: dict) -> None:
        stored.append(store_report(config, report))

    if folders:
        outcome.update(predict_many(checkpoint, folders, out_root, device=config.device,
                                    after=after if store else None))
    write_batch_report(out_root, outcome)
    if store:
        log.info("stored %d instance(s) to %s", sum(stored), config.pacs.address)
    return outcome
