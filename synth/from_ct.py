"""Lesions inserted into a user's own CT, given an organ label map (as PASTA-Gen did with
healthy CT). The same lesion engine as the phantom; outputs keep the CT's geometry."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage as ndi

from synth.dataset import check_run_settings, remove_partials, write_case, write_manifest
from synth.errors import SynthInputError
from synth.generate import GENERATOR_VERSION, Case, build_report
from synth.geometry import Grid
from synth.lesions import host_mask, insert_lesions
from synth.noise import warm_up
from synth.scanner import HU_MAX, HU_MIN
from synth.totalseg import host_groups, load_label_map
from synth.vocabulary import LESION_TYPE_BY_NAME, LESION_TYPE_NAMES, PHASES

LPS = ornt.axcodes2ornt(("L", "P", "S"))


class Reoriented:
    """An image turned into LPS voxel order, and the way back."""

    def __init__(self, shape, affine):
        self.shape = tuple(int(s) for s in shape)
        self.affine = affine
        self.to_lps = ornt.ornt_transform(ornt.io_orientation(affine), LPS)
        self.from_lps = ornt.ornt_transform(LPS, ornt.io_orientation(affine))
        lps_aff = affine @ ornt.inv_ornt_aff(self.to_lps, self.shape)
        self.lps_shape = tuple(int(self.shape[int(i)]) for i in np.argsort(self.to_lps[:, 0]))
        self.grid = Grid.from_affine(self.lps_shape, lps_aff)

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(ornt.apply_orientation(arr, self.to_lps))

    def back(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(ornt.apply_orientation(arr, self.from_lps))

    def index_back(self, ijk) -> list[int]:
        """An LPS voxel index -> the original image's voxel index."""
        out = [0, 0, 0]
        for i, (axis, flip) in enumerate(self.to_lps):
            v = int(ijk[int(axis)])
            out[i] = self.lps_shape[int(axis)] - 1 - v if flip < 0 else v
        return out

    def axes_back(self, values) -> list:
        return [values[int(axis)] for axis, _ in self.to_lps]


def _load(path: str, what: str):
    p = Path(path)
    if not p.is_file():
        raise SynthInputError(f"{what} {path}: no such file")
    try:
        img = nib.load(str(p))
        if len(img.shape) != 3:
            raise SynthInputError(f"{what} {path}: expected a 3D volume, got shape {img.shape}")
        return img
    except nib.filebasedimages.ImageFileError as exc:
        raise SynthInputError(f"{what} {path}: not a NIfTI image ({exc})") from None


def estimate_noise_sd(image: np.ndarray, body: np.ndarray) -> float:
    """Scanner noise (HU sd) from the residual to a 3x3x3 mean in soft tissue (robust MAD)."""
    step = max(1, int(round((image.size / 4e6) ** (1 / 3))))
    sub = image[::step, ::step, ::step].astype(np.float32)
    m = body[::step, ::step, ::step] & (sub > -120) & (sub < 180)
    if m.sum() < 100:
        return 10.0
    res = (sub - ndi.uniform_filter(sub, 3))[ndi.binary_erosion(m, iterations=1)]
    if res.size < 100:
        return 10.0
    mad = float(np.median(np.abs(res - np.median(res))))
    return float(np.clip(1.4826 * mad * np.sqrt(27.0 / 26.0), 2.0, 80.0))


def _phase(image: np.ndarray, mask: np.ndarray, names: dict[int, str], phase: str | None, ct: str) -> str:
    if phase:
        if phase not in PHASES:
            raise SynthInputError(f"--phase: unknown phase '{phase}' (known: {', '.join(PHASES)})")
        return phase
    aorta = [v for v, n in names.items() if n == "aorta"]
    vals = image[np.isin(mask, aorta)] if aorta else np.zeros(0)
    if vals.size < 20:
        raise SynthInputError(f"--ct {ct}: cannot tell its contrast phase (no aorta in the organ mask); give --phase")
    hu = float(np.median(vals))
    return "arterial" if hu > 200 else ("portal_venous" if hu > 110 else "plain")


def insert_into_ct(ct: str, organs: str, out: str, n: int | None = None, types: tuple[str, ...] | None = None,
                   label_map: str | None = None, phase: str | None = None, seed: int = 0) -> list[dict]:
    """Write `n` cases (default: one per lesion type the mask can host) into `out`."""
    ct_img = _load(ct, "--ct")
    m_img = _load(organs, "--organs")
    if ct_img.shape != m_img.shape or not np.allclose(ct_img.affine, m_img.affine, atol=1e-3, rtol=1e-4):
        raise SynthInputError(
            f"--organs {organs}: geometry does not match --ct {ct} "
            f"(shape {tuple(m_img.shape)} vs {tuple(ct_img.shape)}, "
            f"spacing {tuple(np.round(m_img.header.get_zooms()[:3], 3))} "
            f"vs {tuple(np.round(ct_img.header.get_zooms()[:3], 3))})"
        )
    names = load_label_map(label_map)
    ro = Reoriented(ct_img.shape, ct_img.affine)
    image0 = ro.forward(np.asarray(ct_img.dataobj, dtype=np.float32))
    mask_raw = np.asarray(m_img.dataobj)
    if not np.issubdtype(mask_raw.dtype, np.integer):
        mask_raw = np.rint(mask_raw).astype(np.int32)
    mask = ro.forward(mask_raw)
    present = set(int(v) for v in np.unique(mask))
    groups = {o: tuple(v for v in ids if v in present) for o, ids in host_groups(names).items()}
    if types:
        for t in types:
            if t not in LESION_TYPE_BY_NAME:
                raise SynthInputError(f"--types: unknown lesion type '{t}' (known: {', '.join(LESION_TYPE_NAMES)})")
            organ = LESION_TYPE_BY_NAME[t].organ
            if not groups.get(organ):
                wanted = host_groups(names).get(organ) or ()
                raise SynthInputError(
                    f"--organs {organs}: no voxels labelled {organ} "
                    f"(label values {list(wanted) or 'none in the label map'}), needed for {t}"
                )
    else:
        types = tuple(t for t in LESION_TYPE_NAMES if groups.get(LESION_TYPE_BY_NAME[t].organ))
        if not types:
            raise SynthInputError(f"--organs {organs}: none of the host organs of the 15 lesion types is in the mask")
    ph = _phase(image0, mask, names, phase, ct)
    sigma = estimate_noise_sd(image0, image0 > -500)
    n = n or len(types)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    check_run_settings(outp, {"generator": GENERATOR_VERSION, "source": "ct", "ct": str(Path(ct).resolve()),
                              "organs": str(Path(organs).resolve()), "label_map": label_map or "totalseg",
                              "types": list(types), "phase": ph, "seed": seed})
    remove_partials(outp)
    warm_up()
    mask_out = np.asarray(m_img.dataobj).astype(np.uint8 if max(present) < 256 and min(present) >= 0 else np.int16)
    rows = []
    for k in range(n):
        lesion_type = types[k % len(types)]
        organ = LESION_TYPE_BY_NAME[lesion_type].organ
        seqs = np.random.SeedSequence([int(seed), int(k)]).spawn(2)
        rng, rng_surv = (np.random.default_rng(s) for s in seqs)
        image = image0.copy()
        try:
            lesions = insert_lesions(image, mask, groups[organ], lesion_type, ph, rng, ro.grid.spacing,
                                     noise_sd=sigma, label_names=names)
        except RuntimeError as exc:
            raise SynthInputError(f"--organs {organs}: {exc} (organ too small or at the edge of the CT)") from None
        np.rint(image, out=image)
        np.clip(image, HU_MIN, HU_MAX, out=image)
        img16 = image.astype(np.int16)
        host = host_mask(mask, groups[organ])
        rep, masks = build_report(image=img16, total=mask, lesions=lesions, host=host, grid=ro.grid,
                                  lesion_type=lesion_type, phase=ph, label_names=names, rng=rng_surv)
        for les in rep["lesions"]:
            lo, hi = ro.index_back(les["bbox_voxel"][0]), ro.index_back(les["bbox_voxel"][1])
            les["bbox_voxel"] = [[min(a, b) for a, b in zip(lo, hi)], [max(a, b) for a, b in zip(lo, hi)]]
            les["center_voxel"] = ro.index_back(les["center_voxel"])
            les["size_mm"] = ro.axes_back(les["size_mm"])
        rep["spacing_mm"] = ro.axes_back(rep["spacing_mm"])
        rep["shape"] = [int(s) for s in ct_img.shape]
        label = host.astype(np.uint8)
        for m in masks:
            label[m] = 2
        rep = {"id": f"{k:06d}", "index": k, "seed": int(seed), **rep,
               "source": f"ct:{Path(ct).name}", "noise_sd_estimate_hu": round(sigma, 1),
               "generator": {"version": GENERATOR_VERSION, "intended": [les.intended for les in lesions]}}
        case = Case(k, ro.back(img16), ro.back(label), mask_out, ct_img.affine, rep)
        rows.append(write_case(outp, case))
    write_manifest(outp, rows)
    return rows
