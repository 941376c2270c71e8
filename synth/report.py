"""Case-level report fields: lesion location, T stage, survival, and the English report.

T stage (simplified organ rules, not AJCC; docs/synth.md has the table), from the
largest lesion's longest extent D (mm), or for hollow organs its wall thickness t:

| organ | T1 | T2 | T3 | T4 |
|---|---|---|---|---|
| lung | D <= 30 | <= 50 | <= 70 | > 70 or invasion |
| liver | D <= 20 | <= 50 | > 50 | invasion |
| pancreas | D <= 20 | <= 40 | > 40 | invasion |
| kidney | D <= 40 | <= 70 | > 70 | invasion |
| esophagus, stomach, colon, bladder, gallbladder | t <= 8 | <= 12 | > 12 | invasion |

Benign lesions and bone metastases (an M category, not a T) have no T stage.

Survival: a Weibull proportional-hazards model, S(t) = exp(-lam * t^1.2) with t in months,
lam = base[type] * exp(0.5 * stage_index) * (D / 30 mm)^0.4 for malignant types
(stage_index T1=0 .. T4=3; bone metastasis counts as 2), lam = 0.002 for benign ones;
follow-up is censored at a uniform 12-120 months.
"""
from __future__ import annotations

import numpy as np

from synth.lesions import HOLLOW_ORGANS
from synth.vocabulary import LESION_TYPE_BY_NAME, T_STAGES

SURVIVAL_BASE = {
    "lung_tumor": 0.030, "liver_cancer": 0.035, "gallbladder_cancer": 0.045,
    "pancreas_tumor": 0.060, "esophageal_cancer": 0.040, "gastric_cancer": 0.030,
    "colon_cancer": 0.015, "kidney_tumor": 0.010, "bladder_cancer": 0.015,
    "bone_metastasis": 0.050,
}
BENIGN_HAZARD = 0.002
WEIBULL_K = 1.2
STAGE_RULES = {
    "lung": (30, 50, 70), "liver": (20, 50, None), "pancreas": (20, 40, None), "kidney": (40, 70, None),
}
WALL_RULE = (8, 12)

_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


def _rel(c, lo, hi):
    return [float(np.clip((c[a] - lo[a]) / max(hi[a] - lo[a], 1e-6), 0, 1)) for a in range(3)]


def locate(organ: str, centroid_mm, host_lo, host_hi, part: str | None, part_lo=None, part_hi=None) -> str:
    """A radiologist's location for a lesion, from its centroid (patient mm: x left+,
    y posterior+, z superior+), the host organ's box, and the labelled part it sits in."""
    u, v, w = _rel(centroid_mm, host_lo, host_hi)  # u: 0 right -> 1 left, v: 0 ant -> 1 post
    if organ == "liver":
        if u > 0.62:
            return "segment II (left lateral, superior)" if w > 0.5 else "segment III (left lateral, inferior)"
        if u > 0.48:
            if v > 0.6 and 0.3 < w < 0.8:
                return "segment I (caudate lobe)"
            return "segment IV (left medial)"
        if v < 0.5:
            return "segment VIII (right anterior, superior)" if w > 0.5 else "segment V (right anterior, inferior)"
        return "segment VII (right posterior, superior)" if w > 0.5 else "segment VI (right posterior, inferior)"
    if organ == "lung":
        if part and part.startswith("lung_"):
            _, lobe, _, side = part.split("_")
            return f"{side} {lobe} lobe"
        side = "left" if centroid_mm[0] > 0.5 * (host_lo[0] + host_hi[0]) else "right"
        return f"{side} {'upper' if w > 0.5 else 'lower'} lobe"
    if organ == "kidney":
        if part in ("kidney_left", "kidney_right"):
            side = part.split("_")[1]
            pw = _rel(centroid_mm, part_lo, part_hi)[2]
        else:
            side = "left" if u > 0.5 else "right"
            pw = w
        pole = "upper pole" if pw > 0.66 else ("lower pole" if pw < 0.33 else "interpolar region")
        return f"{side} kidney, {pole}"
    if organ == "pancreas":
        return "pancreatic head" if u < 0.35 else ("pancreatic body" if u < 0.7 else "pancreatic tail")
    if organ == "gallbladder":
        return "gallbladder fundus" if w < 0.35 else ("gallbladder neck" if w > 0.7 else "gallbladder body")
    if organ == "stomach":
        return "gastric fundus" if w > 0.7 else ("gastric antrum" if w < 0.3 else "gastric body")
    if organ == "colon":
        if w < 0.2:
            return "rectum" if abs(u - 0.5) < 0.2 and v > 0.5 else "sigmoid colon"
        if u < 0.3:
            return "ascending colon"
        if u > 0.7:
            return "descending colon"
        return "transverse colon"
    if organ == "esophagus":
        return ("upper" if w > 0.66 else "middle" if w > 0.33 else "lower") + " thoracic esophagus"
    if organ == "urinary_bladder":
        if w > 0.7:
            return "bladder dome"
        du, dv = u - 0.5, v - 0.5
        if abs(du) > abs(dv):
            return ("left" if du > 0 else "right") + " lateral bladder wall"
        return ("posterior" if dv > 0 else "anterior") + " bladder wall"
    if organ == "bone":
        if part is None:
            return "skeleton"
        if part.startswith("vertebrae_"):
            return f"{part.split('_')[1]} vertebra"
        if part.startswith("rib_"):
            _, side, k = part.split("_")
            k = int(k)
            return f"{side} {_ORDINAL.get(k, f'{k}th')} rib"
        if part.startswith("hip_"):
            return f"{part.split('_')[1]} hip bone (pelvis)"
        if part.startswith("femur_"):
            return f"{part.split('_')[1]} proximal femur"
        return part.replace("_", " ")
    return organ.replace("_", " ")


def t_stage(lesion_type: str, lesions: list[dict]) -> str | None:
    lt = LESION_TYPE_BY_NAME[lesion_type]
    if not lt.malignant or lesion_type == "bone_metastasis":
        return None
    best = 0
    for les in lesions:
        if les["invasion"] == "yes":
            best = 3
            continue
        if lt.organ in HOLLOW_ORGANS:
            t = les["thickness_mm"]
            stage = 0 if t <= WALL_RULE[0] else (1 if t <= WALL_RULE[1] else 2)
        else:
            d = max(les["size_mm"])
            cuts = STAGE_RULES[lt.organ]
            stage = 0
            for k, cut in enumerate(cuts):
                if cut is None:
                    stage = k
                    break
                if d > cut:
                    stage = k + 1
                else:
                    break
        best = max(best, stage)
    return T_STAGES[best]


def survival(lesion_type: str, stage: str | None, lesions: list[dict], rng: np.random.Generator
             ) -> tuple[float, bool]:
    lt = LESION_TYPE_BY_NAME[lesion_type]
    if lt.malignant:
        d = max(max(les["size_mm"]) for les in lesions)
        idx = T_STAGES.index(stage) if stage else 2
        lam = SURVIVAL_BASE[lesion_type] * np.exp(0.5 * idx) * (max(d, 1.0) / 30.0) ** 0.4
    else:
        lam = BENIGN_HAZARD
    event_time = (rng.exponential() / lam) ** (1.0 / WEIBULL_K)
    follow_up = rng.uniform(12.0, 120.0)
    return round(float(min(event_time, follow_up)), 1), bool(event_time <= follow_up)


_SHAPE_TXT = {"round_like": "round", "irregular": "irregular", "wall_thickening": "wall-thickening",
              "punctate_nodular": "punctate/nodular"}
_PHASE_TXT = {"plain": "Non-contrast", "arterial": "Arterial phase", "portal_venous": "Portal venous phase"}


def report_text(rep: dict) -> str:
    organ = rep["organ"].replace("_", " ")
    lesions = rep["lesions"]
    n = len(lesions)
    lines = [f"{_PHASE_TXT[rep['phase']]} CT. {n} lesion{'s' if n > 1 else ''} in the {organ}."]
    for k, les in enumerate(lesions, 1):
        a, b, c = les["size_mm"]
        ref = f" vs {les['surround_hu']:.0f} HU in the adjacent {organ}" if les.get("surround_hu") is not None else ""
        inv = ("with invasion of adjacent structures" if les["invasion"] == "yes"
               else "without invasion of adjacent structures")
        lines.append(
            f"Lesion {k}: {les['location']}, {a:.0f} x {b:.0f} x {c:.0f} mm ({les['volume_ml']:.1f} ml); "
            f"{_SHAPE_TXT[les['shape']]}, {les['density']} (mean {les['mean_hu']:.0f} HU{ref}), "
            f"{les['heterogeneity']}, {les['surface'].replace('_', '-')} margin, {inv}."
        )
    name = rep["lesion_type"].replace("_", " ")
    stage = f", {rep['t_stage']}" if rep.get("t_stage") else ""
    kind = "malignant" if rep["malignant"] else "benign"
    lines.append(f"Impression: {name} ({kind}){stage}.")
    return " ".join(lines)
