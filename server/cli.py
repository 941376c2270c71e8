"""`pasta-fed certs ...`: thin argparse shell over `server.certs`."""
from __future__ import annotations

import argparse
import sys

from .certs import (
    ProvisioningError,
    add_hospital,
    init_consortium,
    make_handout,
    renew_server_cert,
)
from .certs.provision import (
    DEFAULT_CA_DAYS,
    DEFAULT_CONNECTION,
    DEFAULT_SERVER_DAYS,
)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fail(err: Exception) -> int:
    print(f"pasta-fed certs: error: {err}", file=sys.stderr)
    return 1


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        c = init_consortium(
            args.out, _split(args.server_name), _split(args.hospitals or ""),
            force=args.force, days=args.days, ca_days=args.ca_days,
        )
    except ProvisioningError as err:
        return _fail(err)
    lay = c.layout
    print(f"CA certificate      {lay.ca_cert}   (give to every hospital)")
    print(f"CA private key      {lay.ca_key}   (keep offline; signs SuperLink certificates)")
    print(f"SuperLink cert/key  {lay.server_cert} {lay.server_key}"
          f"   names: {', '.join(c.server_names)}")
    if not {"127.0.0.1", "localhost", "::1"} & {n.lower() for n in c.server_names}:
        print("note: no loopback name among the SuperLink names; flower-superlink's own "
              "SuperExec connects to its --host (127.0.0.1 for 0.0.0.0) and verifies "
              "this certificate, so --host must be one of the names above")
    for h in c.hospitals:
        print(f"hospital {h.name:<10} {h.private_key} {h.public_key}")
    print(f"\nNext: pasta-fed certs handout NAME --out {lay.root} --superlink HOST:PORT")
    return 0


def _cmd_add_hospital(args: argparse.Namespace) -> int:
    try:
        h = add_hospital(args.out, args.name, force=args.force)
    except ProvisioningError as err:
        return _fail(err)
    print(f"hospital {h.name}: private key {h.private_key}, public key {h.public_key}")
    return 0


def _cmd_renew_server(args: argparse.Namespace) -> int:
    try:
        names = renew_server_cert(args.out, _split(args.server_name or ""), days=args.days)
    except ProvisioningError as err:
        return _fail(err)
    print(f"SuperLink certificate re-issued for {', '.join(names)}; restart "
          "flower-superlink to use it (hospitals need nothing new)")
    return 0


def _cmd_handout(args: argparse.Namespace) -> int:
    try:
        handout = make_handout(
            args.out, args.name, args.superlink,
            connection=args.connection, hospital_config=args.hospital_config,
        )
    except ProvisioningError as err:
        return _fail(err)
    print(handout.render())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    certs = subparsers.add_parser(
        "certs", help="provision a deployment: CA, SuperLink TLS certificate, hospital keys"
    )
    sub = certs.add_subparsers(dest="certs_command", required=True)

    p = sub.add_parser("init", help="create the consortium CA, SuperLink certificate "
                                    "and hospital SuperNode keys")
    p.add_argument("--out", required=True, help="provisioning folder (keep it private)")
    p.add_argument("--server-name", required=True,
                   help="comma-separated DNS names / IP addresses of the SuperLink "
                        "(include the address its own processes use, e.g. 127.0.0.1)")
    p.add_argument("--hospitals", default="", help="comma-separated hospital names")
    p.add_argument("--days", type=int, default=DEFAULT_SERVER_DAYS,
                   help=f"SuperLink certificate validity (default {DEFAULT_SERVER_DAYS})")
    p.add_argument("--ca-days", type=int, default=DEFAULT_CA_DAYS,
                   help=f"CA certificate validity (default {DEFAULT_CA_DAYS})")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("add-hospital", help="create a SuperNode key pair for a hospital")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="provisioning folder made by `certs init`")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=_cmd_add_hospital)

    p = sub.add_parser("renew-server", help="re-issue the SuperLink certificate from the "
                                            "existing CA (replaces server.crt/.key)")
    p.add_argument("--out", required=True, help="provisioning folder made by `certs init`")
    p.add_argument("--server-name", default="",
                   help="new comma-separated names (default: those of the current certificate)")
    p.add_argument("--days", type=int, default=DEFAULT_SERVER_DAYS,
                   help=f"validity in days (default {DEFAULT_SERVER_DAYS})")
    p.set_defaults(func=_cmd_renew_server)

    p = sub.add_parser("handout", help="print what to give a hospital and how to "
                                       "register it with the SuperLink")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="provisioning folder made by `certs init`")
    p.add_argument("--superlink", required=True,
                   help="HOST:PORT the hospital's SuperNode connects to")
    p.add_argument("--connection", default=DEFAULT_CONNECTION,
                   help="SuperLink connection name in the coordinator's Flower config "
                        f"(default {DEFAULT_CONNECTION})")
    p.add_argument("--hospital-config", default="hospital.yaml",
                   help="path of hospital.yaml at the hospital (for --node-config)")
    p.set_defaults(func=_cmd_handout)
