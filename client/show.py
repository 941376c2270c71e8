"""`client show`: exactly what the agent reads for one case, for a hospital's QA.

Prints the patient geometry and HU statistics of the volume as read; optionally
writes that volume as NIfTI and a 3-plane PNG montage. Outputs are written
atomically and never inside the hospital's data folders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from synth.atomic import atomic_path

from .ingest import LoadedCase, read_case, scan_site
from .site_config import SiteConfig

DEFAULT_WINDOW = (40.0, 400.0)   # HU level, width: soft tissue


class ShowError(RuntimeError):
    pass


def find_case(config: SiteConfig, case_id: str) -> LoadedCase:
    scan = scan_site(config)
    for source in scan.cases:
        if source.case_id == case_id:
            return read_case(source)
    for rejected in scan.rejected:
        if rejected.case_id == case_id:
            raise ShowError(f"case {case_id} is {rejected.status}: {rejected.reason}")
    known = ", ".join(s.case_id for s in scan.cases[:20])
    where = " or ".join(str(w) for w in (config.data.images, config.pacs and "the PACS cache") if w)
    raise ShowError(f"no case {case_id!r} in {where} (cases: {known or 'none'})")


def describe(case: LoadedCase) -> dict:
    """Geometry and HU statistics of the volume as the agent reads it."""
    hu = sitk.GetArrayViewFromImage(case.image)
    info = {
        "case_id": case.case_id,
        "kind": case.source.kind,
        "source": case.source.source,
        "files": len(case.source.files),
        "patient_id": case.source.patient_id,
        "size_xyz": list(case.shape),
        "spacing_mm": list(case.spacing),
        "origin_mm": list(case.origin),
        "direction": list(case.direction),
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            case.image.GetDirection()),
        "hu": {
            "min": float(hu.min()), "max": float(hu.max()), "mean": float(hu.mean()),
            "std": float(hu.std()),
            **{f"p{q}": float(v) for q, v in zip((1, 50, 99), np.percentile(hu, [1, 50, 99]))},
        },
    }
    if case.mask is not None:
        voxels = int(sitk.GetArrayViewFromImage(case.mask).sum())
        info["mask"] = {"file": str(case.source.mask), "lesion_voxels": voxels,
                        "lesion_ml": voxels * float(np.prod(case.spacing)) / 1000.0}
    return info


def _check_output(config: SiteConfig, out: Path) -> Path:
    out = Path(out).expanduser().resolve()
    if config.is_inside_data(out):
        raise ShowError(f"{out}: refusing to write inside the hospital's data folders")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)    # as every other command does for its outputs
    except OSError as exc:
        raise ShowError(f"{out.parent}: cannot create the output folder ({exc.strerror})") from exc
    return out


def write_nifti(config: SiteConfig, case: LoadedCase, out: Path) -> Path:
    out = _check_output(config, out)
    with atomic_path(out) as tmp:
        sitk.WriteImage(case.image, str(tmp), useCompression=True)
    return out


def write_png(config: SiteConfig, case: LoadedCase, out: Path,
              window: tuple[float, float] = DEFAULT_WINDOW) -> Path:
    """Axial, coronal and sagittal planes through the lesion (or the centre), HU-windowed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = _check_output(config, out)
    image = sitk.DICOMOrient(case.image, "LPS")    # display convention, whatever the scan
    mask = sitk.DICOMOrient(case.mask, "LPS") if case.mask is not None else None
    hu = sitk.GetArrayFromImage(image)             # (z, y, x)
    sx, sy, sz = image.GetSpacing()
    if mask is not None and sitk.GetArrayViewFromImage(mask).any():
        centre = np.round(np.argwhere(sitk.GetArrayViewFromImage(mask)).mean(0)).astype(int)
    else:
        centre = np.array(hu.shape) // 2
    level, width = window
    lo, hi = level - width / 2, level + width / 2
    mask_arr = None if mask is None else sitk.GetArrayViewFromImage(mask)
    planes = [  # (title, 2D slice rows x cols, mask slice, aspect = row mm / col mm, flip)
        ("axial", hu[centre[0]], None if mask_arr is None else mask_arr[centre[0]], sy / sx, False),
        ("coronal", hu[:, centre[1]], None if mask_arr is None else mask_arr[:, centre[1]], sz / sx, True),
        ("sagittal", hu[:, :, centre[2]], None if mask_arr is None else mask_arr[:, :, centre[2]], sz / sy, True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (title, plane, mplane, aspect, flip) in zip(axes, planes):
        origin = "lower" if flip else "upper"      # superior at the top for coronal/sagittal
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin=origin,
                  interpolation="nearest")
        if mplane is not None and mplane.any():
            ax.contour(mplane, levels=[0.5], colors="red", linewidths=0.8, origin=origin)
        ax.set_title(f"{title}")
        ax.axis("off")
    fig.suptitle(f"{case.case_id}  window L{level:g} W{width:g} HU  "
                 f"spacing {sx:.2f}x{sy:.2f}x{sz:.2f} mm")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def format_description(info: dict) -> str:
    hu = info["hu"]
    lines = [
        f"case {info['case_id']} ({info['kind']}, {info['files']} file(s), source {info['source']}, "
        f"patient {info['patient_id']})",
        f"size (x,y,z)     {info['size_xyz']}",
        f"spacing mm       {[round(v, 4) for v in info['spacing_mm']]}",
        f"origin mm (LPS)  {[round(v, 4) for v in info['origin_mm']]}",
        f"direction        {[round(v, 6) for v in info['direction']]}  ({info['orientation']})",
        f"HU               min {hu['min']:.1f}  max {hu['max']:.1f}  mean {hu['mean']:.1f}  "
        f"std {hu['std']:.1f}  p1 {hu['p1']:.1f}  p50 {hu['p50']:.1f}  p99 {hu['p99']:.1f}",
    ]
    if "mask" in info:
        m = info["mask"]
        lines.append(f"mask             {m['file']}: {m['lesion_voxels']} lesion voxels "
                     f"({m['lesion_ml']:.2f} ml)")
    return "\n".join(lines)
