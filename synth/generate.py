"""One synthetic case from (seed, index), and the report measured from it.

`generate_case(seed, index, config)` is a pure function of its arguments: the same seed
and index give the same volumes in any process and with any number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from synth.geometry import Grid
from synth.lesions import Lesion, host_mask, insert_lesions
from synth.measure import measure_lesion
from synth.phantom import Z_BOTTOM, Z_TOP, Anatomy, rasterize, render, sample_anatomy
from synth.report import locate, report_text, survival, t_stage
from synth.scanner import ScannerProfile, apply_scanner, sample_scanner
from synth.totalseg import TOTALSEG_HOSTS, TOTALSEG_V2
from synth.vocabulary import LESION_TYPE_BY_NAME, LESION_TYPE_NAMES, PHASES

# 3: grounded lesion contrast per phase; 2: large invading lesions no longer clipped
GENERATOR_VERSION = "pasta-fed-synth/3"
FOV_MM = 320.0  # default field of view: the spacing is FOV_MM / size unless given


@dataclass(frozen=True)
class GenConfig:
    size: tuple[int, int, int] = (128, 128, 128)
    spacing: float | None = None          # mm, isotropic; None: FOV_MM / max(size)
    types: tuple[str, ...] = LESION_TYPE_NAMES
    phase: str | None = None              # None: drawn per case
    seed: int = 0
    # (type, weight) pairs: case types drawn with these weights instead of round-robin
    type_weights: tuple[tuple[str, float], ...] | None = None
    scanner: ScannerProfile | None = None  # one scanner for every case; None: drawn per case

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        s = self.spacing if self.spacing else FOV_MM / max(self.size)
        return (float(s),) * 3

    def lesion_type(self, index: int) -> str:
        """Round-robin over `types` (any n >= len(types) covers them all), or a draw with
        `type_weights` that depends only on (seed, index)."""
        if self.type_weights:
            names = [t for t, _ in self.type_weights]
            w = np.array([max(float(x), 0.0) for _, x in self.type_weights])
            rng = np.random.default_rng([int(self.seed), int(index), 104729])
            return names[int(rng.choice(len(names), p=w / w.sum()))]
        return self.types[index % len(self.types)]

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": self.spacing, "types": list(self.types),
                "phase": self.phase, "seed": self.seed,
                "type_weights": [[t, round(float(w), 6)] for t, w in self.type_weights] if self.type_weights else None,
                "scanner": self.scanner.to_json() if self.scanner else None}


@dataclass
class Case:
    index: int
    image: np.ndarray          # int16 HU
    label: np.ndarray          # uint8: host organ 1, lesion 2
    total: np.ndarray          # uint8: organ labels (TotalSegmentator v2 ids)
    affine: np.ndarray
    report: dict
    lesion_masks: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def lesion_type(self) -> str:
        return self.report["lesion_type"]


def _streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    names = ("anatomy", "fov", "texture", "lesion", "scanner", "survival", "phase")
    seqs = np.random.SeedSequence([int(seed), int(index)]).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, seqs)}


def _choose_grid(anatomy: Anatomy, organ: str, cfg: GenConfig, rng: np.random.Generator) -> Grid:
    sp = cfg.spacing_mm
    ext = np.array(cfg.size) * np.array(sp)
    anchor = anatomy.organ_anchor(organ, rng)
    center = anchor + rng.uniform(-0.15, 0.15, 3) * ext * np.array([1.0, 0.3, 1.0])
    body_half = np.array([175.0 * anatomy.width_scale, 115.0 * anatomy.depth_scale])
    for a in range(2):
        if ext[a] >= 2 * body_half[a]:
            center[a] = rng.uniform(-5, 5)
        else:
            lim = body_half[a] - ext[a] / 2
            center[a] = np.clip(center[a], -lim, lim)
    ztop, zbot = Z_TOP * anatomy.height_scale, Z_BOTTOM * anatomy.height_scale
    if ext[2] >= ztop - zbot:
        center[2] = 0.5 * (ztop + zbot)
    else:
        center[2] = np.clip(center[2], zbot + ext[2] / 2, ztop - ext[2] / 2)
    # the anchor must stay well inside the field of view
    for a in range(3):
        lo, hi = center[a] - ext[a] / 2, center[a] + ext[a] / 2
        margin = min(0.25 * ext[a], 30.0)
        if anchor[a] < lo + margin:
            center[a] -= (lo + margin) - anchor[a]
        elif anchor[a] > hi - margin:
            center[a] += anchor[a] - (hi - margin)
    origin = center - (np.array(cfg.size) - 1) / 2 * np.array(sp)
    return Grid(tuple(int(s) for s in cfg.size), sp, tuple(float(o) for o in origin))


def build_report(*, image: np.ndarray, total: np.ndarray, lesions: list[Lesion], host: np.ndarray,
                 grid: Grid, lesion_type: str, phase: str, label_names: dict[int, str],
                 rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
    """Measure every lesion in the final image and assemble type.json."""
    lt = LESION_TYPE_BY_NAME[lesion_type]
    masks = []
    for les in lesions:
        m = np.zeros(image.shape, bool)
        m[les.sl] = les.mask
        masks.append(m)
    union = np.zeros(image.shape, bool)
    for les in lesions:
        union[les.sl] |= les.mask
    proj = [np.nonzero(host.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
    hlo = grid.to_mm([p[0] for p in proj])
    hhi = grid.to_mm([p[-1] for p in proj])
    out = []
    for les, m in zip(lesions, masks):
        others = union.copy()
        others[les.sl] &= ~les.mask
        meas = measure_lesion(image, m, host, grid.spacing, lt.organ, others=others)
        part_vals = total[les.sl][les.mask & host[les.sl]]
        part, plo, phi = None, None, None
        if part_vals.size:
            pv = int(np.bincount(part_vals.ravel()).argmax())
            part = label_names.get(pv)
            if lt.organ == "kidney":
                pm = total == pv
                pp = [np.nonzero(pm.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
                plo, phi = grid.to_mm([p[0] for p in pp]), grid.to_mm([p[-1] for p in pp])
        centroid_mm = grid.to_mm(meas["center_voxel"])
        meas["location"] = locate(lt.organ, centroid_mm, hlo, hhi, part, plo, phi)
        out.append(meas)
    rep = {
        "organ": lt.organ,
        "lesion_type": lesion_type,
        "malignant": lt.malignant,
        "phase": phase,
        "spacing_mm": [round(float(s), 4) for s in grid.spacing],
        "shape": [int(s) for s in image.shape],
        "lesions": out,
    }
    rep["t_stage"] = t_stage(lesion_type, out)
    rep["survival_months"], rep["survival_event"] = survival(lesion_type, rep["t_stage"], out, rng)
    rep["report_text"] = report_text(rep)
    return rep, masks


def generate_case(seed: int, index: int, cfg: GenConfig) -> Case:
    """The phantom case `index` of a dataset generated with `seed`."""
    rs = _streams(seed, index)
    lesion_type = cfg.lesion_type(index)
    lt = LESION_TYPE_BY_NAME[lesion_type]
    phase = cfg.phase or PHASES[int(rs["phase"].integers(len(PHASES)))]
    host_ids = TOTALSEG_HOSTS[lt.organ]
    last_error = None
    for _attempt in range(8):
        an = sample_anatomy(rs["anatomy"])
        grid = _choose_grid(an, lt.organ, cfg, rs["fov"])
        total, tissue = rasterize(an, grid, rs["texture"])
        clean = render(tissue, phase, rs["texture"], grid.spacing)
        host = host_mask(total, host_ids)
        try:
            lesions = insert_lesions(clean, total, host_ids, lesion_type, phase, rs["lesion"], grid.spacing,
                                     label_names=TOTALSEG_V2, host=host)
        except RuntimeError as exc:
            last_error = exc
            continue
        break
    else:
        raise RuntimeError(f"case {index}: {last_error}")
    scanner = cfg.scanner or sample_scanner(rs["scanner"], grid.spacing)
    image = apply_scanner(clean, scanner, grid.spacing, rs["scanner"])
    rep, masks = build_report(image=image, total=total, lesions=lesions, host=host, grid=grid,
                              lesion_type=lesion_type, phase=phase, label_names=TOTALSEG_V2,
                              rng=rs["survival"])
    label = host.astype(np.uint8)
    for m in masks:
        label[m] = 2
    rep = {"id": f"{index:06d}", "index": int(index), "seed": int(seed), **rep,
           "source": "phantom", "scanner": scanner.to_json(),
           "generator": {"version": GENERATOR_VERSION, "intended": [les.intended for les in lesions]}}
    return Case(index, image, label, total, grid.affine, rep, masks)
