"""Checkpoints: safetensors round trip, metadata without tensors, no pickle, atomic writes."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from pasta_model.checkpoint import CheckpointError, backbone_sha256, load_checkpoint, read_meta, save_checkpoint
from pasta_model.network import build_model, head_keys
from synth.vocabulary import LESION_TYPE_NAMES, T_STAGES


@pytest.fixture()
def net():
    torch.manual_seed(1)
    return build_model("tiny", ["segment", "stage"])


def test_round_trip_restores_weights_and_metadata(tmp_path, net):
    path = tmp_path / "ckpt" / "model.safetensors"
    meta = save_checkpoint(path, net, extra={"round": 3, "note": "after pretraining"})
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == meta
    assert meta.preset == "tiny" and meta.tasks == ["segment", "stage"]
    assert meta.extra == {"round": 3, "note": "after pretraining"}
    assert meta.vocabularies["lesion_types"] == list(LESION_TYPE_NAMES)
    assert meta.vocabularies["t_stages"] == list(T_STAGES)
    assert meta.backbone_sha256 == backbone_sha256(net)
    a, b = net.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x)["segment"], loaded(x)["segment"])
    assert list(tmp_path.joinpath("ckpt").iterdir()) == [path]  # no temp files left


def test_read_meta_does_not_need_the_tensors(tmp_path, net):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, net)
    assert read_meta(path).tasks == ["segment", "stage"]


def test_backbone_hash_ignores_heads_and_sees_any_backbone_change(net):
    before = backbone_sha256(net)
    with torch.no_grad():
        next(iter(net.heads.parameters())).add_(1.0)
    assert backbone_sha256(net) == before
    with torch.no_grad():
        net.conv_blocks_context[0].blocks[0].conv.bias[0] += 1e-6
    assert backbone_sha256(net) != before
    assert len(before) == 64 and int(before, 16) >= 0


def _edit_saved(path, net, tensors=lambda t: t, meta=lambda m: m) -> None:
    """Save `net`, then rewrite the file as an editor would: other tensors or metadata."""
    from safetensors import safe_open
    save_checkpoint(path, net)
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
    edited = json.dumps(meta(json.loads(header["pasta_fed"])))
    save_file(tensors(load_file(str(path))), str(path), metadata={**header, "pasta_fed": edited})


def test_edited_backbone_is_detected_on_load(tmp_path, net):
    path = tmp_path / "m.safetensors"
    _edit_saved(path, net, tensors=lambda t: {**t, "tu.0.weight": t["tu.0.weight"] + 1})
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_foreign_or_pickled_files_are_refused(tmp_path):
    pickled = tmp_path / "evil.safetensors"

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    pickled.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        load_checkpoint(pickled)
    assert not (tmp_path / "pwned").exists()

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a pasta-fed checkpoint"):
        read_meta(plain)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_meta(tmp_path / "absent.safetensors")


def test_metadata_naming_another_shape_is_refused(tmp_path, net):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, net)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        header = dict(fh.metadata())
    meta = json.loads(header["pasta_fed"])
    meta["preset"] = "small"
    header["pasta_fed"] = json.dumps(meta)
    save_file(load_file(str(path)), str(path), metadata=header)
    with pytest.raises(CheckpointError, match="small"):
        load_checkpoint(path)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, net, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, net, extra={"version": 1})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pasta_model.checkpoint.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, net, extra={"version": 2})
    assert read_meta(path).extra == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_heads_survive_with_their_keys(tmp_path, net):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, net)
    assert sorted(head_keys(load_file(str(path)))) == sorted(head_keys(net))


def test_extra_that_is_not_json_is_refused_before_writing(tmp_path, net):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="extra"):
        save_checkpoint(path, net, extra={"when": object()})
    assert not path.exists()


def test_a_checkpoint_trained_with_other_labels_is_refused(tmp_path, net):
    """Logit k means the k-th lesion type: a reordered vocabulary would mislabel every prediction."""
    path = tmp_path / "model.safetensors"

    def reverse_lesion_types(meta: dict) -> dict:
        meta["vocabularies"]["lesion_types"].reverse()
        return meta
    _edit_saved(path, net, meta=reverse_lesion_types)
    with pytest.raises(CheckpointError, match=f"{path}: vocabulary 'lesion_types' differs"):
        load_checkpoint(path)
