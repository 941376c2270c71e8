"""A real Orthanc PACS for the tests (Debian's `orthanc` and `orthanc-dicomweb`), started by
`simulation.orthanc` as the simulation's is: free 127.0.0.1 ports, its own storage, HTTP basic
authentication (so the agent's credentials file is exercised), DICOMweb, and the agent's AE
title allowed to C-FIND and C-GET. Tests skip, saying how to install it, when it is absent
(`make venv` installs it when run as root).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from simulation.orthanc import INSTALL, ORTHANC_AE, PLUGIN, USER, installed, start_orthanc, stop_orthanc
from simulation.orthanc import OrthancServer as Orthanc

__all__ = ["CALLED_AE", "CALLING_AE", "PASSWORD", "PLUGIN", "USER", "Orthanc", "orthanc_fixture", "own_orthanc"]
PASSWORD = "s3cret-pacs-password"
CALLING_AE, CALLED_AE = "PASTAFED", ORTHANC_AE


@contextmanager
def own_orthanc(home: Path, **kwargs) -> Iterator[Orthanc]:
    """An empty Orthanc of the test's own (it starts in about a second), killed on the way out;
    skips the test, saying how to install it, when Orthanc is absent. kwargs: start_orthanc's (tls)."""
    if not installed():
        pytest.skip(f"Orthanc with its DICOMweb plugin is not installed; {INSTALL}")
    server = start_orthanc(home, password=PASSWORD, peer_ae=CALLING_AE, **kwargs)
    try:
        yield server
    finally:
        stop_orthanc(server, grace_s=0)    # its storage goes with the test; a clean stop takes 3.5 s


@pytest.fixture(name="orthanc")
def orthanc_fixture(tmp_path: Path) -> Iterator[Orthanc]:
    with own_orthanc(tmp_path / "orthanc") as server:
        yield server
