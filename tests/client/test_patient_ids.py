"""One DP sample is one patient: a case the agent cannot attach to a patient is not used."""
from __future__ import annotations

import numpy as np

from client.ingest import scan_site
from client.site_config import load_site_config


def _scan(tmp_path, w, **kw):
    return scan_site(load_site_config(w.site_yaml(tmp_path, tmp_path / "images", **kw)))


def test_nifti_without_a_patient_id_is_an_error_unless_every_scan_is_a_patient(tmp_path, w):
    w.nifti(tmp_path / "images" / "case_a.nii.gz", w.ramp().astype(np.float32))
    scan = _scan(tmp_path, w)
    assert scan.cases == []
    (rejected,) = scan.rejected
    assert (rejected.case_id, rejected.status) == ("case_a", "error")
    assert "no patient id" in rejected.reason and "data.one_scan_per_patient: true" in rejected.reason
    (case,) = _scan(tmp_path, w, one_scan_per_patient=True).cases
    assert (case.case_id, case.patient_id) == ("case_a", "case_a")


def test_nifti_takes_its_patient_id_from_the_labels_csv(tmp_path, w):
    for name in ("scan_1", "scan_2", "scan_3"):
        w.nifti(tmp_path / "images" / f"{name}.nii.gz", w.ramp().astype(np.float32))
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,patient_id,tumor_present\nscan_1,P1,1\nscan_2,P1,0\nscan_3,,1\n")
    scan = _scan(tmp_path, w, labels=labels)
    assert {c.case_id: c.patient_id for c in scan.cases} == {"scan_1": "P1", "scan_2": "P1"}
    assert [(r.case_id, "no patient id" in r.reason) for r in scan.rejected] == [("scan_3", True)]


def test_dicom_with_an_empty_patient_id_is_an_error_unless_every_scan_is_a_patient(tmp_path, w, rng):
    named = w.pydicom_series(tmp_path / "images" / "a", w.ramp(), patient_id="PAT7", rng=rng)
    anonymous = w.pydicom_series(tmp_path / "images" / "b", w.ramp(), patient_id="", rng=rng)
    scan = _scan(tmp_path, w)
    assert [(c.case_id, c.patient_id) for c in scan.cases] == [(named.case_id, "PAT7")]
    assert [(r.case_id, "empty DICOM PatientID" in r.reason) for r in scan.rejected] == [(anonymous.case_id, True)]
    flagged = _scan(tmp_path, w, one_scan_per_patient=True)
    assert {c.case_id: c.patient_id for c in flagged.cases} == {named.case_id: "PAT7",
                                                                anonymous.case_id: anonymous.case_id}
