"""Training samples from real generated cases: targets, crops, negatives, cache, split, bad input."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

from pasta_model.data import build_datasets, case_targets, prepare_cases, region_plan, split_cases
from pasta_model.losses import IGNORE_INDEX
from pasta_model.presets import get_preset
from simulation.cli import main as cli_main
from synth.vocabulary import HOST_ORGANS, LESION_TYPE_NAMES

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from synth.dataset import read_dataset
    root = tmp_path_factory.mktemp("synth-data")
    assert cli_main(["synth", "generate", "--out", str(root), "--n", "8", "--size", "64", "--spacing", "3",
                     "--seed", "11", "--workers", "1"]) == 0
    return root, read_dataset(root)


def test_case_targets_maps_report_fields_to_class_indices():
    report = {"organ": "kidney", "lesion_type": "kidney_cyst", "t_stage": None,
              "survival_months": 40.5, "survival_event": False,
              "lesions": [{"shape": "round_like", "density": "hypodense", "heterogeneity": "homogeneous",
                           "surface": "well_defined", "invasion": "no"}]}
    t = case_targets(report)
    assert t["report"] == {"shape": 0, "density": 0, "heterogeneity": 0, "surface": 0, "invasion": 0,
                           "lesion_type": LESION_TYPE_NAMES.index("kidney_cyst")}
    assert t["stage"] == IGNORE_INDEX                       # benign: no T stage
    assert (t["time"], t["event"], t["has_survival"]) == (40.5, 0.0, 1.0)
    assert t["detect"][0] == 1.0 and t["detect"][1 + HOST_ORGANS.index("kidney")] == 1.0 and sum(t["detect"]) == 2
    t = case_targets({"lesion_type": "unknown_thing", "lesions": [{"shape": "weird"}]})
    assert t["report"]["shape"] == IGNORE_INDEX and t["report"]["lesion_type"] == IGNORE_INDEX
    assert t["has_survival"] == 0.0


def test_prepared_regions_centre_the_lesion_and_negatives_are_lesion_free(dataset):
    _, records = dataset
    plan = region_plan(TINY, jitter=4, negatives=1, seed=0)
    cases = prepare_cases(records, TINY, plan)
    assert len(cases) == len(records)
    n_neg = 0
    for case, rec in zip(cases, records):
        mask = case["lesion_mask"][0].numpy()
        assert case["lesion_image"].shape == (1, 56, 56, 56) and mask.any()
        comps, n = ndimage.label(mask)
        primary = comps == 1 + np.argmax(np.bincount(comps.ravel())[1:])
        idx = np.argwhere(primary)
        mid = (idx.min(0) + idx.max(0)) / 2
        assert np.all(np.abs(mid - 28) <= 1.0)               # primary lesion centred in the region
        assert case["targets"]["report"]["lesion_type"] == LESION_TYPE_NAMES.index(rec.lesion_type)
        for neg in case["neg_mask"]:
            assert neg.shape == (1, 48, 48, 48) and not neg.any()
            n_neg += 1
    assert n_neg >= len(records) // 2


def test_crops_are_seeded_and_keep_the_lesion_in_view(dataset):
    _, records = dataset
    cases = prepare_cases(records, TINY, region_plan(TINY, 4, 1, 0))
    a = build_datasets(cases, TINY, augment=True, seed=3, jitter=True)[0]
    b = build_datasets(cases, TINY, augment=True, seed=3, jitter=True)[0]
    for i in range(len(cases)):                             # lesion entries come first
        sa, sb = a[i], b[i]
        assert sa["image"].shape == (1, 48, 48, 48)
        assert torch.equal(sa["image"], sb["image"]) and sa["seg"].sum() > 0
    neg = [a[i] for i in range(len(cases), len(a))]
    assert all(s["detect"].sum() == 0 and s["seg"].sum() == 0 for s in neg)
    assert all(s["report"]["shape"] == IGNORE_INDEX for s in neg)


def test_jitter_shifts_crops_without_other_augmentation(dataset):
    """`jitter` alone moves the crop inside the region's margin; without it crops are centred."""
    _, records = dataset
    cases = prepare_cases(records, TINY, region_plan(TINY, 4, 0, 0))
    centred = build_datasets(cases, TINY, augment=False)[0]
    shifted = build_datasets(cases, TINY, augment=False, seed=1, jitter=True)[0]
    for i in range(len(cases)):
        middle = cases[i]["lesion_image"][:, 4:52, 4:52, 4:52].float()
        assert torch.equal(centred[i]["image"], middle)
    assert any(not torch.equal(shifted[i]["image"], centred[i]["image"]) for i in range(len(cases)))


def test_persistent_cache_serves_a_second_run_without_the_volumes(dataset, tmp_path):
    root, records = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    from synth.dataset import read_dataset
    recs = read_dataset(copy)
    plan = region_plan(TINY, 4, 1, 0)
    first = prepare_cases(recs, TINY, plan, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == len(recs)
    for r in recs:
        r.img.unlink()                                       # the cache must not need them any more
    second = prepare_cases(recs, TINY, plan, cache_dir=tmp_path / "cache")
    assert len(second) == len(first)
    assert torch.equal(second[0]["lesion_image"], first[0]["lesion_image"])


def test_a_corrupt_case_is_named_and_skipped(dataset, tmp_path, caplog):
    root, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    from synth.dataset import read_dataset
    recs = read_dataset(copy)
    recs[0].img.write_bytes(b"not a nifti")
    with caplog.at_level(logging.ERROR):
        cases = prepare_cases(recs, TINY, region_plan(TINY, 4, 1, 0))
    assert len(cases) == len(recs) - 1
    assert str(recs[0].img) in caplog.text


def test_split_by_case_is_deterministic_and_disjoint():
    ids = [f"case_{i:03d}" for i in range(50)]
    train, val = split_cases(ids, 0.2, seed=1)
    assert (train, val) == split_cases(list(reversed(ids)), 0.2, seed=1)
    assert not set(train) & set(val) and len(train) + len(val) == 50 and 4 <= len(val) <= 18
    # a case keeps its side when other cases are added
    train2, val2 = split_cases(ids + ["extra"], 0.2, seed=1)
    assert set(val) <= set(val2)


