"""`pasta-fed certs`: real certificates and keys on disk, checked with openssl and
with Flower's own key loaders; one slow test runs a real TLS flower-superlink."""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server import cli
from server.certs import (
    Layout,
    ProvisioningError,
    add_hospital,
    init_consortium,
    make_handout,
    renew_server_cert,
    server_names_of,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "provisioning.md"
NAMES = ["localhost", "127.0.0.1", "superlink.example.org", "10.0.0.7", "::1"]
VENV_BIN = Path(sys.executable).parent


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> Layout:
    out = tmp_path_factory.mktemp("pki") / "consortium"
    assert run_cli("certs", "init", "--out", str(out), "--server-name", ",".join(NAMES),
                   "--hospitals", "alpha,beta,gamma") == 0
    return Layout(out)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary absent")
def test_openssl_verify_accepts_server_cert_against_ca(consortium):
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(consortium.ca_cert),
         "-purpose", "sslserver", str(consortium.server_cert)],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(": OK")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary absent")
def test_openssl_rejects_server_cert_against_another_ca(consortium, tmp_path):
    other = tmp_path / "other"
    init_consortium(other, ["localhost"])
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(other / "ca.crt"),
         str(consortium.server_cert)], capture_output=True, text=True, check=False,
    )
    assert res.returncode != 0


def test_server_cert_sans_are_exactly_the_given_names(consortium):
    san = load_cert(consortium.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1")]
    assert len(list(san)) == len(NAMES)


def test_renew_server_keeps_ca_and_hospitals_and_verifies(tmp_path, capsys):
    out = tmp_path / "c"
    init_consortium(out, ["localhost", "127.0.0.1"], ["alpha"])
    before = snapshot(out)
    old = load_cert(out / "server.crt")
    assert run_cli("certs", "renew-server", "--out", str(out), "--days", "30") == 0
    after = snapshot(out)
    unchanged = {k for k in before if not k.startswith("server.")}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    new = load_cert(out / "server.crt")
    assert new.serial_number != old.serial_number
    assert server_names_of(out / "server.crt") == ["localhost", "127.0.0.1"]
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days in (29, 30)
    new.verify_directly_issued_by(load_cert(out / "ca.crt"))
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    assert renew_server_cert(out, ["superlink.example.org"]) == ["superlink.example.org"]
    # a CA key that does not match its certificate is named, nothing is written
    other = tmp_path / "other"
    init_consortium(other, ["localhost"])
    (out / "ca.key").write_bytes((other / "ca.key").read_bytes())
    kept = (out / "server.crt").read_bytes()
    assert run_cli("certs", "renew-server", "--out", str(out)) == 2
    assert str(out / "ca.key") in capsys.readouterr().err
    assert (out / "server.crt").read_bytes() == kept


def test_server_names_keep_the_given_order(consortium):
    assert server_names_of(consortium.server_cert) == NAMES


def test_server_cert_is_server_auth_leaf_and_ca_signs_certs(consortium):
    server = load_cert(consortium.server_cert)
    ca = load_cert(consortium.ca_cert)
    assert server.issuer == ca.subject
    assert server.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    server.verify_directly_issued_by(ca)
    # server key matches its certificate
    key = serialization.load_pem_private_key(consortium.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_hospital_keys_are_p384_in_the_formats_flower_loads(consortium):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    for name in ("alpha", "beta", "gamma"):
        priv = serialization.load_ssh_private_key(
            consortium.hospital_key(name).read_bytes(), None)  # as flower-supernode does
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        assert priv.curve.name == "secp384r1"
        # `flwr supernode register` loader, and the key it sends matches the private one
        assert try_load_public_key(consortium.hospital_pub(name)) == public_key_to_bytes(
            priv.public_key())
    assert consortium.hospitals() == ["alpha", "beta", "gamma"]
    keys = {consortium.hospital_pub(n).read_bytes() for n in ("alpha", "beta", "gamma")}
    assert len(keys) == 3


def test_private_key_files_are_0600_and_public_files_readable(consortium):
    private = [consortium.ca_key, consortium.server_key] + [
        consortium.hospital_key(n) for n in ("alpha", "beta", "gamma")]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [consortium.ca_cert, consortium.server_cert, consortium.hospital_pub("alpha")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not list(consortium.root.rglob(".*.tmp")), "temp files left behind"


def test_rerun_without_force_refuses_and_leaves_files_unchanged(tmp_path, capsys):
    out = tmp_path / "c"
    assert run_cli("certs", "init", "--out", str(out), "--server-name", "localhost",
                   "--hospitals", "alpha") == 0
    before = snapshot(out)
    assert run_cli("certs", "init", "--out", str(out), "--server-name", "localhost",
                   "--hospitals", "alpha,beta") == 2
    err = capsys.readouterr().err
    assert "--force" in err and str(out / "ca.key") in err
    assert snapshot(out) == before  # nothing replaced, and beta not half-created
    assert run_cli("certs", "add-hospital", "alpha", "--out", str(out)) == 2
    assert str(out / "hospitals" / "alpha" / "alpha.key") in capsys.readouterr().err
    assert snapshot(out) == before


def test_force_replaces_everything(tmp_path):
    out = tmp_path / "c"
    init_consortium(out, ["localhost"], ["alpha"])
    before = snapshot(out)
    assert run_cli("certs", "init", "--out", str(out), "--server-name", "127.0.0.1",
                   "--hospitals", "alpha", "--force") == 0
    after = snapshot(out)
    assert set(after) == set(before)
    assert all(after[k] != before[k] for k in before)
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    old_alpha = after["hospitals/alpha/alpha.pub"]
    add_hospital(out, "alpha", force=True)
    assert (out / "hospitals/alpha/alpha.pub").read_bytes() != old_alpha


def test_add_hospital_creates_new_pair_and_needs_a_ca(tmp_path):
    with pytest.raises(ProvisioningError, match="certs init"):
        add_hospital(tmp_path / "nothing", "delta")
    init_consortium(tmp_path / "c", ["localhost"])
    keys = add_hospital(tmp_path / "c", "delta")
    assert keys.private_key == tmp_path / "c/hospitals/delta/delta.key"
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    assert serialization.load_ssh_public_key(keys.public_key.read_bytes()).curve.name == "secp384r1"


@pytest.mark.parametrize("bad", ["https://x.org", "host:8000", "a b", "-bad.org", ""])
def test_bad_server_name_is_refused_before_writing(tmp_path, bad, capsys):
    out = tmp_path / "c"
    assert run_cli("certs", "init", "--out", str(out), "--server-name",
                   f"localhost,{bad}" if bad else ",") == 2
    assert "--server-name" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", "x" * 70])
def test_bad_hospital_name_is_refused(tmp_path, bad):
    init_consortium(tmp_path / "c", ["localhost"])
    with pytest.raises(ProvisioningError, match="hospital name"):
        add_hospital(tmp_path / "c", bad)
    assert not (tmp_path / "evil").exists()


def test_handout_prints_files_address_and_exact_commands(consortium, capsys):
    assert run_cli("certs", "handout", "beta", "--out", str(consortium.root),
                   "--superlink", "superlink.example.org:8000",
                   "--hospital-config", "/srv/pasta/hospital.yaml") == 0
    text = capsys.readouterr().out
    assert str(consortium.ca_cert) in text
    assert str(consortium.hospital_key("beta")) in text
    assert ("flower-supernode --superlink superlink.example.org:8000 --root-certificates "
            "ca.crt --auth-supernode-private-key beta.key --node-config "
            "'hospital-config=\"/srv/pasta/hospital.yaml\"'") in text
    assert f"flwr supernode register {consortium.hospital_pub('beta')} pasta-fed" in text
    assert 'address = "superlink.example.org:8000"' in text
    # the node config string is one Flower can parse
    from flwr.common.config import parse_config_args
    h = make_handout(consortium.root, "beta", "127.0.0.1:8000",
                     hospital_config="/srv/h.yaml")
    assert parse_config_args([h.supernode_command[-1]]) == {"hospital-config": "/srv/h.yaml"}


def test_handout_refuses_unknown_hospital_and_host_not_in_cert(consortium, capsys):
    assert run_cli("certs", "handout", "omega", "--out", str(consortium.root),
                   "--superlink", "localhost:8000") == 2
    assert "add-hospital omega" in capsys.readouterr().err
    with pytest.raises(ProvisioningError, match="not among the certificate's names"):
        make_handout(consortium.root, "alpha", "other.example.org:8000")
    with pytest.raises(ProvisioningError, match="HOST:PORT"):
        make_handout(consortium.root, "alpha", "localhost")
    assert make_handout(consortium.root, "alpha", "[::1]:8000").superlink == "[::1]:8000"


# ---------------------------------------------------------------- real processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listening on {port} after {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session, and its children (SuperExec)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def doc_commands(program: str) -> list[list[str]]:
    """Command lines in docs/provisioning.md's ```bash blocks that start with `program`."""
    lines, in_bash = [], False
    for line in DOC.read_text().splitlines():
        if line.strip().startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and line.strip().startswith(program + " "):
            lines.append(shlex.split(line))
    return lines


def test_guide_commands_run_as_written(tmp_path, monkeypatch):
    """Every `pasta-fed` and `openssl` line of the guide, in order, succeeds (the
    release is signed from this checkout: `--app .` is the repository)."""
    monkeypatch.chdir(tmp_path)
    commands = doc_commands("pasta-fed")
    assert [c[:3] for c in commands] == [["pasta-fed", "certs", "init"],
                                         ["pasta-fed", "certs", "add-hospital"],
                                         ["pasta-fed", "app", "keygen"],
                                         ["pasta-fed", "app", "sign"],
                                         ["pasta-fed", "certs", "handout"],
                                         ["pasta-fed", "app", "publish"],
                                         ["pasta-fed", "certs", "renew-server"]]
    _superlink_database(tmp_path / "superlink.db")   # what flower-superlink --database superlink.db made
    for cmd in commands:
        if cmd[1:3] == ["app", "sign"]:
            cmd[cmd.index("--app") + 1] = str(DOC.parents[1])
        assert run_cli(*cmd[1:]) == 0, cmd
    if shutil.which("openssl"):
        for cmd in doc_commands("openssl"):
            subprocess.run(cmd, check=True, capture_output=True)
    assert Layout(tmp_path / "consortium").hospitals() == ["alpha", "beta", "delta", "gamma"]
    assert Layout(tmp_path / "consortium").hospital_trusted_entities("alpha").is_file()


def _superlink_database(path: Path) -> None:
    from flwr.superlink.config_loader import get_objectstore_linkstate_factories
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
    get_objectstore_linkstate_factories(str(path), NoOpFederationManager())[1].state()


@pytest.fixture(scope="module")
def doc_site(tmp_path_factory) -> Path:
    """A folder where the guide's `certs init` ran (relative paths as in the guide)."""
    site = tmp_path_factory.mktemp("coordinator")
    with contextlib.chdir(site):
        assert run_cli(*doc_commands("pasta-fed")[0][1:]) == 0
    return site


@pytest.fixture
def tls_superlink(doc_site, tmp_path):
    """The guide's flower-superlink command on a free local port; always stopped."""
    exe = VENV_BIN / "flower-superlink"
    if not exe.exists():
        pytest.skip("flower-superlink not installed")
    (cmd,) = doc_commands("flower-superlink")
    port = _free_port()
    cmd = [str(exe), *cmd[1:]]
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"  # the guide binds 0.0.0.0
    cmd[cmd.index("--database") + 1] = str(tmp_path / "state.db")
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")   # it starts flower-superexec
    log = (tmp_path / "superlink.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=doc_site, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(port, proc)
        yield port, env
    finally:
        _stop(proc)
        log.close()


@pytest.mark.slow
def test_real_superlink_serves_tls_that_only_the_consortium_ca_trusts(
        doc_site, tls_superlink, tmp_path):
    consortium = Layout(doc_site / "consortium")
    port, env = tls_superlink
    trusting = ssl.create_default_context(cafile=str(consortium.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert peer == load_cert(consortium.server_cert)

    other = tmp_path / "other"
    init_consortium(other, ["127.0.0.1"])
    for ctx in (ssl.create_default_context(),  # system roots only
                ssl.create_default_context(cafile=str(other / "ca.crt"))):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    # the coordinator's register command from `certs handout` works as printed
    handout = make_handout(consortium.root, "alpha", f"127.0.0.1:{port}")
    flwr_home = Path(env["FLWR_HOME"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(handout.flower_config)
    cmd = handout.register_command
    res = subprocess.run([str(VENV_BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True,
                         text=True, encoding="utf-8", timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "registered successfully" in res.stdout


def _flwr(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "flwr"), *args], env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=60, check=False)


@pytest.mark.slow
def test_handout_commands_admit_the_registered_hospital_only(doc_site, tls_superlink,
                                                             tmp_path):
    consortium = Layout(doc_site / "consortium")
    port, env = tls_superlink
    address = f"127.0.0.1:{port}"
    alpha = make_handout(consortium.root, "alpha", address)
    flwr_home = Path(env["FLWR_HOME"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(alpha.flower_config)
    res = _flwr(env, *alpha.register_command[1:])
    assert res.returncode == 0, res.stdout + res.stderr

    procs = []
    try:
        for name in ("alpha", "beta"):  # beta received its files but was never registered
            h = make_handout(consortium.root, name, address)
            site = tmp_path / name
            site.mkdir()
            shutil.copy(h.ca_cert, site)
            shutil.copy(h.private_key, site)
            cmd = h.supernode_command  # exactly as printed, run in the hospital folder
            cmd = [str(VENV_BIN / cmd[0]), *cmd[1:], "--port", str(_free_port()),
                   "--max-retries", "2"]
            log = (site / "supernode.log").open("wb")
            procs.append(subprocess.Popen(cmd, cwd=site, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 60
        statuses: list[str] = []
        while time.monotonic() < deadline:
            res = _flwr(env, "supernode", "list", alpha.connection, "--format", "json")
            assert res.returncode == 0, res.stdout + res.stderr
            statuses = [n["status"] for n in json.loads(res.stdout)["nodes"]]
            if statuses == ["online"] and procs[1].poll() is not None:
                break
            time.sleep(0.5)
        assert statuses == ["online"], statuses  # alpha only; beta is not even listed
        assert procs[0].poll() is None, "registered SuperNode exited"
        assert procs[1].poll() not in (None, 0), "unregistered SuperNode was admitted"
        assert "Failed to activate SuperNode" in (tmp_path / "beta/supernode.log").read_text()
    finally:
        for proc in procs:
            _stop(proc)
