"""Pretraining end to end through the CLI: metrics.csv, checkpoints, resume, last line."""
from __future__ import annotations

import csv

import pytest
import torch

from pasta_model.checkpoint import load_checkpoint, read_meta
from pasta_model.data import build_datasets, prepare_cases, region_plan
from pasta_model.network import build_model
from pasta_model.presets import get_preset
from pasta_model.pretrain import DEFAULT_LOSS_WEIGHTS, PretrainConfig, train_step
from simulation.cli import main as cli_main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    assert cli_main(["synth", "generate", "--out", str(root), "--n", "6", "--size", "64", "--spacing", "3",
                     "--seed", "21", "--workers", "1"]) == 0
    return root


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_one_epoch_then_resume_writes_metrics_checkpoints_and_last_line(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["pretrain", "--data", str(dataset), "--preset", "tiny", "--out", str(run),
              "--seed", "3", "--val-fraction", "0.3", "--no-progress"]
    assert cli_main(common + ["--epochs", "1"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"checkpoint: {run / 'last.safetensors'}"
    rows = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    assert float(rows[0]["train_loss"]) > 0 and rows[0]["val_dice"] != ""
    assert (run / "checkpoints" / "epoch-001.safetensors").exists()
    assert any((run / "tb").iterdir())
    model, meta = load_checkpoint(run / "last.safetensors")
    assert meta.extra["epoch"] == 1 and meta.preset == "tiny"
    state_1 = {k: v.clone() for k, v in model.state_dict().items()}

    assert cli_main(common + ["--epochs", "2", "--resume"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"checkpoint: {run / 'last.safetensors'}"
    assert [r["epoch"] for r in _rows(run / "metrics.csv")] == ["1", "2"]
    assert read_meta(run / "checkpoints" / "epoch-002.safetensors").extra["epoch"] == 2
    model2, _ = load_checkpoint(run / "last.safetensors")
    assert any(not torch.equal(state_1[k], v) for k, v in model2.state_dict().items())   # it trained on


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_reduce_the_multitask_loss(dataset, precision):
    from synth.dataset import read_dataset
    tiny = get_preset("tiny")
    cases = prepare_cases(read_dataset(dataset)[:2], tiny, region_plan(tiny, 0, 1, 0))
    ds = build_datasets(cases, tiny, augment=False)[0]
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    model = build_model(tiny).to(memory_format=torch.channels_last_3d)    # as pretrain() runs it
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    cpu = torch.device("cpu")
    first = train_step(model, batch, opt, DEFAULT_LOSS_WEIGHTS, cpu, precision)
    for _ in range(3):
        last = train_step(model, batch, opt, DEFAULT_LOSS_WEIGHTS, cpu, precision)
    assert last["loss"] < first["loss"]
    assert set(first) >= {"segment", "report", "detect", "stage", "survival"}


def test_config_errors_name_the_bad_key(tmp_path):
    base = {"data": tmp_path, "out": tmp_path}
    with pytest.raises(ValueError, match="pretrain config: learning_rate: unknown key"):
        PretrainConfig.from_dict({**base, "learning_rate": 1})
    with pytest.raises(ValueError, match="pretrain config: preset: must be one of tiny, small, base, paper"):
        PretrainConfig.from_dict({**base, "preset": "huge"})
    with pytest.raises(ValueError, match=r"loss_weights: unknown task\(s\) \['segmentation'\]"):
        PretrainConfig.from_dict({**base, "loss_weights": {"segmentation": 1.0}})
    with pytest.raises(ValueError, match="precision: must be one of auto, bf16, fp32, got 'fp16'"):
        PretrainConfig.from_dict({**base, "precision": "fp16"})
    cfg = PretrainConfig.from_yaml("configs/pretrain.yaml", data=tmp_path, out=tmp_path)
    assert cfg.preset == "tiny" and cfg.loss_weights["segment"] == 1.0


def test_a_fresh_model_overfits_the_lesion_of_a_tiny_batch(dataset):
    """Regression: from the 50/50 start, CE drove every voxel to background and the argmax
    Dice stayed exactly 0 for ~100 steps; from the lesion prior it passes 0.5 within 25."""
    from pasta_model.data import CropDataset
    from pasta_model.evaluate import crop_metrics
    from synth.dataset import read_dataset

    tiny = get_preset("tiny")
    cases = prepare_cases(read_dataset(dataset)[:2], tiny, region_plan(tiny, 0, 0, 0))
    # 32^3 lesion-centred crops (the smallest the tiny net takes) keep the test fast
    ds = CropDataset(cases, [(0, "lesion", 0), (1, "lesion", 0)], 32, augment=False)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert 0 < float(batch["seg"].mean()) < 0.05           # small lesions: the hard, realistic case
    torch.manual_seed(0)
    model = build_model(tiny)
    assert crop_metrics(model, [ds], torch.device("cpu"))["dice"] < 0.2
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        train_step(model, batch, opt, DEFAULT_LOSS_WEIGHTS, torch.device("cpu"))
    assert crop_metrics(model, [ds], torch.device("cpu"))["dice"] > 0.5


def test_auto_precision_is_bf16_on_cuda_and_an_explicit_precision_is_kept():
    from pasta_model.device import resolve_precision
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_cpu_autocast_computes_in_the_precision_auto_picks():
    from pasta_model.device import autocast, resolve_precision
    cpu = torch.device("cpu")
    conv = torch.nn.Conv3d(1, 2, 3)
    with autocast(cpu):
        out = conv(torch.rand(1, 1, 6, 6, 6))
    assert out.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision("auto", cpu)]
    with autocast(cpu, "fp32"):
        assert conv(torch.rand(1, 1, 6, 6, 6)).dtype == torch.float32
