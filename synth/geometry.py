"""Voxel grids in patient coordinates, and the lofted shapes the phantom is drawn with.

Arrays are indexed [i, j, k] with i towards the patient's left, j posterior, k superior
(an LPS voxel order); patient coordinates in mm are x (left +), y (posterior +),
z (superior +). The NIfTI affine maps to RAS world coordinates, as NIfTI expects.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Fn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # patient mm (x left+, y posterior+, z superior+) of voxel 0

    def axis(self, a: int) -> np.ndarray:
        return (self.origin[a] + self.spacing[a] * np.arange(self.shape[a])).astype(np.float32)

    @property
    def affine(self) -> np.ndarray:
        sx, sy, sz = self.spacing
        ox, oy, oz = self.origin
        return np.array(
            [[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1]], dtype=np.float64
        )

    def to_mm(self, ijk) -> np.ndarray:
        return np.asarray(self.origin) + np.asarray(self.spacing) * np.asarray(ijk, dtype=float)

    @staticmethod
    def from_affine(shape, affine) -> Grid:
        """For an array already in LPS voxel order (see `synth.ctio.to_lps`)."""
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        ras0 = affine[:3, 3]
        origin = (-float(ras0[0]), -float(ras0[1]), float(ras0[2]))
        return Grid(tuple(int(s) for s in shape), spacing, origin)


def box_slices(grid: Grid, lo, hi) -> tuple[slice, slice, slice] | None:
    """Voxel slices of the patient-mm box [lo, hi] (clipped), or None when it misses the grid."""
    out = []
    for a in range(3):
        i0 = int(np.ceil((lo[a] - grid.origin[a]) / grid.spacing[a]))
        i1 = int(np.floor((hi[a] - grid.origin[a]) / grid.spacing[a])) + 1
        i0, i1 = max(i0, 0), min(i1, grid.shape[a])
        if i1 <= i0:
            return None
        out.append(slice(i0, i1))
    return tuple(out)


def local_coords(grid: Grid, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable patient coordinates (X, Y, Z) of a sub-box."""
    x = grid.axis(0)[sl[0]][:, None, None]
    y = grid.axis(1)[sl[1]][None, :, None]
    z = grid.axis(2)[sl[2]][None, None, :]
    return x, y, z


def _shape_along(arr: np.ndarray, a: int) -> np.ndarray:
    s = [1, 1, 1]
    s[a] = arr.size
    return arr.reshape(s)


@dataclass
class Loft:
    """A shape swept along one axis: a super-ellipse cross-section whose centre and radii
    are functions of the position `s` along that axis. `rho` < 1 inside; `t` in [0, 1]
    is the position along the sweep."""

    sl: tuple[slice, slice, slice]
    rho: np.ndarray
    t: np.ndarray
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]


def loft(grid: Grid, axis: int, s0: float, s1: float, cu: Fn, cv: Fn, ru: Fn, rv: Fn,
         p: float = 2.0) -> Loft | None:
    """Sweep along `axis` from s0 to s1; (u, v) are the other two axes in order.

    cu, cv, ru, rv take the normalised position t in [0, 1] (array) and return mm.
    """
    u_ax, v_ax = [a for a in range(3) if a != axis]
    s_all = grid.axis(axis)
    lo_s, hi_s = min(s0, s1), max(s0, s1)
    sel = np.nonzero((s_all >= lo_s) & (s_all <= hi_s))[0]
    if sel.size == 0:
        return None
    s = s_all[sel]
    t = ((s - s0) / (s1 - s0)).astype(np.float32)
    c_u, c_v = np.broadcast_to(cu(t), t.shape), np.broadcast_to(cv(t), t.shape)
    r_u = np.maximum(np.broadcast_to(ru(t), t.shape), 1e-3)
    r_v = np.maximum(np.broadcast_to(rv(t), t.shape), 1e-3)
    lo = [0.0] * 3
    hi = [0.0] * 3
    lo[axis], hi[axis] = float(s[0]), float(s[-1])
    lo[u_ax], hi[u_ax] = float((c_u - r_u).min()), float((c_u + r_u).max())
    lo[v_ax], hi[v_ax] = float((c_v - r_v).min()), float((c_v + r_v).max())
    sl = box_slices(grid, lo, hi)
    if sl is None:
        return None
    coords = local_coords(grid, sl)
    k0 = sl[axis].start - int(sel[0])
    k1 = k0 + (sl[axis].stop - sl[axis].start)
    pick = lambda arr: _shape_along(np.asarray(arr, np.float32)[k0:k1], axis)  # noqa: E731
    du = np.abs(coords[u_ax] - pick(c_u)) / pick(r_u)
    dv = np.abs(coords[v_ax] - pick(c_v)) / pick(r_v)
    if p == 2.0:
        rho = np.sqrt(du * du + dv * dv)
    else:
        rho = (du**p + dv**p) ** (1.0 / p)
    return Loft(sl, rho.astype(np.float32, copy=False), pick(t), coords)


def lerp(a: float, b: float, t):
    return a + (b - a) * t


def cap(t, lo: float = 0.15, hi: float = 0.15):
    """A radius profile that rounds both ends of a sweep (1 in the middle)."""
    t = np.asarray(t, np.float32)
    f = np.ones_like(t)
    if lo > 0:
        u = np.clip((lo - t) / lo, 0, 1)
        f = f * np.sqrt(np.clip(1 - u * u, 0, 1))
    if hi > 0:
        u = np.clip((t - (1 - hi)) / hi, 0, 1)
        f = f * np.sqrt(np.clip(1 - u * u, 0, 1))
    return f
