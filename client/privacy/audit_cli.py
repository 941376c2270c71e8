"""`pasta-fed privacy audit`: attack the site's own DP training with canaries and bound epsilon from below."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from synth.cli_errors import fail

log = logging.getLogger(__name__)


def run_privacy_audit(args: argparse.Namespace) -> int:
    """0: consistent with the claim; 1: the audit found a leak; 2: the audit could not run."""
    from client.privacy.empirical_audit import AuditError, plot_scores, run_audit, write_json
    from client.site_config import SiteConfigError, load_site_config
    try:
        config = load_site_config(args.config)
        result = run_audit(config, task=args.task, canaries=args.canaries, releases=args.releases,
                           confidence=args.confidence, backbone=args.backbone, seed=args.seed)
    except (SiteConfigError, AuditError) as exc:
        return fail("privacy audit", exc)
    print(result.text())
    png = args.png or (args.json.with_suffix(".png") if args.json else None)
    if args.json:
        print(f"json: {write_json(result, args.json)}")
    if png:
        print(f"plot: {plot_scores(result, png)}")
    return 1 if result.leaks else 0


def register(subparsers) -> None:
    group = subparsers.add_parser("privacy", help="privacy tools for a site: an empirical audit of its DP training")
    sub = group.add_subparsers(dest="privacy_command", required=True)
    a = sub.add_parser("audit", help="train with synthetic canaries on a separate ledger, guess them from what "
                                     "would leave the site, and give an epsilon lower bound")
    a.add_argument("--config", type=Path, required=True, help="the site's hospital.yaml")
    a.add_argument("--task", default="report", choices=["report", "stage", "detect"])
    a.add_argument("--canaries", type=int, default=1000, help="canaries, each included with probability 1/2")
    a.add_argument("--releases", type=int, default=1,
                   help="releases of one round the coordinator asks for (replays); >1 also looks for reused noise")
    a.add_argument("--confidence", type=float, default=0.95)
    a.add_argument("--backbone", default=None, help="SHA-256 of an installed backbone (default: the YAML's)")
    a.add_argument("--seed", type=int, default=None, help="seed of the canaries' membership draw only")
    a.add_argument("--json", type=Path, default=None, help="write the result as JSON (and a PNG beside it)")
    a.add_argument("--png", type=Path, default=None, help="histogram of member vs non-member canary scores")
    a.set_defaults(func=run_privacy_audit)
