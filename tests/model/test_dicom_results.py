"""predict on a DICOM series writes a SEG and a TID 1500 SR that reference it and agree with mask.nii.gz/report.json."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from deployment.deploy_guides import command, fill
from orthanc_pacs import PASSWORD, USER, orthanc_fixture  # noqa: F401
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pasta_model.checkpoint import save_checkpoint
from pasta_model.dicom_results import write_dicom_results
from pasta_model.dicom_series import read_series_folder
from pasta_model.network import build_model

ROWS, COLS, SLICES = 40, 48, 36     # rows != columns, so a transposed mask cannot pass
SPACING = (3.0, 3.5, 4.0)           # row (y) spacing, column (x) spacing, slice step (mm)


def write_ct_series(folder, volume_zyx: np.ndarray, frame_of_reference: bool = True) -> list[str]:
    """A minimal but complete CT Image Storage series, written in scrambled file order; returns SOP UIDs by slice."""
    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    uids = []
    for k in range(volume_zyx.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator, ds.KVP, ds.AcquisitionNumber = "", 120, 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, 5.0, 30.0 + k * SPACING[2]]
        ds.SliceThickness, ds.PixelSpacing = SPACING[2], [SPACING[0], SPACING[1]]
        ds.Rows, ds.Columns = volume_zyx.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = volume_zyx[k].astype(np.int16).tobytes()
        if not frame_of_reference:
            del ds.FrameOfReferenceUID
        ds.save_as(folder / f"{(k * 7) % volume_zyx.shape[0]:03d}-{k}.dcm", enforce_file_format=True)
        uids.append(uid)
    return uids


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_results")
    rng = np.random.default_rng(0)
    vol = rng.normal(40, 10, (SLICES, ROWS, COLS))
    vol[10:20, 10:25, 20:30] = 200       # a bright blob
    uids = write_ct_series(root / "series", vol)
    torch.manual_seed(0)
    save_checkpoint(root / "model.safetensors", build_model("tiny"))
    return root, uids


def frame_sources(seg) -> list[str]:
    return [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in seg.PerFrameFunctionalGroupsSequence]


def dciodvfy_errors(path) -> tuple[list[str], str]:
    run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    return [line for line in out.splitlines() if line.startswith(("Error", "Abort"))], out


def test_seg_puts_a_known_voxel_on_the_same_row_column_and_source_instance(series, tmp_path):
    root, uids = series
    image = read_series_folder(root / "series")
    mask = np.zeros((SLICES, ROWS, COLS), np.uint8)
    mask[6, 3, 17] = 1                  # slice 6, row 3, column 17
    report = {"preset": "tiny", "lesions": [], "primary_lesion": {}, "detection": {"any": 0.5}}
    paths = write_dicom_results(root / "series", image, mask, report, tmp_path)
    seg = hd.seg.segread(paths["seg"])
    frames = frame_sources(seg)
    assert sorted(frames) == sorted(uids) and seg.NumberOfFrames == SLICES
    k, r, c = np.argwhere(seg.pixel_array)[0]
    assert (frames[k], r, c) == (uids[6], 3, 17) and seg.pixel_array.sum() == 1
    # and the same voxel in physical space: SimpleITK's index (x=column, y=row, z=slice)
    ds = pydicom.dcmread(next(p for p in (root / "series").iterdir() if pydicom.dcmread(p).SOPInstanceUID == uids[6]))
    expect = np.asarray(ds.ImagePositionPatient, float) + [17 * SPACING[1], 3 * SPACING[0], 0]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((17, 3, 6)), expect, atol=1e-4)


@pytest.fixture(scope="module")
def predicted(series, tmp_path_factory):
    """predict on the series with the segmentation forced to two boxes (an untrained model finds nothing)."""
    root, _ = series
    import pasta_model.predict as predict_mod

    def two_boxes(model, img, dev):
        prob = torch.zeros(img.shape[1:])
        n = prob.shape
        prob[n[0] // 4: n[0] // 2, n[1] // 4: n[1] // 2, n[2] // 3: 2 * n[2] // 3] = 1
        prob[3 * n[0] // 4:, 3 * n[1] // 4:, : n[2] // 4] = 1
        return prob

    mp = pytest.MonkeyPatch()
    mp.setattr(predict_mod, "segment_volume", two_boxes)
    out = tmp_path_factory.mktemp("pred")
    from simulation.cli import main as cli_main
    try:
        assert cli_main(["predict", "--checkpoint", str(root / "model.safetensors"), "--image", str(root / "series"),
                         "--out", str(out), "--device", "cpu"]) == 0
    finally:
        mp.undo()
    return out, json.loads((out / "report.json").read_text())


def test_predict_writes_a_seg_matching_mask_nii_on_every_source_slice(series, predicted):
    _, uids = series
    out, report = predicted
    assert report["dicom"] == {"seg": str(out / "seg.dcm"), "sr": str(out / "sr.dcm")}
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.SegmentationType == "BINARY" and seg.NumberOfFrames == SLICES     # one frame per source slice
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == set(uids) and sorted(frame_sources(seg)) == sorted(uids)
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == "lesion" and desc.SegmentAlgorithmType == "AUTOMATIC"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.MorphologicallyAbnormalStructure.value
    assert desc.SegmentAlgorithmName == "PASTA-Fed"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask.nii.gz")))     # (slice, row, column)
    assert mask.shape == (SLICES, ROWS, COLS) and mask.sum() > 0
    by_slice = np.stack([seg.pixel_array[frame_sources(seg).index(u)] for u in uids])
    assert np.array_equal(by_slice, mask)


def test_predict_writes_an_sr_with_one_group_per_lesion_and_report_json_volumes(series, predicted):
    _, uids = series
    out, report = predicted
    seg = pydicom.dcmread(out / "seg.dcm")
    assert len(report["lesions"]) == 2
    sr = hd.sr.srread(out / "sr.dcm")
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(report["lesions"])
    for group, lesion in zip(groups, report["lesions"]):
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(lesion["volume_ml"] * 1000) and volume.unit.value == "mm3"
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(lesion["longest_diameter_mm"])
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [1]
        # the group's source images are the lesion's slices
        z0, z1 = lesion["bbox_voxel"][2]
        assert {i.referenced_sop_instance_uid for i in ref.source_images_for_segmentation} == set(uids[z0:z1 + 1])
    primary = report["primary_lesion"]
    evaluated = {q.name.meaning: q.value.meaning for q in groups[0].get_qualitative_evaluations()}
    assert evaluated["Shape"] == primary["shape"]["value"].replace("_", " ")
    (whole,) = sr.content.get_image_measurement_groups()
    probs = [m.value for m in whole.get_measurements(name=codes.DCM.ProbabilityOfCancer)]
    assert sorted(probs) == pytest.approx(sorted(report["detection"].values()))


@pytest.mark.parametrize("name", ["seg.dcm", "sr.dcm"])
def test_dciodvfy_finds_no_errors(predicted, name):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy missing: apt-get install -y dicom3tools (make venv does it as root)")
    out, _ = predicted
    errors, text = dciodvfy_errors(out / name)
    assert not errors, text
    assert text.splitlines()[0] == {"seg.dcm": "Segmentation", "sr.dcm": "Comprehensive3DSR"}[name], text


class StowServer(ThreadingHTTPServer):
    """A one-route STOW-RS endpoint: records each POST /studies, answers `status`, listing a failed SOP if `failed`."""

    def __init__(self, status: int = 200, failed: bool = False):
        self.status, self.failed, self.posts = status, failed, []
        super().__init__(("127.0.0.1", 0), StowHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class StowHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((self.path, self.headers["Content-Type"], body))
        answer = {"00081198": {"vr": "SQ", "Value": [{}]}} if self.server.failed else {}
        data = json.dumps(answer).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stow():
    servers = []

    def start(status: int = 200, failed: bool = False) -> StowServer:
        server = StowServer(status, failed)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_predict_store_leaves_seg_and_sr_in_a_real_orthanc(series, orthanc, tmp_path, capsys):
    """The issue's check: after `predict --store`, the PACS holds a SEG on the source frames and an SR."""
    from simulation.cli import main as cli_main
    root, uids = series
    orthanc.upload(sorted((root / "series").iterdir()))
    before = orthanc.instance_count()
    login = tmp_path / "pacs.json"
    login.write_text(json.dumps({"username": USER, "password": PASSWORD}))
    out = tmp_path / "pred"
    guide = fill(command("pasta-fed", "predict", contains="--store"), {   # the hospital guide's command
        "/data/ct/series-001": str(root / "series"), "pred/": f"{out}/", "https://pacs.example.org/dicom-web":
        orthanc.dicomweb, "/etc/pasta-fed/pacs.json": str(login)})
    assert cli_main([*guide[1:], "--checkpoint", str(root / "model.safetensors"), "--device", "cpu"]) == 0
    assert f"stored: 2 instance(s) to {orthanc.dicomweb}" in capsys.readouterr().out
    assert orthanc.instance_count() == before + 2
    stored = {}
    for instance in orthanc.rest("GET", "/instances").json():
        ds = pydicom.dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{instance}/file").content))
        stored[ds.Modality] = ds
    seg, sr = hd.seg.Segmentation.from_dataset(stored["SEG"]), stored["SR"]
    assert seg.SOPInstanceUID == pydicom.dcmread(out / "seg.dcm").SOPInstanceUID
    assert sorted(frame_sources(seg)) == sorted(uids)          # on the source frames, every one of them
    assert sr.SOPInstanceUID == pydicom.dcmread(out / "sr.dcm").SOPInstanceUID
    for name, ds in (("seg.dcm", stored["SEG"]), ("sr.dcm", stored["SR"])):   # what the PACS holds conforms
        fetched = tmp_path / f"fetched-{name}"
        ds.save_as(fetched)
        errors, text = dciodvfy_errors(fetched)
        assert not errors, text


@pytest.mark.parametrize(("status", "why"), [(409, "failed: HTTP 409"), (202, "the PACS refused 1 of 2")])
def test_predict_store_names_the_pacs_when_it_refuses(series, stow, tmp_path, status, why):
    from pasta_model.dicom_results import DicomStoreError, store_dicomweb
    server = stow(status, failed=True)
    mask = np.zeros((SLICES, ROWS, COLS), np.uint8)
    report = {"preset": "tiny", "lesions": [], "primary_lesion": {}, "detection": {}}
    root, _ = series
    paths = write_dicom_results(root / "series", read_series_folder(root / "series"), mask, report, tmp_path)
    with pytest.raises(DicomStoreError, match=f"STOW-RS to {server.url}.*{why}"):
        store_dicomweb(server.url, list(paths.values()))


def test_predict_store_refuses_a_url_with_a_password_before_predicting(series, tmp_path, capsys):
    from simulation.cli import main as cli_main
    root, _ = series
    assert cli_main(["predict", "--checkpoint", str(root / "model.safetensors"), "--image", str(root / "series"),
                     "--out", str(tmp_path / "o"), "--store", "https://u:secret@pacs.example.org/dw"]) == 2
    err = capsys.readouterr().err
    assert "never put a user or password in the URL" in err and "secret" not in err
    assert not (tmp_path / "o" / "mask.nii.gz").exists()


def test_predict_without_a_frame_of_reference_keeps_its_results_says_why_and_store_refuses(series, stow, tmp_path,
                                                                                          capsys):
    """A series no SEG can reference: mask and report still come, report.json says why; --store is exit 2."""
    from simulation.cli import main as cli_main
    root, _ = series
    write_ct_series(tmp_path / "series", np.zeros((SLICES, ROWS, COLS)), frame_of_reference=False)
    server, out = stow(), tmp_path / "pred"
    assert cli_main(["predict", "--checkpoint", str(root / "model.safetensors"), "--image", str(tmp_path / "series"),
                     "--out", str(out), "--device", "cpu", "--store", server.url]) == 2
    assert "nothing to send" in capsys.readouterr().err and not server.posts
    report = json.loads((out / "report.json").read_text())
    assert "FrameOfReferenceUID" in report["dicom"]["skipped"] and (out / "mask.nii.gz").exists()
    assert not (out / "seg.dcm").exists() and not (out / "sr.dcm").exists()


def test_longest_diameter_is_between_voxel_centres_for_flat_lines_and_solids():
    from pasta_model.predict import longest_diameter_mm
    line = np.zeros((8, 3, 3), np.uint8)
    line[1:6, 1, 1] = 1                                        # collinear: qhull fails, all pairs
    assert longest_diameter_mm(line, (2.0, 1.0, 1.0)) == 8.0
    flat = np.zeros((6, 6, 2), np.uint8)
    flat[0:4, 0:3, 0] = 1                                      # one slice: joggled hull
    assert longest_diameter_mm(flat, (1.0, 1.0, 5.0)) == pytest.approx(np.hypot(3, 2), abs=0.05)
    cube = np.ones((3, 3, 3), np.uint8)
    assert longest_diameter_mm(cube, (1.0, 1.0, 1.0)) == pytest.approx(np.sqrt(12), abs=0.05)
