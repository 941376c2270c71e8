"""CT from a real PACS (Orthanc): retrieved over DICOMweb and DIMSE, read like the same files in a folder."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from deployment.deploy_guides import command, fill
from orthanc_pacs import CALLED_AE, CALLING_AE, PASSWORD, USER, Orthanc, orthanc_fixture  # noqa: F401
from pydicom import dcmread
from pydicom.uid import generate_uid

from client import cli as client_cli
from client.check import check_site
from client.ingest import read_case, scan_site
from client.pacs import PacsError, cache_dir
from client.pacs.retrieve import retrieve
from client.site_config import load_site_config
from simulation.cli import main as pasta_fed
from synth.atomic import is_atomic_temp_name


@pytest.fixture
def hospital(tmp_path, w, orthanc):
    """Two CT series exported to a folder and stored in Orthanc: one whole, one with a slice missing."""
    images = tmp_path / "export"
    row, col = w.rotation_z(30)
    good = w.pydicom_series(images / "good", w.ramp(), row=row, col=col, patient_id="P001")
    gap = w.pydicom_series(images / "gap", w.ramp(), patient_id="P002", rng=np.random.default_rng(5))
    gap.files.pop(3).unlink()
    orthanc.upload([*good.files, *gap.files])
    assert orthanc.instance_count() == 15
    (tmp_path / "folder-site").mkdir()
    folder = load_site_config(w.site_yaml(tmp_path / "folder-site", images))
    return folder, good, gap


def pacs_site(root: Path, orthanc: Orthanc, protocol: str, password: str = PASSWORD, *,
              labels: Path | None = None, studies: dict | None = None):
    """A site whose CT comes from the PACS only (no data.images)."""
    root.mkdir(parents=True, exist_ok=True)
    secret = root / "pacs.json"
    secret.write_text(json.dumps({"username": USER, "password": password}))
    pacs = ({"dicomweb": orthanc.dicomweb, "credentials": str(secret)} if protocol == "dicomweb" else
            {"dimse": {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": CALLED_AE,
                       "calling_ae": CALLING_AE}})
    config = {"site": "hospital-pacs", "pacs": {**pacs, "studies": studies or {"modality": "CT"}},
              **({"data": {"labels": str(labels)}} if labels else {}),
              "privacy": {"max_epsilon": 8.0, "delta": 1.0e-5, "max_grad_norm": 1.0},
              "state_dir": str(root / "state"), "device": "cpu"}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    return load_site_config(root / "site.yaml")


def verdicts(config) -> list[tuple]:
    return [(c.case_id, c.status, c.reason, c.shape, c.spacing, c.hu_min, c.hu_max, c.tasks)
            for c in check_site(config).cases]


def cli_check(config, capsys) -> list[dict]:
    """`pasta-fed client check --json` on a site YAML: its cases, less where each was read from."""
    parser = argparse.ArgumentParser(prog="pasta-fed")
    client_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["client", "check", "--config", str(config.source), "--json"])
    capsys.readouterr()
    args.func(args)
    return [{k: v for k, v in case.items() if k != "source"} for case in json.loads(capsys.readouterr().out)["cases"]]


def cache_state(config) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_dir(config).rglob("*") if p.is_file()}


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_pacs_series_read_like_the_folder_and_are_fetched_once(tmp_path, hospital, orthanc, protocol, caplog,
                                                               capsys):
    folder, good, gap = hospital
    config = pacs_site(tmp_path / "pacs-site", orthanc, protocol)
    fetch = fill(command("pasta-fed", "client", "fetch"), {"hospital.yaml": str(config.source)})  # the guide's
    with caplog.at_level(logging.DEBUG):
        assert pasta_fed(fetch[1:]) == 0
    said = capsys.readouterr().out
    assert f"2 series, 15 instances in {cache_dir(config)} (15 fetched now)" in said
    first = retrieve(config)          # nothing left to fetch: the guide's command fetched it all
    assert (first.series, first.instances, first.fetched, first.cached) == (2, 15, 0, 15)
    assert PASSWORD not in caplog.text
    cached = cache_state(config)
    assert len(cached) == 15 and all(name.endswith(".dcm") for name in cached)
    assert not config.is_inside_data(cache_dir(config)) and cache_dir(config).parent == config.state_dir

    # same case ids, verdicts (the gap series refused the same way), shapes, spacings and HU ranges
    assert verdicts(config) == verdicts(folder)
    assert cli_check(config, capsys) == cli_check(folder, capsys)
    by_case = {c.case_id: c for c in check_site(config).cases}
    assert by_case[gap.case_id].status == "error" and "missing slice" in by_case[gap.case_id].reason
    assert by_case[good.case_id].status == "ok"

    # the same HU voxels and world geometry as the folder's files (and as written)
    from_pacs = {c.case_id: c for c in scan_site(config).cases}[good.case_id]
    from_folder = {c.case_id: c for c in scan_site(folder).cases}[good.case_id]
    assert from_pacs.source == f"pacs/{good.series_uid}"
    a, b = read_case(from_pacs), read_case(from_folder)
    np.testing.assert_array_equal(a.hu_array(), b.hu_array())
    np.testing.assert_allclose(a.hu_array(), good.hu, atol=1e-3)
    assert (a.origin, a.spacing, a.direction) == (b.origin, b.spacing, b.direction)
    np.testing.assert_allclose(a.direction, good.direction, atol=1e-6)

    # `client show` on the PACS site writes the same volume and montage as on the folder site
    shown = {}
    for name, site in (("pacs", config), ("folder", folder)):
        nii, png = tmp_path / "qa" / f"{name}.nii.gz", tmp_path / "qa" / f"{name}.png"
        assert pasta_fed(["client", "show", "--config", str(site.source), "--case", good.case_id,
                          "--nifti", str(nii), "--png", str(png)]) == 0
        shown[name] = (nib.load(str(nii)), png.read_bytes())
    np.testing.assert_array_equal(np.asarray(shown["pacs"][0].dataobj), np.asarray(shown["folder"][0].dataobj))
    np.testing.assert_array_equal(shown["pacs"][0].affine, shown["folder"][0].affine)
    assert shown["pacs"][1] == shown["folder"][1] and shown["pacs"][1][:4] == b"\x89PNG"
    capsys.readouterr()

    # a second ingestion fetches nothing and leaves every cached file untouched
    second = retrieve(config)
    assert (second.fetched, second.cached) == (0, 15)
    assert cache_state(config) == cached

    # instances lost from the cache are fetched again, and only those
    lost = sorted(cache_dir(config).glob(f"{good.series_uid}/*.dcm"))[:2]
    for path in lost:
        path.unlink()
    third = retrieve(config)
    assert (third.fetched, third.cached) == (2, 13)
    assert verdicts(config) == verdicts(folder)


def test_interrupted_retrieval_resumes_without_refetching(tmp_path, hospital, orthanc):
    folder, good, _ = hospital
    config = pacs_site(tmp_path / "pacs-site", orthanc, "dicomweb")
    stored: list[Path] = []

    def stop_after_three(path: Path) -> None:
        stored.append(path)
        if len(stored) == 3:
            raise KeyboardInterrupt          # the operator's Ctrl-C, mid-retrieval

    with pytest.raises(KeyboardInterrupt):
        retrieve(config, progress=stop_after_three)
    files = [p for p in cache_dir(config).rglob("*") if p.is_file()]
    assert sorted(files) == sorted(stored)   # whole instances only: no temp file, no partial one
    kept = cache_state(config)
    # what a kill -9 during a write leaves: half an instance under atomic_path's temp name
    target = stored[0].with_name("1.2.3.4.dcm")
    half = target.with_name(f".{target.name}.abcd1234{''.join(target.suffixes)}")
    assert is_atomic_temp_name(half.name)
    half.write_bytes(stored[0].read_bytes()[:300])
    os.utime(half, (0, 0))

    resumed = retrieve(config)
    assert (resumed.fetched, resumed.cached) == (12, 3)
    assert {k: v for k, v in cache_state(config).items() if k in kept} == kept
    assert verdicts(config) == verdicts(folder)
    assert not half.exists()                                    # removed, never read as a slice
    before = cache_state(config)
    assert len(before) == 15
    assert pasta_fed(["client", "fetch", "--config", str(config.source)]) == 0     # the command: nothing left to fetch
    assert cache_state(config) == before


def test_wrong_pacs_password_is_refused_and_never_shown(tmp_path, hospital, orthanc, caplog, capsys):
    config = pacs_site(tmp_path / "pacs-site", orthanc, "dicomweb", password="wrong-password-123")
    with caplog.at_level(logging.DEBUG), pytest.raises(PacsError, match="HTTP 401") as err:
        retrieve(config)
    assert "wrong-password-123" not in str(err.value) + caplog.text
    caplog.clear()
    assert pasta_fed(["client", "fetch", "--config", str(config.source)]) == 1   # says why, not the password
    err_text = capsys.readouterr().err
    assert "pasta-fed client fetch: error: DICOMweb http" in err_text and "HTTP 401" in err_text
    assert "wrong-password-123" not in err_text + caplog.text
    assert scan_site(config).cases == []


def _file_as_study(files: list[Path], study_uid: str | None, accession: str) -> str:
    """Rewrite a written series into a study of our choosing, with an accession number."""
    for path in files:
        ds = dcmread(path)
        ds.StudyInstanceUID = study_uid or ds.StudyInstanceUID
        ds.AccessionNumber = accession
        ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


@pytest.fixture
def three_studies(tmp_path, w, orthanc):
    """Studies A (one series), B (two series, accession ACC-B) and C (accession ACC-C) in Orthanc."""
    root = tmp_path / "export"
    a, b1, b2, c = (w.pydicom_series(root / name, w.ramp(), patient_id=patient, rng=np.random.default_rng(k))
                    for k, (name, patient) in enumerate((("a", "P0"), ("b1", "P1"), ("b2", "P1"), ("c", "P3"))))
    study_a = _file_as_study(a.files, None, "ACC-A")
    study_b = _file_as_study(b1.files, None, "ACC-B")
    _file_as_study(b2.files, study_b, "ACC-B")
    _file_as_study(c.files, None, "ACC-C")
    orthanc.upload([*a.files, *b1.files, *b2.files, *c.files])
    assert len(orthanc.rest("GET", "/studies").json()) == 3
    return study_a, (a, b1, b2, c)


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_from_labels_fetches_only_the_studies_the_csv_names(tmp_path, three_studies, orthanc, protocol, caplog):
    study_a, (a, b1, b2, c) = three_studies
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,patient_id,study_instance_uid,accession_number,tumor_present\n"
                      f"case-a,P0,{study_a},,yes\n"        # by StudyInstanceUID
                      "case-b,P1,,ACC-B,no\n"                # by AccessionNumber: both its series
                      "case-x,P9,,ACC-NOT-THERE,no\n"        # on no study of this PACS
                      "case-w,P8,,*,no\n"                    # a wildcard would match every study: refused
                      "case-n,P7,,,no\n")                    # names no study
    config = pacs_site(tmp_path / "pacs-site", orthanc, protocol, labels=labels,
                       studies={"modality": "CT", "from_labels": True})
    with caplog.at_level(logging.INFO):
        report = retrieve(config)
    fetched = {p.name for p in cache_dir(config).iterdir()}
    assert fetched == {a.series_uid, b1.series_uid, b2.series_uid}       # never study C's
    assert (report.series, report.instances, report.fetched, report.unmatched) == (3, 24, 24, 1)
    assert "line 5: accession_number '*' is not one" in caplog.text
    assert "ACC-NOT-THERE" in caplog.text
    assert {c.source for c in scan_site(config).cases} == {f"pacs/{s.series_uid}" for s in (a, b1, b2)}


def test_from_labels_needs_a_study_column(tmp_path, orthanc):
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,patient_id,tumor_present\ncase-a,P0,yes\n")
    config = pacs_site(tmp_path / "pacs-site", orthanc, "dicomweb", labels=labels,
                       studies={"from_labels": True})
    with pytest.raises(PacsError, match="from_labels needs a study_instance_uid or accession_number column"):
        retrieve(config)
    assert not cache_dir(config).exists()          # refused before the PACS was asked or the cache made


def test_predict_a_pacs_series_and_store_its_seg_and_sr_back(tmp_path, w, orthanc, capsys):
    """`client predict --store`: the series is fetched into the site's cache, predicted, and its SEG
    and SR land in the same PACS, the SEG referencing every source instance."""
    import pydicom

    from pasta_model.checkpoint import save_checkpoint
    from pasta_model.network import build_model

    ct = np.random.default_rng(3).normal(2100, 60, (24, 64, 64)).astype(np.int16)   # 40 HU soft tissue
    good = w.pydicom_series(tmp_path / "export" / "ct", ct, spacing=(3.0, 3.0, 3.0))
    other = w.pydicom_series(tmp_path / "export" / "other", w.ramp(), patient_id="P002")
    orthanc.upload([*good.files, *other.files])
    config = pacs_site(tmp_path / "pacs-site", orthanc, "dicomweb")
    first = pydicom.dcmread(good.files[0])
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_model("tiny"))
    before = orthanc.instance_count()
    out = tmp_path / "pred"
    guide = fill(command("pasta-fed", "client", "predict", contains="--series-uid"), {
        "hospital.yaml": str(config.source), "1.2.840.1": first.StudyInstanceUID,
        "1.2.840.2": first.SeriesInstanceUID, "pred/": f"{out}/"})
    assert pasta_fed([*guide[1:], "--checkpoint", str(ckpt)]) == 0, capsys.readouterr().err
    assert "stored: 2 instance(s) to DICOMweb" in capsys.readouterr().out
    assert orthanc.instance_count() == before + 2
    assert [p.name for p in cache_dir(config).iterdir()] == [first.SeriesInstanceUID]   # only that series
    assert len(list((cache_dir(config) / first.SeriesInstanceUID).iterdir())) == len(good.files)
    seg = pydicom.dcmread(out / "seg.dcm")
    referenced = {ref.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence
                  for ref in item.ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in good.files}
    modalities = sorted(orthanc.rest("GET", f"/instances/{i}/simplified-tags").json()["Modality"]
                        for i in orthanc.rest("GET", "/instances").json())
    assert modalities.count("SEG") == 1 and modalities.count("SR") == 1


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_jpeg2000_series_arrives_compressed_and_reads_like_the_folder(tmp_path, w, orthanc, protocol):
    """Archives keep lossless-compressed CT: retrieval asks for it as stored (no transcoding),
    and the cached files read to the same HU and geometry as the folder's."""
    import pydicom

    hu = w.ramp(low=-1000, step=11)
    series = w.sitk_series(tmp_path / "export" / "j2k", hu, rng=np.random.default_rng(2))
    written = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in series.files}
    orthanc.upload(series.files)
    config = pacs_site(tmp_path / "pacs-site", orthanc, protocol)
    retrieve(config)
    cached = sorted(cache_dir(config).rglob("*.dcm"))
    assert len(cached) == len(series.files)
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in cached} == written
    (from_pacs,) = scan_site(config).cases
    case = read_case(from_pacs)
    np.testing.assert_array_equal(case.hu_array(), hu.astype(np.float32))
    np.testing.assert_allclose(case.origin, series.origin, atol=1e-6)


def _set_tags(files: list[Path], **tags: str) -> None:
    for path in files:
        ds = dcmread(path)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_study_dates_and_body_parts_select_the_series_fetched(tmp_path, w, orthanc, protocol, caplog):
    """Studies of 2023, 2024 (a chest and a head series) and 2025: the PACS is queried by date
    and body part, and what it answers is checked again (a PACS matches loosely)."""
    root = tmp_path / "export"
    old, chest, head, new = (w.pydicom_series(root / name, w.ramp(), patient_id=f"P{k}",
                                              rng=np.random.default_rng(k)) for k, name in enumerate(
        ("old", "chest", "head", "new")))
    _set_tags(old.files, StudyDate="20230615", BodyPartExamined="CHEST")
    _file_as_study(head.files, _file_as_study(chest.files, None, "ACC-24"), "ACC-24")
    _set_tags(chest.files, StudyDate="20240310", BodyPartExamined="CHEST")
    _set_tags(head.files, StudyDate="20240310", BodyPartExamined="HEAD")
    _set_tags(new.files, StudyDate="20250101", BodyPartExamined="ABDOMEN")
    orthanc.upload([*old.files, *chest.files, *head.files, *new.files])

    in_2024 = pacs_site(tmp_path / "site-2024", orthanc, protocol, studies={
        "study_date_from": "2024-01-01", "study_date_to": "2024-12-31", "body_parts": ["chest"]})
    with caplog.at_level(logging.INFO):
        report = retrieve(in_2024)
    assert {p.name for p in cache_dir(in_2024).iterdir()} == {chest.series_uid}
    assert (report.series, report.instances) == (1, len(chest.files))
    assert "1 of 2 series left out (BodyPartExamined missing or not one of chest)" in caplog.text

    trunk = pacs_site(tmp_path / "site-trunk", orthanc, protocol, studies={"body_parts": ["CHEST", "ABDOMEN"]})
    retrieve(trunk)
    assert {p.name for p in cache_dir(trunk).iterdir()} == {old.series_uid, chest.series_uid, new.series_uid}

    since_2024 = pacs_site(tmp_path / "site-since", orthanc, protocol, studies={"study_date_from": "2024-01-01"})
    retrieve(since_2024)
    assert {p.name for p in cache_dir(since_2024).iterdir()} == {chest.series_uid, head.series_uid, new.series_uid}


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_series_filed_under_two_studies_and_exported_twice_reads_like_its_folder(tmp_path, w, orthanc, protocol,
                                                                                    capsys):
    """Archives' oddities: one SeriesInstanceUID filed under two studies, and an export holding
    some instances twice (in another folder). The PACS keeps one copy of each instance; the
    folder is read one file per instance, so both give one whole series, the same verdict."""
    images = tmp_path / "export"
    series = w.pydicom_series(images / "part-1", w.ramp(), patient_id="P001")
    second = images / "part-2"
    second.mkdir()
    moved = [path.rename(second / path.name) for path in series.files[4:]]
    _file_as_study(moved, generate_uid(), "ACC-2")       # the second half under another study
    copies = images / "copy"
    copies.mkdir()
    for path in series.files[:2]:
        (copies / path.name).write_bytes(path.read_bytes())
    orthanc.upload([*series.files[:4], *moved, *copies.iterdir()])
    assert orthanc.instance_count() == 8 and len(orthanc.rest("GET", "/studies").json()) == 2

    (tmp_path / "folder-site").mkdir()
    folder = load_site_config(w.site_yaml(tmp_path / "folder-site", images))
    config = pacs_site(tmp_path / "pacs-site", orthanc, protocol)
    report = retrieve(config)
    assert (report.series, report.instances) == (1, 8)
    assert len(list((cache_dir(config) / series.series_uid).iterdir())) == 8
    assert verdicts(config) == verdicts(folder)
    assert cli_check(config, capsys) == cli_check(folder, capsys)
    (case,) = check_site(config).cases
    assert (case.case_id, case.status, tuple(case.shape)) == (series.case_id, "ok", series.hu.shape[::-1])
    np.testing.assert_allclose(read_case(scan_site(config).cases[0]).hu_array(), series.hu, atol=1e-3)


def test_whole_studies_are_predicted_and_stored_as_one_batch(tmp_path, w, orthanc, capsys, monkeypatch):
    """The guide's `client predict --studies FILE --store` over DIMSE (C-STORE): every CT series of each
    listed study with the model loaded once, a head series left out by body_parts, a study the PACS
    lacks named in batch.json while the others go on."""
    import pydicom

    import pasta_model.predict as predict_module
    from pasta_model.checkpoint import save_checkpoint
    from pasta_model.network import build_model

    def ct(k: int) -> np.ndarray:
        return np.random.default_rng(k).normal(2100, 60, (12, 48, 48)).astype(np.int16)

    root = tmp_path / "export"
    one, chest, head = (w.pydicom_series(root / name, ct(k), spacing=(3.0, 3.0, 3.0), patient_id=f"P{k}",
                                         rng=np.random.default_rng(k))
                        for k, name in enumerate(("one", "chest", "head")))
    _set_tags([*one.files, *chest.files], BodyPartExamined="CHEST")
    _set_tags(head.files, BodyPartExamined="HEAD")
    study_two = _file_as_study(chest.files, None, "ACC-2")
    _file_as_study(head.files, study_two, "ACC-2")
    orthanc.upload([*one.files, *chest.files, *head.files])
    study_one, absent = str(pydicom.dcmread(one.files[0]).StudyInstanceUID), generate_uid()
    studies = tmp_path / "studies.txt"
    studies.write_text(f"# this week's studies\n{study_one}\n\n{absent}   # not on this PACS\n{study_two}\n")
    config = pacs_site(tmp_path / "pacs-site", orthanc, "dimse", studies={"body_parts": ["CHEST"]})
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_model("tiny"))
    loads, load = [], predict_module.load_checkpoint

    def counted_load(*args, **kwargs):
        loads.append(args)
        return load(*args, **kwargs)

    monkeypatch.setattr(predict_module, "load_checkpoint", counted_load)
    out = tmp_path / "predictions"
    before = orthanc.instance_count()

    guide = fill(command("pasta-fed", "client", "predict", contains="--studies"), {
        "hospital.yaml": str(config.source), "studies.txt": str(studies), "predictions/": f"{out}/"})
    assert pasta_fed([*guide[1:], "--checkpoint", str(ckpt)]) == 1          # one study failed
    said = capsys.readouterr()
    assert f"predicted 2 series of 3 study(ies) into {out}" in said.out
    assert f"  {absent}: study {absent}: the PACS holds no CT series to predict" in said.out
    outcome = json.loads((out / "batch.json").read_text())
    assert outcome == {one.series_uid: "ok", chest.series_uid: "ok", absent: outcome[absent]}
    assert len(loads) == 1                                                 # the model loaded once
    for series in (one, chest):
        seg = pydicom.dcmread(out / series.series_uid / "seg.dcm")
        referenced = {ref.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence
                      for ref in item.ReferencedInstanceSequence}
        assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in series.files}
    assert not (out / head.series_uid).exists() and not (cache_dir(config) / head.series_uid).exists()
    assert orthanc.instance_count() == before + 4                          # a SEG and an SR for each, by C-STORE
    stored = [orthanc.rest("GET", f"/instances/{i}/simplified-tags").json() for i in
              orthanc.rest("GET", "/instances").json()]
    assert sorted(t["Modality"] for t in stored if t["Modality"] != "CT") == ["SEG", "SEG", "SR", "SR"]
