"""Whole-volume segmentation: crops put lesions anywhere, the lesion head learns from them, and the
pretraining stage that runs it leaves a checkpoint with an organ head that loads."""
import json

import numpy as np
import pytest
import torch

from pasta_model.checkpoint import load_checkpoint
from pasta_model.presets import get_preset
from pasta_model.pretrain import PretrainConfig, pretrain
from pasta_model.segmentation import (
    LESION_LABEL,
    SegmentationRecipe,
    SegmentationStepper,
    evaluate_volumes,
    load_volumes,
    train_for,
)
from synth.run import generate_dataset


@pytest.fixture(scope="module")
def conspicuous(tmp_path_factory):
    """Two lung tumours (soft tissue in air: always conspicuous) and two bone metastases."""
    root = tmp_path_factory.mktemp("conspicuous")
    generate_dataset(root, 4, size=96, seed=3, types="lung_tumor,bone_metastasis", progress=False)
    return root


@pytest.fixture(scope="module")
def volumes(conspicuous):
    return load_volumes(conspicuous, SegmentationRecipe.named("pasta", get_preset("tiny")))


def test_volumes_carry_their_lesion_type_conspicuity_and_organ_indices(volumes):
    assert sorted(v["lesion_type"] for v in volumes) == ["bone_metastasis", "bone_metastasis",
                                                         "lung_tumor", "lung_tumor"]
    assert all(v["conspicuity"] > 2 for v in volumes if v["lesion_type"] == "lung_tumor")
    assert all(v["conspicuity"] >= 0 for v in volumes)
    for v in volumes:
        assert v["image"].shape[1:] == v["label"].shape[1:] == v["total"].shape[1:]
        assert all(s % 16 == 0 for s in v["image"].shape[1:])
        organs = set(torch.unique(v["total"]).tolist())
        assert 0 in organs and organs <= set(range(11)) and len(organs) > 5


def test_two_of_three_crops_hold_lesion_voxels_and_not_at_a_fixed_place(volumes):
    stepper = SegmentationStepper(SegmentationRecipe.named("pasta", get_preset("tiny")), volumes, seed=1)
    with_lesion, centres = 0, []
    for _ in range(30):
        batch = stepper.batch()
        for crop in batch["label"]:
            idx = torch.nonzero(crop[0] == LESION_LABEL).float()
            if len(idx):
                with_lesion += 1
                centres.append(idx.mean(0).numpy())
    assert 0.5 < with_lesion / 120 < 0.85
    # nnU-Net-style sampling centres a crop on a random lesion voxel: a large lesion's centroid moves
    spread = np.std(np.array(centres), axis=0)
    assert spread.max() > 1.0


@pytest.mark.slow
def test_the_lesion_head_learns_whole_volume_lesions_in_a_few_hundred_steps(volumes):
    torch.manual_seed(0)
    recipe = SegmentationRecipe.named("pasta", get_preset("tiny"))
    before = evaluate_volumes(recipe.build_model(), recipe, volumes)["lesion_dice"]["dice"]
    model, steps = train_for(recipe, volumes, minutes=10, max_steps=250, seed=0)
    after = evaluate_volumes(model, recipe, volumes)["lesion_dice"]["visible"]["dice"]
    assert steps == 250
    assert before == 0.0
    assert after > 0.1


def test_a_segmentation_stage_writes_its_scores_and_an_organ_head_that_loads(conspicuous, tmp_path):
    out = tmp_path / "run"
    last = pretrain(PretrainConfig(data=conspicuous, out=out, preset="tiny", epochs=1, max_minutes=1.5,
                                   segment_minutes=0.2, val_fraction=0.25, progress=False))
    stage = json.loads((out / "segment-stage.json").read_text())
    assert stage["steps"] > 0 and stage["train_volumes"] == 3
    assert stage["lesion_dice"]["cases"] == 1
    assert set(stage["organ_dice"]["by_organ"]) >= {"lung", "bone"}
    model, _ = load_checkpoint(last)
    assert model.organ_names and model.organ_head is not None
    assert model.organ_logits(torch.zeros(1, 1, 48, 48, 48)).shape == (1, len(model.organ_names) + 1, 48, 48, 48)
    # the heads' stage trained on after the segmentation stage's checkpoint
    seg_stage, _ = load_checkpoint(out / "segment-stage.safetensors")
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, seg_stage.state_dict()[k])]
    assert any(k.startswith("heads.report.") for k in moved)


def test_segment_minutes_must_fit_in_the_run(tmp_path):
    with pytest.raises(ValueError, match="segment_minutes"):
        PretrainConfig(data=tmp_path, out=tmp_path / "o", max_minutes=5, segment_minutes=5)
    with pytest.raises(ValueError, match="segment_minutes"):
        PretrainConfig(data=tmp_path, out=tmp_path / "o", segment_minutes=0)
