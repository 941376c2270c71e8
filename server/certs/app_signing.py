"""App pinning: an Ed25519 release key signs the app bundle (FAB), and a hospital's
SuperNode started with `flower-supernode --trusted-entities YAML` runs only FABs
signed by a key in that YAML.

Why: in Flower's deployment runtime a SuperNode runs whatever FAB the SuperLink sends.
The coordinator may be malicious, so the hospital must not trust it; it trusts the
release key it checked itself. flwr 1.42's SuperNode (`_verify_fab` in
`flwr.supernode.start_client_internal`) accepts a FAB when, for a key id in its YAML,
`fab.verifications[key_id]` is JSON `{"signature", "signed_at"}` with a valid Ed25519
signature over `create_message_to_sign(sha256(fab).digest(), signed_at)`, and
`verifications["valid_license"]` is non-empty. This module makes exactly those records
with `cryptography`; the signed message layout is Flower's own function.

Files: the release key pair (`release.key` OpenSSH private, 0600; `release.pub`
OpenSSH public), the signed FAB (`NAME.fab`) and its signature record
(`NAME.fab.sig.json`: FAB SHA-256, app id, version, one entry per signer).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

from .files import ProvisioningError, refuse_existing, write_private, write_public

log = logging.getLogger(__name__)

RECORD_FORMAT = "pasta-fed-app-signature/1"
SIGNATURE_SUFFIX = ".sig.json"
# Flower's SuperNode refuses a FAB whose verifications lack a non-empty "valid_license"
# (Flower Hub's licence flag); the value itself is not checked.
VALID_LICENSE = {"valid_license": "Valid"}


@dataclass(frozen=True)
class ReleaseKeys:
    private_key: Path
    public_key: Path
    key_id: str
    fingerprint: str


@dataclass(frozen=True)
class SignedRelease:
    fab: Path
    signature: Path
    record: dict


# ---------------------------------------------------------------- keys

def _openssh_public(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode("ascii")


def key_id(key: ed25519.Ed25519PublicKey) -> str:
    """Trusted-entities id derived from the key itself, so an id names one key only."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def fingerprint(key: ed25519.Ed25519PublicKey) -> str:
    """`SHA256:...` as `ssh-keygen -l` prints it: what a hospital compares by phone."""
    blob = base64.b64decode(_openssh_public(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def generate_release_key(out: Path, name: str = "release", *, force: bool = False) -> ReleaseKeys:
    """Write `out/NAME.key` (0600) and `out/NAME.pub`; refuses existing files unless `force`."""
    private, public = Path(out) / f"{name}.key", Path(out) / f"{name}.pub"
    refuse_existing([private, public], force)
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    pub = key.public_key()
    write_public(public, f"{_openssh_public(pub)} pasta-fed-{name}\n".encode("ascii"))
    log.info("release key %s (%s) in %s", key_id(pub), fingerprint(pub), private.parent)
    return ReleaseKeys(private, public, key_id(pub), fingerprint(pub))


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ProvisioningError(f"{path}: not a readable OpenSSH private key ({err})") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ProvisioningError(f"{path}: not an Ed25519 key (Flower verifies Ed25519 only)")
    return key


def parse_public_key(text: str, where: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(text.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError) as err:
        raise ProvisioningError(f"{where}: not an OpenSSH public key ({err})") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ProvisioningError(f"{where}: not an Ed25519 key (Flower verifies Ed25519 only)")
    return key


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ProvisioningError(f"{path}: cannot read the release public key ({err})") from err
    return parse_public_key(text, str(path))


# ---------------------------------------------------------------- trusted entities

def trusted_entities_yaml(keys: list[ed25519.Ed25519PublicKey]) -> bytes:
    """The `--trusted-entities` file: key id -> OpenSSH public key line."""
    if not keys:
        # flower-supernode treats an empty mapping as "verify nothing": never write one
        raise ProvisioningError("trusted entities need at least one release key")
    return yaml.safe_dump({key_id(k): _openssh_public(k) for k in keys},
                          sort_keys=True).encode("utf-8")


def read_trusted_entities(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """Keys of a trusted-entities YAML, checked as flower-supernode checks them."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ProvisioningError(f"{path}: cannot read trusted entities ({err})") from err
    if not isinstance(data, dict) or not data:
        raise ProvisioningError(f"{path}: expected a non-empty mapping key-id -> public key")
    return {str(k): parse_public_key(str(v), f"{path}: {k}") for k, v in data.items()}


# ---------------------------------------------------------------- FABs and signatures

def build_fab(app_dir: Path) -> bytes:
    """The FAB of a project folder, built by flwr's own builder (as `flwr build` does)."""
    from flwr.cli.build import build_fab_from_disk
    try:
        return build_fab_from_disk(Path(app_dir))
    except (OSError, ValueError) as err:
        raise ProvisioningError(f"{app_dir}: cannot build a FAB ({err})") from err


def fab_identity(fab: bytes, where: str) -> tuple[str, str]:
    """(app id `@publisher/name`, version) from the FAB's own pyproject.toml."""
    from flwr.common.config import get_fab_config, get_metadata_from_config
    try:
        fab_id, version = get_metadata_from_config(get_fab_config(fab))
    except (ValueError, KeyError) as err:
        raise ProvisioningError(f"{where}: not a Flower app bundle ({err})") from err
    return f"@{fab_id}", version


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signature_entry(fab: bytes, key: ed25519.Ed25519PrivateKey, signed_at: int | None = None) -> dict:
    """One signer's entry: the Ed25519 signature Flower's SuperNode checks."""
    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
    pub = key.public_key()
    return {"public_key_id": key_id(pub), "public_key": _openssh_public(pub),
            "signed_at": signed_at, "signature": _b64url(key.sign(message))}


def new_record(fab: bytes, where: str) -> dict:
    app_id, version = fab_identity(fab, where)
    return {"format": RECORD_FORMAT, "fab_sha256": hashlib.sha256(fab).hexdigest(),
            "app_id": app_id, "version": version, "signatures": []}


def add_signature(record: dict, entry: dict) -> dict:
    """The record with `entry` added (an earlier entry of the same key is replaced)."""
    others = [s for s in record["signatures"] if s["public_key_id"] != entry["public_key_id"]]
    return {**record, "signatures": others + [entry]}


def signature_path(fab_path: Path) -> Path:
    return Path(str(fab_path) + SIGNATURE_SUFFIX)


def read_record(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ProvisioningError(f"{path}: cannot read the signature record ({err})") from err
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ProvisioningError(f"{path}: not a {RECORD_FORMAT} signature record")
    return record


def _entry_verifies(fab: bytes, entry: dict, key: ed25519.Ed25519PublicKey) -> bool:
    message = create_message_to_sign(hashlib.sha256(fab).digest(), int(entry["signed_at"]))
    try:
        key.verify(_b64url_decode(entry["signature"]), message)
        return True
    except (InvalidSignature, ValueError):
        return False


def check_record(fab: bytes, record: dict, where: str) -> None:
    """Refuse a record that is not for this FAB or whose signatures do not verify
    under the keys it names (integrity only: trust is the hospital's YAML)."""
    digest = hashlib.sha256(fab).hexdigest()
    if record.get("fab_sha256") != digest:
        raise ProvisioningError(
            f"{where}: signs FAB {record.get('fab_sha256')}, but the FAB's SHA-256 is {digest}")
    if not record.get("signatures"):
        raise ProvisioningError(f"{where}: holds no signature")
    for entry in record["signatures"]:
        key = parse_public_key(entry["public_key"], f"{where}: {entry['public_key_id']}")
        if key_id(key) != entry["public_key_id"] or not _entry_verifies(fab, entry, key):
            raise ProvisioningError(
                f"{where}: the signature of {entry['public_key_id']} does not verify for this FAB")


def flower_verifications(record: dict) -> dict[str, str]:
    """`fab.verifications` as the SuperNode reads them (the layout Flower Hub sends)."""
    out = {s["public_key_id"]: json.dumps({"signature": s["signature"], "signed_at": s["signed_at"]})
           for s in record["signatures"]}
    return {**out, **VALID_LICENSE}


def trusted_signers(fab: bytes, record: dict, trusted: dict[str, ed25519.Ed25519PublicKey]) -> list[str]:
    """Ids of trusted keys whose signature in `record` verifies for `fab` (the SuperNode's test)."""
    if record.get("fab_sha256") != hashlib.sha256(fab).hexdigest():
        return []
    return [s["public_key_id"] for s in record["signatures"]
            if s["public_key_id"] in trusted and _entry_verifies(fab, s, trusted[s["public_key_id"]])]


def sign_release(key_path: Path, out_fab: Path, *, app_dir: Path | None = None,
                 fab_path: Path | None = None, force: bool = False) -> SignedRelease:
    """Sign a FAB (built from `app_dir`, or read from `fab_path`) into `out_fab` + its record.

    Signing a FAB that already has a record for the same content adds this key's
    signature (several signers); a different FAB under the same name needs `force`.
    """
    one_source = "give either --app (a project folder) or --fab (a built FAB)"
    if (app_dir is None) == (fab_path is None):
        raise ProvisioningError(one_source)
    key = load_private_key(key_path)
    if fab_path is not None:
        try:
            fab = Path(fab_path).read_bytes()
        except OSError as err:
            raise ProvisioningError(f"{fab_path}: cannot read the FAB ({err})") from err
    elif app_dir is not None:
        fab = build_fab(app_dir)
    else:  # excluded by the first check; spelled out so app_dir is narrowed to a Path above
        raise ProvisioningError(one_source)
    out_fab, sig = Path(out_fab), signature_path(Path(out_fab))
    record = new_record(fab, str(fab_path or app_dir))
    if out_fab.exists() and out_fab.read_bytes() != fab:
        refuse_existing([out_fab, sig], force)
    elif sig.exists() and not force:
        record = read_record(sig)
        check_record(fab, record, str(sig))
    record = add_signature(record, signature_entry(fab, key))
    write_public(out_fab, fab)
    write_public(sig, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    log.info("signed %s %s (sha256 %s) with %s", record["app_id"], record["version"],
             record["fab_sha256"], key_id(key.public_key()))
    return SignedRelease(out_fab, sig, record)
