"""`pasta-fed client ledger` and `client audit`: the site's privacy spent, and whether its records agree."""
from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from synth.cli_errors import FAILED, fail


def _format(summary: dict) -> str:
    lines = [f"site {summary['site']}  accountant {summary['mechanism']}",
             f"epsilon spent {summary['epsilon']:.4f} of {summary['max_epsilon']:g} "
             f"(remaining {summary['remaining_epsilon']:.4f}) at delta {summary['delta']:g}, "
             f"over every backbone, task, run and attempt",
             _which_delta(summary)]
    if summary["history"]:
        lines.append(f"{'run':<20} {'round':>5} {'try':>3} {'kind':<8} {'task':<9} {'sigma':>8} {'q':>9} "
                     f"{'steps':>6} {'eps after':>9}  status")
        for e in summary["history"]:
            lines.append(f"{str(e['run_id'])[:20]:<20} {e['round']:>5} {e['attempt']:>3} {e['kind']:<8} "
                         f"{str(e['task'] or '-'):<9} {e['noise_multiplier']:>8.4f} {e['sample_rate']:>9.5f} "
                         f"{e['steps']:>6} {e['epsilon_after']:>9.4f}  {e['status']}")
        if len(summary["by_backbone"]) > 1:
            lines.append("per backbone (a report; the budget is the total above): " + ", ".join(
                f"{k[:12]} {v:.4f}" for k, v in summary["by_backbone"].items()))
    else:
        lines.append("nothing released yet")
    return "\n".join(lines)


def _which_delta(summary: dict) -> str:
    if summary["delta"] < summary["site_delta"]:
        return (f"delta {summary['delta']:g}: the coordinator's, stricter than this site's {summary['site_delta']:g}; "
                f"releases are charged at the stricter one, so the next round is checked at it too")
    rows = " (every row below is at it too)" if summary["history"] else ""
    return f"delta {summary['delta']:g}: this site's privacy.delta{rows}"


def _site(args):
    from client.site_config import SiteConfigError, load_site_config
    try:
        return load_site_config(args.config)
    except SiteConfigError as err:
        fail(f"client {args.client_command}", err)
        return None


def run_ledger(args: argparse.Namespace) -> int:
    from .ledger import LedgerError, PrivacyLedger

    config = _site(args)
    if config is None:
        return 2
    try:
        ledger = PrivacyLedger.open_site(config.state_dir)
    except LedgerError as err:
        return fail(f"client {args.client_command}", err, FAILED)
    summary = ledger.summary(config.privacy.delta, config.privacy.max_epsilon, site=config.site)
    if args.json:
        summary["time"] = datetime.now(UTC).isoformat(timespec="seconds")
        print(json.dumps(summary, indent=2))
    else:
        print(_format(summary))
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from .ledger import LedgerError
    from .tamper import inspect_state, repair_state

    config = _site(args)
    if config is None:
        return 2
    try:
        report = repair_state(config.state_dir, site=config.site) if args.repair else \
            inspect_state(config.state_dir, expect=args.expect)
    except LedgerError as err:
        return fail(f"client {args.client_command}", err, FAILED)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        verdict = "repaired" if args.repair else ("consistent" if report.ok else "NOT CONSISTENT")
        print(f"site {config.site}: ledger and audit log {verdict}")
        print(f"audit log {report.audit_path}: {report.lines} line(s), {report.charges} charge(s)")
        print(f"ledger {report.ledger_path}: {report.ledger_entries} entr(y/ies)")
        print(f"audit head {report.head}  (keep it outside the site's state; check later with --expect)")
        for problem in report.problems:
            print(f"problem: {problem}")
    return 0 if report.ok or args.repair else 1


def register(client_subparsers) -> None:
    p = client_subparsers.add_parser("ledger", help="privacy spent and remaining (epsilon) at this site")
    p.add_argument("--config", required=True, help="site YAML")
    p.add_argument("--json", action="store_true",
                   help='print {"site","delta","epsilon","max_epsilon","by_backbone","history":[...]}')
    p.set_defaults(func=run_ledger)

    a = client_subparsers.add_parser("audit", help="check that the privacy ledger and the audit log agree")
    a.add_argument("--config", required=True, help="site YAML")
    a.add_argument("--expect", metavar="HASH", help="an audit head noted earlier: it must still be in the chain")
    a.add_argument("--repair", action="store_true",
                   help="add charges missing from the ledger back, acknowledge lost audit lines, log the repair")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(func=run_audit)
