"""Put a signed release into the SuperLink's state so that `flwr run @APP_ID` sends
hospitals the FAB together with its signatures.

Why this path (flwr 1.42, read from its source): the SuperLink hands a SuperNode
`fab.verifications` only as stored in its state (`FabModel.verifications`); a FAB
uploaded by `flwr run .` is stored with none, and the only Control API call that stores
verifications (`AddApp`) downloads them from Flower Hub, which an offline consortium
does not have. `StartRun` with an app spec and no version, `flwr run @publisher/name`,
takes the FAB *and its verifications* from an app stored for the federation with
`is_hub_app` set (`state.get_hub_app`). So we store the signed FAB that way, with
Flower's own state class (`SqlLinkState.store_app`, opened by the same factory
`flower-superlink --database` uses), into the SuperLink's SQLite database.

The SuperLink is untrusted: what it stores proves nothing. Security rests on the
hospital's SuperNode checking the signature with the key in its own YAML.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .app_signing import (
    check_record,
    fab_identity,
    flower_verifications,
    read_record,
    signature_path,
)
from .files import ProvisioningError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedApp:
    app_id: str
    version: str
    fab_sha256: str
    signers: tuple[str, ...]
    federation: str


def merged_record(fab: bytes, signature_files: list[Path]) -> dict:
    """One record with the signatures of every file, each checked against `fab`."""
    if not signature_files:
        raise ProvisioningError("no signature record given")

    def checked(path: Path) -> dict:
        record = read_record(path)
        check_record(fab, record, str(path))
        return record

    first, *others = signature_files
    merged = checked(first)
    for path in others:
        record = checked(path)
        ids = {s["public_key_id"] for s in record["signatures"]}
        merged = {**merged, "signatures": [s for s in merged["signatures"]
                                           if s["public_key_id"] not in ids] + record["signatures"]}
    return merged


def _app_type(fab: bytes) -> str:
    # as flwr's control_handlers._get_app_type: a FAB without an agentapp is a ServerApp
    from flwr.common.config import get_fab_config
    from flwr.supercore.constant import TaskType
    components = get_fab_config(fab)["tool"]["flwr"]["app"].get("components", {})
    return TaskType.AGENT_APP if "agentapp" in components else TaskType.SERVER_APP


def open_superlink_state(database: Path):
    """The SuperLink's LinkState on `database`, opened as flower-superlink opens it."""
    from flwr.superlink.config_loader import get_objectstore_linkstate_factories
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
    if not Path(database).is_file():
        raise ProvisioningError(
            f"{database}: no such SuperLink database; start flower-superlink with "
            f"--database {database} first, or give the path it uses")
    _, factory = get_objectstore_linkstate_factories(str(database), NoOpFederationManager())
    return factory.state()


def store_signed_app(database: Path, fab: bytes, verifications: dict[str, str],
                     federation: str | None = None) -> str:
    """Store `fab` with `verifications` as the federation's app; returns its app id."""
    from flwr.common.config import get_app_presentation_metadata, get_fab_config
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.fab import Fab
    app_id, _ = fab_identity(fab, "FAB")
    state = open_superlink_state(database)
    meta = get_app_presentation_metadata(get_fab_config(fab))
    state.store_app(
        fab=Fab(hashlib.sha256(fab).hexdigest(), fab, verifications),
        federation_id=federation or NOOP_FEDERATION_ID, app_id=app_id,
        app_type=_app_type(fab), added_by=NOOP_FLWR_AID,
        is_hub_app=True,   # what makes `flwr run @APP_ID` use this FAB and its verifications
        display_name=meta.display_name, description=meta.description, color=meta.color)
    return app_id


def publish_release(fab_path: Path, database: Path, signature_files: list[Path] | None = None,
                    federation: str | None = None) -> PublishedApp:
    """Check the release's signatures, store it in the SuperLink database, read it back."""
    try:
        fab = Path(fab_path).read_bytes()
    except OSError as err:
        raise ProvisioningError(f"{fab_path}: cannot read the FAB ({err})") from err
    files = signature_files or [signature_path(Path(fab_path))]
    record = merged_record(fab, files)
    verifications = flower_verifications(record)
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    fed = federation or NOOP_FEDERATION_ID
    app_id = store_signed_app(database, fab, verifications, fed)
    stored = open_superlink_state(database).get_hub_app(fed, app_id)
    if stored is None or stored[0].verifications != verifications:
        raise ProvisioningError(f"{database}: the app {app_id} was not stored with its signatures")
    signers = tuple(s["public_key_id"] for s in record["signatures"])
    log.info("published %s %s (sha256 %s) signed by %s into %s", app_id, record["version"],
             record["fab_sha256"], ", ".join(signers), database)
    return PublishedApp(app_id, record["version"], record["fab_sha256"], signers, fed)
