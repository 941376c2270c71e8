"""`pasta-fed client fetch` and `client predict`: the site's CT from its PACS, results back to it.

Run it before `pasta-fed client check` (and again whenever new studies arrive): it
fetches only instances not cached yet, and an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import logging

from synth.cli_errors import FAILED, fail

log = logging.getLogger("client.pacs")


def run_fetch(args: argparse.Namespace) -> int:
    from client.site_config import SiteConfigError, load_site_config

    from .retrieve import retrieve
    from .types import PacsError

    try:
        config = load_site_config(args.config)
    except SiteConfigError as err:
        return fail("client fetch", err)
    if config.pacs is None:
        return fail("client fetch", f"{config.source}: names no pacs")
    try:
        report = retrieve(config)
    except PacsError as err:
        return fail("client fetch", err, FAILED)
    print(f"{report.series} series, {report.instances} instances in {report.cache} ({report.fetched} fetched now)")
    if report.unmatched:
        print(f"{report.unmatched} study(ies) named in the labels are not on the PACS (see the log)")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """One series of the site's PACS: fetched into the cache, predicted, and with --store its SEG
    and SR sent back to the same PACS (DICOMweb STOW-RS, with the site's own login)."""
    from client.site_config import SiteConfigError, load_site_config
    from pasta_model.dicom_results import DicomStoreError, store_dicomweb
    from pasta_model.predict import predict
    from pasta_model.shipped import shipped_checkpoint

    from .retrieve import retrieve_series
    from .types import PacsError, SeriesRef, checked_uid

    try:
        config = load_site_config(args.config)
        if config.pacs is None:
            raise SiteConfigError(f"{config.source}: names no pacs")
        if args.store and config.pacs.dicomweb is None:
            raise SiteConfigError(f"{config.source}: pacs: --store sends by DICOMweb STOW-RS; this PACS is "
                                  f"reached by DIMSE (C-STORE is not supported yet)")
        series = SeriesRef(checked_uid(args.study_uid, "--study-uid"), checked_uid(args.series_uid, "--series-uid"))
    except (SiteConfigError, PacsError) as err:
        return fail("client predict", err)
    try:
        folder = retrieve_series(config, series)
        report = predict(args.checkpoint or shipped_checkpoint(), folder, args.out, device=config.device)
        if args.store:
            if "skipped" in report.get("dicom", {}):
                raise DicomStoreError(f"nothing to store: {report['dicom']['skipped']}")
            stored = store_dicomweb(config.pacs.dicomweb, list(report["dicom"].values()), config.pacs.credentials)
            print(f"stored: {stored} instance(s) to {config.pacs.address}")
    except (PacsError, DicomStoreError) as err:
        return fail("client predict", err, FAILED)
    except (ValueError, FileNotFoundError) as err:
        return fail("client predict", err)
    print(f"mask: {report['mask']}")
    for kind, path in report.get("dicom", {}).items():
        print(f"{kind}: {path}")
    return 0


def register(client_subparsers) -> None:
    fetch = client_subparsers.add_parser("fetch", help="retrieve the site's CT from its PACS into state_dir "
                                                       "(only what is not cached yet)")
    fetch.add_argument("--config", required=True, help="site YAML with a pacs section")
    fetch.set_defaults(func=run_fetch)

    predict = client_subparsers.add_parser("predict", help="predict one series of the site's PACS (fetched into "
                                                           "the cache) and, with --store, send its SEG and SR back")
    predict.add_argument("--config", required=True, help="site YAML with a pacs section")
    predict.add_argument("--study-uid", required=True, help="StudyInstanceUID")
    predict.add_argument("--series-uid", required=True, help="SeriesInstanceUID")
    predict.add_argument("--out", required=True, help="folder for mask.nii.gz, report.json, seg.dcm, sr.dcm")
    predict.add_argument("--checkpoint", default=None, help="default: the shipped model")
    predict.add_argument("--store", action="store_true", help="send seg.dcm and sr.dcm to the site's PACS")
    predict.set_defaults(func=run_predict)
