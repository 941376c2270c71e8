"""Provisioning for a real deployment: consortium CA, SuperLink TLS certificate,
hospital SuperNode keys (`pasta-fed certs`), and app pinning: the signed release FAB
(`pasta-fed app`)."""
from .app_publish import PublishedApp, publish_release
from .app_signing import ReleaseKeys, SignedRelease, generate_release_key, sign_release
from .files import Layout, ProvisioningError
from .provision import (
    Consortium,
    Handout,
    HospitalKeys,
    add_hospital,
    init_consortium,
    make_handout,
    renew_server_cert,
    server_names_of,
)

__all__ = [
    "Consortium",
    "Handout",
    "HospitalKeys",
    "Layout",
    "ProvisioningError",
    "PublishedApp",
    "ReleaseKeys",
    "SignedRelease",
    "add_hospital",
    "generate_release_key",
    "init_consortium",
    "make_handout",
    "publish_release",
    "renew_server_cert",
    "server_names_of",
    "sign_release",
]
