"""`pasta-fed client fetch` and `client predict`: the site's CT from its PACS, results back to it.

Run it before `pasta-fed client check` (and again whenever new studies arrive): it
fetches only instances not cached yet, and an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

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


def _study_uids(args: argparse.Namespace) -> list[str]:
    """The studies named by --study-uid (repeatable) or listed in --studies FILE (one UID a line, # comments)."""
    from .types import PacsError, checked_uid

    if args.studies is None:
        return [checked_uid(uid, "--study-uid") for uid in args.study_uid]
    try:
        lines = Path(args.studies).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PacsError(f"{args.studies}: cannot read the list of studies ({type(err).__name__})") from None
    uids = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                uids.append(checked_uid(text, "StudyInstanceUID"))
            except PacsError:
                raise PacsError(f"{args.studies}: line {number}: {text[:80]!r} is not a StudyInstanceUID") from None
    if not uids:
        raise PacsError(f"{args.studies}: lists no study")
    return list(dict.fromkeys(uids))


def run_predict(args: argparse.Namespace) -> int:
    """Series of the site's PACS: fetched into the cache, predicted, and with --store their SEG and SR
    sent back to the same PACS (DICOMweb STOW-RS with the site's own login, or DIMSE C-STORE)."""
    from client.site_config import SiteConfigError, load_site_config
    from pasta_model.shipped import shipped_checkpoint

    from .types import PacsError, SeriesRef, checked_uid

    try:
        config = load_site_config(args.config)
        if config.pacs is None:
            raise SiteConfigError(f"{config.source}: names no pacs")
        studies = _study_uids(args)
        if args.series_uid is not None and len(studies) != 1:
            raise PacsError("--series-uid names a series of one study: give exactly one --study-uid")
        series = None if args.series_uid is None else SeriesRef(studies[0], checked_uid(args.series_uid,
                                                                                        "--series-uid"))
    except (SiteConfigError, PacsError) as err:
        return fail("client predict", err)
    checkpoint = args.checkpoint or shipped_checkpoint()
    if series is not None:
        return _predict_series(config, series, checkpoint, args.out, args.store)
    return _predict_studies(config, studies, checkpoint, args.out, args.store)


def _predict_series(config, series, checkpoint, out: Path, store: bool) -> int:
    from pasta_model.dicom_results import DicomStoreError
    from pasta_model.predict import predict

    from .batch import store_report
    from .retrieve import retrieve_series
    from .types import PacsError

    try:
        report = predict(checkpoint, retrieve_series(config, series), out, device=config.device)
        if store:
            print(f"stored: {store_report(config, report)} instance(s) to {config.pacs.address}")
    except (PacsError, DicomStoreError) as err:
        return fail("client predict", err, FAILED)
    except (ValueError, FileNotFoundError) as err:
        return fail("client predict", err)
    print(f"mask: {report['mask']}")
    for kind, path in report.get("dicom", {}).items():
        print(f"{kind}: {path}")
    return 0


def _predict_studies(config, studies: list[str], checkpoint, out: Path, store: bool) -> int:
    from .batch import predict_studies
    from .types import PacsError

    try:
        outcome = predict_studies(config, studies, checkpoint, out, store=store)
    except PacsError as err:          # the PACS could not be reached at all
        return fail("client predict", err, FAILED)
    failed = {name: why for name, why in outcome.items() if why != "ok"}
    done = len(outcome) - len(failed)
    print(f"predicted {done} series of {len(studies)} study(ies) into {out} (batch.json)"
          + (f"; SEG and SR of each stored to {config.pacs.address}" if store and done else ""))
    for name, why in failed.items():
        print(f"  {name}: {why}")
    return fail("client predict", f"{len(failed)} study(ies) or series failed (see above)", FAILED) if failed else 0


def register(client_subparsers) -> None:
    fetch = client_subparsers.add_parser("fetch", help="retrieve the site's CT from its PACS into state_dir "
                                                       "(only what is not cached yet)")
    fetch.add_argument("--config", required=True, help="site YAML with a pacs section")
    fetch.set_defaults(func=run_fetch)

    predict = client_subparsers.add_parser(
        "predict", help="predict series of the site's PACS (fetched into the cache; a series, or every CT series "
                        "of the studies named) and, with --store, send each SEG and SR back")
    predict.add_argument("--config", required=True, help="site YAML with a pacs section")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--study-uid", action="append", help="StudyInstanceUID (repeat for several studies)")
    which.add_argument("--studies", type=Path, metavar="FILE", help="a file of StudyInstanceUIDs, one a line")
    predict.add_argument("--series-uid", default=None, help="SeriesInstanceUID: only this series of the one "
                                                            "--study-uid (default: every CT series of each study)")
    predict.add_argument("--out", required=True, type=Path,
                         help="folder for mask.nii.gz, report.json, seg.dcm, sr.dcm (with several series: "
                              "OUT/<SeriesInstanceUID>/ each, and OUT/batch.json)")
    predict.add_argument("--checkpoint", default=None, help="default: the shipped model")
    predict.add_argument("--store", action="store_true", help="send seg.dcm and sr.dcm to the site's PACS")
    predict.set_defaults(func=run_predict)
