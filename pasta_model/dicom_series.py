"""The one DICOM CT series reader: header-only scan (pydicom), slice ordering and checks, pixels (SimpleITK/GDCM).

Both the hospital agent (`client.ingest`) and `pasta_model.predict` read DICOM through
this module, so a series that the agent refuses (missing, duplicate or unevenly spaced
slices, mixed orientations, gantry tilt, truncated files) is refused by predict too.

pydicom reads headers only (parsing stops at the pixel data element, whose declared
length is checked against the file size), so scanning a large archive is cheap and
truncated files are caught before any pixel is decoded; pixels are decoded by GDCM
through SimpleITK, which handles the compressed transfer syntaxes (JPEG lossless,
JPEG 2000, RLE) and applies each slice's rescale slope and intercept.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.uid import UID

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",   # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",   # Legacy Converted Enhanced CT Image Storage
}
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"   # DICOMDIR
PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}   # Pixel, Float, Double Float Pixel Data

# Tolerances of the slice checks (fractions of the median slice spacing, or mm).
GAP_FACTOR = 1.5            # a step this much larger than the median means missing slices
UNEVEN_FRACTION = 0.10      # any other step off the median by more than this is uneven
DUPLICATE_MM = 1e-3         # two slices closer than this are the same position
ORIENTATION_TOL = 1e-4
OFF_AXIS_FRACTION = 0.05    # in-plane drift of positions (gantry tilt) per slice step


class DicomSeriesError(ValueError):
    """A DICOM series cannot be read as one regular CT volume; the message names the problem."""


@dataclass(frozen=True)
class SliceHeader:
    """The header fields of one CT slice that decide grouping, order and geometry."""

    path: Path
    series_uid: str
    patient_id: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    orientation: tuple[float, ...]     # ImageOrientationPatient: row then column cosines
    position: tuple[float, float, float]
    transfer_syntax: str
    sop_uid: str = ""                  # SOPInstanceUID: two files holding it are copies of one instance


@dataclass(frozen=True)
class FileVerdict:
    """A file that is not a usable CT slice: skipped, or an error for its series (if known)."""

    path: Path
    status: str                  # "skipped" | "error"
    reason: str
    series_uid: str | None = None
    patient_id: str = ""


# ---------------------------------------------------------------- headers
@dataclass
class _Parsed:
    dataset: pydicom.Dataset
    pixel_offset: int | None = None    # file offset of the pixel data element, None if absent
    pixel_length: int | None = None    # its declared value length (0xFFFFFFFF: encapsulated)


def _parse(path: Path, force: bool) -> _Parsed:
    """Header-only parse that stops at the pixel data element and remembers where it is."""
    found: dict[str, int] = {}

    def at_pixels(tag, vr, length) -> bool:
        if tag in PIXEL_DATA_TAGS:
            found["length"] = length
            return True
        return False

    with open(path, "rb") as handle:
        ds = read_partial(handle, stop_when=at_pixels, force=force)
        offset = handle.tell() if found else None
    return _Parsed(ds, offset, found.get("length"))


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown SOP class")


def _looks_like_dicom(ds: pydicom.Dataset) -> bool:
    return "SOPClassUID" in ds or "SeriesInstanceUID" in ds


def _pixel_problem(path: Path, parsed: _Parsed) -> str | None:
    """Why a CT slice's pixel data is unusable (absent, or shorter than declared), or None.

    Encapsulated (compressed) data has no declared length; GDCM reports damage there
    when the series is read, and the reader then names the file.
    """
    if parsed.pixel_offset is None:
        return f"{path.name}: no pixel data, file truncated or damaged"
    if parsed.pixel_length == 0xFFFFFFFF:
        return None
    syntax = getattr(getattr(parsed.dataset, "file_meta", None), "TransferSyntaxUID", None)
    header = 8 if syntax is not None and syntax.is_implicit_VR else 12
    end = parsed.pixel_offset + header + parsed.pixel_length
    size = path.stat().st_size
    if end > size:
        return (f"{path.name}: truncated: pixel data needs {parsed.pixel_length} bytes, file ends "
                f"{end - size} bytes short")
    return None


def _salvage_series_uid(path: Path) -> str | None:
    """Best effort: the series UID of a damaged file, so the error lands on its series."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["SeriesInstanceUID"])
        uid = ds.get("SeriesInstanceUID")
        return str(uid) if uid else None
    except Exception:
        return None


def _parse_or_verdict(path: Path) -> _Parsed | FileVerdict:
    """The header of `path`, or why it is not DICOM (skipped) or damaged (error)."""
    try:
        try:
            parsed = _parse(path, force=False)
        except InvalidDicomError:
            # Some archives drop the 128-byte preamble; accept those if real tags parse.
            parsed = _parse(path, force=True)
            if not _looks_like_dicom(parsed.dataset):
                return FileVerdict(path, "skipped", "not a DICOM file")
    except InvalidDicomError:
        return FileVerdict(path, "skipped", "not a DICOM file")
    except Exception as err:  # garbled header
        return FileVerdict(path, "error", f"damaged DICOM file {path.name}: {err}",
                           series_uid=_salvage_series_uid(path))
    return parsed


def read_slice_header(path: Path) -> SliceHeader | FileVerdict:
    """Classify one file from its header: a CT slice, or why it is skipped or broken."""
    parsed = _parse_or_verdict(path)
    if isinstance(parsed, FileVerdict):
        return parsed
    ds = parsed.dataset
    meta = getattr(ds, "file_meta", None)
    media_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    if media_class == MEDIA_DIRECTORY:
        return FileVerdict(path, "skipped", "DICOMDIR (media index), not an image")
    sop_class = str(ds.get("SOPClassUID", "") or media_class)
    modality = str(ds.get("Modality", "") or "?")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    patient_id = str(ds.get("PatientID", "") or "")
    if not series_uid:
        if media_class:   # a Part-10 file whose dataset ends early
            return FileVerdict(path, "error", f"damaged DICOM file {path.name}: header ends "
                                              "early (truncated?)")
        return FileVerdict(path, "skipped", "DICOM file without SeriesInstanceUID")

    def verdict(status: str, reason: str) -> FileVerdict:
        return FileVerdict(path, status, reason, series_uid, patient_id)

    if modality != "CT":
        return verdict("skipped", f"Modality {modality} ({_sop_name(sop_class)}) is not CT")
    if sop_class in ENHANCED_CT_CLASSES:
        return verdict("error", f"{_sop_name(sop_class)} (multi-frame) is not supported; "
                                "export the series as classic CT Image Storage")
    if sop_class != CT_IMAGE_STORAGE:
        return verdict("skipped", f"{_sop_name(sop_class)} is not a CT image")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return verdict("skipped", "localizer (scout) image")
    problem = _pixel_problem(path, parsed)
    if problem:
        return verdict("error", problem)
    return _slice_header(path, ds, series_uid, patient_id, verdict)


def _slice_header(path: Path, ds: pydicom.Dataset, series_uid: str, patient_id: str,
                  verdict) -> SliceHeader | FileVerdict:
    """The geometry tags of a CT slice, or an error verdict naming the missing/unreadable ones."""
    missing = [k for k in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient",
                           "ImagePositionPatient") if ds.get(k) in (None, "")]
    if missing:
        return verdict("error", f"{path.name}: missing {', '.join(missing)}")
    meta = getattr(ds, "file_meta", None)
    try:
        return SliceHeader(
            path=path,
            series_uid=series_uid,
            patient_id=patient_id,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
            orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
            position=tuple(float(v) for v in ds.ImagePositionPatient),
            transfer_syntax=str(getattr(meta, "TransferSyntaxUID", "") or ""),
            sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        )
    except (ValueError, TypeError) as err:
        return verdict("error", f"{path.name}: unreadable geometry tags: {err}")


def group_by_series(headers: list[SliceHeader]) -> dict[str, list[SliceHeader]]:
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_uid].append(header)
    return dict(groups)


# ---------------------------------------------------------------- slice order and checks
def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:6])
    return np.cross(row, col)


def _check_same_frame(slices: list[SliceHeader]) -> None:
    """All slices share size, pixel spacing and orientation, and there are at least two."""
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DicomSeriesError(f"slices of different sizes ({first.rows}x{first.columns} in "
                                   f"{first.path.name}, {s.rows}x{s.columns} in {s.path.name})")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise DicomSeriesError(f"slices with different PixelSpacing ({first.path.name}, "
                                   f"{s.path.name})")
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_TOL):
            raise DicomSeriesError(f"slices with different orientations ({first.path.name}, "
                                   f"{s.path.name})")
    if len(slices) < 2:
        raise DicomSeriesError(f"only one slice ({first.path.name}); a case needs a volume")


def _check_steps(along: np.ndarray, ordered: list[SliceHeader]) -> float:
    """Slice steps along the normal are regular (no duplicates, gaps or uneven steps); returns the median."""
    steps = np.diff(along)
    dup = np.flatnonzero(steps < DUPLICATE_MM)
    if dup.size:
        i = dup[0]
        raise DicomSeriesError(f"duplicate slice position {along[i]:.3f} mm along the normal "
                               f"({ordered[i].path.name}, {ordered[i + 1].path.name})")
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        i = gaps[0]
        missing = int(round(steps[i] / median)) - 1
        raise DicomSeriesError(f"missing slice(s): gap of {steps[i]:.3f} mm between {along[i]:.3f} "
                               f"and {along[i + 1]:.3f} mm (spacing {median:.3f} mm, about "
                               f"{missing} slice(s) missing; {len(gaps)} gap(s) in all)")
    uneven = np.flatnonzero(np.abs(steps - median) > UNEVEN_FRACTION * median)
    if uneven.size:
        i = uneven[0]
        raise DicomSeriesError(f"unevenly spaced slices: step {steps[i]:.3f} mm at {along[i]:.3f} mm "
                               f"against median {median:.3f} mm")
    return median


def one_file_per_instance(slices: list[SliceHeader]) -> list[SliceHeader]:
    """One file per SOPInstanceUID: exports and archives often hold the same instance twice.

    A PACS keeps one copy of an instance, so a folder holding two reads as the PACS does;
    two files that share a SOPInstanceUID but not a position are not copies, and are refused.
    """
    kept: dict[str, SliceHeader] = {}
    unique = []
    for header in sorted(slices, key=lambda h: str(h.path)):
        first = kept.get(header.sop_uid) if header.sop_uid else None
        if first is None:
            kept[header.sop_uid] = header
            unique.append(header)
        elif not np.allclose(first.position, header.position, atol=DUPLICATE_MM):
            raise DicomSeriesError(f"SOPInstanceUID {header.sop_uid} is in two files at different positions "
                                   f"({first.path.name}, {header.path.name}); they are not copies of one instance")
    if len(unique) < len(slices):
        log.info("series %s: %d file(s) are copies of instances already read; one file per instance is used",
                 slices[0].series_uid, len(slices) - len(unique))
    return unique


def order_slices(slices: list[SliceHeader]) -> list[SliceHeader]:
    """Check one series is a single regular volume and return its slices in order.

    Order is by ImagePositionPatient projected on the slice normal (row x column
    cosines), never by file name or InstanceNumber. Raises DicomSeriesError naming the
    problem: mixed sizes or orientations, duplicates, missing or uneven slices, tilt.
    """
    slices = one_file_per_instance(slices)
    _check_same_frame(slices)
    normal = slice_normal(slices[0].orientation)
    positions = np.array([s.position for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    ordered = [slices[i] for i in order]
    median = _check_steps(along, ordered)
    in_plane = positions - np.outer(along, normal)
    drift = np.linalg.norm(np.diff(in_plane, axis=0), axis=1)
    if drift.max() > OFF_AXIS_FRACTION * median:
        raise DicomSeriesError("slice positions do not follow the slice normal (gantry tilt or "
                               "mixed stacks); the volume geometry would be wrong")
    return ordered


# ---------------------------------------------------------------- pixels
def read_series(files: Sequence[Path]) -> sitk.Image:
    """Read ordered slices as one Float32 HU volume (GDCM applies each slice's rescale)."""
    files = tuple(files)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)   # per-slice slopes must not be truncated
    try:
        return reader.Execute()
    except RuntimeError:
        bad = _find_unreadable(files)
        if bad is not None:
            path, why = bad
            raise DicomSeriesError(f"{path}: cannot read pixel data (damaged or truncated file): "
                                   f"{why}") from None
        raise DicomSeriesError(f"{files[0].parent}: SimpleITK could not read the series") from None


def _find_unreadable(files: tuple[Path, ...]) -> tuple[Path, str] | None:
    for path in files:
        try:
            sitk.ReadImage(str(path), sitk.sitkFloat32, imageIO="GDCMImageIO")
        except RuntimeError as err:
            return path, str(err).strip().splitlines()[-1][:200]
    return None


# ---------------------------------------------------------------- one folder, one series
def read_series_folder(folder: str | Path) -> sitk.Image:
    """Read the CT series in `folder` (its files, not subfolders) with every slice check.

    Used by predict: a folder with a missing slice, a truncated file or uneven spacing is
    refused with a DicomSeriesError naming the folder and the problem, never read
    silently. With several CT series the one with most slices is read (others logged).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    found = [read_slice_header(p) for p in files]
    verdicts = [f for f in found if isinstance(f, FileVerdict)]
    series = group_by_series([f for f in found if isinstance(f, SliceHeader)])
    if not series:
        why = "; ".join(sorted({v.reason for v in verdicts})[:3])
        raise DicomSeriesError(f"{folder}: no CT series found" + (f" ({why})" if why else ""))
    uid = max(series, key=lambda u: (len(series[u]), u))
    if len(series) > 1:
        log.warning("%s holds %d CT series; reading %s (%d slices)", folder, len(series), uid,
                    len(series[uid]))
    errors = [v.reason for v in verdicts if v.status == "error" and v.series_uid == uid]
    if errors:
        raise DicomSeriesError(f"{folder}: {'; '.join(errors)}")
    for v in verdicts:
        if v.series_uid != uid:
            log.info("%s: ignored (%s)", v.path, v.reason)
    try:
        ordered = order_slices(series[uid])
    except DicomSeriesError as err:
        raise DicomSeriesError(f"{folder}: {err}") from None
    image = read_series([s.path for s in ordered])
    if image.GetSize()[2] != len(ordered):
        raise DicomSeriesError(f"{folder}: read {image.GetSize()[2]} slices from {len(ordered)} files")
    return image
