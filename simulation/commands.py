"""`pasta-fed simulate` and `pasta-fed demo`: thin shells over `simulation.runner`."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pasta_model.protocol import TASKS
from simulation.config import DEFAULT_CONFIG, SimulationConfig, SimulationConfigError
from synth.cli_errors import fail

log = logging.getLogger(__name__)
DEMO_CONFIG = DEFAULT_CONFIG.parent / "demo.yaml"


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """The YAML (default configs/simulation.yaml) with the command line's overrides on top."""
    return SimulationConfig.load(args.config, hospitals=args.hospitals, rounds=args.rounds, preset=args.preset,
                                 task=args.task, epsilon=args.epsilon, seed=args.seed, pretrained=args.pretrained,
                                 pacs=args.pacs or None)


def _simulate(args: argparse.Namespace) -> int:
    from simulation.runner import simulate
    try:
        if args.resume:
            report = simulate(SimulationConfig(), Path(args.resume), resume=True)
        else:
            report = simulate(config_from_args(args), Path(args.out))
    except SimulationConfigError as exc:
        return fail("simulate", exc)
    print(f"report: {report}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from simulation.runner import demo_pretraining, simulate
    out = Path(args.out)
    try:
        cfg = SimulationConfig.load(DEMO_CONFIG)
        if not args.skip_pretraining:
            demo_pretraining(cfg, out)
        report = simulate(cfg, out, resume=(out / "simulation.json").exists())
    except SimulationConfigError as exc:
        return fail("demo", exc)
    print(f"report: {report}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a federation of hospitals on this machine")
    p.add_argument("--config", type=Path, default=None, help=f"YAML (default {DEFAULT_CONFIG.name})")
    p.add_argument("--out", type=Path, default=Path("runs/simulation"), help="run directory")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN", help="continue a stopped simulation")
    p.add_argument("--hospitals", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--preset")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--epsilon", type=float, help="each site's privacy budget")
    p.add_argument("--seed", type=int)
    p.add_argument("--pretrained", help="a pasta-fed checkpoint, 'shipped' (the default: the model shipped with "
                                        "the package) or 'pretrain' (pretrain one here, or reuse the cached one)")
    p.add_argument("--pacs", action="store_true",
                   help="keep the first hospital's CT in a local Orthanc (PACS) its agent retrieves it from")
    p.set_defaults(func=_simulate)
    d = sub.add_parser("demo", help="the main job: synthetic data, pretraining, a 3-hospital DP federation, a report")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--skip-pretraining", action="store_true",
                   help="skip the short pretraining the demo shows (the federation uses the shipped model either way)")
    d.set_defaults(func=_demo)
