"""Tamper evidence: rolling back the ledger or cutting the audit log is caught, and stops releases."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from flower_messages import node_context, resolve_from_node_config, round_config, round_message
from hospital_factory import write_hospital, write_pretrained
from test_ledger import _run_cli

from client.app import handle_train
from client.privacy.audit import GENESIS, AuditLog, AuditRecord
from client.privacy.ledger import SITE_KEY, PrivacyLedger, ledger_path
from client.privacy.tamper import inspect_state
from client.task import REFUSED_STATE
from pasta_model.checkpoint import load_checkpoint
from pasta_model.protocol import heads_to_arrays

DELTA = 1e-5


def _charge(ledger, rnd, sigma=1.0):
    ledger.record_round(run_id="run", round=rnd, noise_multiplier=sigma, sample_rate=0.1, steps=10,
                        max_epsilon=100, delta=DELTA, task="report", backbone="a" * 64)


@pytest.fixture()
def state(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, SITE_KEY)
    for rnd in (1, 2, 3):
        _charge(ledger, rnd)
        AuditLog(tmp_path).append(AuditRecord.describe(run_id="run", round=rnd, message_type="train", arrays={},
                                                       metrics={"epsilon": ledger.epsilon(DELTA)}))
    assert inspect_state(tmp_path).ok
    return tmp_path


def _lines(state):
    return (state / "audit" / "audit.jsonl").read_bytes().splitlines()


def _write_chain(state, records: list[dict]) -> None:
    """Rewrite the whole log with a fresh, valid chain (what a careful forger would do)."""
    prev, out = GENESIS, []
    for rec in records:
        rec = {**rec, "prev": prev}
        raw = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(raw).hexdigest()
        out.append(raw)
    (state / "audit" / "audit.jsonl").write_bytes(b"\n".join(out) + b"\n")


def test_truncated_audit_log_is_detected(state):
    lines = _lines(state)
    (state / "audit" / "audit.jsonl").write_bytes(b"\n".join(lines[:-2]) + b"\n")   # the last charge and reply
    report = inspect_state(state)
    assert not report.ok and any("truncated" in p for p in report.problems)


def test_rewritten_chain_passes_verify_chain_but_not_the_ledger_anchors(state):
    records = [json.loads(line) for line in _lines(state)]
    _write_chain(state, [r for r in records if not (r["status"] == "charged" and r["round"] == 2)])
    assert AuditLog(state).verify_chain()            # the chain alone cannot tell
    report = inspect_state(state)
    assert not report.ok and any("lacks the charge records of 2 ledger" in p for p in report.problems)


def test_an_edited_line_breaks_the_chain(state):
    lines = _lines(state)
    assert b'"steps":10' in lines[2]                 # round 2's charge: make it look cheaper
    lines[2] = lines[2].replace(b'"steps":10', b'"steps":1')
    (state / "audit" / "audit.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert any("line 4 does not follow" in p for p in inspect_state(state).problems)


def test_deleted_audit_log_and_deleted_ledger_are_detected(state, tmp_path_factory):
    other = tmp_path_factory.mktemp("copy")
    shutil.copytree(state, other, dirs_exist_ok=True)
    (state / "audit" / "audit.jsonl").unlink()
    assert any("audit log was truncated, rewritten or deleted" in p for p in inspect_state(state).problems)
    ledger_path(other, SITE_KEY).unlink()
    assert any("is missing 3 charge(s)" in p for p in inspect_state(other).problems)


def test_both_files_replaced_are_caught_only_by_a_head_kept_elsewhere(state):
    head = inspect_state(state).head
    shutil.rmtree(state / "audit")
    ledger_path(state, SITE_KEY).unlink()
    assert inspect_state(state).ok                    # nothing left to compare
    report = inspect_state(state, expect=head)
    assert not report.ok and "noted earlier is not in the chain" in report.problems[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("tamper")
    pre = write_pretrained(root / "pretrained.ckpt")
    model, meta = load_checkpoint(pre)
    return write_hospital(root, "rolledback", 16, seed=6, epsilon=8.0, backbone=pre), model, meta


def test_a_rolled_back_ledger_stops_training_until_the_operator_repairs_it(site, capsys):
    yaml_path, model, meta = site
    heads = heads_to_arrays(model, "report")
    ctx, state = node_context(yaml_path), yaml_path.parent / "state"

    def train(rnd):
        return handle_train(round_message("train", heads, round_config(meta.backbone_sha256, rnd, rounds=4)),
                            ctx, resolve_from_node_config)

    assert not train(1).has_error()
    saved = ledger_path(state, SITE_KEY).read_bytes()
    assert not train(2).has_error()
    spent = PrivacyLedger.open_site(state).epsilon(DELTA)
    ledger_path(state, SITE_KEY).write_bytes(saved)         # roll the budget back by one round
    assert PrivacyLedger.open_site(state).epsilon(DELTA) < spent

    refused = train(3)
    assert refused.has_error() and refused.error.code == REFUSED_STATE
    assert _run_cli(["client", "audit", "--config", str(yaml_path)]) == 1
    assert "rolled back" in capsys.readouterr().out

    assert _run_cli(["client", "audit", "--config", str(yaml_path), "--repair"]) == 0
    capsys.readouterr()
    assert PrivacyLedger.open_site(state).epsilon(DELTA) == pytest.approx(spent)
    assert _run_cli(["client", "audit", "--config", str(yaml_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert not train(3).has_error()
    repairs = [json.loads(line) for line in (state / "audit" / "audit.jsonl").read_text().splitlines()
               if '"repair"' in line]
    assert repairs and repairs[0]["metrics"]["restored-charges"] == 1
