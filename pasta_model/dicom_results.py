"""predict's results as DICOM objects a PACS and its viewers understand: a Segmentation and a TID 1500 SR.

For a DICOM input, `seg.dcm` (DICOM Segmentation, BINARY, one segment "lesion") carries the
mask on the source slices' own frames, each frame referencing its source instance, so a
viewer overlays it on the CT it came from; `sr.dcm` (Comprehensive 3D SR, TID 1500 Measurement
Report) carries report.json's measurements and attributes as coded content. Both are built with
highdicom, which fills in the patient/study modules from the source series.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import highdicom as hd
import numpy as np
import pydicom
import requests
import SimpleITK as sitk
from dicomweb_client.api import DICOMwebClient
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from synth.atomic import atomic_path
from synth.vocabulary import LESION_TYPE_BY_NAME

from .dicom_series import DicomSeriesError, SliceHeader, group_by_series, order_slices, read_slice_header
from .dicomweb_login import session_with_credentials, tls_failure, tls_problem

log = logging.getLogger(__name__)

PRIVATE_SCHEME = "99PASTA"   # the PASTA report vocabulary (synth/vocabulary.py) as a private coding scheme
POSITION_TOL_MM = 1e-2
# what a SEG/SR needs of its source images beyond what the CT reader checks (all Type 1 in a CT Image)
REQUIRED_SOURCE_TAGS = ("StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID")
LESION_COUNT = Code("lesion_count", PRIVATE_SCHEME, "Number of lesions segmented")

ORGAN_CODES: dict[str, Code] = {
    "lung": codes.SCT.Lung, "liver": codes.SCT.Liver, "gallbladder": codes.SCT.Gallbladder,
    "pancreas": codes.SCT.Pancreas, "esophagus": codes.SCT.Esophagus, "stomach": codes.SCT.Stomach,
    "colon": codes.SCT.Colon, "kidney": codes.SCT.Kidney, "urinary_bladder": codes.SCT.Bladder,
    "bone": codes.SCT.Bone,
}
ATTRIBUTE_NAMES: dict[str, Code] = {
    "lesion_type": Code("lesion_type", PRIVATE_SCHEME, "Lesion type"),
    "shape": codes.SCT.Shape,
    "density": codes.DCM.Density,
    "heterogeneity": Code("heterogeneity", PRIVATE_SCHEME, "Heterogeneity"),
    "surface": Code("surface", PRIVATE_SCHEME, "Surface"),
    "invasion": Code("invasion", PRIVATE_SCHEME, "Invasion"),
    "t_stage": Code("t_stage", PRIVATE_SCHEME, "T stage"),
}


def software_version() -> str:
    try:
        return metadata.version("pasta-fed")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- source instances
class DicomResultsUnavailable(ValueError):
    """The source series lacks what a SEG/SR must reference (e.g. no FrameOfReferenceUID); names it."""


def check_sources(folder: str | Path, sources: list[pydicom.Dataset]) -> None:
    missing = sorted({t for ds in sources for t in REQUIRED_SOURCE_TAGS if not ds.get(t)})
    if missing:
        raise DicomResultsUnavailable(f"{folder}: source images have no {', '.join(missing)}; "
                                      "no DICOM SEG/SR can reference them")


def series_datasets(folder: str | Path, image: sitk.Image) -> list[pydicom.Dataset]:
    """The headers of the series `read_series_folder` read, in the image's slice order.

    Same selection (the CT series with most slices) and order (position along the normal)
    as the reader, then checked against the image's own slice positions, so frame k of the
    SEG is slice k of the mask whatever the file names are.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    series = group_by_series([h for h in map(read_slice_header, files) if isinstance(h, SliceHeader)])
    uid = max(series, key=lambda u: (len(series[u]), u))
    ordered = order_slices(series[uid])
    if len(ordered) != image.GetDepth():
        raise DicomSeriesError(f"{folder}: {len(ordered)} slices but the image has {image.GetDepth()}")
    for k, header in enumerate(ordered):
        if not np.allclose(header.position, image.TransformIndexToPhysicalPoint((0, 0, k)), atol=POSITION_TOL_MM):
            raise DicomSeriesError(f"{folder}: slice {k} ({header.path.name}) is not where the image puts it")
    sources = [with_type2_patient_study(pydicom.dcmread(h.path, stop_before_pixels=True)) for h in ordered]
    check_sources(folder, sources)
    return sources


# Type 2 attributes of the Patient and General Study modules: a SEG and an SR copy them from
# their sources, and must carry them even where a modality or an export left them out.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                       "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def with_type2_patient_study(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds` (in memory only) with each missing Type 2 patient/study attribute present and empty."""
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


# ---------------------------------------------------------------- segmentation
def lesion_type_of(report: dict) -> str | None:
    return (report.get("primary_lesion") or {}).get("lesion_type", {}).get("value")


def lesion_property_type(lesion_type: str | None) -> Code:
    """Neoplasm for the malignant types, Mass for the benign ones (cysts, stones), Lesion when untyped."""
    if lesion_type not in LESION_TYPE_BY_NAME:
        return codes.SCT.Lesion
    return codes.SCT.Neoplasm if LESION_TYPE_BY_NAME[lesion_type].malignant else codes.SCT.Mass


def algorithm_identification(preset: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name="PASTA-Fed", family=codes.cid7162.ArtificialIntelligence,
                                              version=software_version(), parameters={"preset": str(preset)})


def segment_description(report: dict) -> hd.seg.SegmentDescription:
    """The one "lesion" segment; the predicted lesion type goes in its description as text."""
    lesion_type = lesion_type_of(report)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=lesion_property_type(lesion_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(report.get("preset", "")),
        tracking_uid=hd.UID(), tracking_id="lesion",
    )
    if lesion_type:
        p = report["primary_lesion"]["lesion_type"]["probability"]
        desc.SegmentDescription = f"predicted {lesion_type.replace('_', ' ')} (p={p:.2f})"[:64]
    return desc


def build_segmentation(sources: list[pydicom.Dataset], mask_zyx: np.ndarray, report: dict) -> hd.seg.Segmentation:
    """A BINARY SEG with one frame per source slice: `mask_zyx[k]` (rows, columns) is the frame on `sources[k]`.

    highdicom stores the frames in its own (position) order; each frame names its source
    instance, which is what a reader goes by.
    """
    if mask_zyx.shape[0] != len(sources):
        raise ValueError(f"mask has {mask_zyx.shape[0]} slices, the series {len(sources)}")
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=(mask_zyx > 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(report)],
        series_instance_uid=hd.UID(), series_number=9901, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="PASTA-Fed", manufacturer_model_name="PASTA-Fed predict",
        software_versions=software_version(), device_serial_number="0",
        series_description="PASTA-Fed lesion segmentation", omit_empty_frames=False,
    )


# ---------------------------------------------------------------- structured report
def private_code(value: str) -> Code:
    return Code(value, PRIVATE_SCHEME, value.replace("_", " "))


def qualitative_evaluations(primary: dict) -> list[hd.sr.QualitativeEvaluation]:
    """The classifier's attributes of the primary lesion, coded in the PASTA vocabulary."""
    return [hd.sr.QualitativeEvaluation(name=ATTRIBUTE_NAMES[k], value=private_code(str(primary[k]["value"])))
            for k in ATTRIBUTE_NAMES if isinstance(primary.get(k), dict)]


def lesion_measurements(lesion: dict) -> list[hd.sr.Measurement]:
    """Volume (mm3) and longest diameter (mm) of one connected lesion component."""
    out = [hd.sr.Measurement(name=codes.SCT.Volume, value=float(lesion["volume_ml"]) * 1000.0,
                             unit=codes.UCUM.CubicMillimeter)]
    if "longest_diameter_mm" in lesion:
        out.append(hd.sr.Measurement(name=codes.SCT.Diameter, value=float(lesion["longest_diameter_mm"]),
                                     unit=codes.UCUM.Millimeter, derivation=codes.SCT.Maximum))
    return out


def lesion_group(seg: hd.seg.Segmentation, sources: list[pydicom.Dataset], index: int, lesion: dict,
                 report: dict) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for lesion `index` (1 = largest): a connected component of the SEG's segment 1.

    It references the whole segment plus the source slices the lesion spans (an SR image
    reference names a segment or frames, not both). Only the primary (largest) lesion is
    classified by predict, so only it carries a finding site and qualitative evaluations.
    """
    z0, z1 = lesion["bbox_voxel"][2]          # the mask's slice range, i.e. positions in `sources`
    primary = (report.get("primary_lesion") or {}) if index == 1 else {}
    lesion_type = (primary.get("lesion_type") or {}).get("value")
    sites = ([hd.sr.FindingSite(ORGAN_CODES[LESION_TYPE_BY_NAME[lesion_type].organ])]
             if lesion_type in LESION_TYPE_BY_NAME else None)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {index}"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
            source_images=[hd.sr.SourceImageForSegmentation(ds.SOPClassUID, ds.SOPInstanceUID)
                                                 for ds in sources[z0:z1 + 1]]),
        finding_type=lesion_property_type(lesion_type), finding_sites=sites,
        measurements=lesion_measurements(lesion), qualitative_evaluations=qualitative_evaluations(primary) or None,
    )


def whole_volume_group(report: dict) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the whole CT: lesion count, and tumor probability overall and per organ (as finding site).

    Always present, so a CT with nothing found still gets a report saying so.
    """
    measurements = [hd.sr.Measurement(name=LESION_COUNT, value=float(len(report["lesions"])), unit=codes.UCUM.NoUnits)]
    measurements += [
        hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer, value=float(p), unit=codes.UCUM.NoUnits,
                          finding_sites=[hd.sr.FindingSite(ORGAN_CODES[o])] if o in ORGAN_CODES else None)
        for o, p in (report.get("detection") or {}).items() if o == "any" or o in ORGAN_CODES
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="whole volume"),
        measurements=measurements)


def observation_context() -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="PASTA-Fed",
                                                       manufacturer_name="PASTA-Fed", model_name="PASTA-Fed predict")
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def add_private_scheme(ds: pydicom.Dataset) -> None:
    """Declare 99PASTA in the Coding Scheme Identification Sequence, as Part 3 asks for private schemes."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "PASTA structured-report vocabulary"
    item.CodingSchemeResponsibleOrganization = "PASTA-Fed"
    ds.CodingSchemeIdentificationSequence = [item]


def build_report_sr(seg: hd.seg.Segmentation, sources: list[pydicom.Dataset], report: dict) -> hd.sr.Comprehensive3DSR:
    """TID 1500 Measurement Report: one volumetric group per lesion, then the whole-volume group."""
    groups: list = [lesion_group(seg, sources, i, les, report) for i, les in enumerate(report["lesions"], start=1)]
    groups.append(whole_volume_group(report))
    content = hd.sr.MeasurementReport(observation_context=observation_context(),
                                      procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                      imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg], content=content, series_instance_uid=hd.UID(), series_number=9902,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="PASTA-Fed",
        series_description="PASTA-Fed lesion report")
    add_private_scheme(sr)
    return sr


# ---------------------------------------------------------------- files
def save(ds: pydicom.Dataset, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(str(tmp), enforce_file_format=True)
    return path


def write_dicom_results(folder: str | Path, image: sitk.Image, mask_zyx: np.ndarray, report: dict,
                        out_dir: str | Path) -> dict[str, str]:
    """Write seg.dcm and sr.dcm for a prediction on the DICOM series in `folder`; returns their paths.

    Raises DicomResultsUnavailable when the series cannot be referenced (predict then warns
    and keeps its NIfTI/JSON results).
    """
    out_dir = Path(out_dir)
    sources = series_datasets(folder, image)
    seg = build_segmentation(sources, mask_zyx, report)
    sr = build_report_sr(seg, sources, report)
    paths = {"seg": str(save(seg, out_dir / "seg.dcm")), "sr": str(save(sr, out_dir / "sr.dcm"))}
    log.info("predict: wrote DICOM SEG %s and SR %s", paths["seg"], paths["sr"])
    return paths


# ---------------------------------------------------------------- STOW-RS
class DicomStoreError(RuntimeError):
    """The PACS did not take the results; names the URL and the HTTP status, never a credential."""


def checked_store_url(url: str) -> str:
    """The DICOMweb base URL, refused when it carries a user or password (use a credentials file)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--store needs an http(s) DICOMweb URL, got {parts.scheme or '?'}://...")
    if parts.username or parts.password:
        raise ValueError("--store: never put a user or password in the URL; use --store-credentials FILE")
    return url.rstrip("/")


def store_dicomweb(url: str, paths: Sequence[str | Path], credentials: Path | None = None, *,
                   ca: Path | None = None, client_cert: tuple[Path, Path] | None = None) -> int:
    """Send the files to the PACS in one STOW-RS request; returns how many instances it accepted.

    `ca` and `client_cert` are the site's TLS settings (see dicomweb_login.session_with_credentials)."""
    url = checked_store_url(url)
    datasets = [pydicom.dcmread(p) for p in paths]
    session = session_with_credentials(credentials, ca=ca, client_cert=client_cert)
    if problem := tls_problem(session, url, ca):
        raise DicomStoreError(f"STOW-RS to {problem}")
    client = DICOMwebClient(url, session=session, timeout=60)
    try:
        answer = client.store_instances(datasets)
    except requests.exceptions.SSLError as err:
        raise DicomStoreError(f"STOW-RS to {tls_failure(url, err, ca)}") from None
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise DicomStoreError(f"STOW-RS to {url} failed: HTTP {status}") from None
    except requests.RequestException as err:
        raise DicomStoreError(f"STOW-RS to {url} failed: {type(err).__name__}") from None
    failed = answer.get("FailedSOPSequence") or []
    if failed:
        raise DicomStoreError(f"STOW-RS to {url}: the PACS refused {len(failed)} of {len(datasets)} instance(s)")
    log.info("predict: stored %d instance(s) to %s", len(datasets), url)
    return len(datasets)
