"""Prediction on one CT (NIfTI file or DICOM series folder): lesion mask plus a structured report.

The mask is segmented at the preset spacing by sliding-window inference, resampled
back onto the input's own voxel grid and written with the input's own geometry, so it
overlays the CT in any viewer. The report's lesion sizes are measured from that mask.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import EnsureChannelFirst, LoadImage, ResampleToMatch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from synth.atomic import atomic_path, write_atomic
from synth.vocabulary import ATTRIBUTES, LESION_TYPE_NAMES, T_STAGES

from .checkpoint import load_checkpoint
from .dicom_series import read_series_folder
from .evaluate import segment_volume
from .heads import DETECT_OUTPUTS, split_report_logits
from .network import PastaNet
from .transforms import build_preprocess, centred_crop, plain

log = logging.getLogger(__name__)


def longest_diameter_mm(component: np.ndarray, spacing) -> float:
    """Largest distance between two voxel centres of a component (mm): the SR's longest diameter.

    Computed over the convex hull's vertices (exact, cheap); a flat component (one slice) is
    hulled with joggling, and a tiny or collinear one, where qhull fails, uses all its voxels.
    """
    pts = np.argwhere(component) * np.asarray(spacing, dtype=float)
    if len(pts) < 2:
        return 0.0
    for options in ("", "QJ"):
        try:
            pts_hull = pts[ConvexHull(pts, qhull_options=options or None).vertices]
        except (QhullError, ValueError):
            continue
        return round(float(pdist(pts_hull).max()), 1)
    if len(pts) > 5000:   # collinear: argwhere's lexicographic order puts the two ends first and last
        pts = pts[[0, -1]]
    return round(float(pdist(pts).max()), 1)


def lesion_components(mask: np.ndarray, spacing, min_voxels: int = 1) -> list[dict]:
    """Connected lesion components, largest first: voxel count, volume (ml), extent (mm), longest diameter, centre."""
    lab, n = ndimage.label(mask)
    out = []
    sp = np.asarray(spacing, dtype=float)
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[sl] == i
        nvox = int(comp.sum())
        if nvox < min_voxels:
            continue
        extent = [(s.stop - s.start) * float(d) for s, d in zip(sl, sp)]
        centre = [int((s.start + s.stop - 1) // 2) for s in sl]
        out.append({"voxels": nvox, "volume_ml": round(nvox * float(np.prod(sp)) / 1000.0, 3),
                    "size_mm": [round(e, 1) for e in extent],
                    "longest_diameter_mm": longest_diameter_mm(comp, sp), "center_voxel": centre,
                    "bbox_voxel": [[s.start, s.stop - 1] for s in sl]})
    return sorted(out, key=lambda c: -c["voxels"])


@torch.no_grad()
def classify_crop(model: PastaNet, image: torch.Tensor, center, device) -> dict:
    """Report attributes, lesion type, stage and risk from a crop centred on `center`."""
    crop = centred_crop(image, center, model.preset.crop_size, 0.0)
    x = plain(crop)[None].float().to(device)
    out = model(x, tasks=[t for t in ("report", "stage", "survival") if t in model.heads])
    result: dict = {}
    if "report" in out:
        for name, lg in split_report_logits(out["report"].float()).items():
            p = torch.softmax(lg[0], 0).cpu()
            classes = LESION_TYPE_NAMES if name == "lesion_type" else ATTRIBUTES[name]
            result[name] = {"value": classes[int(p.argmax())], "probability": round(float(p.max()), 4)}
    if "stage" in out:
        p = torch.softmax(out["stage"][0].float(), 0).cpu()
        result["t_stage"] = {"value": T_STAGES[int(p.argmax())], "probability": round(float(p.max()), 4)}
    if "survival" in out:
        result["risk_score"] = round(float(out["survival"].reshape(-1)[0]), 4)
    return result


@torch.no_grad()
def detect_volume(model: PastaNet, image: torch.Tensor, device) -> dict[str, float]:
    """Tumor probability per organ: max over a grid of detect-size windows (half overlap)."""
    size = model.preset.detect_crop_size
    shape = image.shape[1:]
    starts = [sorted({*range(0, max(s - size, 0) + 1, max(size // 2, 1)), max(s - size, 0)}) for s in shape]
    best = torch.zeros(len(DETECT_OUTPUTS))
    batch = []

    def flush():
        nonlocal best, batch
        if batch:
            logits = model(torch.stack(batch).to(device), tasks=["detect"])["detect"].float()
            best = torch.maximum(best, torch.sigmoid(logits).max(0).values.cpu())
            batch = []

    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:   # a volume thinner than the window is centred in it (padded), not cut
                centre = [start + min(size, s) // 2 for start, s in zip((a, b, c), shape)]
                batch.append(plain(centred_crop(image, centre, size, 0.0)).float())
                if len(batch) >= 8:
                    flush()
    flush()
    return {name: round(float(p), 4) for name, p in zip(DETECT_OUTPUTS, best)}


def report_text(report: dict) -> str:
    """A short English report rendered from report.json's fields."""
    det = report["detection"]
    lines = [f"PASTA-Fed prediction for {report['input']}",
             f"Tumor probability (any): {det['any']:.2f}"]
    organs = sorted(((p, o) for o, p in det.items() if o != "any"), reverse=True)[:3]
    lines.append("Most likely organs: " + ", ".join(f"{o} {p:.2f}" for p, o in organs))
    if not report["lesions"]:
        lines.append("No lesion segmented.")
        return "\n".join(lines) + "\n"
    les = report["lesions"][0]
    attrs = report.get("primary_lesion", {})
    lines.append(f"{len(report['lesions'])} lesion(s) segmented; the largest measures "
                 f"{' x '.join(f'{s:.0f}' for s in les['size_mm'])} mm ({les['volume_ml']:.1f} ml).")
    if attrs:
        desc = ", ".join(attrs[k]["value"].replace("_", " ") for k in ATTRIBUTES if k in attrs)
        lines.append(f"Appearance: {desc}.")
        if "lesion_type" in attrs:
            lines.append(f"Most likely lesion type: {attrs['lesion_type']['value'].replace('_', ' ')} "
                         f"(p={attrs['lesion_type']['probability']:.2f}).")
        if "t_stage" in attrs:
            lines.append(f"Estimated T stage: {attrs['t_stage']['value']}.")
    return "\n".join(lines) + "\n"


def nifti_input(image: Path, workdir: Path) -> tuple[Path, sitk.Image | None]:
    """A NIfTI path for `image`, plus the DICOM image when `image` is a series folder.

    A folder goes through the agent's checked reader (`dicom_series.read_series_folder`):
    a missing slice or uneven spacing is a DicomSeriesError (a ValueError) naming the
    folder, not a silently wrong volume. The volume is written to `workdir` as NIfTI.
    """
    if image.is_dir():
        sitk_img = read_series_folder(image)
        path = workdir / "input.nii.gz"
        sitk.WriteImage(sitk_img, str(path))
        return path, sitk_img
    if not image.exists():
        raise FileNotFoundError(f"{image}: no such file or folder")
    return image, None


def dicom_results(folder: Path, sitk_img: sitk.Image, mask_xyz: np.ndarray, report: dict,
                  out_dir: Path) -> dict[str, str]:
    """seg.dcm and sr.dcm paths, or {"skipped": why} for a series no DICOM object can reference."""
    from .dicom_results import DicomResultsUnavailable, write_dicom_results

    try:
        # nibabel's (x, y, z) to SimpleITK's (z, y, x) = (slice, row, column): frame k of the SEG is slice k
        return write_dicom_results(folder, sitk_img, np.transpose(mask_xyz, (2, 1, 0)), report, out_dir)
    except DicomResultsUnavailable as exc:
        log.warning("predict: no seg.dcm/sr.dcm: %s", exc)
        return {"skipped": str(exc)}


def _write_mask(path: Path, mask: np.ndarray, nii: Path, sitk_img: sitk.Image | None) -> None:
    """The mask on the input's own grid: the DICOM series' geometry, or the NIfTI's header."""
    with atomic_path(path) as tmp_mask:
        if sitk_img is not None:
            # the DICOM grid: transpose nibabel's (x, y, z) back to SimpleITK's (z, y, x) array order
            m = sitk.GetImageFromArray(np.transpose(mask, (2, 1, 0)).copy())
            m.CopyInformation(sitk_img)
            sitk.WriteImage(m, str(tmp_mask))
            return
        ref = nib.load(str(nii))
        hdr = ref.header.copy()
        hdr.set_data_dtype(np.uint8)
        out_img = nib.Nifti1Image(mask, ref.affine, hdr)
        out_img.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
        out_img.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
        nib.save(out_img, str(tmp_mask))


class Predictor:
    """One loaded model for many CTs: a batch loads the checkpoint once."""

    def __init__(self, checkpoint: str | Path, *, device: str = "auto", threshold: float = 0.5):
        from .device import select_device

        self.checkpoint, self.threshold = checkpoint, threshold
        self.device = select_device(device)
        self.model, self.meta = load_checkpoint(checkpoint, device=self.device)
        self.model.eval()
        self.preprocess = build_preprocess(self.model.preset, mask_keys=())

    def _mask_on_input_grid(self, prob: torch.Tensor, img, nii: Path) -> np.ndarray:
        """Resample the probability back to the input grid (bilinear), then threshold."""
        original = EnsureChannelFirst()(LoadImage(image_only=True)(str(nii)))
        prob_mt = img.clone()
        prob_mt.array = prob[None]
        back = ResampleToMatch(mode="bilinear", padding_mode="zeros")(prob_mt, original)
        return (np.asarray(back[0]) > self.threshold).astype(np.uint8)

    def _describe(self, prob: torch.Tensor, img, lesions: list[dict]) -> tuple[dict, dict]:
        """The primary lesion's attributes (from the largest predicted component) and detection."""
        model, dev = self.model, self.device
        primary = {}
        if lesions:
            comps = lesion_components((prob > self.threshold).numpy(), [model.preset.spacing_mm] * 3)
            if comps:
                primary = classify_crop(model, img, comps[0]["center_voxel"], dev)
        log.info("predict: %d lesion(s) found; describing and detecting", len(lesions))
        detection = detect_volume(model, img, dev) if "detect" in model.heads else {}
        return primary, detection

    def predict(self, image: str | Path, out_dir: str | Path) -> dict:
        """Segment, measure and describe one CT; writes mask.nii.gz, report.json and report.txt to
        `out_dir`, and for a DICOM series folder seg.dcm and sr.dcm referencing the source instances."""
        model, image, out_dir = self.model, Path(image), Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("predict: reading %s", image)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            nii, sitk_img = nifti_input(image, Path(tmp))
            img = self.preprocess({"image": str(nii)})["image"]
            log.info("predict: segmenting a %s volume on %s (preset %s)", "x".join(map(str, img.shape[1:])),
                     self.device, self.meta.preset)
            prob = (segment_volume(model, img, self.device) if "segment" in model.heads
                    else torch.zeros(img.shape[1:]))
            mask = self._mask_on_input_grid(prob, img, nii)
            lesions = lesion_components(mask, nib.load(str(nii)).header.get_zooms()[:3])   # the input's geometry
            primary, detection = self._describe(prob, img, lesions)
            mask_path = out_dir / "mask.nii.gz"
            _write_mask(mask_path, mask, nii, sitk_img)
        report = {"input": str(image), "checkpoint": str(self.checkpoint), "preset": self.meta.preset,
                  "mask": str(mask_path), "lesions": lesions, "primary_lesion": primary, "detection": detection}
        if sitk_img is not None:
            report["dicom"] = dicom_results(image, sitk_img, mask, report, out_dir)
        write_atomic(out_dir / "report.json", json.dumps(report, indent=2))
        write_atomic(out_dir / "report.txt", report_text(report))
        return report


def predict(checkpoint: str | Path, image: str | Path, out_dir: str | Path, *, device: str = "auto",
            threshold: float = 0.5) -> dict:
    """One CT: `Predictor(checkpoint).predict(image, out_dir)`."""
    return Predictor(checkpoint, device=device, threshold=threshold).predict(image, out_dir)


def batch_inputs(folder: Path) -> list[Path]:
    """The CTs of a batch folder: each NIfTI file and each sub-folder (a DICOM series)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() or p.name.endswith((".nii", ".nii.gz")))


def predict_batch(checkpoint: str | Path, folder: str | Path, out_root: str | Path, *,
                  device: str = "auto") -> dict[str, str]:
    """Every CT of `folder` (`batch_inputs`) into `out_root/<its name>/`, the model loaded once."""
    inputs = {image.name: image for image in batch_inputs(Path(folder))}
    return predict_many(checkpoint, inputs, out_root, device=device)


def predict_many(checkpoint: str | Path, inputs: dict[str, Path], out_root: str | Path, *, device: str = "auto",
                 after: Callable[[str, dict], None] | None = None) -> dict[str, str]:
    """Each input CT into `out_root/<its name without .nii[.gz]>/`, the model loaded once, with a progress bar.

    `after(name, report)` runs on each prediction (e.g. to store it). A CT that cannot be
    read, or whose `after` fails, is named with its problem in the outcome and in
    `out_root/batch.json`, and the others go on. Returns {name: "ok" | problem}.
    """
    from tqdm import tqdm

    predictor = Predictor(checkpoint, device=device)
    outcome: dict[str, str] = {}
    for name, image in tqdm(inputs.items(), desc="predict", unit="CT"):
        try:
            report = predictor.predict(image, Path(out_root) / name.removesuffix(".gz").removesuffix(".nii"))
            if after is not None:
                after(name, report)
            outcome[name] = "ok"
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            log.error("predict: %s: %s", image, exc)
            outcome[name] = str(exc)
    write_batch_report(out_root, outcome)
    return outcome


def write_batch_report(out_root: str | Path, outcome: dict[str, str]) -> None:
    """`out_root/batch.json`: each input's name and "ok" or its problem."""
    Path(out_root).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out_root) / "batch.json", json.dumps(outcome, indent=2))
