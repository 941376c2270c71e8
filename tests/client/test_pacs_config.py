"""The site YAML's pacs section: validated like the rest, errors naming the file and the key."""
from __future__ import annotations

import pytest
import yaml

from client.site_config import SiteConfigError, load_site_config


@pytest.fixture
def site(tmp_path) -> dict:
    (tmp_path / "pacs.json").write_text('{"username": "u", "password": "p"}')
    return {
        "site": "hospital-a",
        "pacs": {"dicomweb": "http://127.0.0.1:8042/dicom-web", "credentials": "pacs.json",
                 "studies": {"modality": "CT"}},
        "privacy": {"max_epsilon": 8.0, "delta": 1.0e-5, "max_grad_norm": 1.0},
        "state_dir": "state",
    }


def _load(tmp_path, config: dict):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_site_config(path)


def test_a_pacs_may_replace_the_images_folder(tmp_path, site):
    config = _load(tmp_path, site)
    assert config.data.images is None and config.data_folders == ()
    assert config.pacs.dicomweb == "http://127.0.0.1:8042/dicom-web"
    assert config.pacs.credentials == (tmp_path / "pacs.json").resolve()
    assert config.pacs.studies.modality == "CT"


def test_studies_from_labels_is_off_unless_asked(tmp_path, site):
    assert _load(tmp_path, site).pacs.studies.from_labels is False
    site["pacs"]["studies"] = {"from_labels": True}
    studies = _load(tmp_path, site).pacs.studies
    assert (studies.from_labels, studies.modality) == (True, "CT")


def test_study_dates_and_body_parts(tmp_path, site):
    site["pacs"]["studies"] = {"study_date_from": "2024-01-01", "body_parts": ["chest", "ABDOMEN"]}
    studies = _load(tmp_path, site).pacs.studies
    assert studies.study_dates == "20240101-"              # open-ended DICOM range
    assert [studies.admits_date(d) for d in ("20231231", "20240101", "20991231", "")] == [False, True, True, False]
    assert [studies.admits_body_part(b) for b in ("CHEST", "abdomen ", "HEAD", "")] == [True, True, False, False]
    site["pacs"]["studies"] = {"study_date_from": "2024-01-01", "study_date_to": "2024-03-31"}
    studies = _load(tmp_path, site).pacs.studies
    assert studies.study_dates == "20240101-20240331"
    assert [studies.admits_date(d) for d in ("20240331", "20240401")] == [True, False]
    assert studies.admits_body_part("")                     # no body_parts: every series


def test_dimse_and_a_pacs_beside_the_folder(tmp_path, site):
    (tmp_path / "ct").mkdir()
    site["data"] = {"images": "ct"}
    site["pacs"] = {"dimse": {"host": "pacs.local", "port": 104, "called_ae": "ORTHANC"}}
    config = _load(tmp_path, site)
    assert config.data.images == (tmp_path / "ct").resolve()
    assert (config.pacs.dimse.port, config.pacs.dimse.calling_ae) == (104, "PASTAFED")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("pacs"), "data: is required"),
    (lambda c: c.update(data={"one_scan_per_patient": True}), None),
    (lambda c: c["pacs"].update(dimse={"host": "h", "port": 104, "called_ae": "A"}),
     "pacs: name exactly one of dicomweb or dimse"),
    (lambda c: c["pacs"].update(dicomweb="ftp://pacs"), "pacs.dicomweb: must be an http:// or https:// URL"),
    (lambda c: c["pacs"].update(dicomweb="https://user:pw@pacs/dicom-web"), "those go in pacs.credentials"),
    (lambda c: c["pacs"].update(credentials="missing.json"), "pacs.credentials: file not found"),
    (lambda c: c["pacs"].update(studies={"modality": "MR"}), "pacs.studies.modality: must be one of CT"),
    (lambda c: c["pacs"].update(studies={"accession": "1"}), "pacs.studies.accession: unknown key"),
    (lambda c: c["pacs"].update(studies={"from_labels": "yes"}), "pacs.studies.from_labels: must be"),
    (lambda c: c["pacs"].update(wado="x"), "pacs.wado: unknown key (valid keys: credentials, dicomweb, dimse,"),
    (lambda c: c.update(pacs={"dimse": {"host": "h", "port": "104", "called_ae": "A"}}),
     "pacs.dimse.port: must be an integer, got '104'"),
    (lambda c: c.update(pacs={"dimse": {"host": "h", "port": 70000, "called_ae": "A"}}),
     "pacs.dimse.port: must be <= 65535"),
    (lambda c: c.update(pacs={"dimse": {"host": "h", "port": 104, "called_ae": "A" * 17}}),
     "pacs.dimse.called_ae: must be a DICOM AE title"),
    (lambda c: c.update(pacs="http://pacs"), "pacs: must be a mapping"),
    (lambda c: c["pacs"].update(studies={"study_date_from": "2024-13-01"}), "pacs.studies.study_date_from: "),
    (lambda c: c["pacs"].update(studies={"study_date_from": "2024-06-01", "study_date_to": "2024-01-01"}),
     "study_date_from 2024-06-01 is after study_date_to 2024-01-01"),
    (lambda c: c["pacs"].update(studies={"from_labels": True, "study_date_to": "2024-01-01"}),
     "pacs.studies: from_labels selects studies by the labels CSV, study_date_from/study_date_to by date"),
    (lambda c: c["pacs"].update(studies={"body_parts": ["CHEST", "*"]}),
     "pacs.studies.body_parts.1: must be a DICOM BodyPartExamined value"),
])
def test_bad_pacs_settings_name_the_file_and_key(tmp_path, site, edit, message):
    edit(site)
    if message is None:       # a data section without images is fine beside a pacs
        assert _load(tmp_path, site).data.one_scan_per_patient
        return
    with pytest.raises(SiteConfigError) as err:
        _load(tmp_path, site)
    assert str(err.value).startswith(str((tmp_path / "site.yaml").resolve()) + ": ")
    assert message in str(err.value)


def test_no_images_and_no_pacs_is_refused(tmp_path, site):
    site.pop("pacs")
    site["data"] = {"one_scan_per_patient": True}
    with pytest.raises(SiteConfigError, match=r"data\.images: is required \(or name a pacs\)"):
        _load(tmp_path, site)
