"""The lesion engine: 15 PASTA-Gen lesion types inserted into a CT with an organ label map.

Each type has a model (`TYPE_MODELS`) of where it grows (parenchyma, the wall of a hollow
organ, the dependent lumen, the renal sinus, bone), its size, shape, margin, density in
each contrast phase, texture and how often it invades. `insert_lesions` draws the
generator's intentions from that model, builds each lesion as an occupancy field (1 in
the lesion, falling off at the margin like partial volume; slowly for ill-defined
margins), and blends it into the image. The report is measured afterwards from the mask
and the final image (`synth.measure`), never copied from these intentions.

Works on the phantom's clean image (scanner noise is added afterwards, so it is the same
inside a lesion as around it) and on real CT (`noise_sd` given: the lesion gets noise of
the scanner's level, so it does not look smoother than its surroundings).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from synth.noise import smooth_field
from synth.vocabulary import LESION_TYPE_BY_NAME

HOLLOW_ORGANS = ("stomach", "colon", "esophagus", "gallbladder", "urinary_bladder")
# normal wall thickness used to find "the normal wall" of a hollow organ (mm)
WALL_BAND_MM = {"stomach": 5.0, "colon": 4.0, "esophagus": 5.0, "gallbladder": 3.5,
                "urinary_bladder": 5.0}
SOFT_TISSUE_HU = (-250.0, 300.0)  # where an invading lesion may grow


@dataclass(frozen=True)
class TypeModel:
    name: str
    placement: str                       # parenchyma | wall | lumen | sinus | bone
    count: tuple[int, int]
    diameter_mm: tuple[float, float]
    shape: dict[str, float]              # intended shape -> probability
    # density: phase -> {class: prob}; class deltas from DELTA unless `hu` is given
    density: dict[str, dict[str, float]] = field(default_factory=dict)
    hu: tuple[float, float] | None = None        # absolute HU range (cysts, stones)
    hu_alt: tuple[float, float, float] | None = None  # (prob, lo, hi) second absolute mode
    hetero_p: float = 0.0
    ill_p: float = 0.0
    invasion_p: float = 0.0
    thickness_mm: tuple[float, float] = (8.0, 18.0)  # wall lesions

    @property
    def organ(self) -> str:
        return LESION_TYPE_BY_NAME[self.name].organ


# Lesion minus its organ, in HU (measured on the rendered image afterwards, so the report says
# what the image shows). Grounded in published attenuation: hypovascular liver metastases and
# pancreatic adenocarcinoma enhance 25-60 HU less than their parenchyma in portal-venous or
# pancreatic phase; arterially enhancing HCC and enhancing GI/bladder wall tumours 25-65 HU more.
DELTA = {"hypodense": (-60.0, -25.0), "isodense": (-3.0, 3.0), "hyperdense": (25.0, 65.0)}

_ROUND = {"round_like": 1.0}
_MASS = {"irregular": 0.6, "round_like": 0.4}
_WALL = {"wall_thickening": 0.75, "irregular": 0.25}
# Without contrast most solid tumours are iso- or slightly hypodense (plain-CT detection is
# the hard task); with contrast few stay isodense.
_TUMOR_HYPO_PV = {"plain": {"hypodense": 0.6, "isodense": 0.4},
                  "arterial": {"hypodense": 0.8, "hyperdense": 0.1, "isodense": 0.1},
                  "portal_venous": {"hypodense": 0.9, "isodense": 0.1}}
_WALL_ENH = {"plain": {"isodense": 0.6, "hypodense": 0.4},
             "arterial": {"hyperdense": 0.8, "isodense": 0.2},
             "portal_venous": {"hyperdense": 0.75, "isodense": 0.15, "hypodense": 0.1}}

TYPE_MODELS: dict[str, TypeModel] = {m.name: m for m in (
    TypeModel("lung_tumor", "parenchyma", (1, 2), (8, 60),
              {"irregular": 0.55, "round_like": 0.35, "punctate_nodular": 0.10},
              hu=(25, 55), hetero_p=0.35, ill_p=0.55, invasion_p=0.25),
    TypeModel("liver_cancer", "parenchyma", (1, 3), (15, 80), _MASS,
              density={"plain": {"hypodense": 0.8, "isodense": 0.2},
                       "arterial": {"hyperdense": 0.75, "isodense": 0.05, "hypodense": 0.2},
                       "portal_venous": {"hypodense": 0.9, "isodense": 0.1}},
              hetero_p=0.55, ill_p=0.5, invasion_p=0.2),
    TypeModel("gallbladder_cancer", "wall", (1, 1), (20, 45), _WALL, density=_WALL_ENH,
              hetero_p=0.3, ill_p=0.6, invasion_p=0.35, thickness_mm=(5, 10)),
    TypeModel("pancreas_tumor", "parenchyma", (1, 1), (15, 40), {"irregular": 0.7, "round_like": 0.3},
              density=_TUMOR_HYPO_PV, hetero_p=0.3, ill_p=0.7, invasion_p=0.35),
    TypeModel("esophageal_cancer", "wall", (1, 1), (30, 70), {"wall_thickening": 0.9, "irregular": 0.1},
              density=_WALL_ENH,
              hetero_p=0.3, ill_p=0.5, invasion_p=0.35, thickness_mm=(8, 16)),
    TypeModel("gastric_cancer", "wall", (1, 1), (25, 70), _WALL, density=_WALL_ENH,
              hetero_p=0.35, ill_p=0.5, invasion_p=0.3, thickness_mm=(9, 22)),
    TypeModel("colon_cancer", "wall", (1, 1), (25, 60), _WALL, density=_WALL_ENH,
              hetero_p=0.35, ill_p=0.5, invasion_p=0.3, thickness_mm=(8, 18)),
    TypeModel("kidney_tumor", "parenchyma", (1, 1), (15, 60), _MASS,
              density={"plain": {"isodense": 0.5, "hypodense": 0.3, "hyperdense": 0.2},
                       "arterial": {"hyperdense": 0.3, "hypodense": 0.65, "isodense": 0.05},
                       "portal_venous": {"hypodense": 0.9, "isodense": 0.1}},
              hetero_p=0.6, ill_p=0.4, invasion_p=0.25),
    TypeModel("bladder_cancer", "wall", (1, 1), (15, 45), {"wall_thickening": 0.6, "irregular": 0.4},
              density=_WALL_ENH, hetero_p=0.25, ill_p=0.5, invasion_p=0.3, thickness_mm=(7, 18)),
    TypeModel("bone_metastasis", "bone", (1, 3), (8, 35), {"irregular": 0.5, "round_like": 0.5},
              hu=(25, 75), hu_alt=(0.4, 600, 1100), hetero_p=0.35, ill_p=0.6, invasion_p=0.2),
    TypeModel("liver_cyst", "parenchyma", (1, 4), (10, 60), _ROUND, hu=(0, 15)),
    TypeModel("gallstone", "lumen", (1, 5), (4, 18), {"punctate_nodular": 0.7, "round_like": 0.3},
              hu=(250, 1000)),
    TypeModel("pancreas_cyst", "parenchyma", (1, 1), (10, 30), _ROUND, hu=(0, 18)),
    TypeModel("kidney_cyst", "parenchyma", (1, 3), (10, 50), _ROUND, hu=(0, 15)),
    TypeModel("kidney_stone", "sinus", (1, 3), (3, 10), {"punctate_nodular": 1.0}, hu=(350, 1200)),
)}


@dataclass
class Lesion:
    """One inserted lesion: its voxels (a global index box and a local mask) and intent."""
    sl: tuple[slice, slice, slice]
    mask: np.ndarray
    intended: dict


def _choice(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ], np.float32)


def _crop(center, half_vox, shape) -> tuple[slice, slice, slice]:
    return tuple(slice(max(int(c) - int(h), 0), min(int(c) + int(h) + 1, n))
                 for c, h, n in zip(center, half_vox, shape))


def _box_half(r: float, spacing) -> list[int]:
    """Half-size (voxels per axis) of the box a lesion of radius `r` mm is drawn in: its
    irregular bulges, an ill-defined margin and partial volume fit inside."""
    reach = r * 1.6 + 12.0 + 3 * max(spacing)
    return [int(np.ceil(reach / s)) for s in spacing]


def _offsets(sl, center, spacing):
    return tuple(((np.arange(s.start, s.stop) - c) * sp).astype(np.float32).reshape(
        [-1 if a == b else 1 for b in range(3)]) for a, (s, c, sp) in enumerate(zip(sl, center, spacing)))


def _depth(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each voxel of `mask` to the nearest voxel outside it, in this crop."""
    return ndi.distance_transform_edt(mask, sampling=spacing).astype(np.float32)


def host_lut(host_ids) -> np.ndarray:
    """A lookup table: lut[label] is True for the host's label values (faster than isin)."""
    ids = np.asarray(list(host_ids), dtype=np.int64)
    lut = np.zeros(max(int(ids.max()) + 1 if ids.size else 1, 256), bool)
    lut[ids] = True
    return lut


def host_mask(labels: np.ndarray, host_ids) -> np.ndarray:
    if labels.dtype.kind in "ui" and labels.size and int(labels.max()) < 65536 and int(labels.min()) >= 0:
        lut = host_lut(host_ids)
        if int(labels.max()) >= lut.size:
            lut = np.concatenate([lut, np.zeros(int(labels.max()) + 1 - lut.size, bool)])
        return lut[labels]
    return np.isin(labels, list(host_ids))


def normal_tissue(host: np.ndarray, lesion: np.ndarray, spacing, organ: str,
                  others: np.ndarray | None = None) -> np.ndarray:
    """The host organ's normal tissue (crop arrays): the host less the lesions; for a
    hollow organ only its normal wall (within the wall band of the outer surface)."""
    out = host & ~lesion
    if others is not None:
        out &= ~others
    if organ in HOLLOW_ORGANS:
        band = max(WALL_BAND_MM[organ], 1.5 * float(max(spacing)))
        out &= _depth(host, spacing) <= band
    return out


def surround_hu(image: np.ndarray, host: np.ndarray, lesion: np.ndarray, spacing, organ: str,
                others: np.ndarray | None = None, dist: np.ndarray | None = None,
                normal: np.ndarray | None = None) -> float:
    """Median HU of the host organ's normal tissue in a ring around a lesion (crop arrays):
    from 1 voxel away from the lesion out to max(6 mm, 3 voxels) further. `dist` (distance
    to the lesion) and `normal` (`normal_tissue`) may be passed when already computed."""
    if dist is None:
        dist = ndi.distance_transform_edt(~lesion, sampling=spacing)
    if normal is None:
        normal = normal_tissue(host, lesion, spacing, organ, others)
    smax = float(max(spacing))
    ring = (dist > 1.01 * smax) & (dist <= 1.01 * smax + max(6.0, 3 * smax)) & normal
    vals = image[ring]
    if vals.size < 5:
        vals = image[host & ~lesion]
    return float(np.median(vals)) if vals.size else float("nan")


def _no_invade_ids(label_names: dict[int, str] | None) -> tuple[int, ...]:
    """Labels a lesion never grows into: vessels, heart, airways, bone (unless the host)."""
    if not label_names:
        return ()
    bad = ("aorta", "vena", "vein", "artery", "heart", "trachea", "atrial", "brachiocephalic",
           "vertebrae", "rib_", "sacrum", "hip_", "femur", "sternum", "spinal_cord", "costal")
    return tuple(v for v, n in label_names.items() if any(b in n for b in bad))


class _Context:
    def __init__(self, image, labels, host_ids, spacing, organ, rng, noise_sd, label_names=None, host=None):
        self.image = image
        self.labels = labels
        self.spacing = tuple(float(s) for s in spacing)
        self.organ = organ
        self.rng = rng
        self.noise_sd = noise_sd
        self.host = host if host is not None else host_mask(labels, host_ids)
        self.no_invade = tuple(v for v in _no_invade_ids(label_names) if v not in set(host_ids))
        self.taken = np.zeros(labels.shape, bool)  # lesions placed so far, dilated by a voxel
        self.relaxed = False  # set when strict placement failed: smaller lesions, thinner margins
        self._cand: dict[str, np.ndarray] = {}
        self._box = None
        if self.host.any():
            proj = [np.nonzero(self.host.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
            self._box = tuple(slice(int(p[0]), int(p[-1]) + 1) for p in proj)

    def band(self) -> float:
        """The wall band of a hollow organ (mm); 0 once placement is relaxed."""
        if self.relaxed:
            return 0.0
        return max(WALL_BAND_MM.get(self.organ, 3.0), 1.5 * max(self.spacing))

    def candidates(self, kind: str) -> np.ndarray:
        """Voxel indices where a lesion centre may go: all of the host, its outer surface,
        or its deep part (lumen of a hollow organ, renal sinus)."""
        key = (kind, self.relaxed)
        if key in self._cand:
            return self._cand[key]
        if self._box is None:
            out = np.zeros((0, 3), int)
        else:
            box = self._box
            h = np.pad(self.host[box], 1)
            off = np.array([s.start for s in box]) - 1
            if kind == "surface":
                out = np.argwhere(h & ~ndi.binary_erosion(h)) + off
            elif kind in ("lumen", "sinus"):
                depth = _depth(h, self.spacing)
                if kind == "lumen":
                    deep = depth >= self.band() + 0.9 * min(self.spacing)
                    idx = np.argwhere(deep)
                    if len(idx):  # stones sink: keep the dependent (posterior) half
                        idx = idx[idx[:, 1] >= np.median(idx[:, 1])]
                else:
                    idx = np.argwhere(depth >= (0.3 if self.relaxed else 0.55) * float(depth.max()))
                out = idx + off
            else:
                out = np.argwhere(h) + off
        self._cand[key] = out
        return out


def insert_lesions(image: np.ndarray, labels: np.ndarray, host_ids, lesion_type: str, phase: str,
                   rng: np.random.Generator, spacing, noise_sd: float | None = None,
                   count: int | None = None, label_names: dict[int, str] | None = None,
                   host: np.ndarray | None = None) -> list[Lesion]:
    """Insert lesions of `lesion_type` into `image` (float32, modified in place).

    `labels` is the organ label map, `host_ids` the label values of the host organ;
    `label_names` (value -> name) keeps invading lesions out of vessels, airways and bone;
    `host` may be given when the host mask is already at hand.
    Returns the lesions placed (at least one, or raises RuntimeError if none fits).
    """
    model = TYPE_MODELS[lesion_type]
    ctx = _Context(image, labels, host_ids, spacing, model.organ, rng, noise_sd, label_names, host)
    if ctx._box is None:
        raise RuntimeError(f"no {model.organ} voxels to host a {lesion_type}")
    n = count or int(rng.integers(model.count[0], model.count[1] + 1))
    lesions: list[Lesion] = []
    for k in range(n):
        intent = _intent(model, phase, rng, k)
        for attempt in range(96):
            if attempt == 48 and not lesions:
                ctx.relaxed = True   # the organ is small at this spacing: relax, rather than fail
            les = _place(ctx, model, dict(intent))
            if les is not None:
                lesions.append(les)
                break
            if attempt % 8 == 7:
                intent["diameter_mm"] *= 0.85
        else:
            if lesions:
                break   # satellites are optional
    if not lesions:
        raise RuntimeError(f"could not place a {lesion_type} in this volume")
    return sorted(lesions, key=lambda les: -int(les.mask.sum()))  # the largest (primary) first


def _intent(model: TypeModel, phase: str, rng: np.random.Generator, k: int) -> dict:
    lo, hi = model.diameter_mm
    d = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if k > 0:  # satellites are smaller
        d = max(lo, d * 0.7)
    shape = _choice(rng, model.shape)
    if shape == "punctate_nodular":
        d = min(d, float(rng.uniform(4, 9)))
    intent = {"shape": shape, "diameter_mm": d,
              "heterogeneity": "heterogeneous" if rng.random() < model.hetero_p else "homogeneous",
              "surface": "ill_defined" if rng.random() < model.ill_p else "well_defined",
              "invasion": "yes" if rng.random() < model.invasion_p else "no"}
    if shape == "punctate_nodular":
        intent["invasion"] = "no"
    if model.hu is not None:
        lo_h, hi_h = model.hu
        if model.hu_alt is not None and rng.random() < model.hu_alt[0]:
            lo_h, hi_h = model.hu_alt[1:]
        intent["hu"] = float(rng.uniform(lo_h, hi_h))
        if model.name.startswith("lung"):
            intent["hu"] += {"plain": 0.0, "arterial": 25.0, "portal_venous": 35.0}[phase]
    else:
        cls = _choice(rng, model.density[phase])
        intent["density"] = cls
        intent["delta_hu"] = float(rng.uniform(*DELTA[cls]))
        if cls == "isodense":  # no contrast, no visible edge
            intent["surface"] = "ill_defined"
    if model.placement == "wall":
        intent["thickness_mm"] = float(rng.uniform(*model.thickness_mm))
    return intent


def _place(ctx: _Context, model: TypeModel, intent: dict) -> Lesion | None:
    rng, sp = ctx.rng, ctx.spacing
    shape3 = ctx.image.shape
    smin = min(sp)
    r = 0.5 * intent["diameter_mm"]
    wall = model.placement == "wall" and intent["shape"] == "wall_thickening"
    polyp = model.placement == "wall" and not wall   # a mass growing from the wall
    ext = intent["invasion"] == "yes"
    kind = {"parenchyma": "all", "bone": "all", "lumen": "lumen", "sinus": "sinus"}.get(
        model.placement, "surface" if wall else "all")
    cand = ctx.candidates(kind)
    if len(cand) == 0:
        return None
    if wall:
        r = max(r, 1.3 * intent["thickness_mm"])
    half = _box_half(r, sp)
    tries = 4 if model.placement == "bone" else 1  # metastases favour thick bone
    best = None
    for _ in range(tries):
        c = cand[int(rng.integers(len(cand)))]
        if any(ci < 2 or ci > n - 3 for ci, n in zip(c, shape3)):
            continue
        sl = _crop(c, half, shape3)
        host = ctx.host[sl]
        depth = _depth(host, sp)
        cl = tuple(int(ci - s.start) for ci, s in zip(c, sl))
        if best is None or depth[cl] > best[4][best[3]]:
            best = (c, sl, host, cl, depth)
    if best is None:
        return None
    c, sl, host, cl, depth = best
    dc = float(depth[cl])
    img = ctx.image[sl]
    dx, dy, dz = _offsets(sl, c, sp)
    r_min = 1.05 * smin if ctx.relaxed else max(0.3 * model.diameter_mm[0], 1.5 * smin)

    # -- how big it can be here --------------------------------------------------------
    if model.placement == "bone":
        r = min(r, max(1.6 * dc, 1.5 * smin))
    elif model.placement == "parenchyma" and not ext:
        if dc < 0.8 * r:
            r = dc / 0.8
            if r < r_min:
                return None
    elif model.placement == "parenchyma" and ext:
        if dc > 0.75 * r:
            r = dc / 0.75
        if dc < 0.15 * r:
            return None
    elif polyp:
        r = min(r, 0.8 * float(depth.max()))
        if dc > 0.9 * r or r < r_min:
            return None
    elif model.placement == "lumen":
        r = min(r, dc - ctx.band() + 0.5 * smin)
        if r < 0.8 * smin:
            return None
    elif model.placement == "sinus":
        r = min(r, max(dc - smin, 0.8 * smin))
    r = max(r, 1.05 * smin)  # at least the voxel and its six neighbours
    intent["diameter_mm"] = 2 * r
    need = _box_half(r, sp)
    if any(n > h for n, h in zip(need, half)):
        # an invading lesion deep in its organ grew past the box planned for its drawn
        # size: drawn in that box, a 63 mm lung tumour came out as a cube
        sl = _crop(c, need, shape3)
        host = ctx.host[sl]
        depth = _depth(host, sp)
        cl = tuple(int(ci - s.start) for ci, s in zip(c, sl))
        img = ctx.image[sl]
        dx, dy, dz = _offsets(sl, c, sp)

    # -- the shape: a signed distance-like field d (mm, < 0 inside) ---------------------
    if wall:
        rp = r * float(rng.uniform(0.9, 1.2))
        R = _rotation(rng)
        stretch = np.array([1.0, 1.0, 1.0], np.float32)
        if ctx.organ == "esophagus":
            stretch = np.array([0.6, 0.6, 1.6], np.float32)
        q = [R[i, 0] * dx + R[i, 1] * dy + R[i, 2] * dz for i in range(3)]
        rho = np.sqrt((q[0] / (rp * stretch[0])) ** 2 + (q[1] / (rp * stretch[1])) ** 2
                      + (q[2] / (rp * stretch[2])) ** 2)
        f = smooth_field(rng, rho.shape, max(1.0, 0.3 * rp / smin))
        rho = rho * (1.0 + 0.15 * f)
        thick = intent["thickness_mm"] * (1.0 + 0.2 * smooth_field(rng, rho.shape, max(1.0, 0.4 * rp / smin)))
        d = np.maximum(depth - thick, (rho - 1.0) * rp)
        d = np.where(host, d, np.maximum(d, 0.0) + smin)  # outside the organ: not lesion (yet)
        if intent["shape"] == "irregular":
            d = d + 2.0 * smin * np.clip(smooth_field(rng, rho.shape, 1.5), 0, None)
    else:
        radii = r * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0)], np.float32)
        if intent["shape"] == "punctate_nodular":
            radii = np.full(3, r, np.float32) * np.array([1.0, 0.97, 0.95], np.float32)
        R = _rotation(rng)
        q = [R[i, 0] * dx + R[i, 1] * dy + R[i, 2] * dz for i in range(3)]
        rho = np.sqrt((q[0] / radii[0]) ** 2 + (q[1] / radii[1]) ** 2 + (q[2] / radii[2]) ** 2)
        rm = float(radii.mean())
        if intent["shape"] == "irregular":
            f1 = smooth_field(rng, rho.shape, max(1.0, 0.3 * rm / smin))
            f2 = smooth_field(rng, rho.shape, max(1.0, 0.15 * rm / smin))
            rho = rho * (1.0 + 0.35 * f1) * (1.0 - 0.4 * np.clip(f2 - 0.6, 0, None))
        else:
            rho = rho * (1.0 + 0.04 * smooth_field(rng, rho.shape, max(1.0, 0.5 * rm / smin)))
        d = (rho - 1.0) * rm

    # -- where the lesion may be: the host, plus soft tissue around it when invading -----
    allowed = host.copy()
    if model.placement == "lumen":
        allowed &= depth > ctx.band()
    if ext:
        near = ndi.distance_transform_edt(~host, sampling=sp) <= float(rng.uniform(4.0, 10.0))
        soft = (img > SOFT_TISSUE_HU[0]) & (img < SOFT_TISSUE_HU[1])
        outward = (~host) & near & soft
        if ctx.no_invade:
            outward &= ~host_mask(ctx.labels[sl], ctx.no_invade)
        if wall:
            d = np.where(outward, np.maximum((rho - 1.0) * rp, 0.0) - smin * 0.01, d)
            d = np.where(outward, np.maximum(d, -smin), d)
        allowed |= outward
    allowed &= ~ctx.taken[sl]
    mask = (d <= 0) & allowed
    if not mask[cl] and not (wall or polyp):
        return None
    lab, n = ndi.label(mask)
    if n == 0:
        return None
    keep = lab[cl] if lab[cl] else int(np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    mask = lab == keep
    if ext:
        # a protrusion too small to count as invasion is trimmed: the report and mask agree
        out = mask & ~host
        if 0 < out.sum() < max(3, 0.02 * mask.sum()):
            lab, n = ndi.label(mask & host)
            if n == 0:
                return None
            mask = lab == (lab[cl] if lab[cl] else int(np.argmax(np.bincount(lab.ravel())[1:]) + 1))
    nvox = int(mask.sum())
    if nvox < 2:
        return None
    if not ext and not (wall or polyp) and nvox < 0.45 * (4.0 / 3.0 * np.pi * r**3) / float(np.prod(sp)):
        return None
    if wall and (nvox * float(np.prod(sp)) < 150.0 or (ext and not (mask & ~host).any())):
        return None
    if ext and not wall and not (mask & ~host).any():
        return None

    # -- occupancy: partial volume at the margin; a slow fall-off when ill-defined --------
    if intent["surface"] == "ill_defined" and nvox > 8:
        L = max(4.0, 1.8 * smin) * float(rng.uniform(1.0, 1.3))
        occ = 1.0 / (1.0 + np.exp(np.clip(d / L, -30, 30)))
    else:
        occ = np.clip(0.5 - d / (0.8 * smin), 0.0, 1.0)
    occ = occ.astype(np.float32)
    grown = ndi.binary_dilation(mask, iterations=2) & allowed
    occ = np.where(mask, np.maximum(occ, 0.5), np.where(grown, np.minimum(occ, 0.49), 0.0))

    # -- intensity -------------------------------------------------------------------------
    if "hu" in intent:
        base = intent["hu"]
    else:
        # the normal tissue of the host in this crop (its wall, for a hollow organ)
        normal = host & ~mask & ~ctx.taken[sl]
        if ctx.organ in HOLLOW_ORGANS:
            normal &= depth <= max(WALL_BAND_MM[ctx.organ], 1.5 * max(sp))
        vals = img[normal]
        ref = float(np.median(vals)) if vals.size else float(np.median(img[host]))
        base = ref + intent["delta_hu"]
        intent["reference_hu"] = round(ref, 1)
    tex = smooth_field(rng, mask.shape, max(1.0, 2.0 / smin))
    if intent["heterogeneity"] == "heterogeneous":
        amp = float(rng.uniform(14, 28))
        lesion_hu = base + amp * tex
        inner = np.where(mask, -d, 0.0)   # depth inside the lesion, from its shape field
        nec = (inner > 0.4 * float(inner.max())) & (smooth_field(rng, mask.shape, max(1.0, 0.25 * r / smin)) > 0.3)
        if base > 60:
            lesion_hu = np.where(nec, base - float(rng.uniform(40, 70)), lesion_hu)
        else:
            lesion_hu = np.where(nec, base + float(rng.uniform(30, 60)) * np.sign(rng.random() - 0.5), lesion_hu)
    else:
        lesion_hu = base + 2.0 * tex
    new = img * (1.0 - occ) + lesion_hu * occ
    if ctx.noise_sd:
        keep_frac = 1.0 - occ
        add = np.sqrt(np.clip(1.0 - keep_frac**2, 0, 1)) * ctx.noise_sd
        new = new + add * rng.standard_normal(occ.shape).astype(np.float32)
    ctx.image[sl] = new.astype(ctx.image.dtype)
    ctx.taken[sl] |= ndi.binary_dilation(mask, structure=np.ones((3, 3, 3), bool), iterations=1)
    intent = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in intent.items()}
    return Lesion(sl, mask, intent)
