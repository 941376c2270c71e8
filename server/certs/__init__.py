"""Provisioning for a real deployment: consortium CA, SuperLink TLS certificate,
hospital SuperNode keys (`pasta-fed certs`)."""
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
    "add_hospital",
    "init_consortium",
    "make_handout",
    "renew_server_cert",
    "server_names_of",
]
