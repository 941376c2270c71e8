"""A real Orthanc PACS for the tests: Debian's `orthanc` and `orthanc-dicomweb` packages.

Started on free 127.0.0.1 ports with its own storage folder, HTTP basic authentication
(so the agent's credentials file is exercised), the DICOMweb plugin, and the agent's AE
title registered for C-FIND and C-GET. Tests skip, saying how to install it, when the
`Orthanc` binary is absent (`make venv` installs it when run as root).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "install it with: apt-get install -y orthanc orthanc-dicomweb (or run `make venv` as root)"
USER, PASSWORD = "pasta", "s3cret-pacs-password"
CALLING_AE, CALLED_AE = "PASTAFED", "ORTHANC"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Orthanc:
    process: subprocess.Popen
    http_port: int
    dicom_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(method, self.url + path, auth=(USER, PASSWORD), timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, files: Iterable[Path]) -> None:
        """Store DICOM files through Orthanc's REST API (POST /instances), as a modality would."""
        for path in files:
            self.rest("POST", "/instances", data=Path(path).read_bytes(),
                      headers={"Content-Type": "application/dicom"})

    def instance_count(self) -> int:
        return len(self.rest("GET", "/instances").json())


def _config(folder: Path, http_port: int, dicom_port: int) -> dict:
    storage = folder / "storage"
    storage.mkdir(parents=True)
    return {
        "Name": "pasta-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": CALLED_AE,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"pastafed": {"AET": CALLING_AE, "Host": "127.0.0.1", "Port": 104,
                                         "AllowFind": True, "AllowGet": True, "AllowMove": True}},
        "DicomCheckCalledAet": True, "StorageCompression": False, "SaveJobs": False, "HttpThreadsCount": 4,
    }


def _wait_until_up(server: Orthanc, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {server.process.returncode}: {server.log.read_text()[-2000:]}")
        try:
            if requests.get(server.url + "/system", auth=(USER, PASSWORD), timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer on {server.url} within {timeout_s:.0f}s")


def start_orthanc(folder: Path) -> Orthanc:
    """Start Orthanc with a config of its own under `folder`; skip when it is not installed."""
    binary = shutil.which("Orthanc")
    if binary is None or not PLUGIN.is_file():
        pytest.skip(f"Orthanc with its DICOMweb plugin is not installed; {INSTALL}")
    http_port, dicom_port = _free_port(), _free_port()
    config = folder / "orthanc.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(_config(folder, http_port, dicom_port)))
    log = folder / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([binary, str(config)], stdout=out, stderr=subprocess.STDOUT)
    server = Orthanc(process, http_port, dicom_port, log)
    try:
        _wait_until_up(server)
    except BaseException:
        stop_orthanc(server)
        raise
    return server


def stop_orthanc(server: Orthanc) -> None:
    """Kill it: its storage is thrown away with the test, and a clean stop takes Orthanc 3.5 s."""
    server.process.kill()
    server.process.wait(timeout=15)


@pytest.fixture(name="orthanc")
def orthanc_fixture(tmp_path: Path) -> Iterator[Orthanc]:
    """An empty Orthanc of the test's own (it starts in about a second), stopped at teardown."""
    server = start_orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        stop_orthanc(server)
