"""The real ServerApp and ClientApp in Flower's simulation runtime (Ray).

Only the transport differs from a deployment: the ServerApp runs the same
`server.app.run_federation`, and each virtual SuperNode runs the same ClientApp
handlers, with its site YAML chosen by its partition id instead of --node-config.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import make_client_app
from server.app import GlobalEvaluator, run_federation
from server.settings import RunSettings

log = logging.getLogger(__name__)


class SitesByPartition:
    """Partition id -> that simulated hospital's YAML (picklable, for Ray workers)."""

    def __init__(self, configs: list[Path]):
        self.configs = [str(Path(c).resolve()) for c in configs]

    def __call__(self, context: Context) -> Path:
        return Path(self.configs[int(context.node_config["partition-id"])])


def backend_config(num_sites: int) -> dict:
    """Client resources that fit the machine: one CPU per virtual site, GPUs shared."""
    import torch
    cpus = max(1, os.cpu_count() or 1)
    gpus = 1.0 / num_sites if torch.cuda.is_available() else 0.0
    # the sites' own log lines stay in their Ray workers unless -v: the coordinator's round
    # summary already names each site's failure
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose}}


def run_federated(settings: RunSettings, site_configs: list[Path],
                  evaluator: GlobalEvaluator | None = None) -> Path:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings, evaluator)

    client_app = make_client_app(SitesByPartition(site_configs))
    log.info("starting Ray with %d simulated hospital(s) (about 15 s), then %d round(s)",
             len(site_configs), settings.num_server_rounds)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(site_configs),
                   backend_config=backend_config(len(site_configs)))
    final = Path(settings.run_dir) / "final.ckpt"
    if not final.exists():
        raise RuntimeError(f"the federation ended without {final}; see the log above for the failing round")
    return Path(settings.run_dir)
