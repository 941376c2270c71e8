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
# Quantum noise falls with the square root of the voxel volume. Published soft-tissue noise of
# portal-venous abdominal CT is 10-20 HU at its usual reconstruction (0.75 x 0.75 mm in plane,
# 5 mm slices); a volume with larger voxels averages more photons per voxel.
REFERENCE_NOISE_HU = (10.0, 20.0)
REFERENCE_VOXEL_MM3 = 0.75 * 0.75 * 5.0


def noise_at_spacing(reference_noise_hu: float, spacing) -> float:
    """The noise SD of a voxel of `spacing` (mm) for a scanner with `reference_noise_hu` at the reference voxel."""
    return float(reference_noise_hu * np.sqrt(REFERENCE_VOXEL_MM3 / float(np.prod(spacing))))


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
        noise_hu=noise_at_spacing(float(rng.uniform(*REFERENCE_NOISE_HU)), spacing),
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
