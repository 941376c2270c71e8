"""In-memory PKI objects for a consortium: CA, SuperLink TLS certificate, SuperNode keys.

Pure functions (no file I/O) so they can be tested and reused. Everything is done
with `cryptography`; nothing shells out to openssl.

Formats are the ones the consumers read:
- CA and SuperLink certificate/key: PEM (X.509 / PKCS#8), what `flower-superlink
  --ssl-*` and `flower-supernode --root-certificates` load.
- SuperNode keys: OpenSSH format. flwr 1.42 loads `--auth-supernode-private-key`
  with `load_ssh_private_key` and `flwr supernode register` reads the public key
  with `load_ssh_public_key`, both requiring a NIST EC curve; we use P-384.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1
SIGNATURE_HASH = hashes.SHA384
# Certificates are back-dated a little so a site whose clock runs slow accepts them.
CLOCK_SKEW = _dt.timedelta(minutes=5)

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class KeyAndCert:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 private key."""
    return ec.generate_private_key(CURVE())


def parse_server_name(name: str) -> x509.GeneralName:
    """One SAN entry: an IP address if `name` parses as one, otherwise a DNS name.

    Raises ValueError naming the bad entry (empty, URL, port, bad characters).
    """
    text = name.strip()
    if not text:
        raise ValueError("empty server name")
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not all(_DNS_LABEL.match(label) or (i == 0 and label == "*")
               for i, label in enumerate(labels)):
        raise ValueError(
            f"server name {name!r} is neither an IP address nor a DNS name "
            "(give bare host names: no scheme, no port)"
        )
    return x509.DNSName(text.rstrip(".").lower())


def parse_server_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for `names`, in order, duplicates refused."""
    if not names:
        raise ValueError("at least one server name is required")
    entries = [parse_server_name(n) for n in names]
    seen: set[str] = set()
    for entry in entries:
        key = str(entry.value)
        if key in seen:
            raise ValueError(f"server name {key!r} given twice")
        seen.add(key)
    return entries


def _validity(days: int) -> tuple[_dt.datetime, _dt.datetime]:
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = _dt.datetime.now(_dt.UTC)
    return now - CLOCK_SKEW, now + _dt.timedelta(days=days)


def make_ca(common_name: str, days: int) -> KeyAndCert:
    """A self-signed consortium CA that may sign end-entity certificates only."""
    key = new_ec_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PASTA-Fed consortium"),
    ])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=True, crl_sign=True, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, SIGNATURE_HASH())
    )
    return KeyAndCert(key, cert)


def make_server_cert(ca: KeyAndCert, names: Sequence[str], days: int) -> KeyAndCert:
    """The SuperLink's TLS certificate: `names` as SANs, serverAuth, signed by `ca`."""
    sans = parse_server_names(names)
    key = new_ec_key()
    not_before, not_after = _validity(days)
    if not_after > ca.cert.not_valid_after_utc:
        not_after = ca.cert.not_valid_after_utc  # never outlive the issuer
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, str(sans[0].value)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PASTA-Fed consortium"),
        ]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=False, crl_sign=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, SIGNATURE_HASH())
    )
    return KeyAndCert(key, cert)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (flower-superlink takes no passphrase); protect by mode."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def node_private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """SuperNode private key as flower-supernode's `load_ssh_private_key` reads it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def node_public_openssh(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    """`ecdsa-sha2-nistp384 AAAA... comment`, as `flwr supernode register` reads it."""
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line + b" " + comment.encode("ascii") + b"\n"



def load_ca(cert_pem_bytes: bytes, key_pem_bytes: bytes) -> KeyAndCert:
    """Re-read a CA written by `cert_pem`/`key_pem`; ValueError if the pair mismatches."""
    cert = x509.load_pem_x509_certificate(cert_pem_bytes)
    key = serialization.load_pem_private_key(key_pem_bytes, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    cert_key = cert.public_key()
    if (not isinstance(cert_key, ec.EllipticCurvePublicKey)
            or key.public_key().public_numbers() != cert_key.public_numbers()):
        raise ValueError("the key does not belong to the CA certificate")
    return KeyAndCert(key, cert)
