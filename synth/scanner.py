"""Scanner effects: in-plane blur (PSF), slice thickness, noise level, HU offset.

Applied after the lesions are in, so edges blend as partial volume does and the noise
inside a lesion is the noise of the rest of the volume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from synth.noise import white_noise

HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class ScannerProfile:
    """A scanner: noise (HU sd), in-plane blur (PSF FWHM, mm), slice thickness (mm) and a
    calibration offset (HU). A dataset either fixes one (a simulated hospital's scanner)
    or draws one per case."""
    noise_hu: float
    blur_mm: float
    slice_thickness_mm: float
    hu_offset: float = 0.0

    def to_json(self) -> dict:
        return {k: round(float(v), 2) for k, v in asdict(self).items()}


def sample_scanner(rng: np.random.Generator, spacing) -> ScannerProfile:
    return ScannerProfile(
        noise_hu=float(rng.uniform(8.0, 22.0)),
        blur_mm=float(rng.uniform(0.6, 1.4)),
        slice_thickness_mm=float(spacing[2] * rng.uniform(1.0, 1.6)),
        hu_offset=float(rng.uniform(-6.0, 6.0)),
    )


def blur_sigmas(sc: ScannerProfile, spacing) -> tuple[float, float, float]:
    """Gaussian sigma (voxels) per axis: PSF / slice profile plus ~0.3 voxel of sampling."""
    fw = (sc.blur_mm, sc.blur_mm, max(sc.slice_thickness_mm, 1e-3))
    return tuple(float(np.sqrt((f / 2.355 / s) ** 2 + 0.3**2)) for f, s in zip(fw, spacing))


def apply_scanner(clean: np.ndarray, sc: ScannerProfile, spacing, rng: np.random.Generator) -> np.ndarray:
    """Blur, add noise and offset, round and clip to int16 HU. `clean` is float32 and is reused."""
    img = ndi.gaussian_filter(clean, blur_sigmas(sc, spacing), truncate=2.0, output=np.float32)
    noise = white_noise(rng, img.shape)
    noise *= sc.noise_hu
    img += noise
    img += sc.hu_offset
    np.rint(img, out=img)
    np.clip(img, HU_MIN, HU_MAX, out=img)
    return img.astype(np.int16)
