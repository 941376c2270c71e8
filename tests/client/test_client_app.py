"""The ClientApp's handlers called in-process with hand-built Flower messages."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import ERROR_CODE_REFUSED, handle_evaluate, handle_query, handle_train
from client.task import noise_seed, site_secret
from hospital_factory import write_hospital, write_pretrained
from pasta_model.checkpoint import load_checkpoint
from pasta_model.protocol import RoundConfig, heads_to_arrays


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("clientapp")
    pre = write_pretrained(root / "pretrained.ckpt")
    yaml_path = write_hospital(root, "hosp", 16, seed=5, epsilon=3.0, backbone=pre)
    model, meta = load_checkpoint(pre)
    return yaml_path, model, meta


def _msg(kind: str, arrays: dict, config: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    return Message(content, metadata=Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1,
                                              reply_to_message_id="", group_id="1", created_at=0.0, ttl=3600,
                                              message_type=kind))


def _config(meta, rnd: int, rounds: int = 2, **kw) -> dict:
    base = dict(server_round=rnd, task="report", local_epochs=1, learning_rate=0.5, batch_size=8,
                backbone_sha256=meta.backbone_sha256, dp_delta=1e-5, planned_rounds=rounds, run_id="run-a")
    base.update(kw)
    return RoundConfig(**base).to_config_dict()


def _ctx(yaml_path: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"hospital-config": str(yaml_path)}, state=RecordDict(),
                   run_config={})


def _resolve(ctx: Context) -> Path:
    return Path(ctx.node_config["hospital-config"])


def _audit_lines(yaml_path: Path) -> list[dict]:
    path = yaml_path.parent / "state" / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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
    audit = [json.loads(l) for l in (state / "audit" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["keys"] == sorted(heads) and audit[-1]["status"] == "sent"
    assert audit[-1]["bytes"] == sum(v.nbytes for v in heads.values())


def test_round_config_with_a_path_or_unknown_key_is_refused(site):
    yaml_path, model, meta = site
    heads = heads_to_arrays(model, "report")
    bad = _config(meta, 1)
    bad["run-id"] = "../../etc"
    reply = handle_train(_msg("train", heads, bad), _ctx(yaml_path), _resolve)
    assert reply.has_error() and reply.error.code == ERROR_CODE_REFUSED and "run-id" in reply.error.reason
    n = len(_audit_lines(yaml_path))
    extra = {**_config(meta, 1), "data-dir": "x"}
    reply = handle_train(_msg("train", heads, extra), _ctx(yaml_path), _resolve)
    assert reply.has_error() and "unknown" in reply.error.reason
    # the reason text leaves the site, so the refusal is in the audit log, word for word
    last = _audit_lines(yaml_path)[n:]
    assert [(a["status"], a["message_type"], a["reason"], a["keys"]) for a in last] == \
        [("refused", "train", reply.error.reason, [])]


def test_heads_of_another_task_are_refused(site):
    yaml_path, model, meta = site
    reply = handle_train(_msg("train", heads_to_arrays(model, "stage"), _config(meta, 1, run_id="run-b")),
                         _ctx(yaml_path), _resolve)
    assert reply.has_error() and "heads.report" in reply.error.reason


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
    ledger_file = next((yaml_path.parent / "state" / "privacy").glob("*.json"))
    before = ledger_file.read_text()
    refused = handle_train(_msg("train", heads, _config(meta, 2, run_id="run-c")), _ctx(strict), _resolve)
    assert refused.has_error() and "budget" in refused.error.reason
    assert ledger_file.read_text() == before


def test_evaluate_releases_aggregates_only_above_the_minimum(site):
    yaml_path, model, meta = site
    reply = handle_evaluate(_msg("evaluate", heads_to_arrays(model, "report"), _config(meta, 1)),
                            _ctx(yaml_path), _resolve)
    if reply.has_error():      # fewer than 5 held-out patients at this small site
        assert "fewer than 5" in reply.error.reason
    else:
        assert reply.content["metrics"]["num-examples"] >= 5
        assert "arrays" not in reply.content


def test_backbone_query_answers_from_the_configured_checkpoint(site):
    yaml_path, model, meta = site
    msg = Message(RecordDict({"config": ConfigRecord({"action": "has-backbone", "backbone-sha256": meta.backbone_sha256,
                                                      "preset": "tiny"})}),
                  metadata=Metadata(run_id=1, message_id="q", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                                    group_id="1", created_at=0.0, ttl=3600, message_type="query"))
    n = len(_audit_lines(yaml_path))
    reply = handle_query(msg, _ctx(yaml_path), _resolve)
    assert reply.content["metrics"]["has-backbone"] == 1
    last = _audit_lines(yaml_path)[n:]
    assert [(a["status"], a["message_type"], a["metrics"]) for a in last] == \
        [("sent", "query:has-backbone", {"has-backbone": 1})]


def test_noise_seed_comes_from_the_site_secret(tmp_path):
    secret = site_secret(tmp_path)
    assert site_secret(tmp_path) == secret and len(secret) == 32
    assert stat.S_IMODE((tmp_path / "privacy" / "noise-secret").stat().st_mode) == 0o600
    cfg = RoundConfig(server_round=1, task="report", local_epochs=1, learning_rate=0.1, batch_size=4,
                      backbone_sha256="a" * 64, dp_delta=1e-5, planned_rounds=2, run_id="r", seed=0)
    heads = {"heads.report.x": np.zeros(3, dtype=np.float32)}
    other = {"heads.report.x": np.ones(3, dtype=np.float32)}
    assert noise_seed(secret, cfg, heads) == noise_seed(secret, cfg, heads)
    assert noise_seed(secret, cfg, heads) != noise_seed(secret, cfg, other)
    assert noise_seed(secret, cfg, heads) != noise_seed(b"x" * 32, cfg, heads)
