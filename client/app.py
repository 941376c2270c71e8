"""The hospital's Flower ClientApp (Message API): packs and unpacks, `client.task` does the work.

Site facts come only from the site's own YAML (`--node-config 'hospital-config="..."'`);
the coordinator's config is untrusted and validated by `pasta_model.protocol`.
Every reply passes the outbox allow-list and is written to the audit log first. A
failure leaves as a code and its fixed message (`pasta_model.protocol.ErrorCode`); the
full reason, which may name the site's files, counts or settings, stays in the site's
log and audit log. No exception reaches Flower, which would send its text.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy.audit import AuditLog, AuditRecord
from client.privacy.dp_metrics import released_metric_names
from client.privacy.outbox import DP_METRICS, OutboxPolicy, OutboxRefused, release
from client.site_config import SiteConfig, SiteConfigError, load_site_config
from client.task import SiteAgent, SiteRefused
from pasta_model.app_logging import show_package_info
from pasta_model.protocol import (
    ACTION_HAS_BACKBONE,
    HAS_BACKBONE,
    SITE_RECORD,
    ErrorCode,
    ProtocolError,
    QueryConfig,
    RoundConfig,
    check_incoming_heads,
    error_message,
)
from synth.atomic import clean_stale_temp_files

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "hospital-config"
# DP bookkeeping and what a DP evaluation releases; nothing un-noised (no loss, no c-index)
ALLOWED_METRICS = DP_METRICS | released_metric_names()

SiteResolver = Callable[[Context], Path]
_AGENTS: dict[Path, SiteAgent] = {}


@dataclass
class ReplyRecord(AuditRecord):
    """The audit line of an error reply: `code` and `sent` are exactly what left the site,
    `reason` is the full text that did not."""

    code: int | None = None
    sent: str | None = None


@dataclass
class _Exchange:
    """What a handler knew when it failed: where to audit, and which round it was."""

    msg: Message
    agent: SiteAgent | None = None
    config: RoundConfig | None = None
    action: str | None = None


def site_from_node_config(context: Context) -> Path:
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not path:
        raise SiteConfigError(f"this SuperNode has no {NODE_CONFIG_KEY!r} in its --node-config; "
                              f"start it with --node-config '{NODE_CONFIG_KEY}=\"/path/to/hospital.yaml\"'")
    return Path(str(path))


def _agent(path: Path) -> SiteAgent:
    """The site's agent, created once per process; its start clears temp files a killed save left."""
    path = path.resolve()
    if path not in _AGENTS:
        config = load_site_config(path)
        clean_stale_temp_files(config.state_dir)
        _AGENTS[path] = SiteAgent(config)
    return _AGENTS[path]


# -- error replies ----------------------------------------------------------------------
def error_code(exc: BaseException) -> ErrorCode:
    """The code a failure leaves as; anything unforeseen is an internal error."""
    if isinstance(exc, ProtocolError):
        return ErrorCode.INVALID_MESSAGE
    if isinstance(exc, OutboxRefused):
        return ErrorCode.OUTBOX_REFUSED
    if isinstance(exc, SiteConfigError):
        return ErrorCode.SITE_CONFIG
    if isinstance(exc, SiteRefused):
        try:
            return ErrorCode(getattr(exc, "code", ErrorCode.SITE_POLICY))
        except ValueError:
            return ErrorCode.INTERNAL
    return ErrorCode.INTERNAL


def _refuse(ex: _Exchange, exc: Exception) -> Message:
    """An error reply with a code and its fixed message; the full reason is logged and audited."""
    code = error_code(exc)
    sent = error_message(code)
    reason = str(exc) if code != ErrorCode.INTERNAL else f"{type(exc).__name__}: {exc}"
    kind = str(ex.msg.metadata.message_type)
    if code == ErrorCode.INTERNAL:
        log.error("%s failed (sent %d %r): %s", kind, code, sent, reason, exc_info=exc)
    else:
        log.warning("refused %s (sent %d %r): %s", kind, code, sent, reason)
    if ex.agent is not None:
        _audit_error(ex, code, sent, reason)
    return Message(error=Error(code=int(code), reason=sent), reply_to=ex.msg)


def _audit_error(ex: _Exchange, code: ErrorCode, sent: str, reason: str) -> None:
    record = ReplyRecord.describe(
        run_id=ex.config.run_id if ex.config is not None else f"flower-{ex.msg.metadata.run_id}",
        round=ex.config.server_round if ex.config is not None else 0,
        message_type=f"query:{ex.action}" if ex.action else str(ex.msg.metadata.message_type),
        arrays={}, status="error", reason=reason, site=ex.agent.config.site)
    record.code, record.sent = int(code), sent
    try:
        AuditLog(ex.agent.config.state_dir).append(record)
    except Exception:   # the error reply still leaves (it carries nothing of the site's)
        log.exception("could not audit the error reply %d to %s", code, record.message_type)


def _answering(handler):
    """Run `handler(exchange, context, resolve)`; any exception becomes an audited error reply."""
    def answer(msg: Message, context: Context, resolve: SiteResolver) -> Message:
        ex = _Exchange(msg)
        try:
            return handler(ex, context, resolve)
        except Exception as exc:
            return _refuse(ex, exc)
    answer.__doc__ = handler.__doc__
    return answer


# -- incoming records -------------------------------------------------------------------
def _record(msg: Message, name: str, kind: type):
    if not msg.has_content() or name not in msg.content:
        raise ProtocolError(f"message has no {name!r} record")
    record = msg.content[name]
    if not isinstance(record, kind):
        raise ProtocolError(f"record {name!r} is a {type(record).__name__}, expected {kind.__name__}")
    return record


def _round_inputs(msg: Message, ex: _Exchange) -> tuple[RoundConfig, dict[str, np.ndarray]]:
    """The validated round config and incoming head weights; checked before any work is done."""
    ex.config = RoundConfig.from_config_record(dict(_record(msg, "config", ConfigRecord)))
    incoming = {k: v.numpy() for k, v in _record(msg, "arrays", ArrayRecord).items()}
    check_incoming_heads(incoming, ex.config.task)
    return ex.config, incoming


def _policy(config: SiteConfig, task: str) -> OutboxPolicy:
    return OutboxPolicy(task=task, min_cases=config.min_cases_for_metrics, allowed_metrics=ALLOWED_METRICS)


def _site_record(agent: SiteAgent) -> ConfigRecord:
    return ConfigRecord({"name": agent.config.site})


# -- handlers -------------------------------------------------------------------------
@_answering
def handle_train(ex: _Exchange, context: Context, resolve: SiteResolver) -> Message:
    agent = ex.agent = _agent(resolve(context))
    config, incoming = _round_inputs(ex.msg, ex)
    reply = agent.train(config, incoming)
    content = RecordDict({"arrays": _array_record(reply.arrays), "metrics": MetricRecord(reply.metrics),
                          SITE_RECORD: _site_record(agent)})
    release(AuditLog(agent.config.state_dir), run_id=config.run_id, round=config.server_round,
            message_type="train", arrays=reply.arrays, metrics=reply.metrics,
            policy=_policy(agent.config, config.task), site=agent.config.site,
            expected_shapes={k: v.shape for k, v in incoming.items()})
    return Message(content=content, reply_to=ex.msg)


@_answering
def handle_evaluate(ex: _Exchange, context: Context, resolve: SiteResolver) -> Message:
    agent = ex.agent = _agent(resolve(context))
    config, incoming = _round_inputs(ex.msg, ex)
    evaluation = agent.evaluate(config, incoming)
    metrics = evaluation.metrics
    content = RecordDict({"metrics": MetricRecord(metrics), SITE_RECORD: _site_record(agent)})
    release(AuditLog(agent.config.state_dir), run_id=config.run_id, round=config.server_round,
            message_type="evaluate", arrays={}, metrics=metrics, metric_cases=evaluation.cases,
            withheld=evaluation.withheld, policy=_policy(agent.config, config.task), site=agent.config.site)
    return Message(content=content, reply_to=ex.msg)


def _query(msg: Message) -> QueryConfig:
    """The handshake query's config; anything else is a ProtocolError."""
    return QueryConfig.from_config_record(_record(msg, "config", ConfigRecord))


@_answering
def handle_query(ex: _Exchange, context: Context, resolve: SiteResolver) -> Message:
    """Backbone handshake: `has-backbone`, then (if needed) `install-backbone` with the weights."""
    agent = ex.agent = _agent(resolve(context))
    query = _query(ex.msg)
    ex.action, sha = query.action, query.backbone_sha256
    if ex.action == ACTION_HAS_BACKBONE:
        has = agent.has_backbone(sha)
    else:
        preset = str(query.preset)
        # numpy, not to_torch_state_dict(): the dtype check must see the wire's dtypes, unconverted
        payload = {k: v.numpy() for k, v in _record(ex.msg, "backbone", ArrayRecord).items()}
        agent.install_backbone(sha, preset, payload)
        has = True
    metrics = {HAS_BACKBONE: int(has)}
    AuditLog(agent.config.state_dir).append(AuditRecord.describe(
        run_id=f"flower-{ex.msg.metadata.run_id}", round=0, message_type=f"query:{ex.action}", arrays={},
        metrics=metrics, site=agent.config.site))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), SITE_RECORD: _site_record(agent)}),
                   reply_to=ex.msg)


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def make_client_app(resolve: SiteResolver = site_from_node_config) -> ClientApp:
    """A ClientApp whose site YAML comes from `resolve(context)` (node config by default)."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, resolve)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, resolve)

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, resolve)

    return client


show_package_info("client")   # the SuperNode's ClientApp process: our INFO lines on its stderr
app = make_client_app()
