"""`pasta-fed client ...`: the hospital agent's commands (check, show; ledger from client.privacy)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from synth.cli_errors import fail

from .pacs import cli as pacs_cli
from .privacy import cli as privacy_cli
from .site_config import SiteConfigError, load_site_config


def _load(args):
    try:
        return load_site_config(args.config)
    except SiteConfigError as err:
        fail(f"client {args.client_command}", err)
        return None


def run_check(args: argparse.Namespace) -> int:
    from .check import check_site, format_report

    config = _load(args)
    if config is None:
        return 2
    report = check_site(config)
    if args.json:
        print(json.dumps(report.to_json(), indent=None if args.compact else 2))
    else:
        print(format_report(report))
    return 0 if report.usable > 0 else 1


def _window(text: str) -> tuple[float, float]:
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEVEL,WIDTH in HU, got {text!r}") from None
    if width <= 0:
        raise argparse.ArgumentTypeError("window width must be > 0")
    return level, width


def run_show(args: argparse.Namespace) -> int:
    from .ingest import IngestError
    from .show import ShowError, describe, find_case, format_description, write_nifti, write_png

    config = _load(args)
    if config is None:
        return 2
    try:
        case = find_case(config, args.case)
        info = describe(case)
        print(json.dumps(info, indent=2) if args.json else format_description(info))
        if args.nifti:
            print(f"wrote {write_nifti(config, case, Path(args.nifti))}", file=sys.stderr)
        if args.png:
            print(f"wrote {write_png(config, case, Path(args.png), args.window)}", file=sys.stderr)
    except (ShowError, IngestError) as err:
        return fail("client show", err)
    return 0


def register(subparsers) -> None:
    client = subparsers.add_parser("client", help="hospital agent: check data, inspect cases, privacy ledger")
    client_sub = client.add_subparsers(dest="client_command", required=True)

    check = client_sub.add_parser("check", help="read every case as the agent would; usable cases per task")
    check.add_argument("--config", required=True, help="site YAML (configs/hospital.example.yaml)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--compact", action="store_true", help="with --json: one line")
    check.set_defaults(func=run_check)

    show = client_sub.add_parser("show", help="what the agent reads for one case: geometry, HU, images")
    show.add_argument("--config", required=True, help="site YAML")
    show.add_argument("--case", required=True, help="case_id as listed by 'client check'")
    show.add_argument("--nifti", help="write the volume as read (HU, real geometry) to this .nii.gz")
    show.add_argument("--png", help="write an axial/coronal/sagittal montage to this PNG")
    show.add_argument("--window", type=_window, default=(40.0, 400.0),
                      help="HU window LEVEL,WIDTH for --png (default 40,400)")
    show.add_argument("--json", action="store_true", help="print the description as JSON")
    show.set_defaults(func=run_show)

    privacy_cli.register(client_sub)   # `client ledger`, owned by client.privacy
    pacs_cli.register(client_sub)      # `client fetch`, owned by client.pacs
