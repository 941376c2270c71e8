"""The PASTA HU map and the crop/preprocess transforms on real NIfTI files."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from pasta_model.transforms import (
    PastaHUMapd,
    build_preprocess,
    centred_crop,
    mask_center,
    negative_centers,
    pasta_hu_map,
)


class _Preset:
    spacing_mm = 2.0


def test_hu_map_hits_the_pasta_knots_and_clamps():
    hu = np.array([-3000, -1000, -200, 200, 1000, 4000, -600, 0], np.float32)
    out = pasta_hu_map(hu)
    np.testing.assert_allclose(out, [0, 0, 0.2, 0.9, 1, 1, 0.1, 0.55], atol=1e-6)
    t = pasta_hu_map(torch.from_numpy(hu))
    np.testing.assert_allclose(t.numpy(), out, atol=1e-6)


def test_hu_map_dict_transform_copies_and_maps_only_its_keys():
    d = {"image": torch.tensor([-1000.0, 200.0]), "label": torch.tensor([2, 1])}
    out = PastaHUMapd(keys="image")(d)
    assert out["image"].tolist() == pytest.approx([0.0, 0.9])
    assert out["label"].tolist() == [2, 1] and d["image"][0] == -1000.0


def test_centred_crop_keeps_the_centre_and_pads_with_air_at_the_border():
    x = torch.rand(1, 12, 12, 12) + 1.0
    c = centred_crop(x, [1, 6, 6], 8)
    assert c.shape == (1, 8, 8, 8)
    assert c[0, 4, 4, 4] == x[0, 1, 6, 6]
    assert (c[0, :3] == 0).all() and (c[0, 3:] > 0).all()


def test_negative_centres_give_lesion_free_boxes():
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[2:38, 2:38, 2:38] = 1
    lab[15:20, 15:20, 15:20] = 2
    cs = negative_centers(lab, 16, 3, np.random.default_rng(0))
    assert len(cs) == 3
    for c in cs:
        crop = centred_crop(torch.from_numpy(lab)[None], c, 16)
        assert not (crop == 2).any()


def test_preprocess_resamples_to_preset_spacing_in_ras(tmp_path):
    hu = np.full((20, 16, 10), -1000, np.int16)
    hu[5:15, 4:12, 2:8] = 200
    lab = np.zeros_like(hu, dtype=np.uint8)
    lab[8:12, 6:10, 4:6] = 2
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    aff[:3, 3] = [-10, 5, 30]
    nib.save(nib.Nifti1Image(hu, aff), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "label.nii.gz")
    out = build_preprocess(_Preset())({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    img, label = out["image"], out["label"]
    assert img.shape == (1, 10, 8, 19)          # voxel centres span 36 mm along z and label.shape == img.shape
    np.testing.assert_allclose(np.diag(np.asarray(img.affine))[:3], [2.0, 2.0, 2.0])
    assert float(img.min()) >= 0.0 and float(img.max()) == pytest.approx(0.9, abs=1e-5)
    assert set(np.unique(label.numpy()).tolist()) == {0, 2}            # nearest: no blended labels


def test_mask_centre_is_the_middle_of_the_bounding_box_and_none_when_empty():
    m = np.zeros((10, 12, 9), bool)
    assert mask_center(m) is None
    m[2, 3, 0] = m[6, 10, 0] = m[4, 4, 4] = True              # box [2..6] x [3..10] x [0..4]
    assert mask_center(m) == [4, 7, 2]                         # (lo + hi + 1) // 2 on each axis
    assert mask_center(torch.from_numpy(m)) == [4, 7, 2]
    assert all(type(v) is int for v in mask_center(m))
