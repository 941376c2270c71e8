"""NIfTI cases and masks, read through SimpleITK so geometry is LPS like the DICOM path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .types import IngestError

SUFFIXES = (".nii.gz", ".nii")

# Geometry tolerances for mask <-> image: NIfTI stores float32 geometry.
SPACING_RTOL = 1e-3
ORIGIN_VOXEL_FRACTION = 0.05     # origin may differ by at most this fraction of a voxel
DIRECTION_ATOL = 1e-3


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The case_id of a NIfTI file: its name without .nii or .nii.gz."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def check_nifti_header(path: Path) -> None:
    """Cheap header check: readable and a 3D volume."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise IngestError(f"{path}: not a readable NIfTI file: {_short(err)}") from None
    size = reader.GetSize()
    if len(size) != 3 and not (len(size) == 4 and size[3] == 1):
        raise IngestError(f"{path}: expected a 3D volume, got size {tuple(size)}")


def read_nifti(path: Path, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """Read one volume; scl_slope/scl_inter are applied by the reader."""
    try:
        image = sitk.ReadImage(str(path), pixel_type)
    except RuntimeError as err:
        raise IngestError(f"{path}: cannot read NIfTI: {_short(err)}") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise IngestError(f"{path}: expected a 3D volume, got size {image.GetSize()}")
    return image


def geometry_mismatch(image: sitk.Image, other: sitk.Image) -> str | None:
    """Why `other` does not lie on `image`'s voxel grid, or None when it does."""
    if image.GetSize() != other.GetSize():
        return f"size {other.GetSize()} != image size {image.GetSize()}"
    spacing, o_spacing = np.array(image.GetSpacing()), np.array(other.GetSpacing())
    if not np.allclose(o_spacing, spacing, rtol=SPACING_RTOL, atol=0):
        return f"spacing {_fmt(o_spacing)} != image spacing {_fmt(spacing)}"
    origin, o_origin = np.array(image.GetOrigin()), np.array(other.GetOrigin())
    if np.abs(o_origin - origin).max() > ORIGIN_VOXEL_FRACTION * spacing.min():
        return f"origin {_fmt(o_origin)} != image origin {_fmt(origin)}"
    direction, o_direction = np.array(image.GetDirection()), np.array(other.GetDirection())
    if not np.allclose(o_direction, direction, atol=DIRECTION_ATOL):
        return f"direction {_fmt(o_direction)} != image direction {_fmt(direction)}"
    return None


def read_mask(path: Path, image: sitk.Image) -> sitk.Image:
    """A lesion mask on `image`'s grid as UInt8 (1 = lesion: any label > 0)."""
    mask = read_nifti(path, sitk.sitkFloat32)
    why = geometry_mismatch(image, mask)
    if why:
        raise IngestError(f"{path}: mask does not match its image: {why}")
    values = sitk.GetArrayViewFromImage(mask)
    if values.min() < 0 or not np.all(np.equal(np.mod(values, 1), 0)):
        raise IngestError(f"{path}: mask values must be non-negative integers")
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    binary.CopyInformation(image)   # within tolerance: put it exactly on the image grid
    return binary


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _short(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__
