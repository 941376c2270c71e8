"""`client check` and `client show` on a site written by other tools, through the CLI."""
from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np
import pytest

from client import cli as client_cli


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pasta-fed")
    client_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def site(tmp_path, w, rng):
    """A hospital folder with every kind of trouble next to good cases."""
    images = tmp_path / "hospital" / "images"
    row, col = w.rotation_z(20)
    good = w.pydicom_series(images / "pat1" / "study" / "ct", w.ramp(), slope=0.5,
                            intercept=-1024, row=row, col=col, patient_id="PAT1", rng=rng)
    mr = w.pydicom_series(images / "pat1" / "study" / "ct", w.ramp(shape=(1, 16, 16)),
                          modality="MR", sop_class=w.MRImageStorage, patient_id="PAT1", rng=rng)
    j2k = w.sitk_series(images / "pat2", w.ramp(low=-1000, step=13), patient_id="PAT2", rng=rng)
    truncated = w.pydicom_series(images / "pat3", w.ramp(), patient_id="PAT3", rng=rng)
    cut = truncated.files[5]
    cut.write_bytes(cut.read_bytes()[:-200])
    gap = w.pydicom_series(images / "pat4", w.ramp(), patient_id="PAT4", rng=rng)
    gap.files[3].unlink()
    nii_hu = w.ramp(low=-900).astype(np.float32)
    w.nifti(images / "nifti" / "case_nii.nii.gz", nii_hu)
    mask = np.zeros(nii_hu.shape, np.uint8)
    mask[3:5, 4:8, 4:8] = 1
    w.nifti(tmp_path / "hospital" / "masks" / "case_nii.nii.gz", mask)
    (images / "README.txt").write_text("exported by PACS\n")
    labels = tmp_path / "hospital" / "labels.csv"
    labels.write_text(
        "case_id,patient_id,series_uid,tumor_present,organ,t_stage,survival_months,"
        "survival_event,shape,density,heterogeneity,surface,invasion,lesion_type\n"
        f"liver_01,PAT1,{good.series_uid},1,liver,T2,14.5,1,irregular,hypodense,"
        "heterogeneous,ill_defined,no,liver_cancer\n"
        "case_nii,PAT5,,0,,,30,0,,,,,,\n"
        f"{j2k.case_id},PAT2,,maybe,,,,,,,,,,\n")
    config = w.site_yaml(tmp_path, images, labels=labels, masks=tmp_path / "hospital" / "masks")
    return dict(config=config, good=good, mr=mr, j2k=j2k, truncated=truncated, cut=cut,
                gap=gap, nii_hu=nii_hu, images=images)


def test_check_json_gives_a_verdict_on_every_case_with_exact_hu(site, capsys):
    assert run_cli(["client", "check", "--config", str(site["config"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cases = {c["case_id"]: c for c in report["cases"]}
    for case in report["cases"]:
        assert set(case) >= {"case_id", "status", "reason", "shape", "spacing", "hu_min",
                             "hu_max", "source"}

    good = cases["liver_01"]                                   # mapped by series_uid
    assert good["status"] == "ok" and good["shape"] == [16, 16, 8]
    assert good["spacing"] == [0.7, 0.8, 2.5]
    assert good["hu_min"] == pytest.approx(site["good"].hu.min())
    assert good["hu_max"] == pytest.approx(site["good"].hu.max())
    assert good["tasks"] == ["detect", "report", "stage", "survival"]

    j2k = cases[site["j2k"].case_id]
    assert j2k["status"] == "ok" and j2k["spacing"] == [0.9, 0.9, 3.0]
    assert (j2k["hu_min"], j2k["hu_max"]) == (site["j2k"].hu.min(), site["j2k"].hu.max())

    assert cases[site["mr"].case_id]["status"] == "skipped"
    assert "MR" in cases[site["mr"].case_id]["reason"]
    truncated = cases[site["truncated"].case_id]
    assert truncated["status"] == "error" and site["cut"].name in truncated["reason"]
    assert cases[site["gap"].case_id]["status"] == "error"
    assert "missing slice" in cases[site["gap"].case_id]["reason"]
    assert cases["README.txt"]["status"] == "skipped"
    nii = cases["case_nii"]
    assert nii["status"] == "ok" and nii["tasks"] == ["segment", "detect", "survival"]
    assert nii["hu_min"] == float(site["nii_hu"].min())

    summary = report["summary"]
    assert summary["usable"] == 3
    assert summary["status"] == {"ok": 3, "error": 2, "skipped": 2}
    assert summary["usable_per_task"] == {"segment": 1, "detect": 2, "report": 1, "stage": 1,
                                          "survival": 2}
    assert summary["label_balance"]["tumor_present"] == {"false": 1, "true": 1}
    assert summary["label_balance"]["survival_event"] == {"false": 1, "true": 1}
    assert any("line 4" in e and "tumor_present" in e for e in summary["label_errors"])
    assert summary["spacing_mm"]["z"] == [2.0, 3.0]
    assert set(summary["tasks_below_min_cases"]) == set(summary["usable_per_task"])
    # a fifth of each task's patients is held out: none here, so no metric is ever released
    assert summary["validation_patients_per_task"] == {t: 0 for t in summary["usable_per_task"]}
    assert set(summary["tasks_without_evaluation_metrics"]) == set(summary["usable_per_task"])


def test_check_prints_a_readable_table(site, capsys):
    assert run_cli(["client", "check", "--config", str(site["config"])]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["CASE", "STATUS"]
    assert "liver_01" in out and "missing slice" in out and "usable per task" in out
    assert "fewer than 5 validation patients (evaluation metrics are never released" in out


def test_check_fails_only_when_no_case_is_usable(tmp_path, w, rng, capsys):
    images = tmp_path / "images"
    gap = w.pydicom_series(images, w.ramp(), rng=rng)
    gap.files[2].unlink()
    config = w.site_yaml(tmp_path, images)
    assert run_cli(["client", "check", "--config", str(config), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["summary"]["usable"] == 0


def test_an_empty_site_says_no_case_was_found_and_where_to_look(tmp_path, w, capsys):
    (tmp_path / "images").mkdir()
    assert run_cli(["client", "check", "--config", str(w.site_yaml(tmp_path, tmp_path / "images"))]) == 1
    out = capsys.readouterr().out
    assert "no case found (nothing readable under data.images" in out and "0 usable of 0" not in out


def test_bad_config_is_reported_with_its_key(tmp_path, w, capsys):
    (tmp_path / "images").mkdir()
    config = w.site_yaml(tmp_path, tmp_path / "images", device="gpu")
    assert run_cli(["client", "check", "--config", str(config)]) == 2
    assert "device: must be" in capsys.readouterr().err


def test_show_writes_exactly_what_the_agent_reads(site, tmp_path, capsys):
    # into a folder that does not exist yet: show creates it (before, it printed everything, then failed)
    out_nii, out_png = tmp_path / "qa" / "liver_01.nii.gz", tmp_path / "qa" / "liver_01.png"
    assert run_cli(["client", "show", "--config", str(site["config"]), "--case", "liver_01",
                    "--nifti", str(out_nii), "--png", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "origin mm (LPS)" in text and "[-10.0, 20.0, -30.0]" in text
    written = nib.load(str(out_nii))
    np.testing.assert_allclose(np.asarray(written.dataobj).transpose(2, 1, 0),
                               site["good"].hu, atol=1e-3)
    direction = np.array(site["good"].direction).reshape(3, 3)
    expected = np.eye(4)
    expected[:3, :3] = direction * np.array([0.7, 0.8, 2.5])
    expected[:3, 3] = (-10.0, 20.0, -30.0)
    expected[:2] *= -1                                        # LPS -> RAS
    np.testing.assert_allclose(written.affine, expected, atol=1e-4)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in out_nii.parent.iterdir()) == ["liver_01.nii.gz", "liver_01.png"]


def test_show_refuses_to_write_inside_the_hospital_data(site, capsys):
    target = site["images"] / "copy.nii.gz"
    assert run_cli(["client", "show", "--config", str(site["config"]), "--case", "case_nii",
                    "--nifti", str(target)]) == 2
    assert "refusing to write inside" in capsys.readouterr().err
    assert not target.exists()


def test_show_explains_a_broken_case(site, capsys):
    assert run_cli(["client", "show", "--config", str(site["config"]),
                    "--case", site["gap"].case_id]) == 2
    assert "missing slice" in capsys.readouterr().err
