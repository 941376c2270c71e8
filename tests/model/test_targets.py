"""Pretraining and site fine-tuning encode the same labels into the same targets."""
from __future__ import annotations

import torch

from pasta_model.data import case_targets
from pasta_model.finetune import encode_targets
from pasta_model.heads import DETECT_OUTPUTS, REPORT_OUTPUTS
from pasta_model.losses import IGNORE_INDEX
from pasta_model.targets import labels_from_report

REPORT = {"organ": "kidney", "lesion_type": "kidney_cyst", "t_stage": "T2", "survival_months": 30.0,
          "survival_event": 1, "lesions": [{"shape": "round_like", "density": "hypodense",
                                            "heterogeneity": "homogeneous", "surface": "well_defined",
                                            "invasion": "no"}]}


def test_a_type_json_and_its_labels_row_give_the_same_class_indices():
    pre = case_targets(REPORT)
    fine = encode_targets("report", [labels_from_report(REPORT)])
    assert {name: int(fine[name][0]) for name in REPORT_OUTPUTS} == pre["report"]
    assert IGNORE_INDEX not in pre["report"].values()
    assert int(encode_targets("stage", [labels_from_report(REPORT)])["stage"][0]) == pre["stage"]
    detect = encode_targets("detect", [labels_from_report(REPORT)])
    assert detect["detect"][0].tolist() == pre["detect"]
    assert detect["detect"][0, 0] == 1 and detect["detect"][0].sum() == 2       # any + kidney


def test_unknown_labels_are_ignored_and_an_unknown_organ_teaches_only_any():
    row = {"tumor_present": True, "organ": "thyroid", "shape": "star", "lesion_type": None, "t_stage": "T9"}
    report = encode_targets("report", [row])
    assert all(int(report[name][0]) == IGNORE_INDEX for name in REPORT_OUTPUTS)
    assert int(encode_targets("stage", [row])["stage"][0]) == IGNORE_INDEX
    detect = encode_targets("detect", [row, {"tumor_present": False}])
    assert detect["detect"].shape == (2, len(DETECT_OUTPUTS))
    assert detect["detect"][0].tolist() == [1.0] + [0.0] * (len(DETECT_OUTPUTS) - 1)
    assert detect["weight"][0].tolist() == [1.0] + [0.0] * (len(DETECT_OUTPUTS) - 1)
    assert torch.equal(detect["detect"][1], torch.zeros(len(DETECT_OUTPUTS)))
    assert detect["weight"][1].tolist() == [1.0] * len(DETECT_OUTPUTS)


def test_a_site_crop_of_a_two_lesion_case_is_centred_on_the_larger_lesion():
    """Site fine-tuning centres as pretraining does: on the largest lesion, not between lesions."""
    from monai.data import MetaTensor

    from pasta_model.finetune import preprocess_region
    from pasta_model.presets import get_preset

    tiny = get_preset("tiny")
    affine = torch.diag(torch.tensor([tiny.spacing_mm] * 3 + [1.0]))
    image = MetaTensor(torch.full((1, 100, 60, 60), 40.0), affine=affine)
    mask = torch.zeros(1, 100, 60, 60, dtype=torch.uint8)
    mask[0, 10:20, 25:35, 25:35] = 1            # the large lesion
    mask[0, 88:91, 29:32, 29:32] = 1            # a small one 75 voxels away: outside a 48 crop together
    crop, mcrop = preprocess_region(tiny, image, MetaTensor(mask, affine=affine))
    assert crop.shape == (1, 48, 48, 48)
    assert int(mcrop.sum()) == 1000              # all of the large lesion, none of the small one
    assert mcrop[19:29, 19:29, 19:29].all()      # in the middle of the crop
