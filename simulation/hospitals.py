"""Simulated hospitals that differ the way real ones do, generated from one seed.

Each site gets its own case count, scanner (noise, blur, slice thickness, HU
calibration offset), contrast phase, lesion-type mix (non-IID) and label
availability, and its data is laid out exactly as a real hospital's would be:
RUN/sites/<site>/data/{images,masks}/<case_id>.nii.gz + labels.csv, with its own
hospital.yaml and state_dir. Held-out test cases live outside the site's data folder
(RUN/heldout/<site>/) so the agent never sees them.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from pasta_model.targets import labels_from_report
from synth.atomic import atomic_path, write_atomic
from synth.dataset import generate_dataset, read_dataset
from synth.scanner import ScannerProfile
from synth.vocabulary import ATTRIBUTES, LESION_TYPE_NAMES, PHASES

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("case_id", "patient_id", "tumor_present", "organ", "t_stage", "survival_months",
                 "survival_event", *ATTRIBUTES, "lesion_type")


@dataclass(frozen=True)
class HospitalProfile:
    name: str
    cases: int
    heldout: int
    scanner: ScannerProfile
    phase: str
    type_weights: dict[str, float]
    has_masks: bool
    seed: int


def make_profiles(n: int, seed: int, cases_min: int, cases_max: int, heldout: int) -> list[HospitalProfile]:
    """The first hospital is the large one; the others are small (what federation is for)."""
    rng = np.random.default_rng([seed, 7919])
    profiles = []
    for i in range(n):
        name = f"hospital-{chr(ord('a') + i)}" if i < 26 else f"hospital-{i:03d}"
        cases = cases_max if i == 0 else int(rng.integers(cases_min, max(cases_min + 1, cases_max // 3)))
        weights = rng.dirichlet(np.full(len(LESION_TYPE_NAMES), 0.8))
        profiles.append(HospitalProfile(
            name=name, cases=cases, heldout=heldout,
            scanner=ScannerProfile(noise_hu=float(rng.uniform(8, 28)), blur_mm=float(rng.uniform(0.5, 2.0)),
                                   slice_thickness_mm=float(rng.choice([1.0, 2.5, 5.0])),
                                   hu_offset=float(rng.uniform(-25, 25))),
            phase=str(rng.choice(PHASES)),
            type_weights={t: float(w) for t, w in zip(LESION_TYPE_NAMES, weights)},
            has_masks=bool(i == 0 or rng.random() < 0.5),
            seed=int(rng.integers(1 << 30)),
        ))
    return profiles


def export_hospital_layout(generated: Path, out: Path, with_masks: bool, prefix: str) -> int:
    """PASTA-Gen layout -> images/<case>.nii.gz (+ masks/, lesion = 1) + labels.csv."""
    records = read_dataset(generated)
    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    if with_masks:
        masks.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, rec in enumerate(records):
        case_id = f"{prefix}-{i:04d}"
        target = images / f"{case_id}.nii.gz"
        if not target.exists():
            tmp = images / f".{case_id}.tmp.nii.gz"
            if tmp.exists():
                tmp.unlink()
            os.link(rec.img, tmp)         # the same bytes, no copy
            os.replace(tmp, target)
        if with_masks and not (masks / f"{case_id}.nii.gz").exists():
            label = nib.load(str(rec.label))
            lesion = (np.asarray(label.dataobj) == 2).astype(np.uint8)
            with atomic_path(masks / f"{case_id}.nii.gz") as tmp:
                nib.save(nib.Nifti1Image(lesion, label.affine), str(tmp))
        labels = labels_from_report(rec.report())
        rows.append({"case_id": case_id, "patient_id": f"{prefix}-p{i:04d}", **labels})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LABEL_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else (int(row[k]) if isinstance(row[k], bool) else row[k]))
                         for k in LABEL_COLUMNS})
    write_atomic(out / "labels.csv", buf.getvalue())
    return len(rows)


def site_yaml(site: str, data: Path, state_dir: Path, epsilon: float, delta: float, max_grad_norm: float,
              backbone: Path | None, with_masks: bool) -> str:
    cfg = {
        "site": site,
        "data": {"images": str(data / "images"), "labels": str(data / "labels.csv"),
                 **({"masks": str(data / "masks")} if with_masks else {})},
        "privacy": {"max_epsilon": float(epsilon), "delta": float(delta), "max_grad_norm": float(max_grad_norm)},
        "state_dir": str(state_dir),
        "device": "auto",
    }
    if backbone is not None:
        cfg["backbone"] = str(backbone)
    return yaml.safe_dump(cfg, sort_keys=False)


@dataclass
class SiteFiles:
    profile: HospitalProfile
    config: Path              # RUN/sites/<site>/hospital.yaml
    heldout_config: Path      # RUN/heldout/<site>/hospital.yaml (evaluation only, never given to the agent)
    cases: int


def build_site(run: Path, p: HospitalProfile, size: int, epsilon: float, delta: float, max_grad_norm: float,
               backbone: Path | None, progress: bool = True, spacing: float = 3.0) -> SiteFiles:
    site_dir = run / "sites" / p.name
    held_dir = run / "heldout" / p.name
    kwargs = dict(size=size, spacing=spacing, types=p.type_weights, phase=p.phase, scanner=p.scanner, progress=progress)
    generate_dataset(site_dir / "generated", p.cases, seed=p.seed, **kwargs)
    generate_dataset(held_dir / "generated", p.heldout, seed=p.seed + 1, **kwargs)
    n = export_hospital_layout(site_dir / "generated", site_dir / "data", p.has_masks, p.name)
    export_hospital_layout(held_dir / "generated", held_dir / "data", True, f"{p.name}-test")
    config = site_dir / "hospital.yaml"
    write_atomic(config, site_yaml(p.name, site_dir / "data", site_dir / "state", epsilon, delta,
                                   max_grad_norm, backbone, p.has_masks))
    held_config = held_dir / "hospital.yaml"
    write_atomic(held_config, site_yaml(f"{p.name}-test", held_dir / "data", held_dir / "state", epsilon, delta,
                                        max_grad_norm, backbone, True))
    return SiteFiles(p, config, held_config, n)


def profile_table(sites: list[SiteFiles]) -> list[dict]:
    rows = []
    for s in sites:
        p = s.profile
        top = sorted(p.type_weights.items(), key=lambda kv: -kv[1])[:3]
        rows.append({"site": p.name, "cases": s.cases, "heldout": p.heldout, "phase": p.phase,
                     "noise_hu": round(p.scanner.noise_hu, 1), "blur_mm": round(p.scanner.blur_mm, 2),
                     "slice_mm": p.scanner.slice_thickness_mm, "hu_offset": round(p.scanner.hu_offset, 1),
                     "masks": p.has_masks, "main_types": ", ".join(f"{t} {w:.0%}" for t, w in top)})
    return rows
