"""A procedural torso CT phantom: chest to pelvis, organs in TotalSegmentator labels.

`sample_anatomy(rng)` draws one body (sizes, positions, shapes); `rasterize(anatomy, grid,
rng)` draws it on a voxel grid as two maps: TotalSegmentator v2 organ labels and tissue
classes (`synth.tissue`); `render(tissue, phase, rng)` turns tissue into clean HU.
Organs are super-ellipse lofts painted in order (later wins), clipped by the body wall,
the thoracic cavity and the diaphragm. Landmarks are in mm with z = 0 at the T12/L1 disc.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from synth.geometry import Grid, Loft, box_slices, cap, lerp, local_coords, loft
from synth.noise import smooth_field
from synth.tissue import T, hu_lut, texture_lut
from synth.totalseg import TOTALSEG_ID as TS

HOLLOW_WALL_MM = {"stomach": 4.0, "colon": 3.0, "esophagus": 4.0, "gallbladder": 3.0,
                  "urinary_bladder": 4.0, "small_bowel": 2.5}

# z extent of the torso the phantom draws (mm, before the height scale)
Z_TOP, Z_BOTTOM = 330.0, -360.0

Box = tuple[slice, ...]  # one slice per axis (3)


@dataclass
class Anatomy:
    """One body, drawn by `sample_anatomy`. `*_scale` fields are ratios to the reference
    body; `*_mm` fields are lengths, or heights on the z axis (z = 0 at the T12/L1 disc)."""

    height_scale: float            # z: every landmark height
    width_scale: float             # x: left-right
    depth_scale: float             # y: anterior-posterior
    fat_mm: float                  # subcutaneous fat
    muscle_mm: float               # body-wall muscle
    spine_shift_y_mm: float
    dome_right_z_mm: float         # top of the right hemidiaphragm
    dome_left_z_mm: float
    liver_bottom_z_mm: float
    liver_width_scale: float
    liver_shift_x_mm: float
    spleen_scale: float
    stomach_scale: float
    stomach_gas_fraction: float    # gas fills this share of the anterior half of the lumen
    pancreas_scale: float
    kidney_scale: float
    kidney_shift_z_mm: float
    gallbladder_scale: float
    gallbladder_shift_z_mm: float
    heart_scale: float
    colon_radius_mm: float
    esophagus_has_air: bool
    bladder_bottom_z_mm: float     # before the height scale
    bladder_height_mm: float
    bladder_radius_x_mm: float
    bladder_radius_y_mm: float
    fissure_height_scale: float    # height of the lung fissures
    lung_vessel_threshold: float   # |noise| below it is a lung vessel: the vessels' share

    # ---- landmarks shared by rasterisation and field-of-view choice ----------------
    def level_bounds(self) -> dict[str, tuple[float, float]]:
        """Vertebra name -> (z_bottom, z_top) in mm."""
        height_scale = self.height_scale
        out = {}
        top = 12 * 24.0 * height_scale
        for k in range(1, 13):
            out[f"T{k}"] = (top - k * 24.0 * height_scale, top - (k - 1) * 24.0 * height_scale)
        for k in range(1, 6):
            out[f"L{k}"] = (-k * 31.0 * height_scale, -(k - 1) * 31.0 * height_scale)
        return out

    def y_spine(self, z):
        """y (mm) of the vertebral body centre at height z."""
        return np.interp(z, np.array([-260, -150, -60, 60, 160, 300]) * self.height_scale,
                         [62, 40, 36, 48, 58, 45]).astype(np.float32) + self.spine_shift_y_mm

    def y_aorta(self, z):
        """y (mm) of the descending aorta: just anterior to the vertebral body."""
        return self.y_spine(z) - 32.0

    def y_esophagus(self, z):
        """y (mm) of the esophagus, in front of the spine."""
        return self.y_spine(z) - 36.0

    def y_trachea(self, z):
        """y (mm) of the trachea, in front of the esophagus."""
        return self.y_esophagus(z) - 18.0

    def heart_base_z(self) -> float:
        """z (mm) where the heart sits on the left hemidiaphragm."""
        return self.dome_left_z_mm + 5

    def body_ab(self, z):
        """Semi-axes (a: left-right, b: anterior-posterior; mm) of the skin outline at height z."""
        height_scale, width_scale, depth_scale = self.height_scale, self.width_scale, self.depth_scale
        zk = np.array([-400, -300, -200, -120, -40, 60, 160, 260, 400]) * height_scale
        a = np.interp(z, zk, [150, 172, 170, 150, 152, 160, 165, 150, 130]) * width_scale
        b = np.interp(z, zk, [95, 102, 104, 106, 110, 110, 108, 100, 90]) * depth_scale
        return a.astype(np.float32), b.astype(np.float32)

    def dome(self, x, y, z_ref=None):
        """z of the diaphragm surface above (x, y)."""
        a2 = 150.0 * self.width_scale - self.fat_mm - self.muscle_mm
        b2 = 108.0 * self.depth_scale - self.fat_mm - self.muscle_mm
        ztop = np.where(x < 0, self.dome_right_z_mm, self.dome_left_z_mm)
        xc = 0.5 * a2
        return (ztop - 55.0 * ((np.abs(x) - xc) / (0.6 * a2)) ** 2
                - 30.0 * np.clip(y / b2, 0, None) ** 2 - 8.0 * np.clip(-y / b2, 0, None))

    def organ_anchor(self, organ: str, rng: np.random.Generator) -> np.ndarray:
        """A point (mm) near the middle of a host organ, to centre a field of view on."""
        height_scale, width_scale = self.height_scale, self.width_scale
        side = 1.0 if rng.random() < 0.5 else -1.0
        anchors = {
            "lung": (side * 75 * width_scale, 10.0, 160 * height_scale),
            "liver": (-60 * width_scale, -5.0, 0.0),
            "gallbladder": (-48 * width_scale, -35.0, -45 * height_scale),
            "pancreas": (15 * width_scale, 5.0, -35 * height_scale),
            "esophagus": (10.0, float(self.y_spine(120 * height_scale)) - 35, 120 * height_scale),
            "stomach": (40 * width_scale, -20.0, 0.0),
            "kidney": (side * 72 * width_scale, 55.0, (-50 if side < 0 else -35) * height_scale),
            "urinary_bladder": (0.0, -40.0, self.bladder_bottom_z_mm + 30),
        }
        if organ == "colon":
            segment = rng.integers(4)
            points = [(-100 * width_scale, 5.0, -110 * height_scale), (0.0, -50.0, -80 * height_scale),
                      (100 * width_scale, 15.0, -100 * height_scale), (20.0, 30.0, -230 * height_scale)]
            return np.array(points[int(segment)], float)
        if organ == "bone":
            site = rng.integers(3)
            if site == 0:   # spine
                return np.array([0.0, 45.0, float(rng.uniform(-150, 250)) * height_scale])
            if site == 1:   # ribs
                return np.array([side * 90 * width_scale, 20.0, float(rng.uniform(60, 220)) * height_scale])
            return np.array([side * 60 * width_scale, 30.0, -200 * height_scale])  # pelvis
        return np.array(anchors[organ], float)


# the parameter-dict keys Anatomy had before its fields were named


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one body. The draws happen in this order; reordering them changes every seeded case."""
    u = rng.uniform
    return Anatomy(
        height_scale=u(0.92, 1.08), width_scale=u(0.88, 1.12), depth_scale=u(0.88, 1.12),
        fat_mm=u(8, 30), muscle_mm=u(8, 14), spine_shift_y_mm=u(-5, 5),
        dome_right_z_mm=u(62, 82), dome_left_z_mm=u(48, 68),
        liver_bottom_z_mm=u(-115, -75), liver_width_scale=u(0.9, 1.12), liver_shift_x_mm=u(-8, 8),
        spleen_scale=u(0.8, 1.2), stomach_scale=u(0.85, 1.15), stomach_gas_fraction=u(0.2, 0.6),
        pancreas_scale=u(0.85, 1.15), kidney_scale=u(0.9, 1.1), kidney_shift_z_mm=u(-15, 15),
        gallbladder_scale=u(0.8, 1.2), gallbladder_shift_z_mm=u(-15, 15),
        heart_scale=u(0.9, 1.1), colon_radius_mm=u(18, 27), esophagus_has_air=bool(rng.random() < 0.5),
        bladder_bottom_z_mm=u(-345, -320), bladder_height_mm=u(45, 85), bladder_radius_x_mm=u(35, 50),
        bladder_radius_y_mm=u(28, 40), fissure_height_scale=u(0.9, 1.1), lung_vessel_threshold=u(0.1, 0.14),
    )


class _Canvas:
    """The two maps being painted: organ labels and tissue classes (later paint wins)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.labels = np.zeros(grid.shape, np.uint8)
        self.tissue = np.zeros(grid.shape, np.uint8)

    def paint(self, box: Box, mask: np.ndarray | None, label: int | None, tissue: int | None) -> None:
        """Set `label` and/or `tissue` (None: leave it) where `mask` holds inside `box`."""
        if mask is None or not mask.any():
            return
        shape = tuple(s.stop - s.start for s in box)
        if mask.shape != shape:
            mask = np.broadcast_to(mask, shape)
        if label is not None:
            self.labels[box][mask] = label
        if tissue is not None:
            self.tissue[box][mask] = tissue


@dataclass
class _Scene:
    """What every painting step reads: the body, the grid, the canvas, the texture stream,
    broadcastable voxel coordinates, and the body-wall fields that clip the organs."""

    anatomy: Anatomy
    grid: Grid
    canvas: _Canvas
    rng: np.random.Generator
    mean_spacing_mm: float
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    depth_in_mm: np.ndarray           # ~ mm inside the inner muscle surface (< 0 in the wall)
    muscle_outer_r2: np.ndarray       # squared normalised radius of the fat/muscle boundary
    cavity_half_depth_mm: np.ndarray  # anterior-posterior semi-axis of the cavity, per z
    dome_z: np.ndarray                # diaphragm height over each (x, y)

    def inside(self, box: Box, margin_mm: float = 2.0) -> np.ndarray:
        """Voxels of `box` at least `margin_mm` inside the body cavity."""
        return self.depth_in_mm[box] >= margin_mm

    def below_dome(self, box: Box) -> np.ndarray:
        """Voxels of `box` under the diaphragm (abdomen, not thorax)."""
        return self.z[..., box[2]] < self.dome_z[box[0], box[1]]

    def dome_over(self, box: Box) -> np.ndarray:
        """Diaphragm height over the (x, y) columns of `box`."""
        return self.dome_z[box[0], box[1]]

    def under_fat(self, box: Box) -> np.ndarray:
        """Voxels of `box` inside the subcutaneous fat: where back and gluteal muscle may be."""
        return self.muscle_outer_r2[box] <= 1.0


def _bbox(mask: np.ndarray) -> Box:
    out = []
    for a in range(3):
        other = tuple(b for b in range(3) if b != a)
        hit = np.nonzero(mask.any(axis=other))[0]
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _wall_mm(organ: str, grid: Grid) -> float:
    """Hollow-organ walls are at least two voxels thick, so a wall has an inside."""
    return max(HOLLOW_WALL_MM[organ], 2.0 * max(grid.spacing))



# ---- the scene: coordinates, body wall, diaphragm -------------------------------------

def _paint_body_wall(anatomy: Anatomy, canvas: _Canvas, x: np.ndarray, y: np.ndarray,
                     z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skin/subcutaneous fat, muscle and the cavity as nested ellipses per z. Returns what
    clips the organs: depth (mm) inside the inner muscle surface, the squared normalised
    radius of the fat/muscle boundary and the cavity's anterior-posterior semi-axis."""
    a, b = anatomy.body_ab(z)
    x2, y2 = x * x, y * y
    skin_r2 = x2 / (a * a) + y2 / (b * b)
    canvas.tissue[skin_r2 <= 1.0] = T["fat"]
    fat, muscle = anatomy.fat_mm, anatomy.muscle_mm
    a1, b1 = a - fat, b - fat
    muscle_outer_r2 = x2 / (a1 * a1) + y2 / (b1 * b1)  # <= 1 inside
    canvas.tissue[muscle_outer_r2 <= 1.0] = T["muscle"]
    a2, b2 = a1 - muscle, b1 - muscle
    cavity_r = np.sqrt(x2 / (a2 * a2) + y2 / (b2 * b2))
    canvas.tissue[cavity_r <= 1.0] = T["fat"]
    mean_radius = 0.5 * (a2 + b2)
    depth_in_mm = (1.0 - cavity_r) * mean_radius
    return depth_in_mm, muscle_outer_r2, b2


def _build_scene(anatomy: Anatomy, grid: Grid, rng: np.random.Generator) -> _Scene:
    """Coordinates, the painted body wall and the diaphragm: measured once, read by every step."""
    canvas = _Canvas(grid)
    x, y, z = local_coords(grid, tuple(slice(0, n) for n in grid.shape))
    depth_in_mm, muscle_outer_r2, cavity_half_depth_mm = _paint_body_wall(anatomy, canvas, x, y, z)
    return _Scene(anatomy=anatomy, grid=grid, canvas=canvas, rng=rng,
                  mean_spacing_mm=float(np.mean(grid.spacing)), x=x, y=y, z=z,
                  depth_in_mm=depth_in_mm, muscle_outer_r2=muscle_outer_r2,
                  cavity_half_depth_mm=cavity_half_depth_mm, dome_z=anatomy.dome(x, y))


# ---- thorax: lungs ------------------------------------------------------------------------

def _lung_slab(scene: _Scene) -> slice | None:
    """The z slab where a lung can be (diaphragm to apex): the lung fields are built on it only."""
    z_apex = 300.0 * scene.anatomy.height_scale
    zs = scene.grid.axis(2)
    kz = np.nonzero((zs > float(scene.dome_z.min())) & (zs < z_apex))[0]
    if not kz.size:
        return None
    return slice(int(kz[0]), int(kz[-1]) + 1)


def _lung_lobe_labels(scene: _Scene, slab: slice) -> np.ndarray:
    """Lobe label per voxel of the slab: the fissures slope from high posterior to low anterior."""
    height_scale = scene.anatomy.height_scale
    x, y, z = scene.x, scene.y, scene.z[..., slab]
    half_depth = scene.cavity_half_depth_mm[..., slab]
    z_fissure = (lerp(70.0, 205.0, np.clip((y + half_depth) / (2 * half_depth), 0, 1)) * height_scale
                 * scene.anatomy.fissure_height_scale)
    upper = z > z_fissure
    left = x > 0
    return np.where(left, np.where(upper, TS["lung_upper_lobe_left"], TS["lung_lower_lobe_left"]),
                    np.where(upper, np.where(z > 150.0 * height_scale, TS["lung_upper_lobe_right"],
                                             TS["lung_middle_lobe_right"]),
                             TS["lung_lower_lobe_right"]))


def _paint_lungs(scene: _Scene) -> None:
    """Lungs fill the cavity above the diaphragm, narrowing to the apex, around the mediastinum."""
    slab = _lung_slab(scene)
    if slab is None:
        return
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    x, y, z = scene.x, scene.y, scene.z[..., slab]
    z_apex = 300.0 * height_scale
    apex_t = np.clip((z - 220.0 * height_scale) / (z_apex - 220.0 * height_scale), 0, 1)
    lung = (scene.depth_in_mm[..., slab] >= 10.0 + 60.0 * apex_t**2) & (z >= scene.dome_z)
    lung &= np.abs(x) > np.where(y > -40, 24.0, 10.0)
    lung &= ~((np.abs(x - 20 * width_scale) < 40) & (y < -60 + 30 * apex_t))  # anterior mediastinum
    if not lung.any():
        return
    lobes = _lung_lobe_labels(scene, slab)
    box = (slice(0, scene.grid.shape[0]), slice(0, scene.grid.shape[1]), slab)
    scene.canvas.paint(box, lung, None, T["lung"])
    scene.canvas.labels[box][lung] = np.broadcast_to(lobes, lung.shape)[lung]
    _paint_lung_vessels(scene, lung, slab)


def _paint_lung_vessels(scene: _Scene, lung: np.ndarray, slab: slice) -> None:
    """Vessels where two smooth noise fields are both near zero: thin branching tubes."""
    local = _bbox(lung)
    sub = lung[local]
    box = (local[0], local[1], slice(local[2].start + slab.start, local[2].stop + slab.start))
    n1 = smooth_field(scene.rng, sub.shape, 5.0 / scene.mean_spacing_mm)
    n2 = smooth_field(scene.rng, sub.shape, 5.0 / scene.mean_spacing_mm)
    threshold = scene.anatomy.lung_vessel_threshold
    scene.canvas.paint(box, sub & (np.abs(n1) < threshold) & (np.abs(n2) < threshold * 1.6), None,
                       T["lung_vessel"])


# ---- abdomen: bowel ------------------------------------------------------------------------

def _paint_small_bowel(scene: _Scene) -> None:
    """Small bowel loops first, at low priority: the organs painted later cover them."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    box = box_slices(scene.grid, (-0.8 * 150 * width_scale, -140, -215 * height_scale),
                     (0.8 * 150 * width_scale, 30, -45 * height_scale))
    if box is None:
        return
    canvas, rng, spacing = scene.canvas, scene.rng, scene.mean_spacing_mm
    loops = smooth_field(rng, tuple(s.stop - s.start for s in box), 7.0 / spacing)
    region = scene.inside(box, 8.0) & (scene.y[:, box[1]] < 25)
    bowel = region & (loops > -0.25)
    canvas.paint(box, bowel & (loops < 0.0), TS["small_bowel"], T["gi_wall"])
    gas = smooth_field(rng, bowel.shape, 3.0 / spacing)
    canvas.paint(box, bowel & (loops >= 0.0) & (gas <= 1.2), TS["small_bowel"], T["gi_fluid"])
    canvas.paint(box, bowel & (loops >= 0.0) & (gas > 1.2), TS["small_bowel"], T["gas"])


def _colon_segments(scene: _Scene) -> list[Loft | None]:
    """Ascending, transverse, descending and sigmoid colon: the frame around the small bowel."""
    grid, radius = scene.grid, scene.anatomy.colon_radius_mm
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    return [
        loft(grid, 2, -180 * height_scale, -40 * height_scale, lambda t: -100 * width_scale + 0 * t,
             lambda t: 5 + 0 * t, lambda t: radius * lerp(1.2, 1.0, t) * cap(t, 0.1, 0.0),
             lambda t: radius * lerp(1.2, 1.0, t) * cap(t, 0.1, 0.0)),
        loft(grid, 0, -100 * width_scale, 100 * width_scale, lambda t: -55 + 55 * (2 * t - 1) ** 2,
             lambda t: (-45 - 30 * (1 - (2 * t - 1) ** 2) + 15 * np.clip(2 * t - 1, 0, 1)) * height_scale,
             lambda t: 0.9 * radius + 0 * t, lambda t: 0.9 * radius + 0 * t),
        loft(grid, 2, -185 * height_scale, -30 * height_scale, lambda t: 100 * width_scale + 0 * t,
             lambda t: 15 + 0 * t, lambda t: 0.85 * radius + 0 * t, lambda t: 0.85 * radius + 0 * t),
        loft(grid, 0, 100 * width_scale, 0.0, lambda t: 15 - 55 * np.sin(np.pi * t),
             lambda t: (lerp(-185, -228, t) - 15 * np.sin(np.pi * t)) * height_scale,
             lambda t: 0.8 * radius + 0 * t, lambda t: 0.8 * radius + 0 * t),
    ]


def _paint_colon(scene: _Scene) -> None:
    """Each colon segment: a wall, and a lumen split into gas and feces by a smooth field."""
    radius = scene.anatomy.colon_radius_mm
    wall_mm = _wall_mm("colon", scene.grid)
    for segment in _colon_segments(scene):
        if segment is None:
            continue
        box = segment.sl
        colon = (segment.rho <= 1.0) & scene.inside(box, 3.0)
        narrowest = 0.8 * radius
        lumen = colon & (segment.rho <= 1.0 - wall_mm / narrowest)
        scene.canvas.paint(box, colon, TS["colon"], T["gi_wall"])
        if lumen.any():
            gas = smooth_field(scene.rng, lumen.shape, 4.0 / scene.mean_spacing_mm)
            scene.canvas.paint(box, lumen & (gas > 0.4), TS["colon"], T["gas"])
            scene.canvas.paint(box, lumen & (gas <= 0.4), TS["colon"], T["feces"])


def _paint_rectum(scene: _Scene) -> None:
    """The rectum, anterior to the sacrum, filled with feces."""
    anatomy, radius = scene.anatomy, scene.anatomy.colon_radius_mm
    height_scale = anatomy.height_scale
    rectum = loft(scene.grid, 2, -330 * height_scale, -225 * height_scale, lambda t: 0 * t,
                  lambda t: anatomy.y_spine(lerp(-330, -225, t) * height_scale) + 5 - 30 * t,
                  lambda t: 0.9 * radius * cap(t, 0.1, 0), lambda t: 0.8 * radius * cap(t, 0.1, 0))
    if rectum is None:
        return
    wall_mm = _wall_mm("colon", scene.grid)
    inside = rectum.rho <= 1.0
    scene.canvas.paint(rectum.sl, inside, TS["colon"], T["gi_wall"])
    scene.canvas.paint(rectum.sl, inside & (rectum.rho <= 1.0 - wall_mm / (0.8 * radius)), TS["colon"], T["feces"])


# ---- abdomen: solid organs -----------------------------------------------------------------

def _paint_liver(scene: _Scene) -> None:
    """The liver under the right dome, thinning to the left lobe, with portal/hepatic vessels."""
    anatomy = scene.anatomy
    height_scale, width_scale, depth_scale = anatomy.height_scale, anatomy.width_scale, anatomy.depth_scale
    width = anatomy.liver_width_scale
    liver = loft(scene.grid, 2, anatomy.liver_bottom_z_mm * height_scale, anatomy.dome_right_z_mm + 5,
                 lambda t: (lerp(-88, -32, t**0.8) + anatomy.liver_shift_x_mm) * width_scale,
                 lambda t: lerp(-8, -12, t),
                 lambda t: lerp(38, 110, np.clip(t * 1.4, 0, 1) ** 0.8) * width_scale * width * cap(t, 0.12, 0),
                 lambda t: lerp(55, 82, np.sqrt(t)) * depth_scale * cap(t, 0.12, 0), p=2.2)
    if liver is None:
        return
    x, y, z = liver.coords
    thin = 1.0 - 0.45 * np.clip((x + 20.0) / 80.0, 0, 1)
    rho = liver.rho / np.clip(thin, 0.3, 1)
    inside = (rho <= 1.0) & scene.inside(liver.sl, 3.0) & (z < scene.dome_over(liver.sl) - 2)
    scene.canvas.paint(liver.sl, inside, TS["liver"], T["liver"])
    n1 = smooth_field(scene.rng, inside.shape, 6.0 / scene.mean_spacing_mm)
    n2 = smooth_field(scene.rng, inside.shape, 6.0 / scene.mean_spacing_mm)
    scene.canvas.paint(liver.sl, inside & (np.abs(n1) < 0.12) & (np.abs(n2) < 0.25), TS["liver"],
                       T["liver_vessel"])


def _paint_spleen(scene: _Scene) -> None:
    """The spleen, posterior-left under the diaphragm."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    scale = scene.anatomy.spleen_scale
    spleen = loft(scene.grid, 2, -25 * height_scale, 55 * height_scale, lambda t: 92 * width_scale - 10 * t,
                  lambda t: 45 + 10 * t, lambda t: 24 * scale * cap(t, 0.4, 0.4),
                  lambda t: 45 * scale * cap(t, 0.4, 0.4))
    if spleen is not None:
        inside = (spleen.rho <= 1.0) & scene.inside(spleen.sl, 3.0) & scene.below_dome(spleen.sl)
        scene.canvas.paint(spleen.sl, inside, TS["spleen"], T["spleen"])


def _paint_stomach(scene: _Scene) -> None:
    """Stomach body and antrum: a wall around fluid with a gas cap anteriorly."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    scale = scene.anatomy.stomach_scale
    body = loft(scene.grid, 2, -55 * height_scale, 48 * height_scale, lambda t: lerp(5, 55, t**0.7) * width_scale,
                lambda t: lerp(-55, 5, t), lambda t: lerp(22, 44, t) * scale * cap(t, 0.1, 0.25),
                lambda t: lerp(22, 42, t) * scale * cap(t, 0.1, 0.25))
    antrum = loft(scene.grid, 0, 10 * width_scale, -28 * width_scale, lambda t: -55 + 0 * t,
                  lambda t: -45 * height_scale + 0 * t,
                  lambda t: 15 * scale * cap(t, 0, 0.2), lambda t: 14 * scale * cap(t, 0, 0.2))
    for part in (body, antrum):
        if part is not None:
            _paint_stomach_part(scene, part, 14.0 * scale if part is antrum else 22.0 * scale)


def _paint_stomach_part(scene: _Scene, part: Loft, narrowest_mm: float) -> None:
    """One stomach loft: wall, then a gas-fluid level (gas anterior, fluid dependent)."""
    x, y, z = part.coords
    stomach = (part.rho <= 1.0) & scene.inside(part.sl, 3.0) & (z < scene.dome_over(part.sl) - 2)
    lumen = stomach & (part.rho <= 1.0 - _wall_mm("stomach", scene.grid) / narrowest_mm)
    scene.canvas.paint(part.sl, stomach, TS["stomach"], T["gi_wall"])
    if lumen.any():
        ymin = np.where(lumen, y, np.inf).min()
        ymax = np.where(lumen, y, -np.inf).max()
        level = ymin + scene.anatomy.stomach_gas_fraction * 0.5 * (ymax - ymin)
        scene.canvas.paint(part.sl, lumen & (y >= level), TS["stomach"], T["gi_fluid"])
        scene.canvas.paint(part.sl, lumen & (y < level), TS["stomach"], T["gas"])


def _paint_pancreas(scene: _Scene) -> None:
    """The pancreas from head (right) to tail (left), with fatty lobulation at its edge."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    scale = scene.anatomy.pancreas_scale
    pancreas = loft(scene.grid, 0, -50 * width_scale, 92 * width_scale, lambda t: lerp(-12, 28, t),
                    lambda t: lerp(-45, -15, t) * height_scale,
                    lambda t: lerp(17, 10, np.sqrt(t)) * scale * cap(t, 0.08, 0.1),
                    lambda t: lerp(16, 10, t) * scale * cap(t, 0.08, 0.1))
    if pancreas is None:
        return
    inside = (pancreas.rho <= 1.0) & scene.inside(pancreas.sl, 3.0)
    lobulation = smooth_field(scene.rng, inside.shape, 3.0 / scene.mean_spacing_mm)
    scene.canvas.paint(pancreas.sl, inside, TS["pancreas"], T["pancreas"])
    scene.canvas.paint(pancreas.sl, inside & (lobulation > 1.3) & (pancreas.rho > 0.6), None, T["fat"])


def _paint_portal_veins(scene: _Scene) -> None:
    """Portal and splenic veins, behind the pancreas."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    pancreas_scale = scene.anatomy.pancreas_scale
    portal = loft(scene.grid, 0, 5.0, -45 * width_scale, lambda t: lerp(8, -5, t),
                  lambda t: lerp(-40, -8, t) * height_scale, lambda t: 7.0 + 0 * t, lambda t: 7.0 + 0 * t)
    splenic = loft(scene.grid, 0, 5.0, 85 * width_scale, lambda t: lerp(-12, 28, t * 0.95) + 14 * pancreas_scale,
                   lambda t: lerp(-42, -18, t) * height_scale, lambda t: 4.5 + 0 * t, lambda t: 4.5 + 0 * t)
    for vein in (portal, splenic):
        if vein is not None:
            scene.canvas.paint(vein.sl, vein.rho <= 1.0, TS["portal_vein_and_splenic_vein"], T["blood_portal"])


def _paint_kidneys(scene: _Scene) -> None:
    """Both kidneys, the right one lower (under the liver)."""
    for side, label, z_centre in ((-1, TS["kidney_right"], -50.0), (1, TS["kidney_left"], -35.0)):
        _paint_kidney(scene, side, label, z_centre * scene.anatomy.height_scale + scene.anatomy.kidney_shift_z_mm)


def _paint_kidney(scene: _Scene, side: int, label: int, z_centre: float) -> None:
    """Cortex, medulla, and a medial renal sinus of fat around urine (the collecting system)."""
    width_scale, scale = scene.anatomy.width_scale, scene.anatomy.kidney_scale
    half_height = 55.0 * scale
    kidney = loft(scene.grid, 2, z_centre - half_height, z_centre + half_height,
                  lambda t: side * (72 * width_scale - 10 * (t - 0.5)),
                  lambda t: 55.0 + 0 * t, lambda t: 27 * scale * cap(t, 0.5, 0.5),
                  lambda t: 23 * scale * cap(t, 0.5, 0.5))
    if kidney is None:
        return
    x, y, z = kidney.coords
    inside = (kidney.rho <= 1.0) & scene.inside(kidney.sl, 2.0)
    x_centre = side * 72 * width_scale
    medial = (side * (x - x_centre) < 6) & (y < 65)
    scene.canvas.paint(kidney.sl, inside, label, T["kidney_cortex"])
    scene.canvas.paint(kidney.sl, inside & (kidney.rho < 0.78), label, T["kidney_medulla"])
    sinus = inside & (kidney.rho < 0.55) & medial
    scene.canvas.paint(kidney.sl, sinus, label, T["fat"])
    scene.canvas.paint(kidney.sl, sinus & (kidney.rho < 0.3), label, T["urine"])


def _paint_gallbladder(scene: _Scene) -> None:
    """The gallbladder under the liver: a wall around bile. Never so small it has no lumen."""
    anatomy, grid = scene.anatomy, scene.grid
    height_scale, width_scale = anatomy.height_scale, anatomy.width_scale
    wall_mm = _wall_mm("gallbladder", grid)
    scale = max(anatomy.gallbladder_scale, (wall_mm + 2.5 * max(grid.spacing)) / 12.0)  # a lumen at coarse spacing
    z0 = -78 * height_scale + anatomy.gallbladder_shift_z_mm
    gallbladder = loft(grid, 2, z0, z0 + 55 * scale, lambda t: lerp(-52, -36, t) * width_scale,
                       lambda t: lerp(-55, -18, t), lambda t: lerp(17, 8, t) * scale * cap(t, 0.3, 0.1),
                       lambda t: lerp(16, 8, t) * scale * cap(t, 0.3, 0.1))
    if gallbladder is None:
        return
    inside = (gallbladder.rho <= 1.0) & scene.inside(gallbladder.sl, 2.0)
    scene.canvas.paint(gallbladder.sl, inside, TS["gallbladder"], T["gi_wall"])
    scene.canvas.paint(gallbladder.sl, inside & (gallbladder.rho <= 1.0 - wall_mm / (12.0 * scale)),
                       TS["gallbladder"], T["bile"])


# ---- mediastinum: heart, vessels, esophagus, airways ----------------------------------------

def _paint_heart(scene: _Scene) -> None:
    """The heart on the left dome: myocardium around arterial (left) and venous (right) blood."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    scale = scene.anatomy.heart_scale
    z_base = scene.anatomy.heart_base_z()
    heart = loft(scene.grid, 2, z_base, z_base + 115 * scale * height_scale, lambda t: 22 * width_scale + 0 * t,
                 lambda t: -32 + 0 * t, lambda t: 62 * scale * cap(t, 0.35, 0.45),
                 lambda t: 52 * scale * cap(t, 0.35, 0.45))
    if heart is None:
        return
    x, y, z = heart.coords
    inside = heart.rho <= 1.0
    scene.canvas.paint(heart.sl, inside, TS["heart"], T["myocardium"])
    blood_pool = inside & (heart.rho < 0.8)
    left = (x - 22 * width_scale) + 0.7 * (y + 32) > 0
    scene.canvas.paint(heart.sl, blood_pool & left, TS["heart"], T["blood_arterial"])
    scene.canvas.paint(heart.sl, blood_pool & ~left, TS["heart"], T["blood_venous"])


def _paint_aorta(scene: _Scene) -> None:
    """Ascending aorta, arch and descending aorta down to the bifurcation."""
    anatomy, grid = scene.anatomy, scene.grid
    height_scale, width_scale = anatomy.height_scale, anatomy.width_scale
    z_arch = 205.0 * height_scale
    parts = [
        loft(grid, 2, anatomy.heart_base_z() + 60 * height_scale, z_arch, lambda t: 5 * width_scale + 0 * t,
             lambda t: -18 + 0 * t, lambda t: 15.0 + 0 * t, lambda t: 15.0 + 0 * t),
        loft(grid, 1, -18.0, float(anatomy.y_aorta(z_arch)), lambda t: lerp(5 * width_scale, 22 * width_scale, t),
             lambda t: z_arch + 22 * np.sin(np.pi * t), lambda t: 14.0 + 0 * t, lambda t: 14.0 + 0 * t),
        loft(grid, 2, -105 * height_scale, z_arch, lambda t: lerp(5, 22, t) * width_scale,
             lambda t: anatomy.y_aorta(lerp(-105, 205, t) * height_scale), lambda t: lerp(10, 13, t),
             lambda t: lerp(10, 13, t)),
    ]
    for part in parts:
        if part is not None:
            scene.canvas.paint(part.sl, part.rho <= 1.0, TS["aorta"], T["blood_arterial"])


def _paint_iliac_arteries(scene: _Scene) -> None:
    """Common iliac arteries from the aortic bifurcation to the pelvis."""
    anatomy = scene.anatomy
    height_scale, width_scale = anatomy.height_scale, anatomy.width_scale
    for side, label in ((1, TS["iliac_artery_left"]), (-1, TS["iliac_artery_right"])):
        iliac = loft(scene.grid, 2, -105 * height_scale, -205 * height_scale,
                     lambda t, side=side: side * lerp(5, 55, t) * width_scale,
                     lambda t: lerp(float(anatomy.y_aorta(-105 * height_scale)), 25, t),
                     lambda t: 6.5 + 0 * t, lambda t: 6.5 + 0 * t)
        if iliac is not None:
            scene.canvas.paint(iliac.sl, iliac.rho <= 1.0, label, T["blood_arterial"])


def _paint_vena_cava(scene: _Scene) -> None:
    """The inferior vena cava, right of the aorta, up to the right atrium."""
    anatomy = scene.anatomy
    height_scale, width_scale = anatomy.height_scale, anatomy.width_scale
    vena_cava = loft(scene.grid, 2, -110 * height_scale, anatomy.heart_base_z() + 15,
                     lambda t: -24 * width_scale + 0 * t,
                     lambda t: anatomy.y_aorta(lerp(-110, 80, t) * height_scale) + 6,
                     lambda t: 13.0 + 0 * t, lambda t: 9.5 + 0 * t)
    if vena_cava is not None:
        scene.canvas.paint(vena_cava.sl, vena_cava.rho <= 1.0, TS["inferior_vena_cava"], T["blood_venous"])


def _paint_esophagus(scene: _Scene) -> None:
    """The esophagus from the gastro-esophageal junction up; some bodies have air in its lumen."""
    anatomy = scene.anatomy
    height_scale, width_scale = anatomy.height_scale, anatomy.width_scale
    wall_mm = _wall_mm("esophagus", scene.grid)
    esophagus = loft(scene.grid, 2, 40.0 * height_scale, 330 * height_scale,
                     lambda t: lerp(30, 3, np.clip(t * 1.6, 0, 1)) * width_scale,
                     lambda t: anatomy.y_esophagus(lerp(40, 330, t) * height_scale) - 35 * np.clip(1 - t * 6, 0, 1),
                     lambda t: 10.0 + 0 * t, lambda t: 8.5 + 0 * t)
    if esophagus is None:
        return
    inside = esophagus.rho <= 1.0
    scene.canvas.paint(esophagus.sl, inside, TS["esophagus"], T["gi_wall"])
    if anatomy.esophagus_has_air and 8.5 > wall_mm + 1:
        scene.canvas.paint(esophagus.sl, inside & (esophagus.rho < 1.0 - wall_mm / 8.5), TS["esophagus"], T["gas"])


def _paint_airways(scene: _Scene) -> None:
    """Trachea and main bronchi: an airway wall around air."""
    anatomy = scene.anatomy
    height_scale = anatomy.height_scale
    trachea = loft(scene.grid, 2, 205 * height_scale, 340 * height_scale, lambda t: 0 * t,
                   lambda t: anatomy.y_trachea(lerp(205, 340, t) * height_scale),
                   lambda t: 9.0 + 0 * t, lambda t: 8.0 + 0 * t)
    bronchi = [loft(scene.grid, 2, 175 * height_scale, 207 * height_scale, lambda t, side=side: side * lerp(35, 0, t),
                    lambda t: anatomy.y_trachea(205 * height_scale) + 5 * (1 - t),
                    lambda t: 6.5 + 0 * t, lambda t: 6.5 + 0 * t)
               for side in (-1, 1)]
    for part in [trachea, *bronchi]:
        if part is not None:
            inside = part.rho <= 1.0
            scene.canvas.paint(part.sl, inside, TS["trachea"], T["airway_wall"])
            scene.canvas.paint(part.sl, inside & (part.rho < 0.75), TS["trachea"], T["air"])


# ---- pelvis and muscles ---------------------------------------------------------------------

def _paint_bladder(scene: _Scene) -> None:
    """The urinary bladder: a wall around urine, in the anterior pelvis."""
    anatomy = scene.anatomy
    wall_mm = _wall_mm("urinary_bladder", scene.grid)
    z_bottom = anatomy.bladder_bottom_z_mm * anatomy.height_scale
    bladder = loft(scene.grid, 2, z_bottom, z_bottom + anatomy.bladder_height_mm, lambda t: 0 * t,
                   lambda t: -42 + 10 * t, lambda t: anatomy.bladder_radius_x_mm * cap(t, 0.25, 0.5),
                   lambda t: anatomy.bladder_radius_y_mm * cap(t, 0.25, 0.5))
    if bladder is None:
        return
    inside = (bladder.rho <= 1.0) & scene.inside(bladder.sl, 3.0)
    scene.canvas.paint(bladder.sl, inside, TS["urinary_bladder"], T["gi_wall"])
    narrowest = min(anatomy.bladder_radius_x_mm, anatomy.bladder_radius_y_mm)
    scene.canvas.paint(bladder.sl, inside & (bladder.rho <= 1.0 - wall_mm / narrowest), TS["urinary_bladder"],
                       T["urine"])


def _paint_muscles(scene: _Scene) -> None:
    """Psoas, paraspinal (autochthonous) and gluteal muscles, left then right."""
    for side, psoas, autochthon, gluteus in (
            (1, TS["iliopsoas_left"], TS["autochthon_left"], TS["gluteus_maximus_left"]),
            (-1, TS["iliopsoas_right"], TS["autochthon_right"], TS["gluteus_maximus_right"])):
        _paint_side_muscles(scene, side, psoas, autochthon, gluteus)


def _paint_side_muscles(scene: _Scene, side: int, psoas_label: int, autochthon_label: int,
                        gluteus_label: int) -> None:
    """One side's muscles; back and gluteal muscles stay inside the subcutaneous fat."""
    anatomy, grid, canvas = scene.anatomy, scene.grid, scene.canvas
    height_scale, width_scale = anatomy.height_scale, anatomy.width_scale
    psoas = loft(grid, 2, -250 * height_scale, 0.0, lambda t: side * lerp(62, 30, t) * width_scale,
                 lambda t: lerp(10, 42, t**0.7), lambda t: lerp(22, 8, t) * cap(t, 0, 0.15),
                 lambda t: lerp(20, 9, t) * cap(t, 0, 0.15))
    if psoas is not None:
        canvas.paint(psoas.sl, (psoas.rho <= 1.0) & scene.inside(psoas.sl, 0.0), psoas_label, T["muscle"])
    autochthon = loft(grid, 2, -200 * height_scale, 320 * height_scale, lambda t: side * 30.0 + 0 * t,
                      lambda t: anatomy.y_spine(lerp(-200, 320, t) * height_scale) + 48,
                      lambda t: 20.0 + 0 * t, lambda t: 20.0 + 0 * t)
    if autochthon is not None:
        canvas.paint(autochthon.sl, (autochthon.rho <= 1.0) & scene.under_fat(autochthon.sl), autochthon_label,
                     T["muscle"])
    gluteus = loft(grid, 2, -370 * height_scale, -170 * height_scale, lambda t: side * 100 * width_scale + 0 * t,
                   lambda t: 70.0 + 0 * t, lambda t: 45.0 * cap(t, 0, 0.4), lambda t: 30.0 * cap(t, 0, 0.4))
    if gluteus is not None:
        canvas.paint(gluteus.sl, (gluteus.rho <= 1.0) & scene.under_fat(gluteus.sl), gluteus_label, T["muscle"])


# ---- bones ----------------------------------------------------------------------------------

# angle (rad, 0 posterior, pi anterior) where each rib's bone ends and where its cartilage ends
_RIB_ENDS = {**{k: (2.35, 2.95) for k in range(1, 8)},
             8: (2.25, 2.7), 9: (2.2, 2.6), 10: (2.1, 2.45), 11: (1.9, 1.9), 12: (1.5, 1.5)}


def _paint_solid_bone(scene: _Scene, part: Loft, label: int, radius_mm: float) -> None:
    """Cancellous bone inside a cortical shell at least 2 mm (and most of a voxel) thick."""
    cortex_mm = max(2.0, 0.8 * scene.mean_spacing_mm)
    inside = part.rho <= 1.0
    scene.canvas.paint(part.sl, inside, label, T["cortical_bone"])
    scene.canvas.paint(part.sl, inside & (part.rho < 1.0 - cortex_mm / radius_mm), label, T["cancellous_bone"])


def _paint_vertebrae(scene: _Scene) -> None:
    """T1..L5, each with its disc, arch and processes, the spinal canal and cord."""
    for k, (name, (z_bottom, z_top)) in enumerate(scene.anatomy.level_bounds().items()):
        _paint_vertebra(scene, k, name, z_bottom, z_top)


def _paint_vertebra(scene: _Scene, k: int, name: str, z_bottom: float, z_top: float) -> None:
    """Vertebral body `k` (0 = T1) with the disc under it; bodies widen down the spine."""
    anatomy, grid = scene.anatomy, scene.grid
    label = TS[f"vertebrae_{name}"]
    rx = lerp(17, 25, k / 16) * anatomy.width_scale ** 0.5
    ry = lerp(14, 19, k / 16)
    disc = 5.0 * anatomy.height_scale
    z_centre = 0.5 * (z_bottom + z_top)
    y_centre = float(anatomy.y_spine(z_centre))
    body = loft(grid, 2, z_bottom + disc / 2, z_top - disc / 2, lambda t: 0 * t, lambda t: y_centre + 0 * t,
                lambda t: rx + 0 * t, lambda t: ry + 0 * t)
    if body is not None:
        _paint_solid_bone(scene, body, label, ry)
    disc_loft = loft(grid, 2, z_bottom - disc / 2, z_bottom + disc / 2, lambda t: 0 * t,
                     lambda t: y_centre + 0 * t, lambda t: rx + 0 * t, lambda t: ry + 0 * t)
    if disc_loft is not None:
        scene.canvas.paint(disc_loft.sl, disc_loft.rho <= 1.0, 0, T["disc"])
    _paint_vertebral_arch(scene, label, name.startswith("L"), z_bottom, z_top, y_centre + ry + 9.0)


def _paint_vertebral_arch(scene: _Scene, label: int, lumbar: bool, z_bottom: float, z_top: float,
                          y_canal: float) -> None:
    """Arch, spinous and transverse processes around the canal (centre `y_canal`), and the cord."""
    box = box_slices(scene.grid, (-48, y_canal - 12, z_bottom + 1), (48, y_canal + 42, z_top - 1))
    if box is None:
        return
    x, y, z = local_coords(scene.grid, box)
    z_centre = 0.5 * (z_bottom + z_top)
    r = np.sqrt(x * x + (y - y_canal) ** 2)
    arch = (r >= 8.0) & (r <= 14.5) & (y > y_canal - 9)
    mid = np.abs(z - z_centre) <= 0.3 * (z_top - z_bottom)
    spinous = (np.abs(x) <= 3.5) & (y >= y_canal) & (y <= y_canal + (38 if not lumbar else 32)) & mid
    transverse = ((np.abs(x) >= 8.0) & (np.abs(x) <= (44 if lumbar else 36)) & (np.abs(y - y_canal + 2) <= 4.5)
                  & mid)
    bone = arch | spinous | transverse
    canvas = scene.canvas
    canvas.paint(box, bone, label, T["cancellous_bone"])
    canvas.paint(box, bone & ((r > 13.0) | (np.abs(x) > 3.0) & spinous), label, T["cortical_bone"])
    canvas.paint(box, r < 8.0, 0, T["fat"])
    canvas.paint(box, r < 5.5, TS["spinal_cord"], T["cord"])


def _paint_sacrum(scene: _Scene) -> None:
    """The sacrum, tilted backwards; its top 30 mm is also labelled S1."""
    anatomy = scene.anatomy
    height_scale = anatomy.height_scale
    z_top = -155.0 * height_scale
    sacrum = loft(scene.grid, 2, z_top, -270 * height_scale, lambda t: 0 * t,
                  lambda t: anatomy.y_spine(lerp(-155, -270, t) * height_scale) + 35 * t,
                  lambda t: lerp(50, 15, t) * anatomy.width_scale, lambda t: lerp(20, 10, t))
    if sacrum is None:
        return
    inside = sacrum.rho <= 1.0
    s1 = sacrum.coords[2] > z_top - 30 * height_scale
    scene.canvas.paint(sacrum.sl, inside, TS["sacrum"], T["cancellous_bone"])
    scene.canvas.paint(sacrum.sl, inside & (sacrum.rho > 0.8), TS["sacrum"], T["cortical_bone"])
    scene.canvas.paint(sacrum.sl, inside & s1, TS["vertebrae_S1"], None)


def _rib_classes(anatomy: Anatomy, bounds: dict[str, tuple[float, float]], xs: np.ndarray, ys: np.ndarray,
                 zs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rib label and tissue (0: none) at points (mm) of the chest wall: rib k leaves its
    vertebra and slopes down anteriorly, bone to `_RIB_ENDS` then costal cartilage."""
    theta = np.arctan2(np.abs(xs), ys)  # 0 posterior, pi anterior
    rib_labels = np.zeros(xs.shape, np.uint8)
    rib_tissue = np.zeros(xs.shape, np.uint8)
    for k in range(1, 13):
        z_bottom, z_top = bounds[f"T{k}"]
        z_origin = 0.5 * (z_bottom + z_top) + 8
        drop = (35.0 + 6.0 * k) * anatomy.height_scale
        z_centre = z_origin - drop * (theta / np.pi) ** 1.2
        on = (np.abs(zs - z_centre) <= 6.0) & (theta >= 0.3)
        bone_end, cartilage_end = _RIB_ENDS[k]
        rib = on & (theta <= bone_end)
        cartilage = on & (theta > bone_end) & (theta <= cartilage_end)
        rib_labels[rib] = np.where(xs[rib] > 0, TS[f"rib_left_{k}"], TS[f"rib_right_{k}"])
        rib_tissue[rib] = T["rib_bone"]
        rib_labels[cartilage] = TS["costal_cartilages"]
        rib_tissue[cartilage] = T["cartilage"]
    return rib_labels, rib_tissue


def _paint_ribs(scene: _Scene) -> None:
    """Ribs as ribbons in a band along the inner chest wall (only that band is evaluated)."""
    anatomy, grid = scene.anatomy, scene.grid
    bounds = anatomy.level_bounds()
    box = box_slices(grid, (-200 * anatomy.width_scale, -140, bounds["T12"][0] - 140),
                     (200 * anatomy.width_scale, 140, 320 * anatomy.height_scale))
    if box is None:
        return
    band = (scene.depth_in_mm[box] >= -5.0) & (scene.depth_in_mm[box] <= 6.0)
    idx = np.nonzero(band)
    if not idx[0].size:
        return
    xs = grid.axis(0)[box[0]][idx[0]]
    ys = grid.axis(1)[box[1]][idx[1]]
    zs = grid.axis(2)[box[2]][idx[2]]
    rib_labels, rib_tissue = _rib_classes(anatomy, bounds, xs, ys, zs)
    hit = rib_labels > 0
    voxels = tuple(ix[hit] + s.start for ix, s in zip(idx, box))
    scene.canvas.labels[voxels] = rib_labels[hit]
    scene.canvas.tissue[voxels] = rib_tissue[hit]


def _paint_sternum(scene: _Scene) -> None:
    """The sternum behind the anterior chest wall, from T2 to T9 level."""
    anatomy = scene.anatomy
    bounds = anatomy.level_bounds()

    def y_sternum(z):
        return -anatomy.body_ab(z)[1] + anatomy.fat_mm + anatomy.muscle_mm + 4.0

    sternum = loft(scene.grid, 2, bounds["T9"][0], bounds["T2"][1], lambda t: 0 * t,
                   lambda t: y_sternum(lerp(bounds["T9"][0], bounds["T2"][1], t)),
                   lambda t: 17.0 * cap(t, 0.1, 0.1), lambda t: 6.0 + 0 * t)
    if sternum is not None:
        _paint_solid_bone(scene, sternum, TS["sternum"], 6.0)


def _paint_pelvis(scene: _Scene) -> None:
    """Hip bones and femurs, left then right."""
    for side, hip, femur in ((1, TS["hip_left"], TS["femur_left"]), (-1, TS["hip_right"], TS["femur_right"])):
        _paint_iliac_wing(scene, side, hip)
        _paint_hip_blocks(scene, side, hip)
        _paint_femur(scene, side, femur)


def _paint_iliac_wing(scene: _Scene, side: int, hip_label: int) -> None:
    """The iliac wing: a curved plate on an elliptic cylinder, thicker towards its base."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    box = box_slices(scene.grid, (min(0, side * 135 * width_scale), -60, -218 * height_scale),
                     (max(0, side * 135 * width_scale), 110, -118 * height_scale))
    if box is None:
        return
    x, y, z = local_coords(scene.grid, box)
    t = np.clip((z - (-218 * height_scale)) / (100 * height_scale), 0, 1)
    ap = lerp(85, 125, t) * width_scale
    bp = 70.0
    r = np.sqrt((x / ap) ** 2 + ((y - 25) / bp) ** 2)
    theta = np.arctan2(np.abs(x), y - 25)
    wing = (np.abs(r - 1.0) * 0.5 * (ap + bp) <= 5.0 + 3.0 * (1 - t)) & (theta >= 0.35) & (theta <= 1.75)
    wing &= (side * x) > 0
    scene.canvas.paint(box, wing, hip_label, T["cancellous_bone"])
    scene.canvas.paint(box, wing & (np.abs(r - 1.0) * 0.5 * (ap + bp) > 3.5 + 3.0 * (1 - t)), hip_label,
                       T["cortical_bone"])


def _paint_hip_blocks(scene: _Scene, side: int, hip_label: int) -> None:
    """The acetabular/ischial block and the pubic ramus of one hip bone."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    acetabulum = loft(scene.grid, 2, -270 * height_scale, -215 * height_scale,
                      lambda t: side * 82 * width_scale + 0 * t, lambda t: 15 + 0 * t,
                      lambda t: 22.0 * cap(t, 0.3, 0.2), lambda t: 38.0 * cap(t, 0.3, 0.2))
    if acetabulum is not None:
        _paint_solid_bone(scene, acetabulum, hip_label, 22.0)
    pubis = loft(scene.grid, 0, side * 80 * width_scale, 0.0, lambda t: lerp(-15, -62, t),
                 lambda t: lerp(-262, -290, t) * height_scale, lambda t: 10.0 + 0 * t, lambda t: 12.0 + 0 * t)
    if pubis is not None:
        _paint_solid_bone(scene, pubis, hip_label, 10.0)


def _paint_femur(scene: _Scene, side: int, femur_label: int) -> None:
    """Femoral head in the acetabulum and the shaft below it."""
    height_scale, width_scale = scene.anatomy.height_scale, scene.anatomy.width_scale
    z_head = -245.0 * height_scale
    head = loft(scene.grid, 2, z_head - 24, z_head + 24, lambda t: side * 100 * width_scale + 0 * t,
                lambda t: 8 + 0 * t, lambda t: 24.0 * cap(t, 0.5, 0.5), lambda t: 24.0 * cap(t, 0.5, 0.5))
    if head is not None:
        _paint_solid_bone(scene, head, femur_label, 24.0)
    shaft = loft(scene.grid, 2, -420 * height_scale, z_head, lambda t: side * lerp(122, 104, t) * width_scale,
                 lambda t: 10 + 0 * t, lambda t: 16.0 + 0 * t, lambda t: 16.0 + 0 * t)
    if shaft is not None:
        _paint_solid_bone(scene, shaft, femur_label, 16.0)


# ---- the pipeline ---------------------------------------------------------------------------

# Order matters twice: a later step paints over an earlier one, and the steps draw from the
# texture stream in this order (reordering them changes every seeded case).
PAINT_STEPS: tuple[Callable[[_Scene], None], ...] = (
    _paint_lungs, _paint_small_bowel, _paint_colon, _paint_rectum,
    _paint_liver, _paint_spleen, _paint_stomach, _paint_pancreas, _paint_portal_veins, _paint_kidneys,
    _paint_gallbladder, _paint_heart, _paint_aorta, _paint_iliac_arteries, _paint_vena_cava,
    _paint_esophagus, _paint_airways, _paint_bladder, _paint_muscles,
    _paint_vertebrae, _paint_sacrum, _paint_ribs, _paint_sternum, _paint_pelvis,
)


def rasterize(anatomy: Anatomy, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Organ labels (TotalSegmentator v2 ids) and tissue classes on `grid`."""
    scene = _build_scene(anatomy, grid, rng)
    for paint in PAINT_STEPS:
        paint(scene)
    return scene.canvas.labels, scene.canvas.tissue


def render(tissue: np.ndarray, phase: str, rng: np.random.Generator, spacing) -> np.ndarray:
    """Clean HU (float32): tissue means for the phase plus a smooth texture per tissue."""
    img = hu_lut(phase)[tissue]
    amp = texture_lut()[tissue]
    mean_spacing = float(np.mean(spacing))
    img += amp * smooth_field(rng, tissue.shape, 2.5 / mean_spacing)
    return img
