"""App pinning (`pasta-fed app`, `certs handout --release-key`): the signature records
are checked with Flower's own SuperNode verifier, and publishing is checked through
Flower's own SuperLink StartRun handler on a real SQLite state."""
from __future__ import annotations

import argparse
import hashlib
import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from server import cli
from server.certs import (
    ProvisioningError,
    app_signing,
    generate_release_key,
    init_consortium,
    make_handout,
    publish_release,
    sign_release,
)
from server.certs.app_publish import open_superlink_state, store_signed_app

TINY_PYPROJECT = """\
[project]
name = "{name}"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "consortium"

[tool.flwr.app.components]
serverapp = "tiny:server"
clientapp = "tiny:client"

[tool.flwr.app.config]
rounds = 1
"""


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def tiny_app(root: Path, body: str = "x = 1\n", name: str = "tiny-app") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(TINY_PYPROJECT.format(name=name), encoding="utf-8")
    (root / "tiny.py").write_text(body, encoding="utf-8")
    return root


def flower_trusted_entities(path: Path) -> dict[str, str]:
    """The YAML as flower-supernode loads and validates it."""
    from flwr.supernode.cli.flower_supernode import (
        _try_obtain_trusted_entities,
        _validate_public_keys_ed25519,
    )
    trusted = _try_obtain_trusted_entities(path)
    _validate_public_keys_ed25519(trusted)
    return trusted


def supernode_accepts(content: bytes, verifications: dict[str, str], trusted: dict[str, str]) -> bool:
    """Flower 1.42 SuperNode's own test (start_client_internal._pull_and_store_message)."""
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab
    if not verifications.get("valid_license", ""):
        return False
    return _verify_fab(Fab(hashlib.sha256(content).hexdigest(), content, verifications), trusted)


@pytest.fixture
def release(tmp_path):
    """A release key, a signed tiny FAB, and alpha's handout trusting that key."""
    keys = generate_release_key(tmp_path / "release")
    signed = sign_release(keys.private_key, tmp_path / "tiny.fab", app_dir=tiny_app(tmp_path / "app"))
    init_consortium(tmp_path / "c", ["127.0.0.1"], ["alpha"])
    handout = make_handout(tmp_path / "c", "alpha", "127.0.0.1:8000", release_keys=[keys.public_key])
    return keys, signed, handout


def test_keygen_writes_an_ed25519_pair_private_0600_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "release"
    assert run_cli("app", "keygen", "--out", str(out)) == 0
    priv = serialization.load_ssh_private_key((out / "release.key").read_bytes(), None)
    pub = serialization.load_ssh_public_key((out / "release.pub").read_bytes())
    assert isinstance(priv, ed25519.Ed25519PrivateKey)
    assert pub.public_bytes_raw() == priv.public_key().public_bytes_raw()
    assert stat.S_IMODE((out / "release.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    printed = capsys.readouterr().out
    assert app_signing.fingerprint(pub) in printed
    before = (out / "release.key").read_bytes()
    assert run_cli("app", "keygen", "--out", str(out)) == 2
    assert str(out / "release.key") in capsys.readouterr().err
    assert (out / "release.key").read_bytes() == before


def test_signed_release_passes_flowers_supernode_check_and_tampering_does_not(release, tmp_path):
    keys, signed, handout = release
    trusted = flower_trusted_entities(handout.trusted_entities)
    assert list(trusted) == [keys.key_id]
    fab = signed.fab.read_bytes()
    verifications = app_signing.flower_verifications(signed.record)
    assert supernode_accepts(fab, verifications, trusted)

    # the same record on another FAB (a foreign app replaying the release's signature)
    foreign = app_signing.build_fab(tiny_app(tmp_path / "evil", "import os\n"))
    assert not supernode_accepts(foreign, verifications, trusted)
    # one flipped byte of the signed FAB
    assert not supernode_accepts(fab[:-1] + bytes([fab[-1] ^ 1]), verifications, trusted)
    # signed by a key the hospital does not trust (a coordinator's own key)
    other = generate_release_key(tmp_path / "other")
    forged = sign_release(other.private_key, tmp_path / "evil.fab", fab_path=None,
                          app_dir=tmp_path / "evil")
    assert not supernode_accepts(foreign, app_signing.flower_verifications(forged.record), trusted)
    # no verifications at all (what `flwr run .` stores)
    assert not supernode_accepts(fab, {}, trusted)


def test_a_second_signer_adds_to_the_record_and_a_different_fab_needs_force(release, tmp_path, capsys):
    keys, signed, _ = release
    second = generate_release_key(tmp_path / "hospital-review")
    assert run_cli("app", "sign", "--key", str(second.private_key), "--fab", str(signed.fab),
                   "--out", str(signed.fab)) == 0
    record = app_signing.read_record(signed.signature)
    assert {s["public_key_id"] for s in record["signatures"]} == {keys.key_id, second.key_id}
    app_signing.check_record(signed.fab.read_bytes(), record, "record")   # both verify
    kept = signed.fab.read_bytes()
    tiny_app(tmp_path / "app", "x = 2\n")                               # the project changed
    assert run_cli("app", "sign", "--key", str(keys.private_key), "--app", str(tmp_path / "app"),
                   "--out", str(signed.fab)) == 2
    assert "--force" in capsys.readouterr().err and signed.fab.read_bytes() == kept


def test_sign_refuses_a_non_ed25519_key(tmp_path):
    init_consortium(tmp_path / "c", ["127.0.0.1"], ["alpha"])      # alpha.key is EC P-384
    with pytest.raises(ProvisioningError, match="alpha.key: not an Ed25519 key"):
        sign_release(tmp_path / "c/hospitals/alpha/alpha.key", tmp_path / "x.fab",
                     app_dir=tiny_app(tmp_path / "app"))


def _superlink_db(path: Path) -> Path:
    """An empty SuperLink database, created the way flower-superlink --database creates it."""
    from flwr.superlink.config_loader import get_objectstore_linkstate_factories
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
    get_objectstore_linkstate_factories(str(path), NoOpFederationManager())[1].state()
    return path


def _start_run(db: Path, app_spec: str = "", content: bytes = b"") -> bytes:
    """Flower's StartRun handler on the database; returns the FAB the Fleet API would serve."""
    from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=E0611
    from flwr.supercore.auth.typing import AccountInfo
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import start_run
    state = open_superlink_state(db)
    fab = Fab(hashlib.sha256(content).hexdigest() if content else "", content, {})
    res = start_run(StartRunRequest(fab=fab_to_proto(fab), app_spec=app_spec),
                    AccountInfo(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME), state, None)
    (run,) = state.get_run_info(run_ids=[res.run_id])
    return state.get_fab(run.fab_hash)


def test_published_release_reaches_the_run_with_its_signatures(release, tmp_path, capsys):
    keys, signed, handout = release
    trusted = flower_trusted_entities(handout.trusted_entities)
    db = _superlink_db(tmp_path / "superlink.db")
    assert run_cli("app", "publish", str(signed.fab), "--database", str(db)) == 0
    assert "flwr run @consortium/tiny-app pasta-fed" in capsys.readouterr().out

    served = _start_run(db, app_spec="@consortium/tiny-app")   # `flwr run @consortium/tiny-app`
    assert served.content == signed.fab.read_bytes()
    assert supernode_accepts(served.content, served.verifications, trusted)
    # `flwr run DIR` uploads a FAB: it is stored without signatures, so hospitals refuse it
    foreign = app_signing.build_fab(tiny_app(tmp_path / "evil", "import os\n"))
    uploaded = _start_run(db, content=foreign)
    assert uploaded.verifications == {} and not supernode_accepts(foreign, uploaded.verifications, trusted)
    # a coordinator storing a foreign FAB under the release's id, with the release's
    # signatures copied over, is refused too
    store_signed_app(db, tiny_app_fab(tmp_path), app_signing.flower_verifications(signed.record))
    hijacked = _start_run(db, app_spec="@consortium/tiny-app")
    assert hijacked.content != signed.fab.read_bytes()
    assert not supernode_accepts(hijacked.content, hijacked.verifications, trusted)


def tiny_app_fab(tmp_path: Path) -> bytes:
    """A different app with the same app id as the release."""
    return app_signing.build_fab(tiny_app(tmp_path / "hijack", "import subprocess\n"))


def test_publish_refuses_mismatched_or_forged_records_and_a_missing_database(release, tmp_path):
    _, signed, _ = release
    db = _superlink_db(tmp_path / "superlink.db")
    with pytest.raises(ProvisioningError, match="no such SuperLink database"):
        publish_release(signed.fab, tmp_path / "typo.db")
    other_fab = tmp_path / "other.fab"
    other_fab.write_bytes(tiny_app_fab(tmp_path))
    with pytest.raises(ProvisioningError, match=r"tiny\.fab\.sig\.json: signs FAB"):
        publish_release(other_fab, db, [signed.signature])
    record = json.loads(signed.signature.read_text(encoding="utf-8"))
    sig = record["signatures"][0]["signature"]
    record["signatures"][0]["signature"] = ("A" if sig[0] != "A" else "B") + sig[1:]
    forged = tmp_path / "forged.sig.json"
    forged.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(ProvisioningError, match="forged.sig.json: the signature of fpk_"):
        publish_release(signed.fab, db, [forged])
    assert open_superlink_state(db).list_apps("@none/default") == []


def test_handout_pins_the_release_key_and_warns_without_one(release, tmp_path, capsys):
    keys, _, handout = release
    assert handout.supernode_command[-2:] == ["--trusted-entities", "trusted-entities.yaml"]
    te = yaml.safe_load(handout.trusted_entities.read_text(encoding="utf-8"))
    assert te == {keys.key_id: keys.public_key.read_text(encoding="utf-8").rsplit(" ", 1)[0]}
    assert stat.S_IMODE(handout.trusted_entities.stat().st_mode) == 0o644
    assert run_cli("certs", "handout", "alpha", "--out", str(tmp_path / "c"),
                   "--superlink", "127.0.0.1:8000", "--release-key", str(keys.public_key)) == 0
    out = capsys.readouterr().out
    assert "--trusted-entities trusted-entities.yaml" in out and keys.fingerprint in out
    assert run_cli("certs", "handout", "alpha", "--out", str(tmp_path / "c"),
                   "--superlink", "127.0.0.1:8000") == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "--trusted-entities" not in out
    # an EC hospital key is not a release key: refused, naming the file
    with pytest.raises(ProvisioningError, match="alpha.pub: not an Ed25519 key"):
        make_handout(tmp_path / "c", "alpha", "127.0.0.1:8000",
                     release_keys=[tmp_path / "c/hospitals/alpha/alpha.pub"])


def test_verify_and_fingerprint_use_the_hospitals_own_yaml(release, tmp_path, capsys):
    keys, signed, handout = release
    te = str(handout.trusted_entities)
    assert run_cli("app", "fingerprint", te) == 0
    assert capsys.readouterr().out.split() == [keys.key_id, keys.fingerprint]
    assert run_cli("app", "verify", str(signed.fab), "--trusted-entities", te) == 0
    assert keys.key_id in capsys.readouterr().out
    other = generate_release_key(tmp_path / "other")
    other_te = tmp_path / "other-te.yaml"
    other_te.write_bytes(app_signing.trusted_entities_yaml([app_signing.load_public_key(other.public_key)]))
    assert run_cli("app", "verify", str(signed.fab), "--trusted-entities", str(other_te)) == 1
    assert "would refuse" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("{}\n", encoding="utf-8")
    with pytest.raises(ProvisioningError, match="empty.yaml: expected a non-empty mapping"):
        app_signing.read_trusted_entities(tmp_path / "empty.yaml")
