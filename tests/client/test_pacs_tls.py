"""TLS to the PACS (DICOMweb https, DICOM TLS) and DIMSE C-STORE, against a real Orthanc.

Orthanc serves DICOM TLS itself; its HTTPS is served by simulation.orthanc's TLS front
(Debian 12's Orthanc 1.10.1 crashes serving HTTPS, see there). Certificates are made by
server.certs.pki, as the consortium's are; the agent's client certificate likewise, with
clientAuth (what DCMTK and OpenSSL check of a TLS client).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from orthanc_pacs import CALLING_AE, Orthanc, own_orthanc
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid
from test_pacs import cli_check, hospital, pacs_site, verdicts  # noqa: F401  (hospital: a fixture)

from client.pacs import PacsError, cache_dir
from client.pacs.dimse import DimsePacs
from client.pacs.store import store_results
from client.site_config import SiteConfigError, load_site_config
from pasta_model.dicom_results import DicomStoreError
from server.certs.pki import (
    SIGNATURE_HASH,
    KeyAndCert,
    cert_pem,
    key_pem,
    make_ca,
    make_server_cert,
    new_ec_key,
)
from simulation.cli import main as pasta_fed
from simulation.orthanc import OrthancTls


def make_client_cert(ca: KeyAndCert, name: str) -> KeyAndCert:
    """The agent's TLS client certificate (clientAuth), signed by `ca`; pki has server certificates only."""
    key = new_ec_key()
    now = ca.cert.not_valid_before_utc
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(ca.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, SIGNATURE_HASH()))
    return KeyAndCert(key, cert)


def _write(folder: Path, name: str, pair: KeyAndCert) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(cert_pem(pair.cert))
    key.write_bytes(key_pem(pair.key))
    key.chmod(0o600)
    return cert, key


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """`pasta-fed` points the root logger at this test's stderr; the next test must not log to a closed one."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:], root.level = handlers, level


@pytest.fixture
def pki(tmp_path) -> SimpleNamespace:
    """The PACS' CA and certificate (for 127.0.0.1), the agent's client certificate, and another CA."""
    folder = tmp_path / "pki"
    ca, other = make_ca("hospital PACS CA", 2), make_ca("some other CA", 2)
    ca_file, _ = _write(folder, "ca", ca)
    other_file, _ = _write(folder, "other-ca", other)
    server = _write(folder, "pacs", make_server_cert(ca, ["127.0.0.1", "localhost"], 2))
    agent = _write(folder, "agent", make_client_cert(ca, "pastafed-agent"))
    stranger = _write(folder, "stranger", make_client_cert(other, "stranger"))
    return SimpleNamespace(ca=ca_file, other_ca=other_file, server=server, agent=agent, stranger=stranger)


@pytest.fixture
def start_tls_orthanc(tmp_path, pki) -> Iterator[Callable[..., Orthanc]]:
    """Start an Orthanc speaking only HTTPS and DICOM TLS (mutual TLS on request); all killed at teardown."""
    with ExitStack() as started:
        def start(*, mutual: bool = False) -> Orthanc:
            tls = OrthancTls(*pki.server, ca=pki.ca, client_ca=pki.ca if mutual else None,
                             client=pki.agent if mutual else None)
            return started.enter_context(own_orthanc(tmp_path / f"orthanc-{id(tls)}", tls=tls))

        yield start


@pytest.fixture
def orthanc(start_tls_orthanc) -> Orthanc:
    """This module's Orthanc (the one test_pacs' `hospital` fixture fills): TLS only, no client certificate."""
    return start_tls_orthanc()


def tls_site(root: Path, orthanc: Orthanc, protocol: str, tls: dict | None):
    """test_pacs' PACS-only site, with `pacs.tls` set to `tls` (none when None)."""
    config = pacs_site(root, orthanc, protocol)
    raw = yaml.safe_load(config.source.read_text())
    if tls is not None:
        raw["pacs"]["tls"] = {k: str(v) for k, v in tls.items()}
    config.source.write_text(yaml.safe_dump(raw))
    return load_site_config(config.source)


def cached(config) -> list[Path]:
    return sorted(p for p in cache_dir(config).rglob("*") if p.is_file())


def fetch_error(config, capsys) -> str:
    """`client fetch` refused: exit 1, one error line (no traceback), nothing cached; returns that line."""
    capsys.readouterr()
    assert pasta_fed(["client", "fetch", "--config", str(config.source)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("pasta-fed client fetch: error:")]
    assert len(lines) == 1, err
    assert cached(config) == []
    return lines[0]


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_fetch_over_tls_reads_like_the_folder(tmp_path, hospital, orthanc, pki, protocol, capsys):  # noqa: F811
    folder, good, gap = hospital
    assert orthanc.url.startswith("https://")
    config = tls_site(tmp_path / "pacs-site", orthanc, protocol, {"ca": pki.ca})
    assert config.pacs.tls.ca == pki.ca and config.pacs.tls.client_cert is None
    assert pasta_fed(["client", "fetch", "--config", str(config.source)]) == 0, capsys.readouterr().err
    assert "2 series, 15 instances" in capsys.readouterr().out
    assert len(cached(config)) == 15
    assert verdicts(config) == verdicts(folder)
    assert cli_check(config, capsys) == cli_check(folder, capsys)


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_pacs_certificate_from_another_ca_is_refused(tmp_path, orthanc, pki, protocol, capsys, w):
    orthanc.upload(w.pydicom_series(tmp_path / "export" / "ct", w.ramp()).files)
    config = tls_site(tmp_path / "pacs-site", orthanc, protocol, {"ca": pki.other_ca})
    line = fetch_error(config, capsys)
    assert config.pacs.address in line
    assert "TLS" in line and "certificate was not trusted" in line and str(pki.other_ca) in line
    before = orthanc.instance_count()
    with pytest.raises((PacsError, DicomStoreError)) as err:        # --store goes the same way
        store_results(config, [a_seg_file(tmp_path / "seg.dcm")])
    where = f"STOW-RS to {orthanc.dicomweb}" if protocol == "dicomweb" else config.pacs.address
    assert str(err.value).startswith(f"{where}: TLS: the PACS' certificate was not trusted")
    assert orthanc.instance_count() == before


def test_an_https_pacs_unknown_to_the_system_cas_says_to_name_its_ca(tmp_path, orthanc, capsys, w):
    orthanc.upload(w.pydicom_series(tmp_path / "export" / "ct", w.ramp()).files)
    config = tls_site(tmp_path / "pacs-site", orthanc, "dicomweb", None)
    line = fetch_error(config, capsys)
    assert f"DICOMweb {orthanc.dicomweb}: TLS: the PACS' certificate was not trusted" in line
    assert "pacs.tls.ca" in line


def test_a_plain_dimse_site_is_refused_by_a_tls_only_pacs(tmp_path, orthanc, capsys):
    config = tls_site(tmp_path / "pacs-site", orthanc, "dimse", None)
    line = fetch_error(config, capsys)
    assert f"{config.pacs.address}: association refused or PACS unreachable" in line


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_mutual_tls_needs_the_agents_certificate(tmp_path, start_tls_orthanc, pki, protocol, capsys, w):
    orthanc = start_tls_orthanc(mutual=True)
    series = w.pydicom_series(tmp_path / "export" / "ct", w.ramp())
    orthanc.upload(series.files)                       # the test's own REST calls present the agent's certificate

    without = tls_site(tmp_path / "no-cert", orthanc, protocol, {"ca": pki.ca})
    line = fetch_error(without, capsys)
    assert without.pacs.address in line and "TLS" in line and "client certificate" in line

    cert, key = pki.stranger                           # signed by a CA the PACS does not trust
    stranger = tls_site(tmp_path / "stranger", orthanc, protocol, {"ca": pki.ca, "certificate": cert, "key": key})
    line = fetch_error(stranger, capsys)
    assert stranger.pacs.address in line and "TLS handshake failed: the PACS did not accept the connection" in line

    cert, key = pki.agent
    with_cert = tls_site(tmp_path / "cert", orthanc, protocol, {"ca": pki.ca, "certificate": cert, "key": key})
    assert with_cert.pacs.tls.client_cert == (cert, key)
    assert pasta_fed(["client", "fetch", "--config", str(with_cert.source)]) == 0, capsys.readouterr().err
    assert {p.name for p in cached(with_cert)} == {f"{pydicom.dcmread(f).SOPInstanceUID}.dcm" for f in series.files}


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    from pasta_model.checkpoint import save_checkpoint
    from pasta_model.network import build_model

    path = tmp_path / "model.safetensors"
    save_checkpoint(path, build_model("tiny"))
    return path


@pytest.mark.parametrize("protocol, tls", [("dimse", False), ("dimse", True), ("dicomweb", True)])
def test_predict_store_sends_seg_and_sr_back(tmp_path, w, tls, protocol, pki, start_tls_orthanc, tiny_checkpoint,
                                             capsys, request):
    """`client predict --store`: C-STORE on a DIMSE site (STOW-RS on a DICOMweb one), over TLS or not;
    Orthanc holds a Segmentation and a Comprehensive 3D SR afterwards."""
    orthanc = start_tls_orthanc() if tls else request.getfixturevalue("plain_orthanc")
    ct = np.random.default_rng(3).normal(2100, 60, (24, 64, 64)).astype(np.int16)   # 40 HU soft tissue
    good = w.pydicom_series(tmp_path / "export" / "ct", ct, spacing=(3.0, 3.0, 3.0))
    orthanc.upload(good.files)
    before = set(orthanc.rest("GET", "/instances").json())
    config = tls_site(tmp_path / "pacs-site", orthanc, protocol, {"ca": pki.ca} if tls else None)
    first = pydicom.dcmread(good.files[0])
    out = tmp_path / "pred"
    assert pasta_fed(["client", "predict", "--config", str(config.source), "--study-uid", first.StudyInstanceUID,
                      "--series-uid", first.SeriesInstanceUID, "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                      "--store"]) == 0, capsys.readouterr().err
    assert f"stored: 2 instance(s) to {config.pacs.address}" in capsys.readouterr().out
    new = set(orthanc.rest("GET", "/instances").json()) - before
    tags = [orthanc.rest("GET", f"/instances/{i}/simplified-tags").json() for i in new]
    stored = {t["SOPInstanceUID"]: t["SOPClassUID"] for t in tags}
    written = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in map(pydicom.dcmread, (out / "seg.dcm",
                                                                                            out / "sr.dcm"))}
    assert stored == written
    assert sorted(stored.values()) == sorted([SegmentationStorage, Comprehensive3DSRStorage])


@pytest.fixture
def plain_orthanc(tmp_path) -> Iterator[Orthanc]:
    """A plain (no TLS) Orthanc, as test_pacs' `orthanc` fixture starts it."""
    with own_orthanc(tmp_path / "plain-orthanc") as server:
        yield server


def a_seg_file(path: Path) -> Path:
    """A file of the Segmentation Storage class (its content matters to no check here)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SegmentationStorage, generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_refused_c_store_names_the_pacs_and_the_status(tmp_path, w):
    """A PACS answering C-STORE with a failure status (here pynetdicom's own SCP, out of resources)."""
    from pynetdicom import AE, evt

    from simulation.orthanc import _free_port

    path = a_seg_file(tmp_path / "seg.dcm")
    scp = AE("FULLPACS")
    scp.add_supported_context(SegmentationStorage, ExplicitVRLittleEndian)
    port = _free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    try:
        pacs = DimsePacs("127.0.0.1", port, "FULLPACS", CALLING_AE)
        with pytest.raises(PacsError, match=rf"DIMSE FULLPACS@127.0.0.1:{port}: C-STORE of Segmentation seg.dcm "
                                            r"failed \(status 0xa700\)"):
            pacs.store([path])
    finally:
        server.shutdown()
    ct = w.pydicom_series(tmp_path / "ct", w.ramp()).files[0]
    with pytest.raises(PacsError, match="is not one C-STORE sends here"):
        pacs.store([ct])


# --- the site YAML's pacs.tls ------------------------------------------------------------------------------------

@pytest.fixture
def site(tmp_path, pki) -> dict:
    return {"site": "hospital-a",
            "pacs": {"dicomweb": "https://pacs.example.org/dicom-web", "tls": {"ca": "pki/ca.crt"}},
            "privacy": {"max_epsilon": 8.0, "delta": 1.0e-5, "max_grad_norm": 1.0}, "state_dir": "state"}


def _load(tmp_path, config: dict):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_site_config(path)


def test_tls_paths_resolve_against_the_yaml(tmp_path, site, pki):
    tls = _load(tmp_path, site).pacs.tls
    assert (tls.ca, tls.client_cert) == (pki.ca, None)
    site["pacs"]["tls"].update(certificate="pki/agent.crt", key="pki/agent.key")
    site["pacs"]["dimse"] = {"host": "127.0.0.1", "port": 11112, "called_ae": "PACS"}
    del site["pacs"]["dicomweb"]
    assert _load(tmp_path, site).pacs.tls.client_cert == pki.agent      # DIMSE TLS takes the same section


@pytest.mark.parametrize("edit, message", [
    (lambda t, p: p.update(dicomweb="http://pacs.example.org/dicom-web"),
     "pacs: tls needs an https:// dicomweb URL, got http://pacs.example.org/dicom-web"),
    (lambda t, p: t.update(certificate="pki/agent.crt"),
     "pacs.tls: certificate is given without key: mutual TLS needs both (or neither)"),
    (lambda t, p: t.update(key="pki/agent.key"), "pacs.tls: key is given without certificate"),
    (lambda t, p: t.update(ca="pki/missing.crt"), "pacs.tls.ca: file not found: "),
    (lambda t, p: t.update(certificate="pki/agent.crt", key="nokey.pem"), "pacs.tls.key: file not found: "),
    (lambda t, p: t.pop("ca"), "pacs.tls.ca: is required"),
    (lambda t, p: t.update(verify=False), "pacs.tls.verify: unknown key (valid keys: ca, certificate, key)"),
    (lambda t, p: p.update(tls="pki/ca.crt"), "pacs.tls: must be a mapping"),
])
def test_bad_tls_settings_name_the_key(tmp_path, site, edit, message):
    edit(site["pacs"]["tls"], site["pacs"])
    with pytest.raises(SiteConfigError) as err:
        _load(tmp_path, site)
    assert str(err.value).startswith(f"{(tmp_path / 'site.yaml').resolve()}: ")
    assert message in str(err.value)
