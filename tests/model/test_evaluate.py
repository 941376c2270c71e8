"""evaluate explains itself: lesion Dice by type and conspicuity band, detection AUC per organ,
attributes beside their majority baseline, organ Dice only for a model with an organ output."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pasta_model import metrics
from pasta_model.checkpoint import save_checkpoint
from pasta_model.evaluate import (
    detect_auc_by_organ,
    has_organ_output,
    lesion_dice_summary,
    organ_dice_summary,
    score_case,
)
from pasta_model.network import PastaNet, build_model
from pasta_model.presets import get_preset
from simulation.cli import main as cli_main
from synth.conspicuity import band, measure
from synth.totalseg import TOTALSEG_HOSTS, TOTALSEG_ID
from synth.vocabulary import HOST_ORGANS, LESION_TYPE_BY_NAME

TYPES = ("liver_cancer", "kidney_tumor", "lung_tumor")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from synth.dataset import read_dataset
    root = tmp_path_factory.mktemp("evaluate")
    assert cli_main(["synth", "generate", "--out", str(root / "data"), "--n", "4", "--size", "48",
                     "--spacing", "3", "--seed", "31", "--workers", "1", "--types", ",".join(TYPES),
                     "--no-progress"]) == 0
    torch.manual_seed(0)
    ckpt = root / "model.safetensors"
    save_checkpoint(ckpt, build_model("tiny"))
    return root, ckpt, read_dataset(root / "data")


# ------------------------------------------------------------------ organ Dice on known overlaps
def _total_map() -> np.ndarray:
    t = np.zeros((12, 12, 12), np.uint8)
    t[0:4, 0:4, 0:4] = TOTALSEG_ID["liver"]            # 64 voxels
    t[6:8, 6:8, 0:4] = TOTALSEG_ID["kidney_right"]     # 16
    t[6:8, 9:11, 0:4] = TOTALSEG_ID["kidney_left"]     # 16
    t[10:12, 0:2, 0:2] = TOTALSEG_ID["spleen"]         # not a host organ: background
    return t


def test_organ_dice_is_one_for_a_copied_organ_zero_for_a_missed_one_and_skips_absent_organs():
    total = _total_map()
    groups = {o: TOTALSEG_HOSTS[o] for o in HOST_ORGANS}
    pred = np.zeros_like(total, dtype=np.int64)
    pred[np.isin(total, TOTALSEG_HOSTS["liver"])] = 1 + HOST_ORGANS.index("liver")
    assert metrics.organ_dice(pred, total, groups) == {"liver": 1.0, "kidney": 0.0}


def test_organ_dice_groups_totalsegmentator_ids_into_one_organ():
    total = _total_map()
    groups = {"liver": TOTALSEG_HOSTS["liver"], "kidney": TOTALSEG_HOSTS["kidney"]}
    pred = np.zeros_like(total, dtype=np.int64)
    pred[0:2, 0:4, 0:4] = 1                            # half the liver
    pred[total == TOTALSEG_ID["kidney_right"]] = 2     # one of the two kidneys
    d = metrics.organ_dice(pred, total, groups)
    assert d["liver"] == pytest.approx(2 * 32 / (32 + 64))
    assert d["kidney"] == pytest.approx(2 * 16 / (16 + 32))
    with pytest.raises(ValueError, match="0..2"):
        metrics.organ_dice(pred + 1, total, groups)


# ------------------------------------------------------------------ grouping of lesion Dice
def test_lesion_dice_summary_groups_by_type_and_band_and_keeps_the_visible():
    rows = [{"lesion_type": "liver_cancer", "dice": 0.8, "conspicuity": 5.0},
            {"lesion_type": "liver_cancer", "dice": 0.4, "conspicuity": 2.0},     # band edge: visible
            {"lesion_type": "kidney_tumor", "dice": 0.1, "conspicuity": 0.3},     # band edge: faint
            {"lesion_type": "pancreas_tumor", "dice": 0.0, "conspicuity": 0.1},
            {"lesion_type": None, "dice": 1.0, "conspicuity": None}]              # no lesion: left out
    s = lesion_dice_summary(rows)
    assert s["cases"] == 4 and s["dice"] == pytest.approx(1.3 / 4)
    assert s["by_type"] == {"kidney_tumor": {"dice": 0.1, "cases": 1},
                            "liver_cancer": {"dice": pytest.approx(0.6), "cases": 2},
                            "pancreas_tumor": {"dice": 0.0, "cases": 1}}
    assert list(s["by_band"]) == ["invisible (<0.3)", "faint (0.3-2)", "visible (>=2)"]
    assert s["by_band"]["visible (>=2)"] == {"dice": pytest.approx(0.6), "cases": 2}
    assert s["by_band"]["faint (0.3-2)"] == {"dice": 0.1, "cases": 1}
    assert s["visible"] == {"dice": pytest.approx(0.6), "cases": 2,
                            "by_type": {"liver_cancer": {"dice": pytest.approx(0.6), "cases": 2}}}
    assert organ_dice_summary(rows) is None


def test_detect_auc_by_organ_only_where_both_classes_exist():
    true = np.zeros((4, 1 + len(HOST_ORGANS)))
    prob = np.zeros_like(true)
    true[:2, 0] = 1
    true[0, 1 + HOST_ORGANS.index("liver")] = 1
    true[1, 1 + HOST_ORGANS.index("kidney")] = 1
    prob[:, 1 + HOST_ORGANS.index("liver")] = [0.9, 0.1, 0.2, 0.3]      # perfect
    prob[:, 1 + HOST_ORGANS.index("kidney")] = [0.5, 0.1, 0.2, 0.3]     # the positive ranks last
    assert detect_auc_by_organ({"detect_true": true, "detect_prob": prob}) == {"liver": 1.0, "kidney": 0.0}


# ------------------------------------------------------------------ end to end
def test_evaluate_explains_dice_by_type_and_band_detection_by_organ_and_attributes(setup, tmp_path, capsys):
    root, ckpt, records = setup
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--data", str(root / "data"),
                     "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["cases"] == 4 and isinstance(res["dice"], float) and isinstance(res["detect_auc"], float)

    # per-case conspicuity is synth.conspicuity's on the original arrays; groups follow it
    cons = {}
    for r in records:
        image, label, _, _ = r.load()
        cons[r.case_id] = measure(image, label).conspicuity
    for row in res["per_case"]:
        assert row["conspicuity"] == pytest.approx(cons[row["case_id"]])
        assert row["band"] == band(cons[row["case_id"]])
    ld = res["lesion_dice"]
    types = [r.lesion_type for r in records]
    assert {t: g["cases"] for t, g in ld["by_type"].items()} == {t: types.count(t) for t in set(types)}
    bands = [band(c) for c in cons.values()]
    assert {b: g["cases"] for b, g in ld["by_band"].items()} == {b: bands.count(b) for b in set(bands)}
    assert ld["visible"]["cases"] == sum(c >= 2 for c in cons.values())
    assert ld["dice"] == pytest.approx(np.mean([r["dice"] for r in res["per_case"]]))

    # every host organ of the cases has a lesion crop and lesion-free crops: one AUC each
    assert set(res["detect_auc_by_organ"]) == {LESION_TYPE_BY_NAME[t].organ for t in TYPES}
    assert all(0.0 <= a <= 1.0 for a in res["detect_auc_by_organ"].values())

    for name, a in res["attributes"].items():
        assert (a["acc"], a["majority"]) == (res[f"acc_{name}"], res[f"majority_{name}"])
        assert a["beats_majority"] == (a["acc"] > a["majority"])
    assert res["attributes_beating_majority"] == [n for n, a in res["attributes"].items() if a["beats_majority"]]

    assert res["organ_dice"] is None and res["organ_dice_note"] == "the model has no organ output"
    assert "organ Dice: absent" in printed and "lesion Dice by conspicuity" in printed
    assert all(t in printed for t in TYPES) and "beats" in printed


class ConstantLiver(PastaNet):
    """A tiny net whose organ output calls every voxel liver."""

    def __init__(self):
        super().__init__(get_preset("tiny"))
        self.organ_names = HOST_ORGANS

    def organ_logits(self, x):
        z = torch.zeros((x.shape[0], len(HOST_ORGANS) + 1, *x.shape[2:]))
        z[:, 1 + HOST_ORGANS.index("liver")] = 1.0
        return z


def test_score_case_gives_organ_dice_for_a_model_with_an_organ_output(setup):
    import nibabel as nib

    from pasta_model.data import case_items

    _, _, records = setup
    assert not has_organ_output(build_model("tiny")) and has_organ_output(ConstantLiver())
    rec = next(r for r in records if r.lesion_type == "kidney_tumor")
    row = score_case(ConstantLiver().eval(), case_items([rec])[0], torch.device("cpu"))
    # the case is at the tiny preset's 3 mm already: resampling keeps the grid, so count on the file
    total = np.asarray(nib.load(rec.total).dataobj)
    n_liver = np.isin(total, TOTALSEG_HOSTS["liver"]).sum()
    present = {o for o in HOST_ORGANS if np.isin(total, TOTALSEG_HOSTS[o]).any()}
    assert set(row["organ_dice"]) == present and {"liver", "kidney"} <= present
    assert row["organ_dice"]["liver"] == pytest.approx(2 * n_liver / (n_liver + total.size), rel=1e-5)
    assert all(v == 0.0 for o, v in row["organ_dice"].items() if o != "liver")
    summary = organ_dice_summary([row])
    assert summary["cases"] == 1 and set(summary["by_organ"]) == present
    assert summary["dice"] == pytest.approx(row["organ_dice"]["liver"] / len(present))
    assert not math.isnan(row["conspicuity"])
