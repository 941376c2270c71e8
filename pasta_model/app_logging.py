"""INFO lines of a Flower app's own package on stderr, where Flower's processes show them.

`flwr-serverapp` and the SuperNode's ClientApp process leave Python logging unconfigured,
so only warnings reached stderr (through logging's last resort): `flwr log` showed no
round progress, and a SuperNode was silent for the minute a round's features take. A
process that configured logging itself (the `pasta-fed` CLI, the simulation) is left alone.
"""
from __future__ import annotations

import logging


def show_package_info(package: str) -> None:
    root, pkg = logging.getLogger(), logging.getLogger(package)
    if root.handlers or pkg.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False      # a root handler configured later must not print each line twice
