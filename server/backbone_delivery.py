"""The backbone reaches each site once.

Before a site trains for the first time the coordinator asks it (a `query` message)
whether it holds the backbone with the announced SHA-256; if not, and sending is
allowed, the coordinator sends the backbone weights once (Flower chunks large
messages) and the site verifies the hash before caching it under its state_dir.
"""
from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pasta_model.network import PastaNet, backbone_keys
from pasta_model.protocol import ACTION_HAS_BACKBONE, ACTION_INSTALL_BACKBONE, HAS_BACKBONE, QueryConfig
from server.replies import error_reason, exchange_by_node

log = logging.getLogger(__name__)

def _query(node: int, config: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["backbone"] = arrays
    return Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)


def ensure_backbone(grid: Grid, nodes: list[int], model: PastaNet, sha256: str, *, send: bool,
                    timeout: float, on_reply=None) -> dict[int, str]:
    """Returns node -> problem for nodes that still lack the backbone (empty when all have it)."""
    if not nodes:
        return {}
    has = QueryConfig(action=ACTION_HAS_BACKBONE, backbone_sha256=sha256).to_config_dict()
    install = QueryConfig(action=ACTION_INSTALL_BACKBONE, backbone_sha256=sha256,
                          preset=model.preset.name).to_config_dict()
    replies = exchange_by_node(grid, [_query(n, has) for n in nodes], timeout)
    problems: dict[int, str] = {n: "no reply to the backbone query" for n in nodes}
    need: list[int] = []
    for node, msg in replies:
        if on_reply is not None:
            on_reply(msg)          # learn the site's name from its first reply
        if msg.has_error():
            problems[node] = error_reason(msg)
            continue
        flag = next(iter(msg.content.metric_records.values())).get(HAS_BACKBONE, 0)
        if not isinstance(flag, (int, float)):
            problems[node] = f"malformed backbone query reply: {HAS_BACKBONE} is {flag!r}"
            continue
        if int(flag):
            problems.pop(node, None)
        else:
            need.append(node)
    if need and send:
        state = model.state_dict()
        arrays = ArrayRecord(torch_state_dict={k: state[k] for k in backbone_keys(state)})
        log.info("sending the backbone (%.1f MB) to %d site(s)", arrays.count_bytes() / 1e6, len(need))
        replies = exchange_by_node(
            grid, [_query(n, install, arrays) for n in need], timeout)
        for node, msg in replies:
            if msg.has_error():
                problems[node] = error_reason(msg)
            else:
                problems.pop(node, None)
    elif need:
        for n in need:
            problems[n] = "site lacks the backbone and send-backbone is off"
    return problems
