"""Provisioning steps the coordinator runs: create the consortium, add a hospital,
and say what to hand to a hospital.

Each step checks every file it would write before writing any, so a refusal leaves
the folder exactly as it was.
"""
from __future__ import annotations

import ipaddress
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from . import app_signing, pki
from .files import (
    Layout,
    ProvisioningError,
    check_hospital_name,
    refuse_existing,
    write_private,
    write_public,
)

log = logging.getLogger(__name__)

DEFAULT_SERVER_DAYS = 365
DEFAULT_CA_DAYS = 3650
# node-config key through which a SuperNode tells the ClientApp where its YAML is.
HOSPITAL_CONFIG_KEY = "hospital-config"
# Name of the SuperLink connection in the coordinator's Flower config ($FLWR_HOME).
DEFAULT_CONNECTION = "pasta-fed"


@dataclass(frozen=True)
class HospitalKeys:
    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class Consortium:
    layout: Layout
    server_names: tuple[str, ...]
    hospitals: tuple[HospitalKeys, ...]


def _hospital_keys(layout: Layout, name: str) -> HospitalKeys:
    return HospitalKeys(name, layout.hospital_key(name), layout.hospital_pub(name))


def _write_hospital(keys: HospitalKeys) -> None:
    keys.private_key.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = pki.new_ec_key()
    # Private key first: a .pub without its .key would look registered-but-unusable.
    write_private(keys.private_key, pki.node_private_openssh(key))
    write_public(keys.public_key, pki.node_public_openssh(key, f"pasta-fed-{keys.name}"))
    log.info("hospital %s: SuperNode key pair in %s", keys.name, keys.private_key.parent)


def init_consortium(
    out: Path,
    server_names: Sequence[str],
    hospitals: Sequence[str] = (),
    *,
    force: bool = False,
    days: int = DEFAULT_SERVER_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    ca_name: str = "PASTA-Fed consortium CA",
) -> Consortium:
    """Create CA, SuperLink TLS certificate and hospital key pairs under `out`.

    Refuses (ProvisioningError naming the files) if any target exists and not
    `force`; with `force` every target is replaced, including the CA, which means
    every hospital must receive the new `ca.crt`.
    """
    layout = Layout(Path(out))
    names = [n.strip() for n in server_names if n.strip()]
    try:
        pki.parse_server_names(names)  # validate before touching the disk
    except ValueError as err:
        raise ProvisioningError(f"--server-name: {err}") from err
    hospital_names = [check_hospital_name(h) for h in hospitals]
    if len(set(hospital_names)) != len(hospital_names):
        raise ProvisioningError(f"--hospitals: a name is given twice: {hospital_names}")
    keys = [_hospital_keys(layout, h) for h in hospital_names]
    targets = [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key]
    targets += [p for k in keys for p in (k.private_key, k.public_key)]
    refuse_existing(targets, force)

    try:
        ca = pki.make_ca(ca_name, ca_days)
        server = pki.make_server_cert(ca, names, days)
    except ValueError as err:
        raise ProvisioningError(str(err)) from err
    layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(layout.ca_key, pki.key_pem(ca.key))
    write_public(layout.ca_cert, pki.cert_pem(ca.cert))
    write_private(layout.server_key, pki.key_pem(server.key))
    write_public(layout.server_cert, pki.cert_pem(server.cert))
    log.info("consortium CA %s and SuperLink certificate for %s", layout.ca_cert,
             ", ".join(names))
    for k in keys:
        _write_hospital(k)
    return Consortium(layout, tuple(names), tuple(keys))


def add_hospital(out: Path, name: str, *, force: bool = False) -> HospitalKeys:
    """A new SuperNode key pair for hospital `name` in an existing consortium folder."""
    layout = Layout(Path(out))
    if not layout.ca_cert.is_file():
        raise ProvisioningError(
            f"{layout.ca_cert}: no consortium CA here; run `pasta-fed certs init` first"
        )
    keys = _hospital_keys(layout, name)
    refuse_existing([keys.private_key, keys.public_key], force)
    _write_hospital(keys)
    return keys


def renew_server_cert(
    out: Path, server_names: Sequence[str] = (), *, days: int = DEFAULT_SERVER_DAYS
) -> list[str]:
    """Re-issue the SuperLink certificate from the existing CA; returns its names.

    Replacing server.crt/server.key is this step's whole purpose, so it needs no
    `force`; the CA and the hospital keys are untouched, so hospitals need nothing new.
    Names default to those of the current certificate.
    """
    layout = Layout(Path(out))
    for path in (layout.ca_cert, layout.ca_key):
        if not path.is_file():
            raise ProvisioningError(f"{path}: missing; run `pasta-fed certs init` first")
    try:
        ca = pki.load_ca(layout.ca_cert.read_bytes(), layout.ca_key.read_bytes())
    except ValueError as err:
        raise ProvisioningError(f"{layout.ca_key}: {err}") from err
    names = [n.strip() for n in server_names if n.strip()]
    if not names:
        if not layout.server_cert.is_file():
            raise ProvisioningError(f"{layout.server_cert}: missing; give --server-name")
        names = server_names_of(layout.server_cert)
    try:
        server = pki.make_server_cert(ca, names, days)
    except ValueError as err:
        raise ProvisioningError(f"--server-name: {err}") from err
    write_private(layout.server_key, pki.key_pem(server.key))
    write_public(layout.server_cert, pki.cert_pem(server.cert))
    log.info("SuperLink certificate re-issued for %s", ", ".join(names))
    return names


def server_names_of(cert_path: Path) -> list[str]:
    """The SAN entries (DNS names and IPs, as text) of a certificate file."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(entry.value) for entry in san]  # in certificate order


@dataclass(frozen=True)
class Handout:
    """What a hospital receives and what the coordinator runs to admit it."""

    hospital: str
    ca_cert: Path
    private_key: Path
    public_key: Path
    superlink: str
    connection: str
    hospital_config: str
    # The hospital's --trusted-entities YAML (None: no release key given, no app pinning)
    trusted_entities: Path | None = None
    release_keys: tuple[tuple[str, str], ...] = ()   # (key id, fingerprint) pinned

    @property
    def supernode_command(self) -> list[str]:
        """Run at the hospital, with the handed-out files in the working folder."""
        cmd = [
            "flower-supernode",
            "--superlink", self.superlink,
            "--root-certificates", self.ca_cert.name,
            "--auth-supernode-private-key", self.private_key.name,
            "--node-config", f'{HOSPITAL_CONFIG_KEY}="{self.hospital_config}"',
        ]
        if self.trusted_entities is not None:
            cmd += ["--trusted-entities", self.trusted_entities.name]
        return cmd

    @property
    def register_command(self) -> list[str]:
        """Run at the coordinator (flwr 1.42: public key file, then connection name)."""
        return ["flwr", "supernode", "register", str(self.public_key), self.connection]

    @property
    def flower_config(self) -> str:
        """The coordinator's `$FLWR_HOME/config.toml` section for `connection`."""
        return (
            f"[superlink.{self.connection}]\n"
            f'address = "{self.superlink}"\n'
            f'root-certificates = "{self.ca_cert.resolve()}"\n'
        )

    def _pinning_lines(self) -> list[str]:
        if self.trusted_entities is None:
            return ["  WARNING: no --release-key given: this SuperNode would run ANY app the "
                    "SuperLink sends (no app pinning)"]
        return [f"  trusted apps   : {self.trusted_entities}  (release key(s) "
                + ", ".join(f"{k} {fp}" for k, fp in self.release_keys)
                + "; the hospital checks the fingerprint with the release manager)"]

    def render(self) -> str:
        return "\n".join([
            f"== Hand to hospital '{self.hospital}' (over a channel you trust; the "
            "private key is theirs alone, delete your copy once delivered)",
            f"  CA certificate : {self.ca_cert}",
            f"  private key    : {self.private_key}",
            f"  SuperLink      : {self.superlink}",
            *self._pinning_lines(),
            "",
            "== The hospital runs (in the folder holding these files):",
            "  " + shlex.join(self.supernode_command),
            "",
            "== The coordinator registers it (once) with:",
            "  " + shlex.join(self.register_command),
            "  where $FLWR_HOME/config.toml (default ~/.flwr/config.toml) has:",
            *("    " + line for line in self.flower_config.splitlines()),
            "",
        ])


def _normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower().rstrip(".")


def _check_superlink_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProvisioningError(
            f"--superlink {address!r}: expected HOST:PORT, e.g. superlink.example.org:8000"
        )
    return address


def make_handout(
    out: Path,
    name: str,
    superlink: str,
    *,
    connection: str = DEFAULT_CONNECTION,
    hospital_config: str = "hospital.yaml",
    release_keys: Sequence[Path] = (),
) -> Handout:
    """Describe the handout for `name`; checks the files exist and the host is a SAN.

    With `release_keys` (Ed25519 OpenSSH public keys of the release signers) it also
    writes the hospital's trusted-entities YAML, so its SuperNode runs signed apps only.
    """
    layout = Layout(Path(out))
    keys = _hospital_keys(layout, name)
    for path in (layout.ca_cert, keys.private_key, keys.public_key):
        if not path.is_file():
            hint = ("run `pasta-fed certs init`" if path == layout.ca_cert
                    else f"run `pasta-fed certs add-hospital {name}`")
            raise ProvisioningError(f"{path}: missing; {hint}")
    _check_superlink_address(superlink)
    host = _normal_host(superlink.rpartition(":")[0])
    if layout.server_cert.is_file():
        sans = server_names_of(layout.server_cert)
        if host not in [_normal_host(s) for s in sans]:
            raise ProvisioningError(
                f"{layout.server_cert}: SuperLink host {host!r} is not among the "
                f"certificate's names {sans}; TLS would fail at the hospital"
            )
    pinned, trusted = _write_trusted_entities(layout, name, release_keys)
    return Handout(name, layout.ca_cert, keys.private_key, keys.public_key,
                   superlink, connection, hospital_config, trusted, pinned)


def _write_trusted_entities(layout: Layout, name: str, release_keys: Sequence[Path]
                            ) -> tuple[tuple[tuple[str, str], ...], Path | None]:
    """Write the hospital's --trusted-entities YAML from the release public keys."""
    if not release_keys:
        return (), None
    keys = [app_signing.load_public_key(p) for p in release_keys]
    path = layout.hospital_trusted_entities(name)
    write_public(path, app_signing.trusted_entities_yaml(keys))
    log.info("hospital %s: trusted entities %s", name, path)
    return tuple((app_signing.key_id(k), app_signing.fingerprint(k)) for k in keys), path
