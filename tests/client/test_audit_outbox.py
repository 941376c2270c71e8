"""What leaves a site: the outbox allow-list refuses anything but finite head weights of the current task and
aggregate metrics over >= 5 cases; every reply (sent or refused) is appended to the audit log."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from client.privacy.audit import AuditLog, AuditRecord, payload_sha256
from client.privacy.outbox import OutboxPolicy, OutboxRefused, check_outgoing, release
from pasta_model.heads import build_head
from pasta_model.presets import get_preset


def stage_head_arrays() -> dict[str, np.ndarray]:
    head = build_head("stage", get_preset("tiny"))
    return {f"heads.stage.{k}": v.detach().numpy().copy() for k, v in head.state_dict().items()}


METRICS = {"num-examples": 40, "loss": 0.71, "epsilon": 1.3, "delta": 1e-5, "noise-multiplier": 1.1, "steps": 20}


def test_head_weights_and_aggregate_metrics_pass_and_are_audited(tmp_path):
    arrays = stage_head_arrays()
    log = AuditLog(tmp_path)
    rec = release(log, run_id="run-1", round=3, message_type="train", arrays=arrays, metrics=METRICS,
                  policy=OutboxPolicy("stage"), site="hospital-a",
                  expected_shapes={k: v.shape for k, v in arrays.items()})
    [line] = log.read()
    assert line["status"] == "sent" and line["round"] == 3 and line["run_id"] == "run-1"
    assert line["keys"] == sorted(arrays)
    assert line["shapes"] == [list(arrays[k].shape) for k in sorted(arrays)]
    assert line["dtypes"] == ["float32"] * len(arrays)
    assert line["bytes"] == sum(a.nbytes for a in arrays.values())
    assert line["sha256"] == rec.sha256 == payload_sha256(arrays)
    assert line["metric_names"] == sorted(METRICS)


@pytest.mark.parametrize("key", ["conv_blocks_context.0.blocks.0.conv.weight", "heads.detect.mlp.0.weight",
                                 "heads.stage.", "heads.stagex.mlp.0.weight"])
def test_a_tensor_outside_the_tasks_head_is_refused(key):
    arrays = {**stage_head_arrays(), key: np.zeros(3, np.float32)}
    with pytest.raises(OutboxRefused, match=f"tensor '{key}' is not a head key of task 'stage'"):
        check_outgoing(arrays, METRICS, OutboxPolicy("stage"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(bad):
    arrays = stage_head_arrays()
    key = sorted(arrays)[0]
    arrays[key].flat[5] = bad
    with pytest.raises(OutboxRefused, match=f"tensor '{key}' contains NaN or Inf"):
        check_outgoing(arrays, METRICS, OutboxPolicy("stage"))


def test_integer_tensors_and_reshaped_or_missing_heads_are_refused():
    arrays = stage_head_arrays()
    shapes = {k: v.shape for k, v in arrays.items()}
    key = sorted(arrays)[0]
    with pytest.raises(OutboxRefused, match="dtype int64"):
        check_outgoing({**arrays, key: np.zeros(shapes[key], np.int64)}, METRICS, OutboxPolicy("stage"))
    with pytest.raises(OutboxRefused, match="has shape"):
        check_outgoing({**arrays, key: np.zeros((1, 2), np.float32)}, METRICS, OutboxPolicy("stage"),
                       expected_shapes=shapes)
    del arrays[key]
    with pytest.raises(OutboxRefused, match="lacks head tensor"):
        check_outgoing(arrays, METRICS, OutboxPolicy("stage"), expected_shapes=shapes)


def test_metrics_must_be_allow_listed_single_numbers():
    arrays = stage_head_arrays()
    for name, value, msg in [("patient-ids", 3.0, "is not on the allow-list"),
                             ("loss", [0.1, 0.2], "must be one number"),
                             ("loss", "0.1", "must be one number"),
                             ("loss", float("nan"), "is not finite")]:
        with pytest.raises(OutboxRefused, match=f"metric '{name}' {msg}"):
            check_outgoing(arrays, {**METRICS, name: value}, OutboxPolicy("stage"))


def test_no_metric_over_fewer_than_five_cases():
    arrays = stage_head_arrays()
    with pytest.raises(OutboxRefused, match=r"metric 'auc' computed over 4 case\(s\), fewer than min_cases=5"):
        check_outgoing(arrays, {**METRICS, "auc": 0.8}, OutboxPolicy("stage"), metric_cases={"auc": 4})
    with pytest.raises(OutboxRefused, match="metric 'num-examples' computed over 3"):
        check_outgoing(arrays, {**METRICS, "num-examples": 3}, OutboxPolicy("stage"))
    with pytest.raises(OutboxRefused, match="number of cases unknown"):
        check_outgoing({}, {"dice": 0.5}, OutboxPolicy("segment"))
    # DP bookkeeping is about the mechanism, not patients; evaluate replies carry no tensors
    check_outgoing({}, {"num-examples": 5, "dice": 0.5, "epsilon": 2.0}, OutboxPolicy("segment"))
    check_outgoing(arrays, {**METRICS, "auc": 0.8}, OutboxPolicy("stage", min_cases=2), metric_cases={"auc": 4})


def test_a_refused_reply_is_logged_and_nothing_else(tmp_path):
    log = AuditLog(tmp_path)
    arrays = {**stage_head_arrays(), "conv_blocks_context.0.weight": np.ones(4, np.float32)}
    with pytest.raises(OutboxRefused):
        release(log, run_id="run-1", round=1, message_type="train", arrays=arrays, metrics=METRICS,
                policy=OutboxPolicy("stage"))
    [line] = log.read()
    assert line["status"] == "refused" and "conv_blocks_context.0.weight" in line["reason"]
    assert line["bytes"] == 0 and line["sha256"] == payload_sha256({})
    assert "conv_blocks_context.0.weight" in line["keys"]


def test_payload_hash_is_recomputable_and_order_independent():
    a = {"heads.stage.b": np.arange(3, dtype=np.float32), "heads.stage.a": np.ones((2, 2), np.float32)}
    reordered = {"heads.stage.a": torch.ones(2, 2), "heads.stage.b": torch.arange(3, dtype=torch.float32)}
    assert payload_sha256(a) == payload_sha256(reordered)
    h = hashlib.sha256()
    for key in sorted(a):
        h.update(json.dumps({"key": key, "dtype": a[key].dtype.str, "shape": list(a[key].shape)},
                            sort_keys=True).encode() + b"\0" + a[key].tobytes())
    assert payload_sha256(a) == h.hexdigest()
    changed = {**a, "heads.stage.b": np.array([0, 1, 2.0001], np.float32)}
    assert payload_sha256(changed) != payload_sha256(a)


def test_audit_log_is_appended_never_rewritten(tmp_path):
    log = AuditLog(tmp_path)
    arrays = stage_head_arrays()
    snapshots = []
    for r in range(1, 4):
        log.append(AuditRecord.describe(run_id="run-1", round=r, message_type="train", arrays=arrays,
                                        metrics=METRICS))
        snapshots.append((log.path.read_bytes(), os.stat(log.path).st_ino))
    for (before, ino), (after, ino2) in zip(snapshots, snapshots[1:]):
        assert after.startswith(before) and len(after) > len(before)
        assert ino == ino2  # the same file, appended in place
    assert [e["round"] for e in log.read()] == [1, 2, 3]
    assert log.verify_chain()
    # rewriting an earlier line (e.g. to hide what was sent) breaks the hash chain
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"round":1', b'"round":7')
    log.path.write_bytes(b"".join(lines))
    assert not log.verify_chain()


def test_a_torn_last_line_is_skipped_and_later_appends_stay_readable(tmp_path):
    log = AuditLog(tmp_path)
    log.append(AuditRecord.describe(run_id="r", round=1, message_type="train", arrays={}, metrics={}))
    with open(log.path, "ab") as fh:
        fh.write(b'{"time": 1, "run_')  # a crash in the middle of an append
    log.append(AuditRecord.describe(run_id="r", round=2, message_type="train", arrays={}, metrics={}))
    assert [e["round"] for e in log.read()] == [1, 2]
    assert not log.verify_chain()  # the crash is visible to an auditor
