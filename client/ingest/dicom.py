"""The agent's view of DICOM: `pasta_model.dicom_series` with its errors as IngestError.

Header reading, series grouping, slice ordering with its checks and pixel reading
live in `pasta_model.dicom_series`, shared with `pasta_model.predict`, so the agent and
predict accept and refuse the same series. Here only the error type changes: the
ingestion callers (discover, read, check) catch IngestError.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import SimpleITK as sitk

from pasta_model import dicom_series
from pasta_model.dicom_series import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_CLASSES,
    MEDIA_DIRECTORY,
    DicomSeriesError,
    FileVerdict,
    SliceHeader,
    group_by_series,
    read_slice_header,
    slice_normal,
)

from .types import IngestError

__all__ = [
    "CT_IMAGE_STORAGE", "ENHANCED_CT_CLASSES", "MEDIA_DIRECTORY", "FileVerdict", "SliceHeader",
    "group_by_series", "order_slices", "read_series", "read_slice_header", "slice_normal",
]


@contextmanager
def _as_ingest_error() -> Iterator[None]:
    """Re-raise the shared reader's DicomSeriesError as IngestError, message unchanged."""
    try:
        yield
    except DicomSeriesError as err:
        raise IngestError(str(err)) from None


def order_slices(slices: list[SliceHeader]) -> list[SliceHeader]:
    """`dicom_series.order_slices`, raising IngestError naming the problem."""
    with _as_ingest_error():
        return dicom_series.order_slices(slices)


def read_series(files: Sequence[Path]) -> sitk.Image:
    """`dicom_series.read_series` (ordered slices -> Float32 HU volume), raising IngestError."""
    with _as_ingest_error():
        return dicom_series.read_series(files)
