"""Send messages to sites and tell which site each reply answers for.

A reply's `src_node_id` is not enough: an error the SuperLink writes itself (e.g. "node
unavailable") comes from the SuperLink's own node id. The site a reply belongs to is the
destination of the message it replies to (`reply_to_message_id`); every exchange with
sites (rounds, backbone delivery) maps replies this one way.
"""
from __future__ import annotations

from flwr.app import Message
from flwr.serverapp import Grid


def error_reason(msg: Message) -> str:
    """The reason of an error reply; Flower's Error.reason is optional, the code is not."""
    return msg.error.reason or f"error code {msg.error.code}"


def exchange_by_node(grid: Grid, messages: list[Message], timeout: float) -> list[tuple[int, Message]]:
    """Each reply with the node id of the site it answers for, in arrival order."""
    if not messages:
        return []
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # Flower sets message ids when it pushes, so the map is built after sending
    dst_by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    return [(dst_by_id.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
