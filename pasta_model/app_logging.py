"""INFO lines of a Flower app's own package on stderr, where Flower's processes show them.

`flwr-serverapp` leaves Python logging unconfigured, so only warnings reached stderr
(through logging's last resort) and `flwr log` showed no round progress. In the
SuperNode's `flwr-clientapp` process a library configures the root logger at WARNING, so
the agent's INFO lines (features, each round trained) never reached the SuperNode's output:
a silent minute per round. In a Flower process the package gets its own handler; any other
process (the `pasta-fed` CLI, the simulation, pytest) configures logging itself and is left
alone unless it configured nothing.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def _flower_process() -> bool:
    return Path(sys.argv[0]).name.startswith(("flwr-", "flower-")) if sys.argv and sys.argv[0] else False


def show_package_info(package: str) -> None:
    root, pkg = logging.getLogger(), logging.getLogger(package)
    if pkg.handlers or (root.handlers and not _flower_process()):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False      # the root's handler (if any) must not print each line twice
