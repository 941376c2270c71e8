"""`synth show`: axial, coronal and sagittal slices through a lesion, with the lesion and
its organ outlined and the report beside them."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from synth.errors import SynthInputError
from synth.from_ct import Reoriented

WINDOWS = {"lung": (-1350.0, 150.0), "bone": (-450.0, 1050.0)}
SOFT = (-160.0, 240.0)


def show_case(case_dir: str | Path, png: str | Path, lesion: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(case_dir)
    for f in ("img.nii.gz", "label.nii.gz"):
        if not (d / f).is_file():
            raise SynthInputError(f"{case_dir}: no {f} (not a case folder)")
    img_n = nib.load(str(d / "img.nii.gz"))
    ro = Reoriented(img_n.shape, img_n.affine)
    img = ro.forward(np.asarray(img_n.dataobj, dtype=np.float32))
    lab = ro.forward(np.asarray(nib.load(str(d / "label.nii.gz")).dataobj).astype(np.uint8))
    rep = {}
    if (d / "type.json").is_file():
        rep = json.loads((d / "type.json").read_text(encoding="utf-8"))
    les = lab == 2
    comp, n = ndi.label(les, structure=np.ones((3, 3, 3)))
    if n == 0:
        raise SynthInputError(f"{case_dir}: the label map has no lesion (value 2)")
    sizes = np.bincount(comp.ravel())[1:]
    order = np.argsort(-sizes)
    k = int(order[min((lesion or 1) - 1, n - 1)]) + 1
    c = [int(round(v)) for v in ndi.center_of_mass(comp == k)]
    lo, hi = WINDOWS.get(rep.get("organ"), SOFT)
    sp = ro.grid.spacing
    views = [
        ("axial", img[:, :, c[2]].T, lab[:, :, c[2]].T, "upper", sp[1] / sp[0]),
        ("coronal", img[:, c[1], :].T, lab[:, c[1], :].T, "lower", sp[2] / sp[0]),
        ("sagittal", img[c[0], :, :].T, lab[c[0], :, :].T, "lower", sp[2] / sp[1]),
    ]
    fig = plt.figure(figsize=(19, 6.2))
    gs = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.15])
    for i, (name, sl, lb, origin, aspect) in enumerate(views):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, origin=origin, aspect=aspect, interpolation="nearest")
        if (lb >= 1).any():
            ax.contour(lb >= 1, levels=[0.5], colors=["lime"], linewidths=0.8)
        if (lb == 2).any():
            ax.contour(lb == 2, levels=[0.5], colors=["red"], linewidths=1.0)
        ax.set_title(f"{name} (slice {c[2] if name == 'axial' else c[1] if name == 'coronal' else c[0]})")
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(gs[0, 3])
    ax.axis("off")
    head = f"{rep.get('lesion_type', '?')}  |  {rep.get('phase', '?')}  |  T stage: {rep.get('t_stage')}"
    text = rep.get("report_text", "").replace(" Lesion ", "\nLesion ").replace(" Impression:", "\nImpression:")
    body = "\n\n".join(textwrap.fill(p, 62) for p in text.split("\n"))
    ax.text(0, 1, head + "\n\n" + body, va="top", ha="left", fontsize=9, family="monospace")
    ax.text(0, 0.0, "green: host organ   red: lesion   (patient's right on the image left)",
            fontsize=8, color="gray")
    fig.suptitle(str(d), fontsize=9)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
