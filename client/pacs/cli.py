"""`pasta-fed client fetch --config hospital.yaml`: retrieve the site's CT from its PACS into the cache.

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


def register(client_subparsers) -> None:
    fetch = client_subparsers.add_parser("fetch", help="retrieve the site's CT from its PACS into state_dir "
                                                       "(only what is not cached yet)")
    fetch.add_argument("--config", required=True, help="site YAML with a pacs section")
    fetch.set_defaults(func=run_fetch)
