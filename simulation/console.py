"""What `pasta-fed` prints: our own INFO lines, without the libraries' noise.

Flower logs DEBUG to its own handler and also propagates to the root logger (each line
twice), Alembic announces its plugins, MONAI and Ray warn about optional accelerators,
Opacus about its alpha grid. None of it helps a user; `-v` shows all of it. For
`simulate`, whose hospitals and coordinator are all in this process, only the
simulation's steps and the coordinator's round summaries are shown.
"""
from __future__ import annotations

import logging
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = {"alembic": logging.WARNING, "flwr": logging.WARNING, "ray": logging.WARNING,
         "dicomweb_client": logging.WARNING, "pynetdicom": logging.WARNING,
         "monai.data.nvimgcodec_pydicom_plugin": logging.ERROR, "py.warnings": logging.ERROR}
# A simulation's own lines: its steps, the coordinator's round summaries and result files.
SIMULATE_SHOWN = ("simulation", "server.rounds", "server.app")
SIMULATE_QUIET = ("synth", "pasta_model", "client", "server")
# Flower 1.42 deprecates run_simulation for `flwr run` with a simulation federation, which
# cannot run a ServerApp built around this process's own objects; told once in docs/architecture.md.
_RUN_SIMULATION_DEPRECATED = "The `run_simulation` function is deprecated"


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RUN_SIMULATION_DEPRECATED not in record.getMessage()


def configure_logging(verbose: bool, command: str) -> None:
    """One handler on the root logger; libraries quiet unless `verbose`."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)   # propagated records skip logger levels
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    logging.captureWarnings(True)           # library warnings.warn() -> "py.warnings", quiet below
    warnings.simplefilter("default")
    for name, level in NOISY.items():
        logging.getLogger(name).setLevel(level)
    flwr = logging.getLogger("flwr")
    flwr.propagate = False                  # Flower has its own console handler: no line twice
    flwr.addFilter(_DropRunSimulationDeprecation())
    if command == "simulate":
        for name in SIMULATE_QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in SIMULATE_SHOWN:
            logging.getLogger(name).setLevel(logging.INFO)
