"""Run a federation in its own process (so a test can SIGKILL it): ROOT RUN_DIR ROUNDS SITE_YAML..."""
import logging
import sys
from pathlib import Path

from server.settings import RunSettings
from simulation.federation import run_federated

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    pre, run_dir, rounds, *sites = sys.argv[1:]
    settings = RunSettings(num_server_rounds=int(rounds), task="report", pretrained=pre, run_dir=run_dir,
                           min_sites=2, local_epochs=1, round_timeout=300.0, seed=3)
    run_federated(settings, [Path(s) for s in sites])
