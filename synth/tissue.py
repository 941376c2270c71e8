"""Tissue classes of the phantom and their CT numbers (HU) in each contrast phase.

Values are typical adult figures (plain / arterial / portal venous); the phantom adds a
smooth texture of the given amplitude and the scanner adds noise on top.
"""
from __future__ import annotations

import numpy as np

from synth.vocabulary import PHASES

# name: (plain, arterial, portal_venous, texture_sd)
_TISSUES: dict[str, tuple[float, float, float, float]] = {
    "air": (-1000, -1000, -1000, 0),
    "fat": (-100, -100, -100, 6),
    "muscle": (45, 55, 60, 5),
    "lung": (-860, -860, -860, 18),
    "lung_vessel": (40, 260, 160, 10),
    "liver": (58, 72, 110, 5),
    "liver_vessel": (42, 85, 175, 5),
    "spleen": (48, 115, 120, 5),
    "pancreas": (42, 115, 95, 10),
    "kidney_cortex": (32, 175, 160, 5),
    "kidney_medulla": (32, 70, 150, 5),
    "urine": (8, 8, 10, 2),
    "bile": (10, 10, 10, 2),
    "gi_wall": (40, 85, 95, 5),
    "gi_fluid": (12, 12, 12, 3),
    "gas": (-950, -950, -950, 15),
    "feces": (-40, -40, -40, 70),
    "blood_arterial": (42, 320, 165, 3),
    "blood_venous": (42, 95, 150, 3),
    "blood_portal": (42, 90, 175, 3),
    "myocardium": (45, 110, 95, 4),
    "cortical_bone": (900, 900, 900, 80),
    "cancellous_bone": (230, 230, 235, 35),
    "rib_bone": (420, 420, 420, 60),
    "cartilage": (120, 120, 125, 8),
    "disc": (85, 85, 90, 5),
    "cord": (32, 32, 35, 3),
    "airway_wall": (70, 80, 85, 5),
}
TISSUE_NAMES: tuple[str, ...] = tuple(_TISSUES)
T: dict[str, int] = {name: i for i, name in enumerate(TISSUE_NAMES)}

_TABLE = np.array([v for v in _TISSUES.values()], dtype=np.float32)  # (n_tissues, 4)


def hu_lut(phase: str) -> np.ndarray:
    """Per-tissue mean HU for `phase`, indexable by the tissue map (uint8)."""
    lut = np.zeros(256, np.float32)
    lut[: len(_TABLE)] = _TABLE[:, PHASES.index(phase)]
    return lut


def texture_lut() -> np.ndarray:
    lut = np.zeros(256, np.float32)
    lut[: len(_TABLE)] = _TABLE[:, 3]
    return lut
