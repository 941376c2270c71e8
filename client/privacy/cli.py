"""`pasta-fed client ledger`: the site's privacy spent and remaining, per model."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from .ledger import LedgerError, PrivacyLedger, list_ledgers


def _format(summary: dict, others: list[str]) -> str:
    lines = [f"site {summary['site']}  model {summary['model_key'] or '-'}  accountant {summary['mechanism']}",
             f"epsilon spent {summary['epsilon']:.4f} of {summary['max_epsilon']:g} "
             f"(remaining {summary['remaining_epsilon']:.4f}) at delta {summary['delta']:g}"]
    if summary["history"]:
        lines.append(f"{'run':<20} {'round':>5} {'try':>3} {'task':<9} {'sigma':>8} {'q':>9} {'steps':>6} "
                     f"{'eps after':>9}  status")
        for e in summary["history"]:
            lines.append(f"{str(e['run_id'])[:20]:<20} {e['round']:>5} {e['attempt']:>3} {str(e['task'] or '-'):<9} "
                         f"{e['noise_multiplier']:>8.4f} {e['sample_rate']:>9.5f} {e['steps']:>6} "
                         f"{e['epsilon_after']:>9.4f}  {e['status']}")
    else:
        lines.append("no rounds trained yet")
    if others:
        lines.append(f"other models in this state_dir: {', '.join(others)} (use --model)")
    return "\n".join(lines)


def run_ledger(args: argparse.Namespace) -> int:
    from client.site_config import SiteConfigError, load_site_config

    try:
        config = load_site_config(args.config)
    except SiteConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = list_ledgers(config.state_dir)
    keys = [p.name[len("ledger-"):-len(".json")] for p in paths]
    try:
        if args.model:
            if args.model not in keys:
                print(f"error: no ledger for model {args.model!r} in {config.state_dir}/privacy "
                      f"(found: {', '.join(keys) or 'none'})", file=sys.stderr)
                return 1
            ledger = PrivacyLedger.load(paths[keys.index(args.model)])
        elif paths:
            ledger = PrivacyLedger.load(paths[0])  # the most recently updated model
        else:
            ledger = None
    except LedgerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    privacy = config.privacy
    if ledger is None:
        summary = {"site": config.site, "model_key": None, "mechanism": "rdp", "delta": privacy.delta,
                   "epsilon": 0.0, "max_epsilon": privacy.max_epsilon, "remaining_epsilon": privacy.max_epsilon,
                   "history": []}
    else:
        summary = ledger.summary(privacy.delta, privacy.max_epsilon, site=config.site)
    others = [k for k in keys if k != summary["model_key"]]
    if args.json:
        summary["other_models"] = others
        summary["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        print(json.dumps(summary, indent=2))
    else:
        print(_format(summary, others))
    return 0


def register(client_subparsers) -> None:
    p = client_subparsers.add_parser("ledger", help="privacy spent and remaining (epsilon) at this site")
    p.add_argument("--config", required=True, help="site YAML")
    p.add_argument("--model", help="model key (ledger-<KEY>.json); default: the most recently updated")
    p.add_argument("--json", action="store_true",
                   help='print {"site","delta","epsilon","max_epsilon","history":[...]} (plus a few extra keys)')
    p.set_defaults(func=run_ledger)
