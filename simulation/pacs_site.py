"""A simulated hospital whose CT lives in a PACS: a local Orthanc the simulation starts and stops.

`--pacs` turns the first simulated hospital into one that holds its CT in a PACS, as
many real ones do: its NIfTI cases become DICOM CT series (RUN/sites/<site>/dicom-export,
what its scanners would have sent), they are stored in an Orthanc of the run's own
(RUN/pacs/, DICOMweb with HTTP basic authentication, 127.0.0.1 only), its hospital.yaml
names only that PACS (no data.images) and its labels CSV maps each series to its case
id. The agent's own retrieval (`client.pacs.retrieve`) then copies the series into its
state_dir before the federation, exactly as `pasta-fed client fetch` would.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from simulation.config import SimulationConfigError
from simulation.orthanc import INSTALL, PLUGIN, USER, OrthancServer, installed
from synth.atomic import atomic_path, write_atomic

log = logging.getLogger(__name__)

EXPORT_FOLDER = "dicom-export"


class OrthancMissing(SimulationConfigError):
    """Orthanc or its DICOMweb plugin is not installed; the message says how to install them."""


def require_orthanc() -> None:
    """Refused early (before any data is generated) when Orthanc or its DICOMweb plugin is absent."""
    if not installed():
        raise OrthancMissing(f"--pacs needs Orthanc with its DICOMweb plugin ({PLUGIN}), not found here; {INSTALL}")


# ---------------------------------------------------------------- NIfTI case -> DICOM CT series
def _slice_dataset(image: sitk.Image, k: int, pixels: np.ndarray, uids: Mapping[str, str], patient_id: str,
                   seed: str) -> Dataset:
    """One CT Image Storage slice with the geometry tags ingestion checks (LPS, as SimpleITK reads NIfTI)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[seed, str(k)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, patient_id
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    sx, sy, sz = image.GetSpacing()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{sy:.10g}", f"{sx:.10g}"]          # DICOM: row spacing, then column spacing
    ds.SliceThickness = f"{sz:.10g}"
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1])]
    ds.ImagePositionPatient = [f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "0", "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def nifti_to_dicom_series(nifti: Path, folder: Path, patient_id: str, seed: str) -> str:
    """Write one NIfTI CT as a DICOM series in `folder` (one file per slice); returns its SeriesInstanceUID.

    UIDs derive from `seed` so a resumed run writes (and Orthanc stores) the same instances again.
    """
    image = sitk.ReadImage(str(nifti))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.cross(direction[:, 0], direction[:, 1]), direction[:, 2], atol=1e-4):
        raise ValueError(f"{nifti}: a left-handed voxel grid cannot be written as a DICOM series as is")
    hu = np.clip(np.rint(sitk.GetArrayFromImage(image)), -32768, 32767).astype(np.int16)   # (z, y, x)
    uids = {key: generate_uid(entropy_srcs=[seed, key]) for key in ("study", "series", "frame")}
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(hu.shape[0]):
        with atomic_path(folder / f"slice-{k:04d}.dcm") as tmp:
            _slice_dataset(image, k, hu[k], uids, patient_id, seed).save_as(tmp, enforce_file_format=True)
    return uids["series"]


def export_site_as_dicom(site_dir: Path) -> dict[str, str]:
    """Every case of data/images as a series under dicom-export/<case_id>/; returns case_id -> series UID."""
    with open(site_dir / "data" / "labels.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    series = {}
    for row in rows:
        case_id = row["case_id"]
        series[case_id] = nifti_to_dicom_series(site_dir / "data" / "images" / f"{case_id}.nii.gz",
                                                site_dir / EXPORT_FOLDER / case_id, row["patient_id"],
                                                seed=f"{site_dir.name}/{case_id}")
    log.info("%s: %d cases written as DICOM CT series under %s", site_dir.name, len(series), site_dir / EXPORT_FOLDER)
    return series


def labels_with_series(labels: Path, series: dict[str, str], out: Path) -> None:
    """The labels CSV plus a series_uid column, so the PACS' series join their case ids and labels."""
    with open(labels, encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows, columns = list(reader), [*(reader.fieldnames or []), "series_uid"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "series_uid": series[row["case_id"]]})
    write_atomic(out, buf.getvalue())


def pacs_site_yaml(folder_yaml: Path, labels: Path, dicomweb: str, credentials: Path) -> str:
    """The folder site's YAML with data.images replaced by a pacs section (masks and labels kept)."""
    cfg = yaml.safe_load(folder_yaml.read_text(encoding="utf-8"))
    data = {k: v for k, v in cfg["data"].items() if k != "images"}
    cfg["data"] = {**data, "labels": str(labels)}
    cfg["pacs"] = {"dicomweb": dicomweb, "credentials": str(credentials), "studies": {"modality": "CT"}}
    return yaml.safe_dump(cfg, sort_keys=False)


# ---------------------------------------------------------------- the PACS hospital
def credentials_file(home: Path, password: str) -> Path:
    """The agent's DICOMweb credentials (client.pacs reads them; never in the YAML)."""
    path = home / "credentials.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"username": USER, "password": password}))
    path.chmod(0o600)
    return path


def upload_series(server: OrthancServer, export: Path) -> int:
    """Store every exported slice in the PACS; returns how many files were sent."""
    files = sorted(export.rglob("*.dcm"))
    for path in files:
        server.upload([path])
    log.info("stored %d DICOM instances in the simulated PACS", len(files))
    return len(files)


def make_pacs_site(site_config: Path, server: OrthancServer, home: Path) -> None:
    """Turn a generated folder site into a PACS site: export, upload, YAML naming only the PACS, then fetch.

    Idempotent, so a resumed run (with a new Orthanc port and password) redoes it cheaply.
    """
    from client.pacs.retrieve import retrieve
    from client.site_config import load_site_config

    site_dir = site_config.parent
    folder_yaml = site_dir / "hospital-folder.yaml"
    if not folder_yaml.exists():                    # the folder layout's YAML, kept as generated
        shutil.copyfile(site_config, folder_yaml)
    series = export_site_as_dicom(site_dir)
    labels = site_dir / "data" / "labels-pacs.csv"
    labels_with_series(site_dir / "data" / "labels.csv", series, labels)
    upload_series(server, site_dir / EXPORT_FOLDER)
    write_atomic(site_config, pacs_site_yaml(folder_yaml, labels, server.dicomweb,
                                             credentials_file(home, server.password)))
    report = retrieve(load_site_config(site_config))
    log.info("%s: retrieved its CT from the PACS: %d series, %d instances (%d fetched now)",
             site_dir.name, report.series, report.instances, report.fetched)
