"""A local Orthanc (Debian's `orthanc` + `orthanc-dicomweb`): the PACS of `simulate --pacs`,
of the PACS tests and of bench/pacs_ingest.py, started one way.

127.0.0.1 only, HTTP basic authentication, DICOMweb on, DIMSE on a free port (with one
peer AE allowed to C-FIND and C-GET when asked), its storage under `home`.
"""
from __future__ import annotations

import json
import logging
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from synth.atomic import atomic_path

log = logging.getLogger(__name__)

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "install it with: apt-get install -y orthanc orthanc-dicomweb (or run `make venv` as root)"
USER = "pasta"
ORTHANC_AE = "ORTHANC"


def installed() -> bool:
    return shutil.which("Orthanc") is not None and PLUGIN.is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancServer:
    process: subprocess.Popen
    http_port: int
    dicom_port: int
    password: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(method, self.url + path, auth=(USER, self.password), timeout=60, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, files: Iterable[Path]) -> int:
        """Store DICOM files (POST /instances, as a modality would); storing one again is a no-op."""
        count = 0
        for path in files:
            self.rest("POST", "/instances", data=Path(path).read_bytes(), headers={"Content-Type": "application/dicom"})
            count += 1
        return count

    def instance_count(self) -> int:
        return len(self.rest("GET", "/instances").json())


def orthanc_config(home: Path, http_port: int, dicom_port: int, password: str, peer_ae: str | None) -> dict:
    storage = home / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {"Name": "pasta-fed", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": ORTHANC_AE, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: password}, "Plugins": [str(PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StorageCompression": False, "SaveJobs": False,
              "HttpThreadsCount": 4}
    if peer_ae is not None:
        config["DicomCheckCalledAet"] = True
        config["DicomModalities"] = {"peer": {"AET": peer_ae, "Host": "127.0.0.1", "Port": 104,
                                              "AllowFind": True, "AllowGet": True, "AllowMove": True}}
    return config


def _wait_until_up(server: OrthancServer, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {server.process.returncode}; see {server.log}")
        try:
            if requests.get(f"{server.url}/system", auth=(USER, server.password), timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer on {server.url} within {timeout_s:.0f}s; see {server.log}")


def start_orthanc(home: Path, *, password: str | None = None, peer_ae: str | None = None) -> OrthancServer:
    """Orthanc on free 127.0.0.1 ports; a fresh password unless one is given (its config, 0600, in `home`)."""
    if not installed():
        raise FileNotFoundError(f"Orthanc with its DICOMweb plugin ({PLUGIN}) is not installed; {INSTALL}")
    password = password or secrets.token_urlsafe(18)
    http_port, dicom_port = _free_port(), _free_port()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "orthanc.json"
    with atomic_path(config) as tmp:
        tmp.write_text(json.dumps(orthanc_config(home, http_port, dicom_port, password, peer_ae)))
    config.chmod(0o600)
    log_file = home / "orthanc.log"
    with open(log_file, "ab") as out:
        process = subprocess.Popen([str(shutil.which("Orthanc")), str(config)], stdout=out,
                                   stderr=subprocess.STDOUT)
    server = OrthancServer(process, http_port, dicom_port, password, log_file)
    try:
        _wait_until_up(server)
    except BaseException:
        stop_orthanc(server, grace_s=0)
        raise
    log.info("Orthanc is up on %s (DIMSE port %d), pid %d", server.url, dicom_port, process.pid)
    return server


def stop_orthanc(server: OrthancServer, grace_s: float = 15) -> None:
    """Terminate it, killing it after `grace_s` (0: kill at once, when its storage is thrown away)."""
    if grace_s > 0:
        server.process.terminate()
        try:
            server.process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    server.process.kill()
    server.process.wait(timeout=15)


@contextmanager
def running_orthanc(home: Path, **kwargs) -> Iterator[OrthancServer]:
    """Orthanc for the duration of the block, stopped on the way out, error or not."""
    server = start_orthanc(home, **kwargs)
    try:
        yield server
    finally:
        stop_orthanc(server)
