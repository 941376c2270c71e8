"""`pasta-fed`: one command, subcommands registered by each package's own `cli` module.

The root lives in `simulation` because it is the top of the dependency graph
(synth <- pasta_model <- client, server <- simulation) and may import them all.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from simulation.console import configure_logging

# Each module exposes `register(subparsers)`; it adds its subcommands with
# `set_defaults(func=...)`, where func(args) returns an exit code.
COMMAND_MODULES = (
    "synth.cli",
    "pasta_model.cli",
    "server.cli",
    "client.cli",
    "client.privacy.audit_cli",
    "simulation.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pasta-fed", description="PASTA-Fed: hospitals fine-tune a pan-tumor CT foundation model together, "
                                      "with differential privacy, and no CT leaves a hospital. Guides: docs/ "
                                      "(hospital-guide.md, coordinator-guide.md, simulation.md).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.command)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `pasta-fed certs handout alpha | head`: the reader left; not an error of ours.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
