"""The checkpoint shipped in the package: small, loads as fp32, the default of predict and simulate;
`model ship` round trip; `model info` names it; a missing file is one clear error naming its path."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open

from pasta_model import shipped
from pasta_model.checkpoint import backbone_sha256, load_checkpoint, read_meta, save_checkpoint
from pasta_model.network import build_model
from simulation.cli import main as cli_main


@pytest.fixture
def empty_shipped_dir(tmp_path, monkeypatch):
    folder = tmp_path / "no-shipped-model"
    folder.mkdir()
    monkeypatch.setattr(shipped, "SHIPPED_DIR", folder)
    return folder


def _card(**extra) -> dict:
    return {"status": "test", "data": {"seed": 5, "count": 3}, "command": "pasta-fed pretrain ...",
            "device": "cpu", "minutes": 0.1, "heldout": {"data": {"seed": 6, "cases": 2}, "figures": {"dice": 0.5}},
            **extra}


def test_the_shipped_file_is_small_fp16_and_its_card_describes_it():
    path = shipped.shipped_checkpoint()
    assert path.name == "pasta-tiny.safetensors" and path.parent.name == "shipped"
    assert path.stat().st_size <= 8 * 1024 * 1024
    with safe_open(str(path), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    card = shipped.shipped_card()
    assert card["file"]["sha256"] == shipped.file_sha256(path) and card["file"]["bytes"] == path.stat().st_size
    assert {"seed", "count"} <= set(card["data"]) and card["command"] and card["device"] and card["minutes"] > 0
    assert card["heldout"]["figures"]
    text = (path.parent / "MODEL_CARD.md").read_text()
    assert card["status"] in text and card["file"]["sha256"] in text


def test_the_shipped_model_loads_as_an_fp32_model_with_its_recorded_backbone():
    model, meta = load_checkpoint(shipped.shipped_checkpoint())
    assert meta.preset == "tiny" and model.preset.name == "tiny"
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    # what a site recomputes from the model it holds is what the file records
    assert backbone_sha256(model) == meta.backbone_sha256


def test_an_fp16_checkpoint_records_the_backbone_of_its_fp32_reload(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", ["segment", "report"])
    save_checkpoint(tmp_path / "half.safetensors", model, storage_dtype=torch.float16)
    loaded, meta = load_checkpoint(tmp_path / "half.safetensors")
    assert next(loaded.parameters()).dtype == torch.float32
    assert meta.backbone_sha256 == backbone_sha256(loaded) != backbone_sha256(model)   # rounded weights
    with pytest.raises(ValueError, match="storage_dtype"):
        save_checkpoint(tmp_path / "x.safetensors", model, storage_dtype=torch.int8)


def test_predict_without_checkpoint_uses_the_shipped_model(tmp_path, capsys):
    from synth.dataset import read_dataset
    assert cli_main(["synth", "generate", "--out", str(tmp_path / "data"), "--n", "1", "--size", "48",
                     "--spacing", "3", "--seed", "41", "--workers", "1", "--no-progress"]) == 0
    image = read_dataset(tmp_path / "data")[0].img
    assert cli_main(["predict", "--image", str(image), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    src, mask = nib.load(image), nib.load(tmp_path / "pred" / "mask.nii.gz")
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
    assert json.loads((tmp_path / "pred" / "report.json").read_text())["detection"]
    assert "mask:" in capsys.readouterr().out


def test_model_ship_round_trip_then_info_names_it(tmp_path, monkeypatch, capsys):
    torch.manual_seed(1)
    source = tmp_path / "run" / "last.safetensors"
    model = build_model("tiny")
    save_checkpoint(source, model, extra={"epoch": 3})
    (tmp_path / "card.json").write_text(json.dumps(_card()))
    out = tmp_path / "shipped"
    assert cli_main(["model", "ship", "--checkpoint", str(source), "--card", str(tmp_path / "card.json"),
                     "--out", str(out)]) == 0
    assert "wrote " in capsys.readouterr().out
    ckpt = out / "pasta-tiny.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "model_card.json", "pasta-tiny.safetensors"]
    assert ckpt.stat().st_size < 0.55 * source.stat().st_size
    card = json.loads((out / "model_card.json").read_text())
    assert card["status"] == "test" and card["file"]["sha256"] == shipped.file_sha256(ckpt)
    assert card["model"]["preset"] == "tiny" and card["round_trip"]["max_abs_diff"] <= card["round_trip"]["allowed"]

    reloaded, meta = load_checkpoint(ckpt)
    assert meta.tasks == list(model.tasks) and meta.extra["epoch"] == 3 and meta.extra["storage_dtype"] == "float16"
    diff, allowed = shipped.output_difference(model, reloaded)
    assert 0 < diff <= allowed

    monkeypatch.setattr(shipped, "SHIPPED_DIR", out)
    assert cli_main(["model", "info"]) == 0
    printed = capsys.readouterr().out
    assert f"shipped model:   {ckpt}" in printed and card["file"]["sha256"] in printed
    assert "preset:          tiny" in printed and "card status:   test" in printed and "held-out: dice 0.5" in printed
    assert "warning" not in printed
    assert cli_main(["model", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "tiny" and info["shipped"]["sha256"] == card["file"]["sha256"]
    assert info["shipped"]["bytes"] == ckpt.stat().st_size and info["shipped"]["status"] == "test"

    (out / "model_card.json").write_text(json.dumps({**card, "file": {**card["file"], "sha256": "0" * 64}}))
    assert cli_main(["model", "info"]) == 0
    assert "model card describes another file" in capsys.readouterr().out


def test_model_ship_refuses_an_incomplete_card_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "m.safetensors"
    save_checkpoint(source, build_model("tiny", ["report"]))
    card = _card()
    del card["minutes"], card["heldout"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    assert cli_main(["model", "ship", "--checkpoint", str(source), "--card", str(tmp_path / "card.json"),
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "card.json" in err and "minutes" in err and "heldout" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_missing_shipped_file_is_one_clear_error_naming_its_path(empty_shipped_dir, tmp_path, capsys):
    expected = empty_shipped_dir / "pasta-tiny.safetensors"
    with pytest.raises(shipped.ShippedModelMissing, match=str(expected)):
        shipped.shipped_checkpoint()
    assert cli_main(["predict", "--image", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pasta-fed predict: error: ") and str(expected) in err and "--checkpoint" in err
    assert cli_main(["evaluate", "--data", str(tmp_path)]) == 2
    assert str(expected) in capsys.readouterr().err
    assert cli_main(["model", "info"]) == 2
    assert str(expected) in capsys.readouterr().err

    from simulation.config import SimulationConfig, SimulationConfigError
    from simulation.runner import ensure_pretrained
    with pytest.raises(SimulationConfigError, match=str(expected)):
        ensure_pretrained(SimulationConfig())


def test_simulate_defaults_to_the_shipped_model_of_its_preset():
    from simulation.config import SimulationConfig, SimulationConfigError
    from simulation.runner import ensure_pretrained
    assert SimulationConfig().pretrained == "shipped" == SimulationConfig.load().pretrained
    assert ensure_pretrained(SimulationConfig()) == shipped.shipped_checkpoint()
    with pytest.raises(SimulationConfigError, match="preset 'tiny'.*'small'"):
        ensure_pretrained(SimulationConfig(preset="small"))
    assert read_meta(ensure_pretrained(SimulationConfig(pretrained=str(shipped.shipped_checkpoint())))).preset == "tiny"
