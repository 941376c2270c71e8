"""Ingestion reads what other tools wrote: exact HU, exact geometry, clear verdicts."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from client.check import check_site
from client.ingest import IngestError, discover_cases, labels_for, read_case, read_labels, scan_site
from client.site_config import load_site_config
from pasta_model.dicom_series import DicomSeriesError
from pasta_model.predict import nifti_input

JPEG2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def _site(tmp_path, w, **kw):
    return load_site_config(w.site_yaml(tmp_path, tmp_path / "images", **kw))


def _by_id(scan):
    found = {c.case_id: c for c in scan.cases}
    found.update({r.case_id: r for r in scan.rejected})
    return found


def test_pydicom_series_reads_exact_hu_and_oblique_geometry(tmp_path, w, rng):
    stored = w.ramp()
    slopes = np.linspace(0.5, 2.0, stored.shape[0])        # a different rescale per slice
    intercepts = np.linspace(-1024, -1000, stored.shape[0])
    row, col = w.rotation_z(30)
    series = w.pydicom_series(tmp_path / "images" / "a" / "b", stored, slope=slopes,
                              intercept=intercepts, row=row, col=col, rng=rng)
    cases = discover_cases(_site(tmp_path, w))
    assert [c.case_id for c in cases] == [series.case_id]
    assert list(cases[0].files) == series.files                 # sorted by position, not name
    case = read_case(cases[0])
    assert case.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(case.hu_array(), series.hu, atol=1e-3)
    np.testing.assert_allclose(case.spacing, series.spacing, atol=1e-6)
    np.testing.assert_allclose(case.origin, series.origin, atol=1e-6)
    np.testing.assert_allclose(case.direction, series.direction, atol=1e-6)
    assert case.shape == (16, 16, 8)


def test_slices_stored_head_first_are_ordered_along_the_normal(tmp_path, w, rng):
    stored = w.ramp()
    # Positions decrease with slice index: the reader must still go along +normal.
    series = w.pydicom_series(tmp_path / "images", stored, spacing=(0.7, 0.8, -2.0), rng=rng)
    case = read_case(discover_cases(_site(tmp_path, w))[0])
    np.testing.assert_allclose(case.hu_array(), series.hu[::-1], atol=1e-3)
    lowest = np.asarray(series.origin) + (stored.shape[0] - 1) * -2.0 * np.array([0, 0, 1.0])
    np.testing.assert_allclose(case.origin, lowest, atol=1e-6)
    np.testing.assert_allclose(case.spacing, (0.7, 0.8, 2.0), atol=1e-6)


def test_jpeg2000_series_written_by_simpleitk_reads_exact_hu(tmp_path, w, rng):
    hu = w.ramp(low=-1000, step=11)
    series = w.sitk_series(tmp_path / "images" / "j2k", hu, rng=rng)
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in series.files}
    assert syntaxes and syntaxes <= JPEG2000, syntaxes       # really compressed
    case = read_case(discover_cases(_site(tmp_path, w))[0])
    np.testing.assert_array_equal(case.hu_array(), hu.astype(np.float32))
    np.testing.assert_allclose(case.origin, series.origin, atol=1e-6)
    np.testing.assert_allclose(case.spacing, series.spacing, atol=1e-6)


def test_stray_mr_slice_is_skipped_and_ct_series_beside_it_reads(tmp_path, w, rng):
    folder = tmp_path / "images" / "study"
    ct = w.pydicom_series(folder, w.ramp(), rng=rng)
    mr = w.pydicom_series(folder, w.ramp(shape=(1, 16, 16)), modality="MR",
                          sop_class=w.MRImageStorage, rng=rng)
    # and an MR slice that (wrongly) carries the CT series' UID
    w.pydicom_series(folder, w.ramp(shape=(1, 16, 16)), modality="MR",
                     sop_class=w.MRImageStorage, series_uid=ct.series_uid, rng=rng)
    scan = scan_site(_site(tmp_path, w))
    found = _by_id(scan)
    assert found[mr.case_id].status == "skipped"
    assert "Modality MR" in found[mr.case_id].reason
    assert [c.case_id for c in scan.cases] == [ct.case_id]
    np.testing.assert_allclose(read_case(scan.cases[0]).hu_array(), ct.hu, atol=1e-3)


def test_truncated_slice_fails_its_series_only(tmp_path, w, rng):
    broken = w.pydicom_series(tmp_path / "images" / "s1", w.ramp(), patient_id="BROKEN", rng=rng)
    good = w.pydicom_series(tmp_path / "images" / "s2", w.ramp(), patient_id="GOOD", rng=rng)
    victim = broken.files[3]
    victim.write_bytes(victim.read_bytes()[:-300])             # pixel data cut short
    scan = scan_site(_site(tmp_path, w))
    found = _by_id(scan)
    assert found[broken.case_id].status == "error"
    assert victim.name in found[broken.case_id].reason
    assert "truncated" in found[broken.case_id].reason
    assert [c.case_id for c in scan.cases] == [good.case_id]
    np.testing.assert_allclose(read_case(scan.cases[0]).hu_array(), good.hu, atol=1e-3)


def test_file_damaged_after_discovery_fails_read_naming_the_file(tmp_path, w, rng):
    series = w.pydicom_series(tmp_path / "images", w.ramp(), rng=rng)
    (source,) = discover_cases(_site(tmp_path, w))
    victim = series.files[6]
    victim.write_bytes(victim.read_bytes()[:-300])
    with pytest.raises(IngestError) as err:
        read_case(source)
    assert victim.name in str(err.value) and "truncated" in str(err.value)


@pytest.mark.parametrize("keep_bytes", [300, 700])
def test_header_truncated_file_fails_its_series(tmp_path, w, rng, keep_bytes):
    series = w.pydicom_series(tmp_path / "images", w.ramp(), rng=rng)
    victim = series.files[2]
    victim.write_bytes(victim.read_bytes()[:keep_bytes])       # cut inside the header
    scan = scan_site(_site(tmp_path, w))
    assert scan.cases == []
    errors = [r for r in scan.rejected if r.status == "error"]
    assert any(victim.name in r.reason for r in errors)        # named, not silently dropped
    assert not [r for r in scan.rejected if r.status == "skipped"]


def test_truncated_jpeg2000_slice_fails_its_series_naming_the_file(tmp_path, w, rng):
    series = w.sitk_series(tmp_path / "images" / "j2k", w.ramp(low=-1000), rng=rng)
    good = w.pydicom_series(tmp_path / "images" / "plain", w.ramp(), rng=rng)
    victim = series.files[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    checks = {c.case_id: c for c in check_site(_site(tmp_path, w)).cases}
    assert checks[series.case_id].status == "error"
    assert victim.name in checks[series.case_id].reason
    assert checks[good.case_id].status == "ok"


def test_missing_slice_is_an_error_naming_the_gap(tmp_path, w, rng):
    series = w.pydicom_series(tmp_path / "images", w.ramp(), rng=rng)
    series.files[4].unlink()
    scan = scan_site(_site(tmp_path, w))
    assert scan.cases == []
    (rejected,) = scan.rejected
    assert rejected.status == "error" and "missing slice" in rejected.reason
    assert "5.000 mm" in rejected.reason                      # gap of two 2.5 mm steps


def test_predict_reader_refuses_a_missing_slice_naming_the_folder_and_the_gap(tmp_path, w, rng):
    folder = tmp_path / "images" / "series"
    series = w.pydicom_series(folder, w.ramp(), rng=rng)
    series.files[4].unlink()                                  # a slice from the middle
    with pytest.raises(DicomSeriesError) as err:
        nifti_input(folder, tmp_path)
    message = str(err.value)
    assert isinstance(err.value, ValueError)                  # predict's CLI reports it, exit 2
    assert message.startswith(f"{folder}: ") and "missing slice" in message
    assert "gap of 5.000 mm" in message                       # two 2.5 mm steps
    assert not (tmp_path / "input.nii.gz").exists()


def test_agent_and_predict_read_a_series_to_the_same_hu_and_geometry(tmp_path, w, rng):
    folder = tmp_path / "images" / "series"
    stored = w.ramp()
    row, col = w.rotation_z(30)
    series = w.pydicom_series(folder, stored, slope=np.linspace(0.5, 2.0, stored.shape[0]),
                              intercept=np.linspace(-1024, -1000, stored.shape[0]), row=row, col=col,
                              spacing=(0.7, 0.8, -2.5), rng=rng)
    agent = read_case(discover_cases(_site(tmp_path, w))[0]).image
    work = tmp_path / "work"
    work.mkdir()
    nii, predicted = nifti_input(folder, work)
    assert predicted.GetPixelID() == agent.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(predicted), sitk.GetArrayFromImage(agent))
    for get in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(predicted, get)() == getattr(agent, get)(), get
    np.testing.assert_allclose(sitk.GetArrayFromImage(agent), series.hu[::-1], atol=1e-3)
    written = sitk.ReadImage(str(nii))                        # what predict's model pipeline loads
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(agent))
    np.testing.assert_allclose(written.GetOrigin(), agent.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), agent.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), agent.GetDirection(), atol=1e-5)


def test_duplicate_slice_is_an_error(tmp_path, w, rng):
    series = w.pydicom_series(tmp_path / "images", w.ramp(), rng=rng)
    ds = pydicom.dcmread(series.files[5])
    ds.ImagePositionPatient = pydicom.dcmread(series.files[4]).ImagePositionPatient
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series.files[5])
    (rejected,) = scan_site(_site(tmp_path, w)).rejected
    assert "duplicate slice position" in rejected.reason


def test_two_files_claiming_one_instance_at_different_positions_are_an_error(tmp_path, w, rng):
    """Copies of one instance are read once (test_pacs); a file reusing a SOPInstanceUID elsewhere is no copy."""
    series = w.pydicom_series(tmp_path / "images", w.ramp(), rng=rng)
    ds = pydicom.dcmread(series.files[5])
    ds.SOPInstanceUID = pydicom.dcmread(series.files[4]).SOPInstanceUID
    ds.save_as(series.files[5])
    (rejected,) = scan_site(_site(tmp_path, w)).rejected
    assert f"SOPInstanceUID {ds.SOPInstanceUID} is in two files at different positions" in rejected.reason
    with pytest.raises(DicomSeriesError, match="not copies of one instance"):
        nifti_input(tmp_path / "images", tmp_path)             # predict refuses it the same way


def test_non_dicom_files_and_localizers_are_skipped(tmp_path, w, rng):
    images = tmp_path / "images"
    ct = w.pydicom_series(images / "ct", w.ramp(), rng=rng)
    scout = w.pydicom_series(images / "scout", w.ramp(shape=(2, 16, 16)), rng=rng,
                             image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    (images / "notes.txt").write_text("report for the radiologist\n")
    found = _by_id(scan_site(_site(tmp_path, w)))
    assert found["notes.txt"].status == "skipped" and "not a DICOM" in found["notes.txt"].reason
    assert "localizer" in found[scout.case_id].reason
    assert found[ct.case_id].kind == "dicom"


def test_nifti_written_by_nibabel_keeps_hu_and_geometry(tmp_path, w):
    hu = w.ramp().astype(np.float32)
    w.nifti(tmp_path / "images" / "case007.nii.gz", hu, spacing=(0.8, 0.9, 2.0),
            origin_ras=(10.0, 20.0, -5.0))
    (case,) = discover_cases(_site(tmp_path, w, one_scan_per_patient=True))
    assert case.case_id == "case007" and case.kind == "nifti"
    loaded = read_case(case)
    np.testing.assert_array_equal(loaded.hu_array(), hu)
    np.testing.assert_allclose(loaded.origin, (-10.0, -20.0, -5.0), atol=1e-5)   # RAS -> LPS
    np.testing.assert_allclose(loaded.spacing, (0.8, 0.9, 2.0), atol=1e-6)
    np.testing.assert_allclose(loaded.direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-6)


def test_mask_on_the_image_grid_is_read_and_a_shifted_one_is_an_error(tmp_path, w):
    hu = w.ramp().astype(np.float32)
    mask = np.zeros_like(hu, dtype=np.uint8)
    mask[2:4, 5:9, 5:9] = 2
    w.nifti(tmp_path / "images" / "good.nii.gz", hu)
    w.nifti(tmp_path / "images" / "shifted.nii.gz", hu)
    w.nifti(tmp_path / "masks" / "good.nii.gz", mask)
    w.nifti(tmp_path / "masks" / "shifted.nii.gz", mask, origin_ras=(10.0, 22.0, -5.0))
    cases = {c.case_id: c for c in discover_cases(_site(tmp_path, w, masks=tmp_path / "masks",
                                                         one_scan_per_patient=True))}
    good = read_case(cases["good"])
    assert sitk.GetArrayFromImage(good.mask).sum() == 32 and good.mask.GetPixelID() == sitk.sitkUInt8
    with pytest.raises(IngestError, match="mask does not match its image: origin"):
        read_case(cases["shifted"])


def test_labels_map_series_to_case_ids_and_bad_cells_name_line_and_column(tmp_path, w, rng):
    series = w.pydicom_series(tmp_path / "images", w.ramp(), patient_id="P9", rng=rng)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "case_id,patient_id,series_uid,tumor_present,t_stage,lesion_type,organ,survival_months,survival_event\n"
        f"liver_01,PAT-1,{series.series_uid},1,T2,liver_cancer,liver,14.5,1\n"
        "liver_02,PAT-2,,yes,T7,,,,\n"
        "liver_03,PAT-3,,0,,,,,\n"
        "liver_04,PAT-4,,1,,liver_cyst,kidney,,\n")
    config = _site(tmp_path, w, labels=labels)
    (case,) = discover_cases(config)
    assert case.case_id == "liver_01" and case.patient_id == "PAT-1"
    table = read_labels(labels)
    assert set(table.labels) == {"liver_01", "liver_03"}
    assert any("line 3" in e and "column t_stage" in e and "T7" in e for e in table.errors)
    assert any("line 5" in e and "column organ" in e for e in table.errors)
    got = labels_for(config)["liver_01"]
    assert (got.tumor_present, got.t_stage, got.survival_months, got.survival_event) == (True, "T2", 14.5, True)
