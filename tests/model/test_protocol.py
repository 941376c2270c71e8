"""The round wire format: config validation (untrusted input) and head-only weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from pasta_model.checkpoint import backbone_sha256
from pasta_model.network import build_model, head_keys
from pasta_model.protocol import (
    ProtocolError,
    RoundConfig,
    array_record_to_heads,
    arrays_to_heads,
    check_array_dtypes,
    check_incoming_heads,
    heads_to_array_record,
    heads_to_arrays,
)

GOOD = {
    "server-round": 2, "task": "report", "local-epochs": 1, "learning-rate": 0.01, "batch-size": 8,
    "backbone-sha256": "0" * 64, "dp-delta": 1e-5, "planned-rounds": 5, "run-id": "run-2026.11_a",
}


def test_config_round_trips_through_a_flower_config_record():
    cfg = RoundConfig.from_config_record(GOOD)
    assert cfg.proximal_mu == 0.0 and cfg.seed == 0
    record = ConfigRecord(cfg.to_config_dict())
    assert RoundConfig.from_config_record(record) == cfg
    assert set(cfg.to_config_dict()) == set(GOOD) | {"proximal-mu", "seed"}


def test_integer_learning_rate_is_accepted_as_a_number():
    assert RoundConfig.from_config_record({**GOOD, "learning-rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize("key,value", [
    ("server-round", 0), ("task", "segmentation"), ("local-epochs", 51), ("learning-rate", 0.0),
    ("learning-rate", 1.5), ("batch-size", 0), ("batch-size", 2048), ("backbone-sha256", "abc"),
    ("backbone-sha256", "G" * 64), ("dp-delta", 0.0), ("dp-delta", 1.0), ("planned-rounds", 10001),
    ("run-id", "x" * 65), ("run-id", "a b"), ("proximal-mu", -0.1), ("learning-rate", float("nan")),
    ("server-round", 6),  # beyond planned-rounds
    ("proximal-mu", 1e300), ("proximal-mu", 101.0),
])
def test_out_of_range_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ProtocolError, match=key):
        RoundConfig.from_config_record({**GOOD, key: value})


@pytest.mark.parametrize("key,value", [
    ("server-round", "2"), ("server-round", 2.0), ("local-epochs", True), ("learning-rate", "0.1"),
    ("task", 3), ("seed", 1.5),
])
def test_wrong_types_are_refused_naming_the_key(key, value):
    with pytest.raises(ProtocolError, match=key):
        RoundConfig.from_config_record({**GOOD, key: value})


@pytest.mark.parametrize("value", ["/etc/passwd", "..", "~root", "a\\b", ".hidden", "runs/x"])
def test_path_like_strings_are_refused(value):
    with pytest.raises(ProtocolError, match="run-id"):
        RoundConfig.from_config_record({**GOOD, "run-id": value})
    with pytest.raises(ProtocolError, match="task"):
        RoundConfig.from_config_record({**GOOD, "task": value})


def test_unknown_and_missing_keys_are_refused():
    with pytest.raises(ProtocolError, match="data-path"):
        RoundConfig.from_config_record({**GOOD, "data-path": "x"})
    partial = dict(GOOD)
    del partial["dp-delta"]
    with pytest.raises(ProtocolError, match="dp-delta"):
        RoundConfig.from_config_record(partial)


def test_heads_to_arrays_holds_only_that_tasks_head():
    net = build_model("tiny", ["segment", "stage"])
    arrays = heads_to_arrays(net, "stage")
    assert sorted(arrays) == sorted(head_keys(net, "stage"))
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    with pytest.raises(ProtocolError, match="report"):
        heads_to_arrays(net, "report")


def test_array_record_round_trip_changes_only_the_head():
    torch.manual_seed(0)
    sender = build_model("tiny", ["segment", "stage"])
    receiver = build_model("tiny", ["segment", "stage"])
    receiver.load_state_dict(sender.state_dict())
    with torch.no_grad():
        for p in sender.heads["stage"].parameters():
            p.add_(0.5)
        sender.conv_blocks_context[0].blocks[0].conv.bias.add_(1.0)  # must not travel
    before_backbone = backbone_sha256(receiver)
    before_segment = {k: v.clone() for k, v in receiver.state_dict().items() if k.startswith("heads.segment.")}
    record = heads_to_array_record(sender, "stage")
    assert isinstance(record, ArrayRecord) and sorted(record) == sorted(head_keys(sender, "stage"))
    array_record_to_heads(receiver, record, "stage")
    rs, ss = receiver.state_dict(), sender.state_dict()
    assert all(torch.equal(rs[k], ss[k]) for k in head_keys(sender, "stage"))
    assert backbone_sha256(receiver) == before_backbone
    assert all(torch.equal(rs[k], v) for k, v in before_segment.items())


def test_arrays_outside_the_task_head_are_refused_and_nothing_is_loaded():
    net = build_model("tiny", ["segment", "stage"])
    arrays = heads_to_arrays(net, "stage")
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    poisoned = {k: v + 1 for k, v in arrays.items()}
    poisoned["conv_blocks_context.0.blocks.0.conv.bias"] = np.zeros(8, dtype=np.float32)
    with pytest.raises(ProtocolError, match="conv_blocks_context"):
        arrays_to_heads(net, poisoned, "stage")
    other = heads_to_arrays(net, "segment")
    with pytest.raises(ProtocolError, match="heads.segment"):
        arrays_to_heads(net, {**arrays, **other}, "stage")
    wrong_shape = {**arrays, next(iter(arrays)): np.zeros((1, 1), dtype=np.float32)}
    with pytest.raises(ProtocolError, match="shape"):
        arrays_to_heads(net, wrong_shape, "stage")
    key = next(iter(arrays))
    nan = {k: v + 1 for k, v in arrays.items()}
    nan[key] = np.full_like(arrays[key], np.nan)
    with pytest.raises(ProtocolError, match="NaN"):
        arrays_to_heads(net, nan, "stage")
    missing = dict(arrays)
    del missing[key]
    with pytest.raises(ProtocolError, match="missing"):
        arrays_to_heads(net, missing, "stage")
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items())


def test_proximal_mu_is_bounded_by_the_learning_rate():
    """w -= lr*mu*(w - w_global) overshoots once lr*mu > 1: refused, whatever mu alone is."""
    assert RoundConfig.from_config_record({**GOOD, "proximal-mu": 100.0}).proximal_mu == 100.0  # lr 0.01
    with pytest.raises(ProtocolError, match="proximal-mu.*learning-rate"):
        RoundConfig.from_config_record({**GOOD, "learning-rate": 0.5, "proximal-mu": 2.5})
    assert RoundConfig.from_config_record({**GOOD, "learning-rate": 0.5, "proximal-mu": 2.0}).proximal_mu == 2.0


@pytest.mark.parametrize("dtype", ["int64", "bool", "complex64", "float64", ">f4", "float16"])
def test_heads_of_another_dtype_are_refused_naming_key_and_dtype(dtype):
    net = build_model("tiny", ["stage"])
    arrays = heads_to_arrays(net, "stage")
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    key = sorted(arrays)[0]
    bad = {**arrays, key: arrays[key].astype(dtype)}
    shown = np.dtype(dtype).name if np.dtype(dtype).isnative else np.dtype(dtype).str
    with pytest.raises(ProtocolError, match=rf"{key}.*dtype {shown}, expected float32"):
        arrays_to_heads(net, bad, "stage")
    with pytest.raises(ProtocolError, match=rf"{key}.*dtype {shown}"):
        check_incoming_heads(bad, "stage")
    if np.dtype(dtype).isnative:        # the same weights as torch tensors
        tensors = {k: torch.from_numpy(v) for k, v in bad.items()}
        with pytest.raises(ProtocolError, match=rf"{key}.*dtype {shown}"):
            arrays_to_heads(net, tensors, "stage")
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("value", [3e38, -2e4])
def test_absurdly_large_head_weights_are_refused(value):
    net = build_model("tiny", ["stage"])
    arrays = heads_to_arrays(net, "stage")
    key = sorted(arrays)[-1]
    bad = {**arrays, key: np.full_like(arrays[key], value)}
    with pytest.raises(ProtocolError, match=rf"{key}.*magnitude"):
        check_incoming_heads(bad, "stage")
    with pytest.raises(ProtocolError, match=rf"{key}.*magnitude"):
        arrays_to_heads(net, bad, "stage")
    fine = {**arrays, key: np.full_like(arrays[key], 1e4)}
    check_incoming_heads(fine, "stage")
    arrays_to_heads(net, fine, "stage")
    assert float(net.state_dict()[key].abs().max()) == 1e4


def test_check_incoming_heads_refuses_keys_of_another_task_or_the_backbone():
    net = build_model("tiny", ["segment", "stage"])
    with pytest.raises(ProtocolError, match="heads.segment"):
        check_incoming_heads(heads_to_arrays(net, "segment"), "stage")
    with pytest.raises(ProtocolError, match="conv_blocks_context"):
        check_incoming_heads({"conv_blocks_context.0.blocks.0.conv.bias": np.zeros(8, np.float32)}, "stage")


def test_check_array_dtypes_takes_one_dtype_per_key():
    """The form a backbone payload is checked in: the model's own dtype for every key."""
    state = {"a": torch.zeros(2), "n": torch.zeros(1, dtype=torch.int64)}
    good = {k: v.numpy() for k, v in state.items()}
    check_array_dtypes(good, {k: v.dtype for k, v in state.items()})
    with pytest.raises(ProtocolError, match="'n' has dtype float32, expected int64"):
        check_array_dtypes({**good, "n": np.zeros(1, np.float32)}, {k: v.dtype for k, v in state.items()})
