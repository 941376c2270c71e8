"""predict writes a mask in the input's own geometry (NIfTI and DICOM) and a report; evaluate scores."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pasta_model.checkpoint import save_checkpoint
from pasta_model.network import build_model
from pasta_model.predict import lesion_components
from simulation.cli import main as cli_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from synth.dataset import read_dataset
    root = tmp_path_factory.mktemp("predict")
    assert cli_main(["synth", "generate", "--out", str(root / "data"), "--n", "3", "--size", "48",
                     "--spacing", "3", "--seed", "31", "--workers", "1"]) == 0
    torch.manual_seed(0)
    ckpt = root / "model.safetensors"
    save_checkpoint(ckpt, build_model("tiny"))
    return root, ckpt, read_dataset(root / "data")


def test_predict_on_nifti_writes_mask_with_the_input_affine_and_a_report(setup, tmp_path, capsys):
    _, ckpt, records = setup
    out = tmp_path / "pred"
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--image", str(records[0].img), "--out", str(out)]) == 0
    src, mask = nib.load(records[0].img), nib.load(out / "mask.nii.gz")
    assert np.array_equal(mask.affine, src.affine) and mask.shape == src.shape
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
    report = json.loads((out / "report.json").read_text())
    assert set(report["detection"]) >= {"any", "liver", "kidney"}
    assert all(0 <= p <= 1 for p in report["detection"].values())
    assert (out / "report.txt").read_text().startswith("PASTA-Fed prediction")
    assert "mask:" in capsys.readouterr().out


def test_predict_keeps_an_oblique_flipped_geometry(setup, tmp_path):
    _, ckpt, records = setup
    src = nib.load(records[0].img)
    aff = src.affine.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag([-1.0, 1.0, -1.0])       # LAI-like orientation
    c, s = math.cos(0.2), math.sin(0.2)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ aff[:3, :3]
    img = nib.Nifti1Image(np.asarray(src.dataobj), aff)
    nib.save(img, tmp_path / "oblique.nii.gz")
    from pasta_model.predict import predict
    predict(ckpt, tmp_path / "oblique.nii.gz", tmp_path / "out", device="cpu")
    mask = nib.load(tmp_path / "out" / "mask.nii.gz")
    np.testing.assert_allclose(mask.affine, nib.load(tmp_path / "oblique.nii.gz").affine, atol=1e-6)
    assert mask.shape == src.shape


def _write_dicom_series(image: sitk.Image, folder):
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1.424242"
    for i in range(image.GetDepth()):
        sl = image[:, :, i]
        for tag, value in {
            "0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".1",
            "0008|0018": f"{series}.{i + 1}", "0020|0013": str(i + 1),
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, i)))),
            "0020|0037": "\\".join(map(str, direction[0:7:3] + direction[1:8:3])),
            "0028|1053": "1", "0028|1052": "0",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{i:04d}.dcm"))
        writer.Execute(sl)


def test_predict_on_a_dicom_series_folder_keeps_its_geometry(setup, tmp_path):
    _, ckpt, records = setup
    ct = sitk.Cast(sitk.ReadImage(str(records[1].img)), sitk.sitkInt16)
    _write_dicom_series(ct, tmp_path / "series")
    out = tmp_path / "pred"
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--image", str(tmp_path / "series"),
                     "--out", str(out)]) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    series = reader.Execute()
    mask = sitk.ReadImage(str(out / "mask.nii.gz"))
    assert mask.GetSize() == series.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), series.GetDirection(), atol=1e-6)
    assert json.loads((out / "report.json").read_text())["input"] == str(tmp_path / "series")


def test_predict_refuses_a_dicom_folder_with_a_missing_slice_naming_folder_and_gap(setup, tmp_path, capsys):
    """predict reads DICOM with the agent's checks: a gap is an error (exit 2), not a silently short volume."""
    _, ckpt, records = setup
    ct = sitk.Cast(sitk.ReadImage(str(records[1].img)), sitk.sitkInt16)
    folder = tmp_path / "series"
    _write_dicom_series(ct, folder)
    (folder / f"{ct.GetDepth() // 2:04d}.dcm").unlink()
    out = tmp_path / "pred"
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--image", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    step = ct.GetSpacing()[2]
    assert str(folder) in err and "missing slice" in err and f"gap of {2 * step:.3f} mm" in err
    assert not (out / "mask.nii.gz").exists()


def test_predict_names_a_missing_input(setup, tmp_path, capsys):
    _, ckpt, _ = setup
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--image", str(tmp_path / "nope.nii.gz"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err


def test_a_batch_loads_the_model_once_and_goes_on_past_a_broken_ct(setup, tmp_path, capsys, monkeypatch):
    """Every NIfTI and series sub-folder of the batch folder gets its own results; a series with a
    missing slice is named with its problem (exit 2) while the others are predicted."""
    import shutil

    import pasta_model.predict as predict_mod
    _, ckpt, records = setup
    batch = tmp_path / "batch"
    batch.mkdir()
    for rec in records[:2]:
        shutil.copy(rec.img, batch / f"{rec.img.parent.name}.nii.gz")
    ct = sitk.Cast(sitk.ReadImage(str(records[1].img)), sitk.sitkInt16)
    _write_dicom_series(ct, batch / "series-good")
    _write_dicom_series(ct, batch / "series-gap")
    (batch / "series-gap" / f"{ct.GetDepth() // 2:04d}.dcm").unlink()
    loads = []
    real_load = predict_mod.load_checkpoint
    monkeypatch.setattr(predict_mod, "load_checkpoint", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "out"
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--batch", str(batch), "--out", str(out)]) == 2
    assert len(loads) == 1
    outcome = json.loads((out / "batch.json").read_text())
    assert sorted(name for name, why in outcome.items() if why == "ok") == sorted(
        [f"{r.img.parent.name}.nii.gz" for r in records[:2]] + ["series-good"])
    assert "missing slice" in outcome["series-gap"]
    for name in (records[0].img.parent.name, "series-good"):
        assert (out / name / "mask.nii.gz").exists() and (out / name / "report.json").exists()
    assert not (out / "series-gap" / "mask.nii.gz").exists()
    printed = capsys.readouterr()
    assert "predicted 3 of 4 CT(s)" in printed.out and "series-gap: " in printed.out
    assert "pasta-fed predict: error: 1 CT(s) could not be read" in printed.err


def test_a_ct_thinner_than_the_detection_window_is_predicted(setup, tmp_path):
    """A short scan (12 slices of 3 mm, fewer voxels than the detect window) used to fail in
    detection: the window centre lay past the volume, so the crop came out cut."""
    _, ckpt, _ = setup
    short = tmp_path / "short.nii.gz"
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(2).normal(40, 20, (48, 48, 12)).astype(np.float32), affine),
             short)
    out = tmp_path / "pred"
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--image", str(short), "--out", str(out)]) == 0
    detection = json.loads((out / "report.json").read_text())["detection"]
    assert set(detection) >= {"any", "liver"} and all(0 <= v <= 1 for v in detection.values())
    assert nib.load(out / "mask.nii.gz").shape == (48, 48, 12)


def test_lesion_components_measure_volume_and_extent():
    m = np.zeros((20, 20, 20), np.uint8)
    m[2:6, 2:4, 2:3] = 1          # 4x2x1 = 8 voxels
    m[10:15, 10:15, 10:15] = 1    # 125 voxels
    comps = lesion_components(m, (2.0, 1.0, 1.0))
    assert [c["voxels"] for c in comps] == [125, 8]
    assert comps[0]["volume_ml"] == pytest.approx(0.25) and comps[0]["size_mm"] == [10.0, 5.0, 5.0]
    assert comps[1]["size_mm"] == [8.0, 2.0, 1.0]


def test_evaluate_reports_every_metric_as_a_float(setup, tmp_path):
    root, ckpt, _ = setup
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--data", str(root / "data"),
                     "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["cases"] == 3
    for key in ("dice", "hd95_mm", "detect_auc", "acc_shape", "f1_shape", "majority_shape", "stage_acc", "c_index"):
        assert isinstance(res[key], float), key
    assert 0.0 <= res["dice"] <= 1.0
