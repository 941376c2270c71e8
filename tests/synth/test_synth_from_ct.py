"""`synth from-ct`: lesions into a CT and organ mask written by another tool (SimpleITK)."""
from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from synth.dataset import read_dataset
from synth.from_ct import estimate_noise_sd

NOISE_SD = 12.0


def _write_ct(tmp_path, flip_x=True, shape=(96, 80, 60), spacing=(2.0, 2.0, 3.0)):
    """A small abdomen: body, liver (5), kidneys (2, 3), aorta (52) at portal venous HU."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape[::-1]), indexing="ij")
    sx, sy, sz = spacing
    X, Y, Z = (x - shape[0] / 2) * sx, (y - shape[1] / 2) * sy, (z - shape[2] / 2) * sz
    hu = np.full(x.shape, -1000.0, np.float32)
    mask = np.zeros(x.shape, np.uint8)
    body = (X / 85) ** 2 + (Y / 70) ** 2 <= 1
    hu[body] = -100
    liver = ((X + 25) / 45) ** 2 + ((Y + 5) / 40) ** 2 + (Z / 60) ** 2 <= 1
    hu[liver], mask[liver] = 105, 5
    for lab, cx in ((2, -45.0), (3, 45.0)):
        kid = ((X - cx) / 16) ** 2 + ((Y - 35) / 14) ** 2 + ((Z + 10) / 30) ** 2 <= 1
        hu[kid], mask[kid] = 150, lab
    aorta = ((X - 10) / 8) ** 2 + ((Y - 20) / 8) ** 2 <= 1
    hu[aorta], mask[aorta] = 160, 52
    hu += rng.normal(0, NOISE_SD, hu.shape).astype(np.float32) * body
    ct = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    organs = sitk.GetImageFromArray(mask)
    direction = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0) if flip_x else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    for im in (ct, organs):
        im.SetSpacing(spacing)
        im.SetOrigin((12.5, -40.0, 100.0))
        im.SetDirection(direction)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(organs, str(tmp_path / "organs.nii.gz"))
    return tmp_path / "ct.nii.gz", tmp_path / "organs.nii.gz"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "simulation.cli", "synth", *args],
                          capture_output=True, text=True)


def test_from_ct_inserts_lesions_in_the_ct_geometry(tmp_path):
    ct, organs = _write_ct(tmp_path)
    out = tmp_path / "out"
    res = _cli("from-ct", "--ct", str(ct), "--organs", str(organs), "--out", str(out),
               "--types", "liver_cyst,liver_cancer,kidney_cyst", "--seed", "3")
    assert res.returncode == 0, res.stderr
    recs = read_dataset(out)
    assert [r.lesion_type for r in recs] == ["liver_cyst", "liver_cancer", "kidney_cyst"]
    src = nib.load(str(ct))
    src_mask = np.asarray(nib.load(str(organs)).dataobj)
    for rec in recs:
        img = nib.load(str(rec.img))
        assert img.shape == src.shape and np.allclose(img.affine, src.affine)
        assert np.asarray(img.dataobj).dtype == np.int16
        label = np.asarray(nib.load(str(rec.label)).dataobj)
        total = np.asarray(nib.load(str(rec.total)).dataobj)
        assert np.array_equal(total, src_mask)            # the user's organ map, untouched
        rep = rec.report()
        assert rep["phase"] == "portal_venous"             # told from the aorta's HU
        host = np.isin(src_mask, [5] if rep["organ"] == "liver" else [2, 3])
        lesion = label == 2
        assert lesion.any()
        for les in rep["lesions"]:
            if les["invasion"] == "no":
                assert not (lesion & ~host).any() or len(rep["lesions"]) > 1
            # report voxel indices are the saved file's indices
            assert lesion[tuple(les["center_voxel"])] or les["voxels"] < 30
        data = np.asarray(img.dataobj).astype(np.float32)
        # only the lesion and its blended margin changed
        far = ~ndi.binary_dilation(lesion, iterations=3)
        assert np.array_equal(data[far], np.asarray(src.dataobj)[far])
    cyst = recs[0].report()["lesions"][0]
    assert cyst["density"] == "hypodense" and cyst["heterogeneity"] == "homogeneous"


def test_noise_is_estimated_from_the_ct(tmp_path):
    ct, _ = _write_ct(tmp_path, flip_x=False)
    data = np.asarray(nib.load(str(ct)).dataobj).astype(np.float32)
    assert abs(estimate_noise_sd(data, data > -500) - NOISE_SD) < 0.25 * NOISE_SD


def test_custom_label_map(tmp_path):
    ct, organs = _write_ct(tmp_path)
    lm = tmp_path / "labels.json"
    lm.write_text(json.dumps({"5": "liver", "2": "kidney", "3": "kidney", "52": "aorta"}))
    res = _cli("from-ct", "--ct", str(ct), "--organs", str(organs), "--out", str(tmp_path / "o"),
               "--label-map", str(lm), "--types", "kidney_stone", "--n", "1")
    assert res.returncode == 0, res.stderr
    assert read_dataset(tmp_path / "o")[0].report()["lesions"][0]["location"].endswith(("pole", "region"))


@pytest.mark.parametrize("problem, expect", [
    ("geometry", "geometry does not match"),
    ("organ", "no voxels labelled pancreas"),
    ("type", "unknown lesion type 'liver_tumour'"),
    ("missing", "no such file"),
])
def test_bad_input_gets_one_clear_line(tmp_path, problem, expect):
    ct, organs = _write_ct(tmp_path)
    args = ["from-ct", "--ct", str(ct), "--organs", str(organs), "--out", str(tmp_path / "o")]
    if problem == "geometry":
        small = sitk.GetImageFromArray(np.zeros((10, 10, 10), np.uint8))
        sitk.WriteImage(small, str(tmp_path / "small.nii.gz"))
        args[4] = str(tmp_path / "small.nii.gz")
    elif problem == "organ":
        args += ["--types", "pancreas_tumor"]
    elif problem == "type":
        args += ["--types", "liver_tumour"]
    else:
        args[2] = str(tmp_path / "nope.nii.gz")
    res = _cli(*args)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0]
    named = {"geometry": "small.nii.gz", "organ": "organs.nii.gz", "type": "--types", "missing": "nope.nii.gz"}
    assert named[problem] in lines[0]
