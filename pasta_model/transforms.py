"""MONAI dict transforms for PASTA: loading, geometry, the PASTA HU map and crops.

One preprocessing pipeline (`build_preprocess`) serves pretraining, prediction,
evaluation and the hospital agent, so a model always sees CT the way it was trained.
Our own transforms follow MONAI's split: an array transform with the logic and a thin
`...d` MapTransform that copies the dict and applies it to each key.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    BorderPad,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Spacingd,
    SpatialCrop,
    Transform,
    generate_spatial_bounding_box,
)

log = logging.getLogger(__name__)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

# The PASTA intensity map: (HU, value) knots, piecewise linear, clamped outside.
HU_KNOTS: tuple[tuple[float, float], ...] = ((-1000.0, 0.0), (-200.0, 0.2), (200.0, 0.9), (1000.0, 1.0))
AIR_VALUE = 0.0          # value of air after the HU map: what crops pad with
LESION_LABEL = 2         # label.nii.gz: host organ 1, lesion 2
ORGAN_LABEL = 1


def plain(x) -> torch.Tensor:
    """A plain torch.Tensor (MetaTensor dropped): models must not run on MetaTensors,
    whose per-op metadata tracking makes every convolution several times slower."""
    if hasattr(x, "as_tensor"):
        return x.as_tensor()
    return torch.as_tensor(x)


def pasta_hu_map(x):
    """Map HU to [0, 1] with the PASTA knots; works on numpy arrays and torch tensors.

    Written as a sum of clamped ramps (one per knot segment) so the same expression
    serves numpy and torch (MetaTensor metadata survives torch ops).
    """
    clip = torch.clamp if isinstance(x, torch.Tensor) else np.clip
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x, dtype=np.float32)
    elif not torch.is_floating_point(x):
        x = x.float()
    out = None
    for (h0, v0), (h1, v1) in zip(HU_KNOTS[:-1], HU_KNOTS[1:]):
        ramp = (clip(x, h0, h1) - h0) * ((v1 - v0) / (h1 - h0))
        out = ramp + HU_KNOTS[0][1] if out is None else out + ramp
    return out


class PastaHUMap(Transform):
    """Array transform: HU -> PASTA intensity in [0, 1]."""

    def __call__(self, img):
        return pasta_hu_map(img)


class PastaHUMapd(MapTransform):
    """Dict version of `PastaHUMap`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mapper = PastaHUMap()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mapper(d[key])
        return d


def centred_crop(img: torch.Tensor, center: Sequence[int], size: int | Sequence[int], value: float = 0.0):
    """Crop `img` [C, *spatial] to `size` centred on `center`, padding with `value` past the border.

    Pads by half the crop first (BorderPad) so the centre stays exactly in the middle
    of the output even at the edge of the volume.
    """
    sizes = [int(size)] * (img.ndim - 1) if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    half = [s // 2 + 1 for s in sizes]
    padded = BorderPad(spatial_border=[b for h in half for b in (h, h)], mode="constant", value=value)(img)
    start = [int(c) + h - s // 2 for c, h, s in zip(center, half, sizes)]
    return SpatialCrop(roi_start=start, roi_end=[a + s for a, s in zip(start, sizes)])(padded)


def mask_center(mask) -> list[int] | None:
    """Centre (voxel) of the bounding box of a boolean mask [*spatial] or None when empty."""
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    if not m.any():
        return None
    start, end = generate_spatial_bounding_box(m[None])   # end exclusive
    return [int((a + b) // 2) for a, b in zip(start, end)]


def largest_component_center(mask) -> list[int] | None:
    """Centre of the bounding box of the largest connected component (the primary lesion)."""
    from scipy import ndimage

    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    if not m.any():
        return None
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        m = lab == (int(np.argmax(sizes)) + 1)
    return mask_center(m)


def negative_centers(label: np.ndarray, size: int, n: int, rng: np.random.Generator,
                     tries: int = 200) -> list[list[int]]:
    """Up to `n` centres whose `size`^3 box holds no lesion voxel: host organ first, then body.

    Detection needs lesion-free crops as negatives; drawing candidates and checking
    the box is cheap and needs no organ-name table.
    """
    lesion = label == LESION_LABEL
    half = size // 2
    out: list[list[int]] = []
    for pool in (label == ORGAN_LABEL, label >= 0):
        cand = np.argwhere(pool)
        if len(cand) == 0:
            continue
        for c in cand[rng.permutation(len(cand))[:tries]]:
            lo = np.maximum(c - half, 0)
            hi = c - half + size
            if not lesion[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any():
                out.append([int(v) for v in c])
                if len(out) >= n:
                    return out
    return out


def load_keys(keys: Sequence[str]) -> list:
    """LoadImaged + EnsureChannelFirstd + Orientationd(RAS): geometry kept in the MetaTensors."""
    return [
        LoadImaged(keys=list(keys), image_only=True),
        EnsureChannelFirstd(keys=list(keys)),
        Orientationd(keys=list(keys), axcodes="RAS", labels=RAS_LABELS),
    ]


def build_preprocess(preset, image_key: str = "image", mask_keys: Sequence[str] = ("label",),
                     load: bool = True) -> Compose:
    """The one preprocessing pipeline: load, RAS, preset spacing (image bilinear, masks nearest), HU map.

    `preset` is a `pasta_model.presets.Preset` (or anything with `spacing_mm`).
    With `load=False` the dict must already hold channel-first MetaTensors (e.g. CT
    read from DICOM by the hospital agent).
    """
    keys = [image_key, *mask_keys]
    spacing = float(preset.spacing_mm)
    steps: list = load_keys(keys) if load else [Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS)]
    steps += [
        Spacingd(keys=keys, pixdim=(spacing,) * 3, mode=["bilinear"] + ["nearest"] * len(mask_keys)),
        PastaHUMapd(keys=[image_key]),
        EnsureTyped(keys=keys, dtype=[torch.float32] + [torch.uint8] * len(mask_keys)),
    ]
    return Compose(steps)

