"""The phantom: TotalSegmentator labels, phase-dependent HU, anatomy that varies with the seed."""
from __future__ import annotations

import numpy as np
import pytest

from synth.geometry import Grid
from synth.phantom import rasterize, render, sample_anatomy
from synth.tissue import T
from synth.totalseg import TOTALSEG_ID, TOTALSEG_V2

TORSO = Grid((84, 60, 150), (5.0, 5.0, 5.0), (-207.5, -147.5, -390.0))


def _body(seed: int):
    rng = np.random.default_rng(seed)
    an = sample_anatomy(rng)
    lab, tis = rasterize(an, TORSO, rng)
    return an, lab, tis, rng


@pytest.fixture(scope="module")
def torso():
    return _body(0)


def test_torso_has_every_organ_the_issue_names_in_totalsegmentator_ids(torso):
    _, lab, tis, _ = torso
    present = set(np.unique(lab).tolist()) - {0}
    assert present <= set(TOTALSEG_V2)
    needed = ["liver", "gallbladder", "spleen", "stomach", "pancreas", "esophagus", "colon",
              "kidney_left", "kidney_right", "urinary_bladder", "aorta", "heart", "trachea",
              "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
              "lung_middle_lobe_right", "lung_lower_lobe_right", "vertebrae_L1", "vertebrae_T6",
              "sacrum", "hip_left", "hip_right", "rib_left_5", "rib_right_5", "sternum", "small_bowel"]
    missing = [n for n in needed if TOTALSEG_ID[n] not in present]
    assert not missing
    # body outline, fat and muscle are tissue, not organ labels
    assert {T["fat"], T["muscle"], T["air"]} <= set(np.unique(tis).tolist())


def test_organs_sit_where_anatomy_puts_them(torso):
    _, lab, _, _ = torso

    def centre(name):
        return TORSO.to_mm(np.argwhere(lab == TOTALSEG_ID[name]).mean(axis=0))

    liver, spleen = centre("liver"), centre("spleen")
    assert liver[0] < 0 < spleen[0]                      # liver on the right, spleen on the left
    assert centre("kidney_right")[0] < 0 < centre("kidney_left")[0]
    assert centre("lung_upper_lobe_left")[2] > liver[2] > centre("urinary_bladder")[2]
    assert centre("vertebrae_L1")[1] > centre("aorta")[1]  # aorta anterior to the spine
    assert centre("vertebrae_T1")[2] > centre("vertebrae_L5")[2]


def test_hollow_organs_have_a_wall_and_contents(torso):
    _, lab, tis, _ = torso
    for organ, contents in (("stomach", ("gas", "gi_fluid")), ("urinary_bladder", ("urine",)),
                            ("gallbladder", ("bile",)), ("colon", ("gas", "feces"))):
        inside = set(np.unique(tis[lab == TOTALSEG_ID[organ]]).tolist())
        assert T["gi_wall"] in inside, organ
        assert any(T[c] in inside for c in contents), organ


def test_contrast_phase_changes_enhancing_organs(torso):
    _, lab, tis, _ = torso
    hu = {p: render(tis, p, np.random.default_rng(1), TORSO.spacing) for p in ("plain", "arterial", "portal_venous")}
    aorta, liver = lab == TOTALSEG_ID["aorta"], tis == T["liver"]
    a = {p: float(np.median(v[aorta])) for p, v in hu.items()}
    li = {p: float(np.median(v[liver])) for p, v in hu.items()}
    assert a["arterial"] > 250 > a["portal_venous"] > 120 > a["plain"]
    assert li["portal_venous"] > li["arterial"] > li["plain"]
    fat = tis == T["fat"]
    assert abs(float(np.median(hu["plain"][fat])) + 100) < 10


def test_anatomy_varies_with_the_seed():
    sizes = []
    for seed in (1, 2, 3):
        _, lab, _, _ = _body(seed)
        sizes.append(tuple(int((lab == TOTALSEG_ID[n]).sum()) for n in ("liver", "kidney_left", "stomach")))
    assert len(set(sizes)) == 3
