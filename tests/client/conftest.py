"""Writers for hospital-like data on disk, made with tools other than the agent's reader.

DICOM is written by pydicom by hand (explicit datasets, CT Image Storage, rescale
slope/intercept != 1/0) and by SimpleITK/GDCM (compressed JPEG 2000); NIfTI by
nibabel. Volumes are tiny (16x16x8) so the whole area's tests stay fast.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


@dataclass
class WrittenSeries:
    series_uid: str
    patient_id: str
    files: list[Path]          # in slice order (index k = k-th position along the normal)
    hu: np.ndarray             # (z, y, x) expected HU
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]   # SimpleITK order: columns are row, col, normal cosines

    @property
    def case_id(self) -> str:
        patient = self.patient_id or "anon"
        return f"{patient}_{hashlib.sha256(self.series_uid.encode()).hexdigest()[:8]}"


def rotation_z(degrees: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.deg2rad(degrees)
    return np.array([np.cos(a), np.sin(a), 0.0]), np.array([-np.sin(a), np.cos(a), 0.0])


def write_pydicom_series(folder: Path, stored: np.ndarray, *, slope=0.5, intercept=-1024.0,
                         spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, -30.0),
                         row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0), patient_id="P001",
                         series_uid: str | None = None, modality="CT", sop_class=CTImageStorage,
                         rng: np.random.Generator | None = None, image_type=None) -> WrittenSeries:
    """One series, one file per slice, random file names and scrambled InstanceNumbers.

    `stored` is (z, y, x) int16; slope/intercept may be scalars or one per slice.
    spacing is (x = along row, y = along column, z = slice step) in mm.
    """
    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    nz, ny, nx = stored.shape
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    # Values as the DS strings in the file say them (expected HU must use the same).
    slopes = np.array([float(f"{v:g}") for v in np.broadcast_to(np.asarray(slope, float), (nz,))])
    intercepts = np.array([float(f"{v:g}") for v in np.broadcast_to(np.asarray(intercept, float), (nz,))])
    instance_numbers = rng.permutation(nz) + 1
    files = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.PatientID = patient_id
        ds.PatientName = "Test^Patient"
        ds.ImageType = image_type or ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(instance_numbers[k])
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]   # DICOM: row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slopes[k]:g}", f"{intercepts[k]:g}"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k], dtype="<i2").tobytes()
        path = folder / f"{rng.integers(1 << 40):010x}"          # no extension, random order
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    hu = stored.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]
    direction = tuple(np.column_stack([row, col, normal]).ravel())
    return WrittenSeries(series_uid, patient_id, files, hu, tuple(map(float, origin)),
                         tuple(map(float, spacing)), direction)


def write_sitk_series(folder: Path, hu: np.ndarray, *, spacing=(0.9, 0.9, 3.0),
                      origin=(5.0, -7.0, 100.0), patient_id="P002", compressor="JPEG2000",
                      rng: np.random.Generator | None = None) -> WrittenSeries:
    """One series written by SimpleITK's GDCM writer, compressed (JPEG 2000 by default)."""
    rng = rng or np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    series_uid, study_uid = generate_uid(), generate_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    if compressor:
        writer.SetUseCompression(True)
        writer.SetCompressor(compressor)
    files = []
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        tags = {
            "0008|0060": "CT", "0008|0016": CTImageStorage, "0008|0018": generate_uid(),
            "0020|000e": series_uid, "0020|000d": study_uid, "0010|0020": patient_id,
            "0020|0013": str(int(rng.integers(1, 1000))),
            "0020|0032": "\\".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": f"{spacing[2]:g}",
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        path = folder / f"IMG{rng.integers(1 << 30):09d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(piece)
        files.append(path)
    return WrittenSeries(series_uid, patient_id, files, hu.astype(np.float64), tuple(origin),
                         tuple(spacing), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def write_nifti(path: Path, array_zyx: np.ndarray, *, spacing=(1.0, 1.0, 2.0),
                origin_ras=(10.0, 20.0, -5.0)) -> Path:
    """A NIfTI file written with nibabel (RAS affine, axis-aligned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin_ras
    nib.save(nib.Nifti1Image(np.transpose(array_zyx, (2, 1, 0)), affine), str(path))
    return path


def ramp_volume(shape=(8, 16, 16), low=-200, step=7) -> np.ndarray:
    """Distinct stored values per voxel so misordered slices or axes cannot pass."""
    return (low + step * np.arange(np.prod(shape)).reshape(shape) % 3000).astype(np.int16)


def write_site_yaml(root: Path, images: Path, *, labels: Path | None = None,
                    masks: Path | None = None, one_scan_per_patient: bool | None = None, **extra) -> Path:
    config = {
        "site": "hospital-test",
        "data": {"images": str(images), **({"labels": str(labels)} if labels else {}),
                 **({"masks": str(masks)} if masks else {}),
                 **({} if one_scan_per_patient is None else {"one_scan_per_patient": one_scan_per_patient})},
        "privacy": {"max_epsilon": 8.0, "delta": 1.0e-5, "max_grad_norm": 1.0},
        "state_dir": str(root / "state"),
        "device": "cpu",
        **extra,
    }
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def w() -> SimpleNamespace:
    """The writers above, as a fixture (test modules never import conftest by name)."""
    return SimpleNamespace(
        pydicom_series=write_pydicom_series, sitk_series=write_sitk_series, nifti=write_nifti,
        ramp=ramp_volume, rotation_z=rotation_z, site_yaml=write_site_yaml,
        MRImageStorage=MRImageStorage)
