"""How visible a lesion is in its image: contrast to its organ's nearby tissue over the image noise.

conspicuity = |mean lesion HU - median HU of a 2-voxel ring of the host organ around it| / noise SD
(the median, so that a kidney ring crossing the renal-sinus fat still reads as parenchyma),
where the noise SD is the robust (MAD) standard deviation of the organ's residual to a 3^3
median filter, inside the organ eroded by 2 voxels: the filter keeps anatomy, the erosion and the
MAD keep organ edges and vessels out, so what is left is scanner noise. For a soft-tissue lesion
the organ is its soft tissue only (a hollow organ's gas, bone), else a lung tumour's ring would be
noise-free lung and an oesophageal one's its air. Below about 2 a lesion is
hard to see; below about 0.3 it is invisible. Used to read segmentation figures by band: a model
cannot be asked to find what the image does not show.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from synth.lesions import SOFT_TISSUE_HU  # a hollow organ's gas lumen and bone stay out of ring and noise

RING_VOXELS = 2
BANDS = ((0.0, 0.3, "invisible (<0.3)"), (0.3, 2.0, "faint (0.3-2)"), (2.0, np.inf, "visible (>=2)"))
LESION, HOST = 2, 1


@dataclass(frozen=True)
class Conspicuity:
    lesion_hu: float
    ring_hu: float
    noise_sd: float
    contrast_hu: float      # lesion - ring (signed)
    conspicuity: float      # |contrast| / noise
    voxels: int


def band(value: float) -> str:
    for lo, hi, name in BANDS:
        if lo <= value < hi:
            return name
    return BANDS[-1][2]


def organ_noise_sd(image: np.ndarray, organ: np.ndarray) -> float:
    """SD of the organ's residual to a 3^3 median filter, on a bounding box around the organ."""
    idx = np.argwhere(organ)
    if len(idx) < 27:
        return float("nan")
    lo, hi = np.maximum(idx.min(0) - 1, 0), idx.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    img = image[box].astype(np.float32)
    resid = img - ndi.median_filter(img, size=3)
    inner = ndi.binary_erosion(organ[box], iterations=2)
    vals = resid[inner] if inner.sum() >= 27 else resid[organ[box]]
    return float(1.4826 * np.median(np.abs(vals - np.median(vals))))


def measure(image: np.ndarray, label: np.ndarray) -> Conspicuity | None:
    """Conspicuity of all lesion voxels (`label == 2`) against the host organ (`label == 1`);
    None when the case has no lesion."""
    lesion = label == LESION
    if not lesion.any():
        return None
    soft = (image > SOFT_TISSUE_HU[0]) & (image < SOFT_TISSUE_HU[1])
    organ = (label == HOST) & (soft if soft[lesion].mean() > 0.5 else True)
    ring = ndi.binary_dilation(lesion, iterations=RING_VOXELS) & ~lesion & organ
    if ring.sum() < 4:   # lesion not inside its organ (e.g. it fills it): use any nearby non-lesion tissue
        ring = ndi.binary_dilation(lesion, iterations=RING_VOXELS) & ~lesion
    noise = organ_noise_sd(image, organ & ~lesion)
    if not np.isfinite(noise) or noise <= 0:
        noise = organ_noise_sd(image, ndi.binary_dilation(lesion, iterations=4) & ~lesion)
    lesion_hu = float(image[lesion].mean())
    ring_hu = float(np.median(image[ring]))
    contrast = lesion_hu - ring_hu
    return Conspicuity(lesion_hu, ring_hu, noise, contrast, abs(contrast) / max(noise, 1e-6), int(lesion.sum()))
