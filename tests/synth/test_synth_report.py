"""Report rules: T stage, the survival model, locations, the montage."""
from __future__ import annotations

import numpy as np
from PIL import Image

from synth.report import locate, survival, t_stage


def _les(d, invasion="no", thickness=5.0):
    return {"size_mm": [d, d * 0.8, d * 0.7], "invasion": invasion, "thickness_mm": thickness}


def test_t_stage_follows_the_documented_organ_rules():
    assert t_stage("lung_tumor", [_les(25)]) == "T1"
    assert t_stage("lung_tumor", [_les(45)]) == "T2"
    assert t_stage("lung_tumor", [_les(65)]) == "T3"
    assert t_stage("lung_tumor", [_les(80)]) == "T4"
    assert t_stage("liver_cancer", [_les(15), _les(60)]) == "T3"
    assert t_stage("pancreas_tumor", [_les(15, invasion="yes")]) == "T4"
    assert t_stage("colon_cancer", [_les(40, thickness=7)]) == "T1"
    assert t_stage("colon_cancer", [_les(40, thickness=15)]) == "T3"
    assert t_stage("liver_cyst", [_les(30)]) is None
    assert t_stage("bone_metastasis", [_les(30)]) is None


def test_survival_depends_on_stage_and_is_reproducible():
    def median(lt, stage, d):
        rng = np.random.default_rng(0)
        return np.median([survival(lt, stage, [_les(d)], rng)[0] for _ in range(400)])

    assert median("pancreas_tumor", "T4", 50) < median("pancreas_tumor", "T1", 15)
    assert median("pancreas_tumor", "T2", 30) < median("kidney_tumor", "T2", 30)
    assert median("kidney_cyst", None, 20) > median("kidney_tumor", "T1", 20)
    a = survival("colon_cancer", "T2", [_les(30)], np.random.default_rng(5))
    assert a == survival("colon_cancer", "T2", [_les(30)], np.random.default_rng(5))


def test_locations():
    lo, hi = np.array([-150.0, -90, -100]), np.array([30.0, 80, 80])
    assert locate("liver", [-130, 60, 60], lo, hi, "liver").startswith("segment VII")
    assert locate("liver", [20, -50, 0], lo, hi, "liver").startswith("segment I")
    assert locate("lung", [0, 0, 0], lo, hi, "lung_middle_lobe_right") == "right middle lobe"
    assert locate("bone", [0, 0, 0], lo, hi, "vertebrae_L3") == "L3 vertebra"
    assert locate("bone", [0, 0, 0], lo, hi, "rib_left_2") == "left 2nd rib"
    assert locate("kidney", [70, 0, 70], lo, hi, "kidney_left", np.array([50.0, 30, 0]), np.array([90.0, 80, 80])) \
        == "left kidney, upper pole"


def test_show_draws_a_montage(small_dataset, tmp_path):
    from simulation.cli import main

    root, rows, _ = small_dataset
    for row in rows[:2]:
        png = tmp_path / f"{row['lesion_type']}.png"
        assert main(["synth", "show", str(root / row["path"]), "--png", str(png)]) == 0
        im = Image.open(png)
        assert im.size[0] > 1000 and im.size[1] > 300
        px = np.asarray(im.convert("RGB")).astype(int)
        red = (px[..., 0] > 200) & (px[..., 1] < 80) & (px[..., 2] < 80)
        assert red.sum() > 5   # the lesion outline is drawn


def test_show_refuses_a_folder_that_is_not_a_case(tmp_path, capsys):
    from simulation.cli import main

    assert main(["synth", "show", str(tmp_path), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a case folder" in err[0]
