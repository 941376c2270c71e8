"""Hand-built Flower messages for calling the ClientApp's handlers in-process, as a
(possibly hostile) coordinator would send them."""
from __future__ import annotations

from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from pasta_model.protocol import RoundConfig


def round_message(kind: str, arrays: dict, config: dict, run_id: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    return Message(content, metadata=Metadata(run_id=run_id, message_id="m1", src_node_id=0, dst_node_id=1,
                                              reply_to_message_id="", group_id="1", created_at=0.0, ttl=3600,
                                              message_type=kind))


def query_message(config: dict, backbone: dict | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if backbone is not None:
        content["backbone"] = ArrayRecord({k: Array(v) for k, v in backbone.items()})
    return Message(content, metadata=Metadata(run_id=1, message_id="q", src_node_id=0, dst_node_id=1,
                                              reply_to_message_id="", group_id="1", created_at=0.0, ttl=3600,
                                              message_type="query"))


def round_config(backbone_sha256: str, rnd: int, rounds: int = 2, **overrides) -> dict:
    base = dict(server_round=rnd, task="report", local_epochs=1, learning_rate=0.5, batch_size=8,
                backbone_sha256=backbone_sha256, dp_delta=1e-5, planned_rounds=rounds, run_id="run-a")
    base.update(overrides)
    return RoundConfig(**base).to_config_dict()


def node_context(yaml_path: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"hospital-config": str(yaml_path)}, state=RecordDict(),
                   run_config={})


def resolve_from_node_config(ctx: Context) -> Path:
    return Path(ctx.node_config["hospital-config"])
