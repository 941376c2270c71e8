"""SimpleITK images (LPS, what DICOM and the hospital agent read) as MONAI MetaTensors (RAS).

The preprocessing pipeline (`transforms.build_preprocess(load=False)`) takes
channel-first MetaTensors with a RAS affine, as MONAI's NIfTI loader produces; this
is the one place that converts SimpleITK's LPS geometry into that form.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> RAS mm affine of a SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return _LPS_TO_RAS @ affine


def metatensor_from_sitk(image: sitk.Image, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """[1, X, Y, Z] MetaTensor carrying the image's RAS affine."""
    array = sitk.GetArrayFromImage(image)            # (z, y, x)
    array = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))[None]
    return MetaTensor(torch.from_numpy(array).to(dtype), affine=torch.from_numpy(sitk_affine_ras(image)))
