"""What a report says about a lesion, measured from its mask and the final image.

Every number and every one of the five PASTA attributes is measured here, after the
scanner effects, with the rules below (docs/synth.md has them as a table):

- size_mm: extent of the mask along each array axis (voxel count x spacing);
  volume_ml: voxel count x voxel volume; mean_hu: mean of the image over the mask.
- density: contrast = interior_hu - surround_hu. interior_hu is the mean over the lesion
  eroded by 2 voxels (1 when that leaves under 20 voxels; the whole lesion when under 8),
  as a radiologist puts a region of interest inside a lesion, clear of its partial-volume
  rim; surround_hu is the median HU of the host organ's normal tissue in a ring 1 voxel to
  max(6 mm, 3 voxels) further out (for hollow organs, only the normal wall: voxels within
  the wall band of the organ's outer surface). Hypodense below -10 HU, hyperdense above
  +10 HU, else isodense.
- heterogeneity: interquartile spread (IQR / 1.349) of the lesion's interior after a
  1-voxel Gaussian smoothing (which takes out most scanner noise); heterogeneous above
  10 HU. Lesions with fewer than 20 interior voxels are homogeneous (too small to judge).
- surface: edge ratio = (median HU of the normal tissue touching the lesion (26-neighbourhood) - surround_hu) /
  contrast; ill-defined above 0.2, or when |contrast| < 12 HU (no visible edge). Lesions
  under 27 voxels: well-defined when |contrast| >= 12 HU.
- shape: wall_thickening when the host is hollow and the lesion is a sheet
  (thickness / extent < 0.5; thickness = 2 x the deepest point's distance to the edge,
  less a voxel); else punctate_nodular when the equivalent diameter is <= 10 mm; else
  irregular when the solidity (volume / convex hull volume) is below 0.8 (lobulation,
  spicules), otherwise round_like.
- invasion: yes when at least max(3 voxels, 2 %) of the lesion lies outside its host organ.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from synth.lesions import HOLLOW_ORGANS, normal_tissue, surround_hu

DENSITY_HU = 10.0
HETERO_HU = 10.0
EDGE_RATIO = 0.2
EDGE_MIN_CONTRAST = 12.0
IRREGULAR_FRACTION = 0.2
PUNCTATE_MM = 10.0
SHEET_RATIO = 0.5


def density_class(contrast_hu: float) -> str:
    if contrast_hu < -DENSITY_HU:
        return "hypodense"
    if contrast_hu > DENSITY_HU:
        return "hyperdense"
    return "isodense"


def solidity(mask: np.ndarray, spacing) -> float:
    """Volume over convex-hull volume: ~0.9-1 for a round lesion, lower for a lobulated or
    spiculated one."""
    from scipy.spatial import ConvexHull, QhullError

    border = mask & ~ndi.binary_erosion(mask)
    pts = np.argwhere(border).astype(np.float32)
    if len(pts) < 4:
        return 1.0
    sp = np.asarray(spacing, np.float32)
    try:
        hull = ConvexHull(pts * sp)
        inner = hull.volume
        # the hull of all voxel corners is the hull of the corners of the hull's vertices
        corners = (pts[hull.vertices][:, None, :] + _CORNERS[None, :, :]).reshape(-1, 3) * sp
        outer = ConvexHull(corners).volume
    except QhullError:
        return 1.0
    # the hull of the corners over-counts a voxelised surface, the hull of the centres
    # under-counts it: their mean is close to the volume of a convex shape
    return float(min(1.0, mask.sum() * float(np.prod(sp)) / (0.5 * (outer + inner))))


_CORNERS = np.array([[dx, dy, dz] for dx in (-0.5, 0.5) for dy in (-0.5, 0.5) for dz in (-0.5, 0.5)],
                    np.float32)


def _bbox_fast(mask: np.ndarray):
    lo, hi = [], []
    for a in range(3):
        hit = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.array(lo), np.array(hi)


def measure_lesion(image: np.ndarray, lesion: np.ndarray, host: np.ndarray, spacing, organ: str,
                   others: np.ndarray | None = None) -> dict:
    """Measure one lesion. All arrays are full volumes; `lesion` is this lesion's mask,
    `host` the host organ, `others` the other lesions (excluded from the surround)."""
    sp = np.asarray(spacing, float)
    lo, hi = _bbox_fast(lesion)
    smax = float(sp.max())
    margin = np.ceil((3 * smax + max(6.0, 3 * smax) + 2 * smax) / sp).astype(int) + 1
    sl = tuple(slice(max(int(a) - int(m), 0), min(int(b) + int(m) + 1, n))
               for a, b, m, n in zip(lo, hi, margin, image.shape))
    les = lesion[sl]
    img = image[sl].astype(np.float32)
    hst = host[sl]
    oth = others[sl] if others is not None else None
    n = int(les.sum())
    vox_ml = float(np.prod(sp)) / 1000.0
    centroid = np.argwhere(les).mean(axis=0) + np.array([s.start for s in sl])
    size_mm = (hi - lo + 1) * sp
    mean_hu = float(img[les].mean())
    dist_out = ndi.distance_transform_edt(~les, sampling=sp)
    normal = normal_tissue(hst, les, sp, organ, oth)
    sur = surround_hu(img, hst, les, sp, organ, oth, dist=dist_out, normal=normal)

    # interior: eroded mask (2 voxels when it leaves enough, else 1, else the whole lesion)
    inner = ndi.binary_erosion(les, iterations=2)
    if inner.sum() < 20:
        inner = ndi.binary_erosion(les, iterations=1)
    n_in = int(inner.sum())
    interior_hu = float(img[inner].mean()) if n_in >= 8 else mean_hu
    contrast = interior_hu - sur if np.isfinite(sur) else 0.0

    if n_in >= 20:
        # smooth within the lesion only (normalised convolution), so nothing outside leaks in
        w = ndi.gaussian_filter(les.astype(np.float32), 1.0, truncate=2.0)
        sm = ndi.gaussian_filter(np.where(les, img, 0.0), 1.0, truncate=2.0) / np.maximum(w, 1e-6)
        q75, q25 = np.percentile(sm[inner], [75, 25])
        spread = float(q75 - q25) / 1.349
    else:
        spread = 0.0
    heterogeneity = "heterogeneous" if (n_in >= 20 and spread > HETERO_HU) else "homogeneous"

    # margin: the normal tissue just outside the lesion against the surround further out
    near = (dist_out > 0) & (dist_out <= 1.75 * smax) & normal
    if n < 27:
        surface = "well_defined" if abs(contrast) >= EDGE_MIN_CONTRAST else "ill_defined"
        edge_ratio = None
    elif abs(contrast) < EDGE_MIN_CONTRAST or near.sum() < 3:
        surface = "ill_defined"
        edge_ratio = None
    else:
        edge_ratio = float((np.median(img[near]) - sur) / contrast)
        surface = "ill_defined" if edge_ratio > EDGE_RATIO else "well_defined"

    # shape
    inside_dist = ndi.distance_transform_edt(np.pad(les, 1), sampling=sp)
    thickness = max(2.0 * float(inside_dist.max()) - float(sp.min()), float(sp.min()))
    extent = float(size_mm.max())
    d_eq = float((6.0 * n * np.prod(sp) / np.pi) ** (1.0 / 3.0))
    irregularity = 1.0 - solidity(les, sp)
    if organ in HOLLOW_ORGANS and thickness / max(extent, 1e-6) < SHEET_RATIO and d_eq > PUNCTATE_MM:
        shape = "wall_thickening"
    elif d_eq <= PUNCTATE_MM:
        shape = "punctate_nodular"
    elif irregularity > IRREGULAR_FRACTION:
        shape = "irregular"
    else:
        shape = "round_like"

    outside = int((les & ~hst).sum())
    invasion = "yes" if outside >= max(3, 0.02 * n) else "no"

    return {
        "center_voxel": [int(round(v)) for v in centroid],
        "bbox_voxel": [[int(v) for v in lo], [int(v) for v in hi]],
        "size_mm": [round(float(v), 1) for v in size_mm],
        "volume_ml": round(n * vox_ml, 3),
        "voxels": n,
        "mean_hu": round(mean_hu, 1),
        "interior_hu": round(interior_hu, 1),
        "surround_hu": round(float(sur), 1) if np.isfinite(sur) else None,
        "contrast_hu": round(float(contrast), 1),
        "thickness_mm": round(thickness, 1),
        "shape": shape,
        "density": density_class(contrast),
        "heterogeneity": heterogeneity,
        "surface": surface,
        "invasion": invasion,
        "measures": {
            "interior_spread_hu": round(spread, 1),
            "edge_ratio": None if edge_ratio is None else round(edge_ratio, 3),
            "irregularity": round(irregularity, 3),
            "equivalent_diameter_mm": round(d_eq, 1),
            "voxels_outside_organ": outside,
        },
    }
