"""Small hospitals on disk for federation tests, written with nibabel (not the synth generator).

Each case is a 40^3 CT at 3 mm with a bright or dark sphere as the lesion, a lesion
mask, and a labels.csv row; attributes follow the sphere so a head can learn them.
"""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml


def write_hospital(root: Path, site: str, n_cases: int, seed: int, *, epsilon: float = 50.0,
                   backbone: Path | None = None, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    data = root / site / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "masks").mkdir(parents=True, exist_ok=True)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    rows = []
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for i in range(n_cases):
        hyper = bool(rng.integers(2))
        c = rng.integers(size // 3, 2 * size // 3, 3)
        r = rng.uniform(3, 6)
        lesion = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r
        img = rng.normal(40, 15, (size,) * 3)
        img[lesion] += 80 if hyper else -60
        case = f"{site}-{i:03d}"
        nib.save(nib.Nifti1Image(img.astype(np.int16), affine), str(data / "images" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), str(data / "masks" / f"{case}.nii.gz"))
        rows.append({"case_id": case, "patient_id": f"{site}-p{i:03d}", "tumor_present": 1, "organ": "liver",
                     "t_stage": ("T2" if r > 4.5 else "T1") if hyper else "",
                     "survival_months": round(float(rng.uniform(3, 60)), 1),
                     "survival_event": int(rng.integers(2)), "shape": "round_like",
                     "density": "hyperdense" if hyper else "hypodense", "heterogeneity": "homogeneous",
                     "surface": "well_defined", "invasion": "no",
                     "lesion_type": "liver_cancer" if hyper else "liver_cyst"})
    with open(data / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = {"site": site, "data": {"images": str(data / "images"), "labels": str(data / "labels.csv"),
                                  "masks": str(data / "masks")},
           "privacy": {"max_epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
           "state_dir": str(root / site / "state"), "device": "cpu"}
    if backbone is not None:
        cfg["backbone"] = str(backbone)
    path = root / site / "hospital.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_pretrained(path: Path, seed: int = 0) -> Path:
    import torch

    from pasta_model.checkpoint import save_checkpoint
    from pasta_model.network import build_model
    torch.manual_seed(seed)
    save_checkpoint(path, build_model("tiny"))
    return path
