"""Smooth random fields for textures, shapes and bowel loops, cheap enough for every case.

A field is cut from a periodic tile of band-limited Gaussian noise (made once per process
by FFT filtering, from a fixed seed) at an offset, flip and axis order drawn from the
caller's generator. The tiles are a pure function of their scale, so a case still depends
only on the generator it is given, whatever the process that makes it.
"""
from __future__ import annotations

from functools import cache

import numpy as np
from scipy import fft as sp_fft

TILE = 64
TILES_PER_SCALE = 3
# Correlation lengths (in voxels) the bank holds; a request is rounded to the nearest one.
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


@cache
def _tile(scale: float, k: int) -> np.ndarray:
    rng = np.random.default_rng([20250211, int(scale * 10), k])
    white = rng.standard_normal((TILE,) * 3, dtype=np.float32)
    f = np.fft.fftfreq(TILE).astype(np.float32)
    fr = np.fft.rfftfreq(TILE).astype(np.float32)
    g = np.exp(-2.0 * (np.pi * scale) ** 2 * f**2)
    gr = np.exp(-2.0 * (np.pi * scale) ** 2 * fr**2)
    spec = sp_fft.rfftn(white) * (g[:, None, None] * g[None, :, None] * gr[None, None, :])
    field = sp_fft.irfftn(spec, s=(TILE,) * 3)
    field -= field.mean()
    field /= field.std()
    return field.astype(np.float32)


def nearest_scale(scale_vox: float) -> float:
    return min(SCALES, key=lambda s: abs(np.log(s / max(scale_vox, 1e-3))))


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], scale_vox: float) -> np.ndarray:
    """A unit-variance smooth random field of `shape` with correlation length ~`scale_vox`."""
    scale = nearest_scale(scale_vox)
    return _cut(_tile(scale, int(rng.integers(TILES_PER_SCALE))), rng, shape)


def _cut(tile: np.ndarray, rng: np.random.Generator, shape) -> np.ndarray:
    """A `shape` block of a periodic tile at a random axis order, flip and offset."""
    n = tile.shape[0]
    perm = rng.permutation(3)
    flips = rng.integers(0, 2, 3)
    offs = rng.integers(0, n, 3)
    out = tile.transpose(tuple(int(a) for a in perm))
    for a in range(3):
        idx = (int(offs[a]) + np.arange(int(shape[a]))) % n
        if flips[a]:
            idx = n - 1 - idx
        out = out.take(idx, axis=a)
    return out


def warm_up() -> None:
    """Build every tile now (a worker calls this once, so cases do not pay for it)."""
    for scale in SCALES:
        for k in range(TILES_PER_SCALE):
            _tile(scale, k)
    for k in range(WHITE_TILES):
        _white(k)


WHITE_TILE = 128
WHITE_TILES = 3


@cache
def _white(k: int) -> np.ndarray:
    return np.random.default_rng([20250212, k]).standard_normal((WHITE_TILE,) * 3, dtype=np.float32)


def white_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian white noise of `shape`, cut from a cached 128^3 tile at a random
    offset, flip and axis order (half the cost of drawing it afresh)."""
    return _cut(_white(int(rng.integers(WHITE_TILES))), rng, shape)
