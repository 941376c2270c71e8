"""Every lesion type: where it lies, that lesions do not touch, what the report says."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from synth.generate import GenConfig, generate_case
from synth.lesions import HOLLOW_ORGANS, TYPE_MODELS
from synth.totalseg import TOTALSEG_HOSTS
from synth.vocabulary import ATTRIBUTES, LESION_TYPE_BY_NAME, LESION_TYPE_NAMES, PHASES, T_STAGES

CUBE = np.ones((3, 3, 3), bool)


@pytest.fixture(scope="module")
def cases():
    cfg = GenConfig(size=(80,) * 3, seed=11)
    return {t: generate_case(11, i, cfg) for i, t in enumerate(LESION_TYPE_NAMES)}


@pytest.mark.parametrize("lesion_type", LESION_TYPE_NAMES)
def test_lesions_lie_in_their_organ(cases, lesion_type):
    case = cases[lesion_type]
    organ = LESION_TYPE_BY_NAME[lesion_type].organ
    host = np.isin(case.total, TOTALSEG_HOSTS[organ])
    assert case.report["lesion_type"] == lesion_type
    for m, les in zip(case.lesion_masks, case.report["lesions"]):
        outside = m & ~host
        if les["invasion"] == "no":
            assert not outside.any()
        else:
            # an invading lesion may only extend just past its organ (a few mm)
            near = ndi.binary_dilation(host, CUBE, iterations=int(np.ceil(12.0 / min(case.report["spacing_mm"]))))
            assert not (outside & ~near).any()
            assert TYPE_MODELS[lesion_type].invasion_p > 0


@pytest.mark.parametrize("lesion_type", LESION_TYPE_NAMES)
def test_separate_lesions_are_separate_components(cases, lesion_type):
    case = cases[lesion_type]
    union = (case.label == 2)
    _, n = ndi.label(union, structure=CUBE)
    assert n == len(case.report["lesions"]) == len(case.lesion_masks)
    for m in case.lesion_masks:
        assert ndi.label(m, structure=CUBE)[1] == 1


@pytest.mark.parametrize("lesion_type", LESION_TYPE_NAMES)
def test_report_fields_and_vocabulary(cases, lesion_type):
    rep = cases[lesion_type].report
    lt = LESION_TYPE_BY_NAME[lesion_type]
    assert rep["organ"] == lt.organ and rep["malignant"] == lt.malignant
    assert rep["phase"] in PHASES
    for les in rep["lesions"]:
        for attr, values in ATTRIBUTES.items():
            assert les[attr] in values
        assert les["location"]
        assert les["volume_ml"] > 0 and all(s > 0 for s in les["size_mm"])
    if lt.malignant and lesion_type != "bone_metastasis":
        assert rep["t_stage"] in T_STAGES
    else:
        assert rep["t_stage"] is None
    assert rep["survival_months"] > 0 and isinstance(rep["survival_event"], bool)
    assert lesion_type.replace("_", " ") in rep["report_text"]


def test_lesion_types_look_like_themselves(cases):
    dens = {t: cases[t].report["lesions"][0] for t in LESION_TYPE_NAMES}
    for stone in ("kidney_stone", "gallstone"):
        assert dens[stone]["density"] == "hyperdense" and dens[stone]["mean_hu"] > 150
    for cyst in ("liver_cyst", "kidney_cyst", "pancreas_cyst"):
        assert dens[cyst]["interior_hu"] < 40
        assert dens[cyst]["heterogeneity"] == "homogeneous"
    assert dens["lung_tumor"]["density"] == "hyperdense"
    for t in ("gastric_cancer", "colon_cancer", "esophageal_cancer", "bladder_cancer", "gallbladder_cancer"):
        assert LESION_TYPE_BY_NAME[t].organ in HOLLOW_ORGANS


def test_same_seed_and_index_give_the_same_case():
    cfg = GenConfig(size=(64,) * 3, seed=5)
    a, b = generate_case(5, 2, cfg), generate_case(5, 2, cfg)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.report == b.report
    c = generate_case(5, 17, cfg)   # the same type (17 % 15 == 2), another case
    assert c.report["lesion_type"] == a.report["lesion_type"]
    assert not np.array_equal(a.image, c.image)


def test_noise_inside_a_lesion_matches_the_volume():
    cfg = GenConfig(size=(96,) * 3, spacing=2.0, types=("liver_cyst",), phase="portal_venous", seed=2)

    def noise(resid, mask):
        r = resid[mask]
        return 1.4826 * float(np.median(np.abs(r - np.median(r))))

    for index in range(6):   # a case with a cyst big enough to measure noise in
        case = generate_case(2, index, cfg)
        biggest = max(case.lesion_masks, key=lambda m: m.sum())
        core = ndi.binary_erosion(biggest, iterations=2)
        if core.sum() >= 150:
            break
    assert core.sum() >= 150
    img = case.image.astype(np.float32)
    resid = img - ndi.uniform_filter(img, 3)
    fat = ndi.binary_erosion((img > -160) & (img < -40), iterations=2)   # featureless tissue
    assert 0.75 < noise(resid, core) / noise(resid, fat) < 1.33


def test_a_large_invading_lesion_is_not_clipped_to_its_box():
    """Seed 1, case 45 at 96^3: a T4 lung tumour that outgrew the box planned for its drawn
    size came out as a cube (98 % of its bounding box). An ellipsoid fills ~52 %."""
    from synth.run import make_config

    case = generate_case(1, 45, make_config(seed=1, size=96))
    for les in case.report["lesions"]:
        lo, hi = np.array(les["bbox_voxel"])
        assert les["voxels"] / np.prod(hi - lo + 1) < 0.75, les
