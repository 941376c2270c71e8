"""`pasta-fed certs ...` and `pasta-fed app ...`: thin argparse shells over `server.certs`."""
from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from synth.cli_errors import FAILED, fail

from .certs import (
    ProvisioningError,
    add_hospital,
    app_signing,
    init_consortium,
    make_handout,
    renew_server_cert,
)
from .certs.app_publish import publish_release
from .certs.provision import (
    DEFAULT_CA_DAYS,
    DEFAULT_CONNECTION,
    DEFAULT_SERVER_DAYS,
)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fail(err: Exception) -> int:
    return fail("certs", err)


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
            release_keys=args.release_key or (),
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
    p.add_argument("--release-key", type=Path, action="append",
                   help="release public key (from `pasta-fed app keygen`) the hospital's "
                        "SuperNode trusts; writes its trusted-entities.yaml (repeatable)")
    p.set_defaults(func=_cmd_handout)
    _register_app(subparsers)


# ---------------------------------------------------------------- pasta-fed app

def _app_fail(err: Exception | str) -> int:
    return fail("app", err)


def _cmd_app_keygen(args: argparse.Namespace) -> int:
    try:
        keys = app_signing.generate_release_key(args.out, args.name, force=args.force)
    except ProvisioningError as err:
        return _app_fail(err)
    print(f"release private key {keys.private_key}   (0600; the release manager's alone, "
          "keep it off the SuperLink)")
    print(f"release public key  {keys.public_key}   (for `certs handout --release-key`)")
    print(f"key id {keys.key_id}  fingerprint {keys.fingerprint}   (tell hospitals, "
          "over a second channel)")
    return 0


def _cmd_app_sign(args: argparse.Namespace) -> int:
    try:
        rel = app_signing.sign_release(args.key, args.out, app_dir=args.app,
                                       fab_path=args.fab, force=args.force)
    except ProvisioningError as err:
        return _app_fail(err)
    rec = rel.record
    print(f"signed {rec['app_id']} {rec['version']}  sha256 {rec['fab_sha256']}")
    print(f"FAB        {rel.fab}")
    print(f"signatures {rel.signature}   ({', '.join(s['public_key_id'] for s in rec['signatures'])})")
    print(f"\nNext (coordinator): pasta-fed app publish {rel.fab} --database superlink.db")
    return 0


def _cmd_app_publish(args: argparse.Namespace) -> int:
    logging.getLogger("alembic").setLevel(logging.WARNING)   # schema check chatter
    try:
        app = publish_release(args.fab, args.database, args.signature, args.federation)
    except ProvisioningError as err:
        return _app_fail(err)
    print(f"published {app.app_id} {app.version}  sha256 {app.fab_sha256}  signed by "
          f"{', '.join(app.signers)}  into {args.database}")
    print("Run it with:  " + shlex.join(["flwr", "run", app.app_id, args.connection,
                                         "--run-config", "..."]))
    return 0


def _cmd_app_verify(args: argparse.Namespace) -> int:
    try:
        trusted = app_signing.read_trusted_entities(args.trusted_entities)
        fab = args.fab.read_bytes()
        sig = args.signature or app_signing.signature_path(args.fab)
        signers = app_signing.trusted_signers(fab, app_signing.read_record(sig), trusted)
    except OSError as err:
        return _app_fail(f"{args.fab}: cannot read the FAB ({err})")
    except ProvisioningError as err:
        return _app_fail(err)
    if not signers:
        return fail("app verify", f"{args.fab}: no signature by a key in {args.trusted_entities}; "
                    "your SuperNode would refuse this app", FAILED)
    for kid in signers:
        print(f"{args.fab}: signed by {kid} {app_signing.fingerprint(trusted[kid])}")
    return 0


def _cmd_app_fingerprint(args: argparse.Namespace) -> int:
    try:
        trusted = app_signing.read_trusted_entities(args.trusted_entities)
    except ProvisioningError as err:
        return _app_fail(err)
    for kid, key in trusted.items():
        print(f"{kid} {app_signing.fingerprint(key)}")
    return 0


def _cmd_app_check_config(args: argparse.Namespace) -> int:
    from .run_check import check_run_config
    from .settings import SettingsError

    try:
        settings = check_run_config(args.run_config)
    except SettingsError as err:
        return fail("app check-config", err)
    print(f"run config OK: task {settings.task}, {settings.num_server_rounds} round(s), strategy "
          f"{settings.strategy}, at least {settings.min_sites} site(s); run-dir {settings.run_dir}")
    return 0


def _cmd_app_sites(args: argparse.Namespace) -> int:
    import json

    from .run_state import RunDirectory

    run = RunDirectory(args.run_dir)
    if not run.exists():
        return fail("app sites", f"{args.run_dir}: no federated run there")
    nodes = run.sites_by_node()
    if args.json:
        print(json.dumps({str(node): seen for node, seen in sorted(nodes.items())}, indent=2))
        return 0
    print(f"{'node-id':<22} {'site':<24} rounds")
    for node, seen in sorted(nodes.items()):
        print(f"{node:<22} {seen['site']:<24} {','.join(map(str, seen['rounds']))}")
    if not nodes:
        print("(no completed round yet)")
    return 0


def _register_app(subparsers: argparse._SubParsersAction) -> None:
    app = subparsers.add_parser(
        "app", help="app pinning: sign the release FAB, publish it to the SuperLink")
    sub = app.add_subparsers(dest="app_command", required=True)

    p = sub.add_parser("check-config", help="check a --run-config before `flwr run` submits it "
                                              "(names the bad key; exit 2)")
    p.add_argument("--run-config", action="append", default=[], metavar="STR",
                   help="the same string(s) you give `flwr run --run-config`")
    p.set_defaults(func=_cmd_app_check_config)

    p = sub.add_parser("sites", help="which hospital each node id of `flwr supernode list` is, from a run's "
                                       "records")
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory (run-dir of the run config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_app_sites)

    p = sub.add_parser("keygen", help="create the Ed25519 release key pair")
    p.add_argument("--out", required=True, type=Path, help="folder for NAME.key / NAME.pub")
    p.add_argument("--name", default="release", help="file name stem (default release)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=_cmd_app_keygen)

    p = sub.add_parser("sign", help="build (or take) the FAB and sign it with a release key")
    p.add_argument("--key", required=True, type=Path, help="release private key")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--app", type=Path, help="project folder to build the FAB from")
    src.add_argument("--fab", type=Path, help="a FAB built with `flwr build`")
    p.add_argument("--out", required=True, type=Path,
                   help="signed FAB to write (its record goes to OUT.sig.json)")
    p.add_argument("--force", action="store_true", help="replace a different FAB at --out")
    p.set_defaults(func=_cmd_app_sign)

    p = sub.add_parser("publish", help="store a signed FAB with its signatures in the "
                                       "SuperLink database (run `flwr run @APP_ID` then)")
    p.add_argument("fab", type=Path)
    p.add_argument("--database", required=True, type=Path,
                   help="the SuperLink's --database file")
    p.add_argument("--signature", type=Path, action="append",
                   help="signature record(s) (default FAB.sig.json; repeatable)")
    p.add_argument("--federation", default=None, help="federation id (default Flower's)")
    p.add_argument("--connection", default=DEFAULT_CONNECTION,
                   help="SuperLink connection name printed in the run command")
    p.set_defaults(func=_cmd_app_publish)

    p = sub.add_parser("verify", help="check a FAB's signature against a trusted-entities YAML")
    p.add_argument("fab", type=Path)
    p.add_argument("--trusted-entities", required=True, type=Path)
    p.add_argument("--signature", type=Path, help="signature record (default FAB.sig.json)")
    p.set_defaults(func=_cmd_app_verify)

    p = sub.add_parser("fingerprint", help="print the key ids and fingerprints of a "
                                           "trusted-entities YAML")
    p.add_argument("trusted_entities", type=Path)
    p.set_defaults(func=_cmd_app_fingerprint)
