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

from dataclasses import dataclass, field, fields, replace

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
    """How one lesion type grows: where, how many, how big, its shape, density and margin."""

    name: str
    placement: str                       # parenchyma | wall | lumen | sinus | bone
    count: tuple[int, int]
    diameter_mm: tuple[float, float]
    shape: dict[str, float]              # intended shape -> probability
    # density: phase -> {class: prob}; class deltas from DELTA unless `hu` is given
    density: dict[str, dict[str, float]] = field(default_factory=dict)
    hu: tuple[float, float] | None = None        # absolute HU range (cysts, stones)
    hu_second_mode: tuple[float, float, float] | None = None  # (prob, lo, hi) second absolute mode
    heterogeneous_p: float = 0.0
    ill_defined_p: float = 0.0
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
              hu=(25, 55), heterogeneous_p=0.35, ill_defined_p=0.55, invasion_p=0.25),
    TypeModel("liver_cancer", "parenchyma", (1, 3), (15, 80), _MASS,
              density={"plain": {"hypodense": 0.8, "isodense": 0.2},
                       "arterial": {"hyperdense": 0.75, "isodense": 0.05, "hypodense": 0.2},
                       "portal_venous": {"hypodense": 0.9, "isodense": 0.1}},
              heterogeneous_p=0.55, ill_defined_p=0.5, invasion_p=0.2),
    TypeModel("gallbladder_cancer", "wall", (1, 1), (20, 45), _WALL, density=_WALL_ENH,
              heterogeneous_p=0.3, ill_defined_p=0.6, invasion_p=0.35, thickness_mm=(5, 10)),
    TypeModel("pancreas_tumor", "parenchyma", (1, 1), (15, 40), {"irregular": 0.7, "round_like": 0.3},
              density=_TUMOR_HYPO_PV, heterogeneous_p=0.3, ill_defined_p=0.7, invasion_p=0.35),
    TypeModel("esophageal_cancer", "wall", (1, 1), (30, 70), {"wall_thickening": 0.9, "irregular": 0.1},
              density=_WALL_ENH,
              heterogeneous_p=0.3, ill_defined_p=0.5, invasion_p=0.35, thickness_mm=(8, 16)),
    TypeModel("gastric_cancer", "wall", (1, 1), (25, 70), _WALL, density=_WALL_ENH,
              heterogeneous_p=0.35, ill_defined_p=0.5, invasion_p=0.3, thickness_mm=(9, 22)),
    TypeModel("colon_cancer", "wall", (1, 1), (25, 60), _WALL, density=_WALL_ENH,
              heterogeneous_p=0.35, ill_defined_p=0.5, invasion_p=0.3, thickness_mm=(8, 18)),
    TypeModel("kidney_tumor", "parenchyma", (1, 1), (15, 60), _MASS,
              density={"plain": {"isodense": 0.5, "hypodense": 0.3, "hyperdense": 0.2},
                       "arterial": {"hyperdense": 0.3, "hypodense": 0.65, "isodense": 0.05},
                       "portal_venous": {"hypodense": 0.9, "isodense": 0.1}},
              heterogeneous_p=0.6, ill_defined_p=0.4, invasion_p=0.25),
    TypeModel("bladder_cancer", "wall", (1, 1), (15, 45), {"wall_thickening": 0.6, "irregular": 0.4},
              density=_WALL_ENH, heterogeneous_p=0.25, ill_defined_p=0.5, invasion_p=0.3, thickness_mm=(7, 18)),
    TypeModel("bone_metastasis", "bone", (1, 3), (8, 35), {"irregular": 0.5, "round_like": 0.5},
              hu=(25, 75), hu_second_mode=(0.4, 600, 1100), heterogeneous_p=0.35, ill_defined_p=0.6, invasion_p=0.2),
    TypeModel("liver_cyst", "parenchyma", (1, 4), (10, 60), _ROUND, hu=(0, 15)),
    TypeModel("gallstone", "lumen", (1, 5), (4, 18), {"punctate_nodular": 0.7, "round_like": 0.3},
              hu=(250, 1000)),
    TypeModel("pancreas_cyst", "parenchyma", (1, 1), (10, 30), _ROUND, hu=(0, 18)),
    TypeModel("kidney_cyst", "parenchyma", (1, 3), (10, 50), _ROUND, hu=(0, 15)),
    TypeModel("kidney_stone", "sinus", (1, 3), (3, 10), {"punctate_nodular": 1.0}, hu=(350, 1200)),
)}


Box = tuple[slice, ...]  # one slice per axis (3)


@dataclass
class LesionIntent:
    """What the generator means to draw. The report is measured from the image afterwards;
    these intentions go to type.json's "generator" block only (`as_report`)."""

    shape: str
    diameter_mm: float
    heterogeneity: str
    surface: str
    invasion: str
    hu: float | None = None            # absolute HU (cysts, stones, lung, bone) ...
    density: str | None = None         # ... or a density class relative to the organ,
    delta_hu: float | None = None      # its HU difference,
    thickness_mm: float | None = None  # (wall lesions)
    reference_hu: float | None = None  # and the organ HU it was added to (set at placement)

    def as_report(self) -> dict[str, str | float]:
        """The fields that are set, in field order, floats to 0.01."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


@dataclass
class Lesion:
    """One inserted lesion: its voxels (a global index box and a local mask) and intent."""
    sl: Box
    mask: np.ndarray
    intended: dict


def _choice(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix, from a random unit quaternion."""
    quaternion = rng.standard_normal(4)
    quaternion /= np.linalg.norm(quaternion)
    w, x, y, z = quaternion
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ], np.float32)


def _rotate(rotation: np.ndarray, offsets: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """The offsets (mm, broadcastable per axis) in the lesion's rotated frame."""
    dx, dy, dz = offsets
    return [rotation[i, 0] * dx + rotation[i, 1] * dy + rotation[i, 2] * dz for i in range(3)]


def _crop(center, half_vox, shape) -> Box:
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
    """One volume's insertion state: the image being written, the host organ, the lesions
    placed so far, and whether placement has been relaxed for a small organ."""

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
        self._candidates: dict[tuple[str, bool], np.ndarray] = {}
        self.host_box: Box | None = None  # bounding box of the host organ; None: no host voxels
        if self.host.any():
            proj = [np.nonzero(self.host.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
            self.host_box = tuple(slice(int(p[0]), int(p[-1]) + 1) for p in proj)

    @property
    def min_spacing(self) -> float:
        return min(self.spacing)

    def band(self) -> float:
        """The wall band of a hollow organ (mm); 0 once placement is relaxed."""
        if self.relaxed:
            return 0.0
        return max(WALL_BAND_MM.get(self.organ, 3.0), 1.5 * max(self.spacing))

    def candidates(self, kind: str) -> np.ndarray:
        """Voxel indices where a lesion centre may go: all of the host, its outer surface,
        or its deep part (lumen of a hollow organ, renal sinus)."""
        key = (kind, self.relaxed)
        if key not in self._candidates:
            self._candidates[key] = self._find_candidates(kind)
        return self._candidates[key]

    def _find_candidates(self, kind: str) -> np.ndarray:
        if self.host_box is None:
            return np.zeros((0, 3), int)
        box = self.host_box
        host = np.pad(self.host[box], 1)
        offset = np.array([s.start for s in box]) - 1
        if kind == "surface":
            return np.argwhere(host & ~ndi.binary_erosion(host)) + offset
        if kind not in ("lumen", "sinus"):
            return np.argwhere(host) + offset
        depth = _depth(host, self.spacing)
        if kind == "lumen":
            deep = depth >= self.band() + 0.9 * min(self.spacing)
            idx = np.argwhere(deep)
            if len(idx):  # stones sink: keep the dependent (posterior) half
                idx = idx[idx[:, 1] >= np.median(idx[:, 1])]
        else:
            idx = np.argwhere(depth >= (0.3 if self.relaxed else 0.55) * float(depth.max()))
        return idx + offset


# ---- intentions ---------------------------------------------------------------------------

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
    if ctx.host_box is None:
        raise RuntimeError(f"no {model.organ} voxels to host a {lesion_type}")
    n = count or int(rng.integers(model.count[0], model.count[1] + 1))
    lesions: list[Lesion] = []
    for k in range(n):
        lesion = _place_with_retries(ctx, model, _draw_intent(model, phase, rng, k), first=not lesions)
        if lesion is None:
            if lesions:
                break   # satellites are optional
            continue
        lesions.append(lesion)
    if not lesions:
        raise RuntimeError(f"could not place a {lesion_type} in this volume")
    return sorted(lesions, key=lambda les: -int(les.mask.sum()))  # the largest (primary) first


def _place_with_retries(ctx: _Context, model: TypeModel, intent: LesionIntent, first: bool) -> Lesion | None:
    """Up to 96 tries, shrinking the lesion every 8; halfway, relax placement if no lesion
    is placed yet (the organ is small at this spacing: relax, rather than fail)."""
    for attempt in range(96):
        if attempt == 48 and first:
            ctx.relaxed = True
        lesion = _place(ctx, model, replace(intent))
        if lesion is not None:
            return lesion
        if attempt % 8 == 7:
            intent.diameter_mm *= 0.85
    return None


def _draw_intent(model: TypeModel, phase: str, rng: np.random.Generator, k: int) -> LesionIntent:
    """The k-th lesion's intentions (k > 0: a smaller satellite), drawn from its type's model."""
    lo, hi = model.diameter_mm
    diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if k > 0:  # satellites are smaller
        diameter = max(lo, diameter * 0.7)
    shape = _choice(rng, model.shape)
    if shape == "punctate_nodular":
        diameter = min(diameter, float(rng.uniform(4, 9)))
    intent = LesionIntent(shape=shape, diameter_mm=diameter,
                          heterogeneity="heterogeneous" if rng.random() < model.heterogeneous_p else "homogeneous",
                          surface="ill_defined" if rng.random() < model.ill_defined_p else "well_defined",
                          invasion="yes" if rng.random() < model.invasion_p else "no")
    if shape == "punctate_nodular":
        intent.invasion = "no"
    if model.hu is not None:
        intent.hu = _draw_absolute_hu(model, phase, rng)
    else:
        intent.density = _choice(rng, model.density[phase])
        intent.delta_hu = float(rng.uniform(*DELTA[intent.density]))
        if intent.density == "isodense":  # no contrast, no visible edge
            intent.surface = "ill_defined"
    if model.placement == "wall":
        intent.thickness_mm = float(rng.uniform(*model.thickness_mm))
    return intent


def _draw_absolute_hu(model: TypeModel, phase: str, rng: np.random.Generator) -> float:
    """HU of a type with absolute density (cysts, stones, lung, bone); lung tumours enhance."""
    assert model.hu is not None
    lo, hi = model.hu
    if model.hu_second_mode is not None and rng.random() < model.hu_second_mode[0]:
        lo, hi = model.hu_second_mode[1:]
    hu = float(rng.uniform(lo, hi))
    if model.name.startswith("lung"):
        hu += {"plain": 0.0, "arterial": 25.0, "portal_venous": 35.0}[phase]
    return hu


# ---- placement: one attempt, in steps -----------------------------------------------------

@dataclass(frozen=True)
class _Growth:
    """How a lesion grows, from its type's placement and its intended shape."""

    placement: str
    thickening: bool   # a wall thickening: follows the wall of a hollow organ
    polyp: bool        # a mass growing from the wall
    invading: bool

    @staticmethod
    def of(model: TypeModel, intent: LesionIntent) -> _Growth:
        thickening = model.placement == "wall" and intent.shape == "wall_thickening"
        return _Growth(model.placement, thickening, model.placement == "wall" and not thickening,
                       intent.invasion == "yes")

    @property
    def candidate_kind(self) -> str:
        """Where its centre may go (`_Context.candidates`): thickenings on the surface."""
        return {"parenchyma": "all", "bone": "all", "lumen": "lumen", "sinus": "sinus"}.get(
            self.placement, "surface" if self.thickening else "all")


@dataclass
class _Site:
    """A lesion centre and the box it is drawn in, with the host organ's crop there."""

    centre: np.ndarray                  # voxel index in the volume
    box: Box
    host: np.ndarray                    # host mask in the box
    depth: np.ndarray                   # mm from each host voxel to the organ's surface (in the box)
    local_centre: tuple[int, ...]       # the centre's index in the box

    @staticmethod
    def at(ctx: _Context, centre: np.ndarray, half: list[int]) -> _Site:
        box = _crop(centre, half, ctx.image.shape)
        host = ctx.host[box]
        return _Site(centre, box, host, _depth(host, ctx.spacing),
                     tuple(int(ci - s.start) for ci, s in zip(centre, box)))

    @property
    def centre_depth(self):
        return self.depth[self.local_centre]


@dataclass
class _ShapeField:
    """The lesion's shape as a signed distance-like field (mm, < 0 inside)."""

    signed_mm: np.ndarray
    ellipsoid_mm: np.ndarray | None = None  # a thickening's ellipsoid alone: it bounds the invasion


def _place(ctx: _Context, model: TypeModel, intent: LesionIntent) -> Lesion | None:
    """One attempt to place a lesion as `intent` says (its diameter becomes the fitted one,
    and its reference HU is set). None: it does not fit here; the caller tries again."""
    growth = _Growth.of(model, intent)
    candidates = ctx.candidates(growth.candidate_kind)
    if len(candidates) == 0:
        return None
    radius = 0.5 * intent.diameter_mm
    if growth.thickening:
        assert intent.thickness_mm is not None  # drawn for every wall lesion
        radius = max(radius, 1.3 * intent.thickness_mm)
    half = _box_half(radius, ctx.spacing)
    site = _pick_site(ctx, model, candidates, half)
    if site is None:
        return None
    fitted = _fit_radius(ctx, model, growth, radius, site)
    if fitted is None:
        return None
    radius = fitted
    intent.diameter_mm = 2 * radius
    need = _box_half(radius, ctx.spacing)
    if any(n > h for n, h in zip(need, half)):
        # an invading lesion deep in its organ grew past the box planned for its drawn
        # size: drawn in that box, a 63 mm lung tumour came out as a cube
        site = _Site.at(ctx, site.centre, need)
    shape = _shape_field(ctx, growth, intent, radius, site)
    outward = _invasion_zone(ctx, site) if growth.invading else None
    if outward is not None and growth.thickening:
        shape = _thickening_into(shape, outward, ctx.min_spacing)
    allowed = _allowed_region(ctx, growth, site, outward)
    mask = _lesion_mask(growth, site, shape.signed_mm, allowed)
    if mask is None or not _acceptable(growth, site, mask, radius, ctx.spacing):
        return None
    occupancy = _occupancy(ctx, intent, shape.signed_mm, mask, allowed)
    lesion_hu = _lesion_hu(ctx, intent, mask, shape.signed_mm, _base_hu(ctx, intent, site, mask), radius)
    _blend(ctx, site.box, mask, occupancy, lesion_hu)
    return Lesion(site.box, mask, intent.as_report())


def _pick_site(ctx: _Context, model: TypeModel, candidates: np.ndarray, half: list[int]) -> _Site | None:
    """A random candidate centre away from the volume's edge; bone metastases take the
    deepest of four (they favour thick bone)."""
    tries = 4 if model.placement == "bone" else 1
    best = None
    for _ in range(tries):
        centre = candidates[int(ctx.rng.integers(len(candidates)))]
        if any(ci < 2 or ci > n - 3 for ci, n in zip(centre, ctx.image.shape)):
            continue
        site = _Site.at(ctx, centre, half)
        if best is None or site.centre_depth > best.centre_depth:
            best = site
    return best


def _fit_radius(ctx: _Context, model: TypeModel, growth: _Growth, radius: float, site: _Site) -> float | None:
    """How big the lesion can be here (mm), from how deep its centre lies in the organ;
    None when the organ is too thin for it (or an invading lesion too deep to reach out)."""
    min_spacing = ctx.min_spacing
    centre_depth = float(site.centre_depth)
    r_min = 1.05 * min_spacing if ctx.relaxed else max(0.3 * model.diameter_mm[0], 1.5 * min_spacing)
    if model.placement == "bone":
        radius = min(radius, max(1.6 * centre_depth, 1.5 * min_spacing))
    elif model.placement == "parenchyma" and not growth.invading:
        if centre_depth < 0.8 * radius:
            radius = centre_depth / 0.8
            if radius < r_min:
                return None
    elif model.placement == "parenchyma" and growth.invading:
        if centre_depth > 0.75 * radius:
            radius = centre_depth / 0.75
        if centre_depth < 0.15 * radius:
            return None
    elif growth.polyp:
        radius = min(radius, 0.8 * float(site.depth.max()))
        if centre_depth > 0.9 * radius or radius < r_min:
            return None
    elif model.placement == "lumen":
        radius = min(radius, centre_depth - ctx.band() + 0.5 * min_spacing)
        if radius < 0.8 * min_spacing:
            return None
    elif model.placement == "sinus":
        radius = min(radius, max(centre_depth - min_spacing, 0.8 * min_spacing))
    return max(radius, 1.05 * min_spacing)  # at least the voxel and its six neighbours


def _shape_field(ctx: _Context, growth: _Growth, intent: LesionIntent, radius: float, site: _Site) -> _ShapeField:
    """The lesion's shape around its centre, in its random orientation."""
    offsets = _offsets(site.box, site.centre, ctx.spacing)
    if growth.thickening:
        return _thickening_field(ctx, intent, radius, site, offsets)
    return _mass_field(ctx, intent, radius, offsets)


def _thickening_field(ctx: _Context, intent: LesionIntent, radius: float, site: _Site, offsets) -> _ShapeField:
    """A wall thickening: the organ's outer wall to a bumpy depth, within a bumpy ellipsoid
    (long along the esophagus); nothing outside the organ yet."""
    assert intent.thickness_mm is not None
    rng, min_spacing = ctx.rng, ctx.min_spacing
    extent_mm = radius * float(rng.uniform(0.9, 1.2))
    rotated = _rotate(_rotation(rng), offsets)
    stretch = np.array([1.0, 1.0, 1.0], np.float32)
    if ctx.organ == "esophagus":
        stretch = np.array([0.6, 0.6, 1.6], np.float32)
    rho = np.sqrt((rotated[0] / (extent_mm * stretch[0])) ** 2 + (rotated[1] / (extent_mm * stretch[1])) ** 2
                  + (rotated[2] / (extent_mm * stretch[2])) ** 2)
    bumps = smooth_field(rng, rho.shape, max(1.0, 0.3 * extent_mm / min_spacing))
    rho = rho * (1.0 + 0.15 * bumps)
    thickness = intent.thickness_mm * (1.0 + 0.2 * smooth_field(rng, rho.shape,
                                                                 max(1.0, 0.4 * extent_mm / min_spacing)))
    ellipsoid_mm = (rho - 1.0) * extent_mm
    signed_mm = np.maximum(site.depth - thickness, ellipsoid_mm)
    signed_mm = np.where(site.host, signed_mm, np.maximum(signed_mm, 0.0) + min_spacing)
    return _ShapeField(signed_mm, ellipsoid_mm)


def _mass_field(ctx: _Context, intent: LesionIntent, radius: float, offsets) -> _ShapeField:
    """A mass: a randomly oriented ellipsoid; irregular ones get lobes and clefts, the rest
    a slightly wavy outline."""
    rng, min_spacing = ctx.rng, ctx.min_spacing
    radii = radius * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0)], np.float32)
    if intent.shape == "punctate_nodular":
        radii = np.full(3, radius, np.float32) * np.array([1.0, 0.97, 0.95], np.float32)
    rotated = _rotate(_rotation(rng), offsets)
    rho = np.sqrt((rotated[0] / radii[0]) ** 2 + (rotated[1] / radii[1]) ** 2 + (rotated[2] / radii[2]) ** 2)
    mean_radius = float(radii.mean())
    if intent.shape == "irregular":
        lobes = smooth_field(rng, rho.shape, max(1.0, 0.3 * mean_radius / min_spacing))
        clefts = smooth_field(rng, rho.shape, max(1.0, 0.15 * mean_radius / min_spacing))
        rho = rho * (1.0 + 0.35 * lobes) * (1.0 - 0.4 * np.clip(clefts - 0.6, 0, None))
    else:
        rho = rho * (1.0 + 0.04 * smooth_field(rng, rho.shape, max(1.0, 0.5 * mean_radius / min_spacing)))
    return _ShapeField((rho - 1.0) * mean_radius)


def _invasion_zone(ctx: _Context, site: _Site) -> np.ndarray:
    """Soft tissue within a few mm outside the host, never vessels, airways or bone:
    where an invading lesion may grow."""
    image = ctx.image[site.box]
    near = ndi.distance_transform_edt(~site.host, sampling=ctx.spacing) <= float(ctx.rng.uniform(4.0, 10.0))
    soft = (image > SOFT_TISSUE_HU[0]) & (image < SOFT_TISSUE_HU[1])
    outward = (~site.host) & near & soft
    if ctx.no_invade:
        outward &= ~host_mask(ctx.labels[site.box], ctx.no_invade)
    return outward


def _thickening_into(shape: _ShapeField, outward: np.ndarray, min_spacing: float) -> _ShapeField:
    """An invading thickening fills the invasion zone within its ellipsoid (just inside)."""
    assert shape.ellipsoid_mm is not None
    signed_mm = np.where(outward, np.maximum(shape.ellipsoid_mm, 0.0) - min_spacing * 0.01, shape.signed_mm)
    signed_mm = np.where(outward, np.maximum(signed_mm, -min_spacing), signed_mm)
    return _ShapeField(signed_mm, shape.ellipsoid_mm)


def _allowed_region(ctx: _Context, growth: _Growth, site: _Site, outward: np.ndarray | None) -> np.ndarray:
    """Where the lesion may be: the host (the deep lumen, for stones), plus the invasion
    zone; never on or next to an earlier lesion."""
    allowed = site.host.copy()
    if growth.placement == "lumen":
        allowed &= site.depth > ctx.band()
    if outward is not None:
        allowed |= outward
    allowed &= ~ctx.taken[site.box]
    return allowed


def _component(mask: np.ndarray, local_centre: tuple[int, ...]) -> np.ndarray | None:
    """The connected part of `mask` holding the centre, else its largest part; None if empty."""
    parts, n = ndi.label(mask)
    if n == 0:
        return None
    keep = parts[local_centre] if parts[local_centre] else int(np.argmax(np.bincount(parts.ravel())[1:]) + 1)
    return parts == keep


def _lesion_mask(growth: _Growth, site: _Site, signed_mm: np.ndarray, allowed: np.ndarray) -> np.ndarray | None:
    """The lesion's voxels: one connected piece of its shape where it is allowed. A mass must
    hold its centre; a protrusion too small to count as invasion is trimmed, so the report
    (measured from the mask) and the mask agree."""
    mask = (signed_mm <= 0) & allowed
    if not mask[site.local_centre] and not (growth.thickening or growth.polyp):
        return None
    mask = _component(mask, site.local_centre)
    if mask is None or not growth.invading:
        return mask
    outside = mask & ~site.host
    if 0 < outside.sum() < max(3, 0.02 * mask.sum()):
        return _component(mask & site.host, site.local_centre)
    return mask


def _acceptable(growth: _Growth, site: _Site, mask: np.ndarray, radius: float, spacing) -> bool:
    """Reject a speck, a mass clipped to under half its volume, a thickening too small to
    see, and an invading lesion that stayed inside its organ."""
    voxels = int(mask.sum())
    if voxels < 2:
        return False
    voxel_mm3 = float(np.prod(spacing))
    mass = not (growth.thickening or growth.polyp)
    if not growth.invading and mass and voxels < 0.45 * (4.0 / 3.0 * np.pi * radius**3) / voxel_mm3:
        return False
    if growth.thickening and (voxels * voxel_mm3 < 150.0 or (growth.invading and not (mask & ~site.host).any())):
        return False
    return not (growth.invading and not growth.thickening and not (mask & ~site.host).any())


# ---- appearance: occupancy, intensity, blending -----------------------------------------------

def _occupancy(ctx: _Context, intent: LesionIntent, signed_mm: np.ndarray, mask: np.ndarray,
               allowed: np.ndarray) -> np.ndarray:
    """How much of each voxel is lesion: partial volume at the margin; a slow fall-off
    when ill-defined. At least 0.5 in the mask, below it just outside."""
    min_spacing = ctx.min_spacing
    if intent.surface == "ill_defined" and int(mask.sum()) > 8:
        falloff_mm = max(4.0, 1.8 * min_spacing) * float(ctx.rng.uniform(1.0, 1.3))
        occupancy = 1.0 / (1.0 + np.exp(np.clip(signed_mm / falloff_mm, -30, 30)))
    else:
        occupancy = np.clip(0.5 - signed_mm / (0.8 * min_spacing), 0.0, 1.0)
    occupancy = occupancy.astype(np.float32)
    grown = ndi.binary_dilation(mask, iterations=2) & allowed
    return np.where(mask, np.maximum(occupancy, 0.5), np.where(grown, np.minimum(occupancy, 0.49), 0.0))


def _base_hu(ctx: _Context, intent: LesionIntent, site: _Site, mask: np.ndarray) -> float:
    """The lesion's mean HU: absolute, or the organ's normal tissue in this box (its wall,
    for a hollow organ) plus the intended difference; that reference goes into `intent`."""
    if intent.hu is not None:
        return intent.hu
    assert intent.delta_hu is not None
    image = ctx.image[site.box]
    normal = site.host & ~mask & ~ctx.taken[site.box]
    if ctx.organ in HOLLOW_ORGANS:
        normal &= site.depth <= max(WALL_BAND_MM[ctx.organ], 1.5 * max(ctx.spacing))
    values = image[normal]
    reference = float(np.median(values)) if values.size else float(np.median(image[site.host]))
    intent.reference_hu = round(reference, 1)
    return reference + intent.delta_hu


def _lesion_hu(ctx: _Context, intent: LesionIntent, mask: np.ndarray, signed_mm: np.ndarray, base: float,
               radius: float) -> np.ndarray:
    """The lesion's HU: a faint texture when homogeneous; when heterogeneous a strong one
    and a core that differs (darker in an enhancing lesion, else either way)."""
    rng, min_spacing = ctx.rng, ctx.min_spacing
    texture = smooth_field(rng, mask.shape, max(1.0, 2.0 / min_spacing))
    if intent.heterogeneity != "heterogeneous":
        return base + 2.0 * texture
    amplitude = float(rng.uniform(14, 28))
    lesion_hu = base + amplitude * texture
    inner = np.where(mask, -signed_mm, 0.0)   # depth inside the lesion, from its shape field
    core = ((inner > 0.4 * float(inner.max()))
            & (smooth_field(rng, mask.shape, max(1.0, 0.25 * radius / min_spacing)) > 0.3))
    if base > 60:
        return np.where(core, base - float(rng.uniform(40, 70)), lesion_hu)
    return np.where(core, base + float(rng.uniform(30, 60)) * np.sign(rng.random() - 0.5), lesion_hu)


def _blend(ctx: _Context, box: Box, mask: np.ndarray, occupancy: np.ndarray, lesion_hu: np.ndarray) -> None:
    """Mix the lesion into the image by occupancy; on real CT give it the scanner's noise
    where it replaces the image (so it is no smoother); mark its voxels taken."""
    image = ctx.image[box]
    blended = image * (1.0 - occupancy) + lesion_hu * occupancy
    if ctx.noise_sd:
        kept = 1.0 - occupancy
        noise_sd = np.sqrt(np.clip(1.0 - kept**2, 0, 1)) * ctx.noise_sd
        blended = blended + noise_sd * ctx.rng.standard_normal(occupancy.shape).astype(np.float32)
    ctx.image[box] = blended.astype(ctx.image.dtype)
    ctx.taken[box] |= ndi.binary_dilation(mask, structure=np.ones((3, 3, 3), bool), iterations=1)
