"""The label vocabularies shared by the generator, the model and the sites.

They live in `synth` because everything else depends on it: a model trained on
PASTA-Gen-style data predicts exactly these classes, in exactly this order.
Order matters: class indices in checkpoints are positions in these tuples.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LesionType:
    name: str          # folder name under <Organ>/ and the value of type.json "lesion_type"
    organ: str         # host organ (one of HOST_ORGANS)
    malignant: bool


LESION_TYPES: tuple[LesionType, ...] = (
    LesionType("lung_tumor", "lung", True),
    LesionType("liver_cancer", "liver", True),
    LesionType("gallbladder_cancer", "gallbladder", True),
    LesionType("pancreas_tumor", "pancreas", True),
    LesionType("esophageal_cancer", "esophagus", True),
    LesionType("gastric_cancer", "stomach", True),
    LesionType("colon_cancer", "colon", True),
    LesionType("kidney_tumor", "kidney", True),
    LesionType("bladder_cancer", "urinary_bladder", True),
    LesionType("bone_metastasis", "bone", True),
    LesionType("liver_cyst", "liver", False),
    LesionType("gallstone", "gallbladder", False),
    LesionType("pancreas_cyst", "pancreas", False),
    LesionType("kidney_cyst", "kidney", False),
    LesionType("kidney_stone", "kidney", False),
)
LESION_TYPE_NAMES: tuple[str, ...] = tuple(t.name for t in LESION_TYPES)
LESION_TYPE_BY_NAME: dict[str, LesionType] = {t.name: t for t in LESION_TYPES}

# Organs that host a lesion type; also the per-organ outputs of the `detect` head.
HOST_ORGANS: tuple[str, ...] = (
    "lung", "liver", "gallbladder", "pancreas", "esophagus",
    "stomach", "colon", "kidney", "urinary_bladder", "bone",
)
# Folder names of the PASTA-Gen-30K layout: <Organ>/<Type>/<id>/
ORGAN_FOLDERS: dict[str, str] = {
    "lung": "Lung", "liver": "Liver", "gallbladder": "Gallbladder",
    "pancreas": "Pancreas", "esophagus": "Esophagus", "stomach": "Stomach",
    "colon": "Colon", "kidney": "Kidney", "urinary_bladder": "Bladder", "bone": "Bone",
}

# The five PASTA structured-report attributes (arXiv 2502.06171), in class order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("round_like", "irregular", "wall_thickening", "punctate_nodular"),
    "density": ("hypodense", "isodense", "hyperdense"),
    "heterogeneity": ("homogeneous", "heterogeneous"),
    "surface": ("well_defined", "ill_defined"),
    "invasion": ("no", "yes"),
}

T_STAGES: tuple[str, ...] = ("T1", "T2", "T3", "T4")   # benign lesions have t_stage null
PHASES: tuple[str, ...] = ("plain", "arterial", "portal_venous")
