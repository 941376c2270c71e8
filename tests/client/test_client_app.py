"""The ClientApp's handlers called in-process with hand-built Flower messages."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from flower_messages import node_context, query_message, resolve_from_node_config, round_config, round_message
from flwr.app import ConfigRecord, Message, RecordDict
from hospital_factory import write_hospital, write_pretrained

import client.app as client_app
from client.app import handle_evaluate, handle_query, handle_train, make_client_app
from client.privacy.audit import AuditLog
from client.task import SiteAgent
from pasta_model.checkpoint import load_checkpoint
from pasta_model.protocol import ErrorCode, error_message, heads_to_arrays


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("clientapp")
    pre = write_pretrained(root / "pretrained.ckpt")
    yaml_path = write_hospital(root, "hosp", 16, seed=5, epsilon=3.0, backbone=pre)
    model, meta = load_checkpoint(pre)
    return yaml_path, model, meta


_msg, _ctx, _resolve = round_message, node_context, resolve_from_node_config


def _query(config: dict) -> Message:
    return query_message(config)


def _config(meta, rnd: int, rounds: int = 2, **kw) -> dict:
    return round_config(meta.backbone_sha256, rnd, rounds, **kw)


def _audit_lines(yaml_path: Path) -> list[dict]:
    path = yaml_path.parent / "state" / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _privacy_state(yaml_path: Path) -> dict[str, bytes]:
    """Every file of the site's privacy folder (the ledger): what a charge would change."""
    folder = yaml_path.parent / "state" / "privacy"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()} if folder.exists() else {}


def _assert_error_reply(reply: Message, code: ErrorCode) -> None:
    """Only the code and its fixed message leave: no path, key, count or exception text."""
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (int(code), error_message(code))
    assert "/" not in reply.error.reason


def _new_errors(yaml_path: Path, before: int) -> list[dict]:
    return [a for a in _audit_lines(yaml_path)[before:] if a["status"] != "charged"]


def test_train_round_returns_only_head_keys_and_charges_the_ledger(site):
    yaml_path, model, meta = site
    heads = heads_to_arrays(model, "report")
    reply = handle_train(_msg("train", heads, _config(meta, 1)), _ctx(yaml_path), _resolve)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    keys = set(reply.content["arrays"].keys())
    assert keys == set(heads) and all(k.startswith("heads.report.") for k in keys)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] >= 5 and 0 < metrics["epsilon"] <= 3.0
    state = yaml_path.parent / "state"
    ledger = json.loads(next((state / "privacy").glob("*.json")).read_text())
    assert [(e["round"], e["status"]) for e in ledger["entries"]] == [(1, "committed")]
    audit = _audit_lines(yaml_path)
    assert audit[-1]["keys"] == sorted(heads) and audit[-1]["status"] == "sent"
    assert audit[-1]["bytes"] == sum(v.nbytes for v in heads.values())


def test_round_config_with_a_path_or_unknown_key_is_refused_with_a_code_only(site):
    yaml_path, model, meta = site
    heads = heads_to_arrays(model, "report")
    bad = _config(meta, 1)
    bad["run-id"] = "../../etc"
    n = len(_audit_lines(yaml_path))
    reply = handle_train(_msg("train", heads, bad), _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.INVALID_MESSAGE)
    extra = {**_config(meta, 1), "data-dir": "x"}
    reply = handle_train(_msg("train", heads, extra), _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.INVALID_MESSAGE)
    # each error reply is audited: what left (code, text) and the full reason that did not
    first, second = _new_errors(yaml_path, n)
    assert [(a["status"], a["message_type"], a["code"], a["sent"], a["keys"]) for a in (first, second)] == \
        [("error", "train", 4100, reply.error.reason, [])] * 2
    assert "run-id" in first["reason"] and "data-dir" in second["reason"]
    assert AuditLog(yaml_path.parent / "state").verify_chain()


def test_heads_of_another_task_are_refused(site):
    yaml_path, model, meta = site
    n = len(_audit_lines(yaml_path))
    reply = handle_train(_msg("train", heads_to_arrays(model, "stage"), _config(meta, 1, run_id="run-b")),
                         _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.INVALID_MESSAGE)
    (record,) = _new_errors(yaml_path, n)
    assert "heads.report" in record["reason"]


def _hostile_heads(heads: dict, how: str) -> dict:
    key = sorted(heads)[0]
    if how == "3e38":
        return {**heads, key: np.full_like(heads[key], 3e38)}
    return {**heads, key: heads[key].astype(how)}


@pytest.mark.parametrize("how", ["int64", "bool", "complex64", "float64", "3e38"])
def test_hostile_head_weights_are_refused_before_any_privacy_is_charged(site, how):
    yaml_path, model, meta = site
    heads = heads_to_arrays(model, "report")
    before, n = _privacy_state(yaml_path), len(_audit_lines(yaml_path))
    reply = handle_train(_msg("train", _hostile_heads(heads, how), _config(meta, 1, run_id=f"run-h-{how}")),
                         _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.INVALID_MESSAGE)
    assert _privacy_state(yaml_path) == before
    (record,) = _new_errors(yaml_path, n)
    assert sorted(heads)[0] in record["reason"]
    assert ("magnitude" if how == "3e38" else f"dtype {how}") in record["reason"]


@pytest.mark.parametrize("settings", [{"proximal-mu": 1e300}, {"proximal-mu": 101.0},
                                      {"proximal-mu": 4.0, "learning-rate": 0.5}])
def test_a_proximal_mu_that_would_blow_up_training_is_refused_before_any_charge(site, settings):
    yaml_path, model, meta = site
    before = _privacy_state(yaml_path)
    config = {**_config(meta, 1, run_id="run-mu"), **settings}
    reply = handle_train(_msg("train", heads_to_arrays(model, "report"), config), _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.INVALID_MESSAGE)
    assert _privacy_state(yaml_path) == before


def test_a_message_without_its_records_is_an_invalid_message(site):
    yaml_path, model, meta = site
    msg = Message(RecordDict({"config": ConfigRecord(_config(meta, 1))}), metadata=_msg("train", {}, {}).metadata)
    _assert_error_reply(handle_train(msg, _ctx(yaml_path), _resolve), ErrorCode.INVALID_MESSAGE)


def test_a_round_past_the_budget_is_refused_and_nothing_trains(site):
    yaml_path, model, meta = site
    heads = heads_to_arrays(model, "report")
    first = handle_train(_msg("train", heads, _config(meta, 1, run_id="run-c")), _ctx(yaml_path), _resolve)
    assert not first.has_error()
    # the hospital lowers its budget below what it has already spent: the next round must not train
    import yaml
    cfg = yaml.safe_load(yaml_path.read_text())
    cfg["privacy"]["max_epsilon"] = 0.5
    strict = yaml_path.with_name("hospital-strict.yaml")
    strict.write_text(yaml.safe_dump(cfg))
    before, n = _privacy_state(yaml_path), len(_audit_lines(yaml_path))
    refused = handle_train(_msg("train", heads, _config(meta, 2, run_id="run-c")), _ctx(strict), _resolve)
    _assert_error_reply(refused, ErrorCode.PRIVACY_BUDGET)
    assert _privacy_state(yaml_path) == before
    (record,) = _new_errors(yaml_path, n)
    assert "budget" in record["reason"] and record["sent"] == error_message(ErrorCode.PRIVACY_BUDGET)


def test_evaluate_releases_aggregates_only_above_the_minimum(site):
    yaml_path, model, meta = site
    n = len(_audit_lines(yaml_path))
    reply = handle_evaluate(_msg("evaluate", heads_to_arrays(model, "report"), _config(meta, 1)),
                            _ctx(yaml_path), _resolve)
    if reply.has_error():      # fewer than 5 held-out patients at this small site
        _assert_error_reply(reply, ErrorCode.TOO_FEW_CASES)
        (record,) = _new_errors(yaml_path, n)
        assert "fewer than 5" in record["reason"]
    else:
        assert reply.content["metrics"]["num-examples"] >= 5
        assert "arrays" not in reply.content


class DiskFull(OSError):
    pass


def _fail(*args, **kwargs):
    raise DiskFull(28, "No space left on device", "/srv/hospital-a/state/privacy/ledger-site.json")


@pytest.mark.parametrize("handler, method, message", [
    (handle_train, "train", lambda meta, heads: _msg("train", heads, _config(meta, 1, run_id="run-x"))),
    (handle_evaluate, "evaluate", lambda meta, heads: _msg("evaluate", heads, _config(meta, 1, run_id="run-x"))),
    (handle_query, "has_backbone", lambda meta, heads: _query({"action": "has-backbone",
                                                              "backbone-sha256": meta.backbone_sha256})),
])
def test_an_unexpected_exception_becomes_an_audited_internal_error(site, monkeypatch, handler, method, message):
    """Flower would send the exception's text (with the site's paths); the site sends 5000 only."""
    yaml_path, model, meta = site
    monkeypatch.setattr(SiteAgent, method, _fail)
    n = len(_audit_lines(yaml_path))
    reply = handler(message(meta, heads_to_arrays(model, "report")), _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.INTERNAL)
    (record,) = _new_errors(yaml_path, n)
    assert (record["status"], record["code"], record["sent"]) == ("error", 5000, reply.error.reason)
    assert "DiskFull" in record["reason"] and "/srv/hospital-a/state/privacy" in record["reason"]


def test_the_client_app_itself_never_lets_an_exception_through(site, monkeypatch):
    yaml_path, model, meta = site
    monkeypatch.setattr(SiteAgent, "train", _fail)
    app = make_client_app(_resolve)
    reply = app(_msg("train", heads_to_arrays(model, "report"), _config(meta, 1, run_id="run-y")), _ctx(yaml_path))
    _assert_error_reply(reply, ErrorCode.INTERNAL)


def test_a_site_without_a_usable_yaml_answers_without_naming_it(tmp_path):
    missing = tmp_path / "srv" / "hospital.yaml"
    reply = handle_query(_query({"action": "has-backbone", "backbone-sha256": "a" * 64}), _ctx(missing), _resolve)
    _assert_error_reply(reply, ErrorCode.SITE_CONFIG)
    assert "hospital.yaml" not in reply.error.reason


def test_backbone_query_answers_from_the_configured_checkpoint(site):
    yaml_path, model, meta = site
    n = len(_audit_lines(yaml_path))
    reply = handle_query(_query({"action": "has-backbone", "backbone-sha256": meta.backbone_sha256,
                                 "preset": "tiny"}), _ctx(yaml_path), _resolve)
    assert reply.content["metrics"]["has-backbone"] == 1
    last = _audit_lines(yaml_path)[n:]
    assert [(a["status"], a["message_type"], a["metrics"]) for a in last] == \
        [("sent", "query:has-backbone", {"has-backbone": 1})]


@pytest.mark.parametrize("config", [
    {"action": "has-backbone", "backbone-sha256": "a" * 64, "data-dir": "/srv"},
    {"action": "has-backbone", "backbone-sha256": "xyz"},
    {"action": "delete-backbone", "backbone-sha256": "a" * 64},
    {"action": "install-backbone", "backbone-sha256": "a" * 64, "preset": "huge"},
    {"action": "install-backbone", "backbone-sha256": "a" * 64, "preset": "tiny"},   # no weights sent
])
def test_a_malformed_query_is_an_audited_invalid_message(site, config):
    yaml_path, _, _ = site
    n = len(_audit_lines(yaml_path))
    reply = handle_query(_query(config), _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.INVALID_MESSAGE)
    (record,) = _new_errors(yaml_path, n)
    assert (record["status"], record["code"], record["sent"]) == ("error", 4100, reply.error.reason)


def test_the_agent_start_removes_temp_files_of_a_killed_save(site, monkeypatch):
    yaml_path, _, meta = site
    privacy = yaml_path.parent / "state" / "privacy"
    privacy.mkdir(parents=True, exist_ok=True)
    fd, leftover = tempfile.mkstemp(prefix=".ledger-site.json.", suffix=".json", dir=privacy)
    os.write(fd, b'{"half": ')
    os.close(fd)
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setattr(client_app, "_AGENTS", {})          # a fresh process: the agent starts again
    reply = handle_query(_query({"action": "has-backbone", "backbone-sha256": meta.backbone_sha256}),
                         _ctx(yaml_path), _resolve)
    assert not reply.has_error()
    assert not Path(leftover).exists()


def test_a_reply_the_outbox_refuses_leaves_as_4104_and_both_records_are_audited(site, monkeypatch):
    """The outbox records what was not sent ("refused"); the app records what was ("error")."""
    from client.task import RoundReply
    yaml_path, model, meta = site
    heads = heads_to_arrays(model, "report")
    leaking = {**heads, "conv_blocks_context.0.blocks.0.conv.weight": np.zeros(3, np.float32)}
    monkeypatch.setattr(SiteAgent, "train", lambda self, config, incoming: RoundReply(leaking, {"num-examples": 9.0}))
    n = len(_audit_lines(yaml_path))
    reply = handle_train(_msg("train", heads, _config(meta, 1, run_id="run-o")), _ctx(yaml_path), _resolve)
    _assert_error_reply(reply, ErrorCode.OUTBOX_REFUSED)
    refused, error = _audit_lines(yaml_path)[n:]
    assert refused["status"] == "refused" and "conv_blocks_context.0.blocks.0.conv.weight" in refused["keys"]
    assert (error["status"], error["code"], error["sent"]) == ("error", 4104, reply.error.reason)
    assert "conv_blocks_context" in error["reason"]
