"""A local Orthanc (Debian's `orthanc` + `orthanc-dicomweb`): the PACS of `simulate --pacs`,
of the PACS tests and of bench/pacs_ingest.py, started one way.

127.0.0.1 only, HTTP basic authentication, DICOMweb on, DIMSE on a free port (with one
peer AE allowed to C-FIND, C-GET and C-STORE when asked), its storage under `home`.

With `tls` (OrthancTls) its DICOM port speaks only DICOM TLS (Orthanc's own, DCMTK) and
its REST/DICOMweb API only HTTPS. Debian 12's Orthanc 1.10.1 cannot serve HTTPS itself:
its civetweb 1.15 looks up SSL_get_peer_certificate, which OpenSSL 3 no longer exports,
and crashes on the first HTTPS connection. So HTTPS is served by a TLS front (Python's
ssl, i.e. OpenSSL) ahead of Orthanc's plain HTTP on 127.0.0.1, as a hospital's reverse
proxy serves its PACS.
"""
from __future__ import annotations

import json
import logging
import secrets
import selectors
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

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


@dataclass(frozen=True)
class OrthancTls:
    """Orthanc serving HTTPS and DICOM TLS with `certificate`/`key` (PEM, signed by `ca`).

    With `client_ca`, both refuse a client without a certificate signed by it (mutual TLS);
    `client` is then the (certificate, key) that `OrthancServer.rest()` presents.
    """
    certificate: Path
    key: Path
    ca: Path
    client_ca: Path | None = None
    client: tuple[Path, Path] | None = None


@dataclass
class OrthancServer:
    process: subprocess.Popen
    http_port: int
    dicom_port: int
    password: str
    log: Path
    tls: OrthancTls | None = None
    front: _TlsFront | None = None     # the HTTPS front (with tls)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def _https(self) -> dict:
        """requests' TLS arguments: verify with the CA, present the client certificate (mutual TLS)."""
        if self.tls is None:
            return {}
        cert = {"cert": tuple(map(str, self.tls.client))} if self.tls.client else {}
        return {"verify": str(self.tls.ca), **cert}

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(method, self.url + path, auth=(USER, self.password), timeout=60,
                                    **self._https(), **kwargs)
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
                                              "AllowFind": True, "AllowGet": True, "AllowMove": True,
                                              "AllowStore": True}}
    return config


def dicom_tls_config(tls: OrthancTls) -> dict:
    """Orthanc's DICOM TLS options (names as Orthanc 1.10's default configuration documents them)."""
    return {"DicomTlsEnabled": True, "DicomTlsCertificate": str(tls.certificate), "DicomTlsPrivateKey": str(tls.key),
            # Orthanc needs a trust list for DICOM TLS even when it requires no client certificate
            "DicomTlsTrustedCertificates": str(tls.client_ca or tls.ca),
            "DicomTlsRemoteCertificateRequired": tls.client_ca is not None}


class _TlsFront(socketserver.ThreadingTCPServer):
    """HTTPS on 127.0.0.1:`port`, each connection relayed to Orthanc's HTTP on `backend_port`."""
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int, backend_port: int, tls: OrthancTls) -> None:
        self.backend_port = backend_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(tls.certificate, tls.key)
        if tls.client_ca is not None:        # mutual TLS: no certificate signed by client_ca, no connection
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cafile=tls.client_ca)
        super().__init__(("127.0.0.1", port), _Relay)
        threading.Thread(target=self.serve_forever, name="orthanc-https-front", daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Relay(socketserver.BaseRequestHandler):
    server: _TlsFront

    def handle(self) -> None:
        self.request.settimeout(30)
        try:
            client = self.server.context.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError):
            _linger(self.request)            # refused in the handshake: let the client read the TLS alert
            return
        try:
            with client, socket.create_connection(("127.0.0.1", self.server.backend_port), timeout=30) as backend:
                _relay(client, backend)
        except OSError:
            pass


def _linger(sock: socket.socket) -> None:
    """Close after the client has stopped sending: closing with its request unread would reset
    the connection, and the client would see that instead of the alert saying why."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2)
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _relay(client: ssl.SSLSocket, backend: socket.socket) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(client, selectors.EVENT_READ, backend)
        selector.register(backend, selectors.EVENT_READ, client)
        while events := selector.select(timeout=60):
            for key, _ in events:
                source, target = cast(socket.socket, key.fileobj), key.data
                data = source.recv(65536)
                if not data:
                    return
                target.sendall(data)
                while isinstance(source, ssl.SSLSocket) and source.pending():   # decrypted, not yet read
                    target.sendall(source.recv(65536))


def _wait_until_up(server: OrthancServer, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {server.process.returncode}; see {server.log}")
        try:
            if requests.get(f"{server.url}/system", auth=(USER, server.password), timeout=2, **server._https()).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer on {server.url} within {timeout_s:.0f}s; see {server.log}")


def start_orthanc(home: Path, *, password: str | None = None, peer_ae: str | None = None,
                  tls: OrthancTls | None = None) -> OrthancServer:
    """Orthanc on free 127.0.0.1 ports; a fresh password unless one is given (its config, 0600, in `home`).

    With `tls`, its REST/DICOMweb server speaks only HTTPS and its DICOM port only DICOM TLS."""
    if not installed():
        raise FileNotFoundError(f"Orthanc with its DICOMweb plugin ({PLUGIN}) is not installed; {INSTALL}")
    password = password or secrets.token_urlsafe(18)
    http_port, dicom_port = _free_port(), _free_port()
    orthanc_http = _free_port() if tls else http_port      # behind the HTTPS front with tls
    home.mkdir(parents=True, exist_ok=True)
    config = home / "orthanc.json"
    with atomic_path(config) as tmp:
        settings = orthanc_config(home, orthanc_http, dicom_port, password, peer_ae)
        tmp.write_text(json.dumps({**settings, **(dicom_tls_config(tls) if tls else {})}))
    config.chmod(0o600)
    log_file = home / "orthanc.log"
    with open(log_file, "ab") as out:
        process = subprocess.Popen([str(shutil.which("Orthanc")), str(config)], stdout=out,
                                   stderr=subprocess.STDOUT)
    server = OrthancServer(process, http_port, dicom_port, password, log_file, tls)
    try:
        if tls is not None:
            server.front = _TlsFront(http_port, orthanc_http, tls)
        _wait_until_up(server)
    except BaseException:
        stop_orthanc(server, grace_s=0)
        raise
    log.info("Orthanc is up on %s (DIMSE port %d), pid %d", server.url, dicom_port, process.pid)
    return server


def stop_orthanc(server: OrthancServer, grace_s: float = 15) -> None:
    """Terminate it, killing it after `grace_s` (0: kill at once, when its storage is thrown away)."""
    if server.front is not None:
        server.front.stop()
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
