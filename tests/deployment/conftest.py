from __future__ import annotations

from pathlib import Path

import pytest
from deploy_cluster import Cluster
from hospital_factory import write_hospital, write_pretrained

CASES = 14   # per site: enough training patients (>= 5) for DP rounds, small enough to be quick


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """The coordinator's pretrained PASTA (tiny preset)."""
    return write_pretrained(tmp_path_factory.mktemp("coordinator-models") / "pasta.ckpt")


@pytest.fixture
def cluster_factory(tmp_path):
    """Make clusters; every process any of them started is stopped at the end, pass or fail."""
    made: list[Cluster] = []

    def make(hospitals: list[str]) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(made)}", hospitals)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop_all()


def hospitals(root: Path, names: list[str], backbone: Path | None = None) -> dict[str, Path]:
    """Fresh hospitals (data + empty state_dir) with their hospital.yaml."""
    return {n: write_hospital(root / "hospitals", n, CASES, seed=i, backbone=backbone)
            for i, n in enumerate(names)}
