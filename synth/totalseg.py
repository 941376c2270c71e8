"""TotalSegmentator v2 ("total" task) label ids, and how they group into our host organs.

`total.nii.gz` of every generated case uses these ids, so a whole-body map from
TotalSegmentator and one from the phantom read the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from synth.errors import SynthInputError
from synth.vocabulary import HOST_ORGANS

# id -> name, TotalSegmentator v2 "total" (117 classes).
TOTALSEG_V2: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
    6: "stomach", 7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left",
    10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus", 16: "trachea",
    17: "thyroid_gland", 18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder",
    22: "prostate", 23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum",
    26: "vertebrae_S1", 27: "vertebrae_L5", 28: "vertebrae_L4", 29: "vertebrae_L3",
    30: "vertebrae_L2", 31: "vertebrae_L1", 32: "vertebrae_T12", 33: "vertebrae_T11",
    34: "vertebrae_T10", 35: "vertebrae_T9", 36: "vertebrae_T8", 37: "vertebrae_T7",
    38: "vertebrae_T6", 39: "vertebrae_T5", 40: "vertebrae_T4", 41: "vertebrae_T3",
    42: "vertebrae_T2", 43: "vertebrae_T1", 44: "vertebrae_C7", 45: "vertebrae_C6",
    46: "vertebrae_C5", 47: "vertebrae_C4", 48: "vertebrae_C3", 49: "vertebrae_C2",
    50: "vertebrae_C1", 51: "heart", 52: "aorta", 53: "pulmonary_vein",
    54: "brachiocephalic_trunk", 55: "subclavian_artery_right", 56: "subclavian_artery_left",
    57: "common_carotid_artery_right", 58: "common_carotid_artery_left",
    59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right",
    61: "atrial_appendage_left", 62: "superior_vena_cava", 63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein", 65: "iliac_artery_left", 66: "iliac_artery_right",
    67: "iliac_vena_left", 68: "iliac_vena_right", 69: "humerus_left", 70: "humerus_right",
    71: "scapula_left", 72: "scapula_right", 73: "clavicula_left", 74: "clavicula_right",
    75: "femur_left", 76: "femur_right", 77: "hip_left", 78: "hip_right", 79: "spinal_cord",
    80: "gluteus_maximus_left", 81: "gluteus_maximus_right", 82: "gluteus_medius_left",
    83: "gluteus_medius_right", 84: "gluteus_minimus_left", 85: "gluteus_minimus_right",
    86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right",
    90: "brain", 91: "skull",
    **{91 + k: f"rib_left_{k}" for k in range(1, 13)},
    **{103 + k: f"rib_right_{k}" for k in range(1, 13)},
    116: "sternum", 117: "costal_cartilages",
}
TOTALSEG_ID: dict[str, int] = {name: i for i, name in TOTALSEG_V2.items()}

VERTEBRA_LEVELS: tuple[str, ...] = tuple(
    [f"T{k}" for k in range(1, 13)] + [f"L{k}" for k in range(1, 6)]
)


def _is_bone(name: str) -> bool:
    return name.startswith(("vertebrae_", "rib_", "hip_", "femur_", "humerus_", "scapula_",
                            "clavicula_")) or name in ("sacrum", "sternum", "skull")


def _host_of(name: str) -> str | None:
    if name.startswith("lung_"):
        return "lung"
    if name in ("kidney_right", "kidney_left", "kidney_cyst_left", "kidney_cyst_right"):
        return "kidney"
    if _is_bone(name):
        return "bone"
    return name if name in HOST_ORGANS else None


def host_groups(label_names: dict[int, str]) -> dict[str, tuple[int, ...]]:
    """Host organ -> the label values that make it up, for a map of label value -> name.

    Names may be TotalSegmentator names or our own host-organ names (a user's map).
    """
    groups: dict[str, list[int]] = {organ: [] for organ in HOST_ORGANS}
    for value, name in label_names.items():
        host = _host_of(name)
        if host is not None:
            groups[host].append(int(value))
    return {organ: tuple(sorted(v)) for organ, v in groups.items()}


TOTALSEG_HOSTS: dict[str, tuple[int, ...]] = host_groups(TOTALSEG_V2)


def load_label_map(spec: str | None) -> dict[int, str]:
    """`None` or "totalseg" -> TotalSegmentator v2; else a JSON file {"value": "name", ...}."""
    if spec in (None, "", "totalseg", "totalsegmentator", "totalseg_v2"):
        return dict(TOTALSEG_V2)
    path = Path(spec)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        mapping = {int(k): str(v) for k, v in raw.items()}
    except FileNotFoundError:
        raise SynthInputError(f"--label-map {spec}: no such file") from None
    except (ValueError, AttributeError, TypeError) as exc:
        raise SynthInputError(
            f"--label-map {spec}: expected a JSON object of label value -> organ name ({exc})"
        ) from None
    return mapping
