"""The hospital's Flower ClientApp (Message API): packs and unpacks, `client.task` does the work.

Site facts come only from the site's own YAML (`--node-config 'hospital-config="..."'`);
the coordinator's config is untrusted and validated by `pasta_model.protocol`.
Every reply passes the outbox allow-list and is written to the audit log first.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy.audit import AuditLog, AuditRecord
from client.privacy.outbox import DEFAULT_ALLOWED_METRICS, OutboxPolicy, OutboxRefused, record_refusal, release
from client.site_config import SiteConfig, SiteConfigError, load_site_config
from client.task import SiteAgent, SiteRefused, parse_round_config
from pasta_model.finetune import METRIC_NAMES
from pasta_model.protocol import TRAIN_LOSS, ProtocolError

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "hospital-config"
SITE_RECORD = "site"
ERROR_CODE_REFUSED = 4100          # the site refused: reason in the error message
ALLOWED_METRICS = DEFAULT_ALLOWED_METRICS | METRIC_NAMES | {TRAIN_LOSS}

SiteResolver = Callable[[Context], Path]
_AGENTS: dict[Path, SiteAgent] = {}


def site_from_node_config(context: Context) -> Path:
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not path:
        raise SiteConfigError(f"this SuperNode has no {NODE_CONFIG_KEY!r} in its --node-config; "
                              f"start it with --node-config '{NODE_CONFIG_KEY}=\"/path/to/hospital.yaml\"'")
    return Path(str(path))


def _agent(path: Path) -> SiteAgent:
    path = path.resolve()
    if path not in _AGENTS:
        _AGENTS[path] = SiteAgent(load_site_config(path))
    return _AGENTS[path]


def _refuse(msg: Message, exc: Exception, agent: SiteAgent | None = None, config=None) -> Message:
    """An error reply carrying only the reason, audited like any reply when the site is known.

    The outbox audits its own refusals (`exc.audited`). Without a readable site config
    there is no state_dir to log to (the SuperNode's log still has the line).
    """
    reason = str(exc)
    log.error("refused %s: %s", msg.metadata.message_type, reason)
    if agent is not None and not getattr(exc, "audited", False):
        record_refusal(AuditLog(agent.config.state_dir),
                       run_id=config.run_id if config is not None else f"flower-{msg.metadata.run_id}",
                       round=config.server_round if config is not None else 0,
                       message_type=str(msg.metadata.message_type), reason=reason, site=agent.config.site)
    return Message(error=Error(code=ERROR_CODE_REFUSED, reason=reason), reply_to=msg)


def _policy(config: SiteConfig, task: str) -> OutboxPolicy:
    return OutboxPolicy(task=task, min_cases=config.min_cases_for_metrics, allowed_metrics=ALLOWED_METRICS)


def _round_inputs(msg: Message):
    """The validated round config and the incoming head weights of a train/evaluate message."""
    config = parse_round_config(msg.content["config"])
    incoming = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    return config, incoming


def handle_train(msg: Message, context: Context, resolve: SiteResolver) -> Message:
    agent = config = None
    try:
        agent = _agent(resolve(context))
        config, incoming = _round_inputs(msg)
        reply = agent.train(config, incoming)
        release(AuditLog(agent.config.state_dir), run_id=config.run_id, round=config.server_round,
                message_type="train", arrays=reply.arrays, metrics=reply.metrics,
                policy=_policy(agent.config, config.task), site=agent.config.site,
                expected_shapes={k: v.shape for k, v in incoming.items()})
    except (SiteRefused, SiteConfigError, OutboxRefused, ProtocolError) as exc:
        return _refuse(msg, exc, agent, config)
    content = RecordDict({
        "arrays": _array_record(reply.arrays),
        "metrics": MetricRecord(reply.metrics),
        SITE_RECORD: ConfigRecord({"name": agent.config.site}),
    })
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, resolve: SiteResolver) -> Message:
    agent = config = None
    try:
        agent = _agent(resolve(context))
        config, incoming = _round_inputs(msg)
        metrics = agent.evaluate(config, incoming)
        release(AuditLog(agent.config.state_dir), run_id=config.run_id, round=config.server_round,
                message_type="evaluate", arrays={}, metrics=metrics,
                policy=_policy(agent.config, config.task), site=agent.config.site)
    except (SiteRefused, SiteConfigError, OutboxRefused, ProtocolError) as exc:
        return _refuse(msg, exc, agent, config)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       SITE_RECORD: ConfigRecord({"name": agent.config.site})}), reply_to=msg)


def handle_query(msg: Message, context: Context, resolve: SiteResolver) -> Message:
    """Backbone handshake: `has-backbone`, then (if needed) `install-backbone` with the weights."""
    agent = None
    try:
        agent = _agent(resolve(context))
        cfg = dict(msg.content["config"])
        unknown = set(cfg) - {"action", "backbone-sha256", "preset"}
        if unknown:
            raise SiteRefused(f"query config has unknown key(s) {sorted(unknown)}")
        sha, action = str(cfg.get("backbone-sha256", "")), cfg.get("action")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise SiteRefused("query: backbone-sha256 must be 64 hex digits")
        if action == "has-backbone":
            has = agent.has_backbone(sha)
        elif action == "install-backbone":
            preset = str(cfg.get("preset", ""))
            if preset not in ("tiny", "small", "base", "paper"):
                raise SiteRefused(f"query: unknown preset {preset!r}")
            agent.install_backbone(sha, preset, {k: v.numpy() for k, v in msg.content["backbone"].items()})
            has = True
        else:
            raise SiteRefused(f"query: unknown action {action!r}")
    except (SiteRefused, SiteConfigError) as exc:
        return _refuse(msg, exc, agent)
    AuditLog(agent.config.state_dir).append(AuditRecord.describe(
        run_id=f"flower-{msg.metadata.run_id}", round=0, message_type=f"query:{action}", arrays={},
        metrics={"has-backbone": int(has)}, site=agent.config.site))
    return Message(content=RecordDict({"metrics": MetricRecord({"has-backbone": int(has)}),
                                       SITE_RECORD: ConfigRecord({"name": agent.config.site})}), reply_to=msg)


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


app = make_client_app()
