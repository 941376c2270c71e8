"""The small typed records that ingestion hands to `client check`, `client show` and the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

Status = Literal["ok", "skipped", "error"]


class IngestError(RuntimeError):
    """One case (or file) cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CaseSource:
    """Where one case lives, found from headers only (cheap)."""

    case_id: str
    kind: Literal["dicom", "nifti"]
    files: tuple[Path, ...]          # DICOM: slices sorted along the slice normal; NIfTI: one file
    source: str                      # for people: path relative to data.images
    patient_id: str                  # one DP sample is one patient
    series_uid: str | None = None    # DICOM only
    mask: Path | None = None         # <masks>/<case_id>.nii[.gz] when present


@dataclass(frozen=True)
class Rejected:
    """A file or series that is not a usable case, and why."""

    case_id: str
    status: Status                   # "skipped" (not meant to be a case) or "error" (broken case)
    reason: str
    source: str


@dataclass
class LoadedCase:
    """Exactly what the agent reads: HU volume with patient geometry (LPS), optional lesion mask."""

    source: CaseSource
    image: sitk.Image                # Float32, Hounsfield units, real origin/spacing/direction
    mask: sitk.Image | None = None   # UInt8, 1 = lesion, same geometry as `image`

    @property
    def case_id(self) -> str:
        return self.source.case_id

    def hu_array(self) -> np.ndarray:
        """HU values as a (z, y, x) float32 array (SimpleITK's numpy order)."""
        return sitk.GetArrayFromImage(self.image)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Size in (x, y, z) order, like `spacing`."""
        return tuple(int(v) for v in self.image.GetSize())

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.image.GetSpacing())

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.image.GetOrigin())

    @property
    def direction(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.image.GetDirection())
