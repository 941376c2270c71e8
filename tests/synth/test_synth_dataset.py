"""The dataset on disk: layout, reports that agree with the files, resumable runs, reader."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from synth.dataset import MANIFEST, read_dataset, resolve_lesion_type
from synth.errors import SynthInputError
from synth.generate import GenConfig
from synth.lesions import HOLLOW_ORGANS, WALL_BAND_MM
from synth.run import generate_dataset
from synth.totalseg import TOTALSEG_HOSTS
from synth.vocabulary import LESION_TYPE_NAMES, ORGAN_FOLDERS

CUBE = np.ones((3, 3, 3), bool)


def _load(d):
    return [np.asarray(nib.load(str(d / f)).dataobj) for f in ("img.nii.gz", "label.nii.gz", "total.nii.gz")]


def test_layout_manifest_and_files(small_dataset):
    root, rows, _ = small_dataset
    lines = (root / MANIFEST).read_text().splitlines()
    assert len(lines) == 15 == len(rows)
    assert sorted(json.loads(line)["lesion_type"] for line in lines) == sorted(LESION_TYPE_NAMES)
    for row in rows:
        d = root / row["path"]
        organ_folder, type_folder, case_id = row["path"].split("/")
        assert organ_folder == ORGAN_FOLDERS[row["organ"]] and type_folder == row["lesion_type"]
        img, label, total = _load(d)
        assert img.dtype == np.int16 and img.shape == (80, 80, 80)
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        affines = [nib.load(str(d / f)).affine for f in ("img.nii.gz", "label.nii.gz", "total.nii.gz")]
        assert all(np.allclose(a, affines[0]) for a in affines)
        # total keeps the healthy anatomy: lesion voxels carry organ labels, not a lesion label
        assert (total[label == 2] > 0).mean() > 0.5


def _independent_measure(img, lesion, host, spacing, organ):
    """The report's rules, written again from their documentation."""
    sp = np.asarray(spacing)
    dist = ndi.distance_transform_edt(~lesion, sampling=sp)
    smax = sp.max()
    normal = host & ~lesion
    if organ in HOLLOW_ORGANS:
        depth = ndi.distance_transform_edt(host, sampling=sp)
        normal &= depth <= max(WALL_BAND_MM[organ], 1.5 * smax)
    ring = (dist > 1.01 * smax) & (dist <= 1.01 * smax + max(6.0, 3 * smax)) & normal
    surround = float(np.median(img[ring]))
    inner = ndi.binary_erosion(lesion, iterations=2)
    if inner.sum() < 20:
        inner = ndi.binary_erosion(lesion, iterations=1)
    interior = float(img[inner].mean()) if inner.sum() >= 8 else float(img[lesion].mean())
    return interior - surround


def test_reports_agree_with_the_mask_and_image(small_dataset):
    root, rows, _ = small_dataset
    checked = 0
    for row in rows:
        d = root / row["path"]
        rep = json.loads((d / "type.json").read_text())
        img, label, total = _load(d)
        img = img.astype(np.float32)
        host = np.isin(total, TOTALSEG_HOSTS[rep["organ"]])
        comps, n = ndi.label(label == 2, structure=CUBE)
        assert n == len(rep["lesions"])
        sp = rep["spacing_mm"]
        for les in rep["lesions"]:
            k = comps[tuple(les["center_voxel"])] or np.bincount(
                comps[tuple(slice(a, b + 1) for a, b in zip(*les["bbox_voxel"]))].ravel())[1:].argmax() + 1
            m = comps == k
            idx = np.argwhere(m)
            lo, hi = idx.min(axis=0), idx.max(axis=0)
            assert np.all(np.abs(lo - les["bbox_voxel"][0]) <= 1) and np.all(np.abs(hi - les["bbox_voxel"][1]) <= 1)
            size = (hi - lo + 1) * np.asarray(sp)
            assert np.all(np.abs(size - les["size_mm"]) <= np.asarray(sp) + 1e-6)
            assert abs(float(img[m].mean()) - les["mean_hu"]) <= 5
            assert abs(m.sum() * np.prod(sp) / 1000 - les["volume_ml"]) < 1e-3 + 0.01 * les["volume_ml"]
            contrast = _independent_measure(img, m, host, sp, rep["organ"])
            if abs(abs(contrast) - 10) > 2:  # away from the threshold, the class must agree
                expect = "hypodense" if contrast < -10 else "hyperdense" if contrast > 10 else "isodense"
                assert les["density"] == expect, (row["path"], contrast, les)
                checked += 1
    assert checked >= 12


def test_one_or_two_workers_give_identical_cases(tmp_path):
    cfg = GenConfig(size=(64,) * 3, seed=9, types=("kidney_cyst", "liver_cancer", "gastric_cancer"))
    a = generate_dataset(tmp_path / "w1", 4, cfg, workers=1, progress=False)
    b = generate_dataset(tmp_path / "w2", 4, cfg, workers=2, progress=False)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra in a:
        da, db = tmp_path / "w1" / ra["path"], tmp_path / "w2" / ra["path"]
        for x, y in zip(_load(da), _load(db)):
            assert np.array_equal(x, y)
        assert json.loads((da / "type.json").read_text()) == json.loads((db / "type.json").read_text())


def test_rerun_skips_complete_cases_and_redoes_half_written_ones(tmp_path):
    cfg = GenConfig(size=(64,) * 3, seed=4, types=("liver_cyst", "kidney_stone", "lung_tumor"))
    out = tmp_path / "ds"
    rows = generate_dataset(out, 3, cfg, workers=1, progress=False)
    done = out / rows[0]["path"]
    half = out / rows[1]["path"]
    mtime = (done / "img.nii.gz").stat().st_mtime_ns
    before = (half / "img.nii.gz").read_bytes()
    (half / "img.nii.gz").unlink()                            # a case missing a file
    partial = half.parent / f".{half.name}.partial-12345"      # an interrupted write
    partial.mkdir()
    (partial / "img.nii.gz").write_bytes(b"garbage")
    (out / MANIFEST).unlink()
    rows2 = generate_dataset(out, 3, cfg, workers=1, progress=False)
    assert (done / "img.nii.gz").stat().st_mtime_ns == mtime
    assert (half / "img.nii.gz").read_bytes() == before
    assert not partial.exists()
    assert len((out / MANIFEST).read_text().splitlines()) == 3 == len(rows2)


def test_rerun_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "ds"
    generate_dataset(out, 1, GenConfig(size=(64,) * 3, seed=1), progress=False)
    with pytest.raises(SynthInputError, match="other settings"):
        generate_dataset(out, 1, GenConfig(size=(64,) * 3, seed=2), progress=False)


def test_reader_reads_generated_and_released_layouts(small_dataset, tmp_path):
    root, _, _ = small_dataset
    recs = read_dataset(root)
    assert len(recs) == 15 and {r.lesion_type for r in recs} == set(LESION_TYPE_NAMES)
    image, label, total, affine = recs[0].load()
    assert image.shape == label.shape == total.shape and affine.shape == (4, 4)

    # the released PASTA-Gen-30K: Organ/Kind/<number>/, no manifest, its own type.json
    rel = tmp_path / "released"
    arr = np.zeros((8, 8, 8), np.int16)
    for organ, kind, cid in (("Liver", "Tumor", "1020"), ("Gall", "Stone", "7"), ("Kidney", "Cyst", "103"),
                             ("Bone", "Tumor", "5")):
        d = rel / organ / kind / cid
        d.mkdir(parents=True)
        for f in ("img.nii.gz", "label.nii.gz", "total.nii.gz"):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(d / f))
        (d / "type.json").write_text(json.dumps({"organ": organ.lower(), "size": "10 mm"}))
    got = {r.path.name: r.lesion_type for r in read_dataset(rel)}
    assert got == {"1020": "liver_cancer", "7": "gallstone", "103": "kidney_cyst", "5": "bone_metastasis"}
    assert resolve_lesion_type("Pancreas", "pancreas_tumor") == "pancreas_tumor"


def test_generate_cli_writes_all_types_with_two_workers(tmp_path):
    """The issue's own command, smaller: `synth generate ... --workers 2`."""
    from simulation.cli import main

    out = tmp_path / "D"
    assert main(["synth", "generate", "--out", str(out), "--n", "15", "--size", "64", "--seed", "7",
                 "--workers", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert {r["lesion_type"] for r in rows} == set(LESION_TYPE_NAMES)
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    assert os.path.exists(out / "synth.json")


@pytest.mark.slow
def test_issue_command_n30_size96_two_workers(tmp_path):
    from simulation.cli import main

    out = tmp_path / "D"
    assert main(["synth", "generate", "--out", str(out), "--n", "30", "--size", "96", "--seed", "7",
                 "--workers", "2", "--no-progress"]) == 0
    recs = read_dataset(out)
    assert len(recs) == 30
    assert {r.lesion_type for r in recs} == set(LESION_TYPE_NAMES)
    for r in recs:
        for f in ("img.nii.gz", "label.nii.gz", "total.nii.gz", "type.json"):
            assert (r.path / f).is_file()


def test_a_site_dataset_with_its_own_scanner_phase_and_type_mix(tmp_path):
    """What simulation/hospitals.py asks of synth: weights, one phase, one scanner."""
    from synth.dataset import generate_dataset as generate
    from synth.scanner import ScannerProfile

    scanner = ScannerProfile(noise_hu=25.0, blur_mm=1.8, slice_thickness_mm=5.0, hu_offset=-20.0)
    weights = {t: (1.0 if t in ("liver_cyst", "kidney_stone") else 0.0) for t in LESION_TYPE_NAMES}
    rows = generate(tmp_path / "site", 6, seed=4, size=64, types=weights, phase="plain", scanner=scanner,
                    progress=False)
    assert {r["lesion_type"] for r in rows} <= {"liver_cyst", "kidney_stone"}
    assert {r["phase"] for r in rows} == {"plain"}
    rep = read_dataset(tmp_path / "site")[0].report()
    assert rep["scanner"] == scanner.to_json()
    again = generate(tmp_path / "again", 6, seed=4, size=64, types=weights, phase="plain", scanner=scanner,
                     progress=False)
    assert [r["lesion_type"] for r in again] == [r["lesion_type"] for r in rows]
