"""A procedural torso CT phantom: chest to pelvis, organs in TotalSegmentator labels.

`sample_anatomy(rng)` draws one body (sizes, positions, shapes); `rasterize(anatomy, grid,
rng)` draws it on a voxel grid as two maps: TotalSegmentator v2 organ labels and tissue
classes (`synth.tissue`); `render(tissue, phase, rng)` turns tissue into clean HU.
Organs are super-ellipse lofts painted in order (later wins), clipped by the body wall,
the thoracic cavity and the diaphragm. Landmarks are in mm with z = 0 at the T12/L1 disc.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from synth.geometry import Grid, Loft, box_slices, cap, lerp, local_coords, loft
from synth.noise import smooth_field
from synth.tissue import T, hu_lut, texture_lut
from synth.totalseg import TOTALSEG_ID as TS

HOLLOW_WALL_MM = {"stomach": 4.0, "colon": 3.0, "esophagus": 4.0, "gallbladder": 3.0,
                  "urinary_bladder": 4.0, "small_bowel": 2.5}

# z extent of the torso the phantom draws (mm, before the height scale)
Z_TOP, Z_BOTTOM = 330.0, -360.0


@dataclass
class Anatomy:
    p: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, k: str) -> float:
        return self.p[k]

    # ---- landmarks shared by rasterisation and field-of-view choice ----------------
    def level_bounds(self) -> dict[str, tuple[float, float]]:
        """Vertebra name -> (z_bottom, z_top) in mm."""
        sz = self["sz"]
        out = {}
        top = 12 * 24.0 * sz
        for k in range(1, 13):
            out[f"T{k}"] = (top - k * 24.0 * sz, top - (k - 1) * 24.0 * sz)
        for k in range(1, 6):
            out[f"L{k}"] = (-k * 31.0 * sz, -(k - 1) * 31.0 * sz)
        return out

    def y_spine(self, z):
        """y (mm) of the vertebral body centre at height z."""
        sz = self["sz"]
        return np.interp(z, np.array([-260, -150, -60, 60, 160, 300]) * sz,
                         [62, 40, 36, 48, 58, 45]).astype(np.float32) + self["spine_dy"]

    def body_ab(self, z):
        sz, sw, sd = self["sz"], self["sw"], self["sd"]
        zk = np.array([-400, -300, -200, -120, -40, 60, 160, 260, 400]) * sz
        a = np.interp(z, zk, [150, 172, 170, 150, 152, 160, 165, 150, 130]) * sw
        b = np.interp(z, zk, [95, 102, 104, 106, 110, 110, 108, 100, 90]) * sd
        return a.astype(np.float32), b.astype(np.float32)

    def dome(self, x, y, z_ref=None):
        """z of the diaphragm surface above (x, y)."""
        a2 = 150.0 * self["sw"] - self["fat"] - self["muscle"]
        b2 = 108.0 * self["sd"] - self["fat"] - self["muscle"]
        ztop = np.where(x < 0, self["dome_r"], self["dome_l"])
        xc = 0.5 * a2
        return (ztop - 55.0 * ((np.abs(x) - xc) / (0.6 * a2)) ** 2
                - 30.0 * np.clip(y / b2, 0, None) ** 2 - 8.0 * np.clip(-y / b2, 0, None))

    def organ_anchor(self, organ: str, rng: np.random.Generator) -> np.ndarray:
        """A point (mm) near the middle of a host organ, to centre a field of view on."""
        sz, sw = self["sz"], self["sw"]
        side = 1.0 if rng.random() < 0.5 else -1.0
        anchors = {
            "lung": (side * 75 * sw, 10.0, 160 * sz),
            "liver": (-60 * sw, -5.0, 0.0),
            "gallbladder": (-48 * sw, -35.0, -45 * sz),
            "pancreas": (15 * sw, 5.0, -35 * sz),
            "esophagus": (10.0, float(self.y_spine(120 * sz)) - 35, 120 * sz),
            "stomach": (40 * sw, -20.0, 0.0),
            "kidney": (side * 72 * sw, 55.0, (-50 if side < 0 else -35) * sz),
            "urinary_bladder": (0.0, -40.0, self["bladder_z0"] + 30),
        }
        if organ == "colon":
            seg = rng.integers(4)
            pts = [(-100 * sw, 5.0, -110 * sz), (0.0, -50.0, -80 * sz),
                   (100 * sw, 15.0, -100 * sz), (20.0, 30.0, -230 * sz)]
            return np.array(pts[int(seg)], float)
        if organ == "bone":
            site = rng.integers(3)
            if site == 0:   # spine
                return np.array([0.0, 45.0, float(rng.uniform(-150, 250)) * sz])
            if site == 1:   # ribs
                return np.array([side * 90 * sw, 20.0, float(rng.uniform(60, 220)) * sz])
            return np.array([side * 60 * sw, 30.0, -200 * sz])  # pelvis
        return np.array(anchors[organ], float)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    p = {
        "sz": u(0.92, 1.08), "sw": u(0.88, 1.12), "sd": u(0.88, 1.12),
        "fat": u(8, 30), "muscle": u(8, 14), "spine_dy": u(-5, 5),
        "dome_r": u(62, 82), "dome_l": u(48, 68),
        "liver_bot": u(-115, -75), "liver_w": u(0.9, 1.12), "liver_x": u(-8, 8),
        "spleen_s": u(0.8, 1.2), "stomach_s": u(0.85, 1.15), "stomach_gas": u(0.2, 0.6),
        "panc_s": u(0.85, 1.15), "kid_s": u(0.9, 1.1), "kid_dz": u(-15, 15),
        "gb_s": u(0.8, 1.2), "gb_z": u(-15, 15),
        "heart_s": u(0.9, 1.1), "colon_r": u(18, 27), "eso_air": float(rng.random() < 0.5),
        "bladder_z0": u(-345, -320), "bladder_h": u(45, 85), "bladder_rx": u(35, 50),
        "bladder_ry": u(28, 40), "fissure_z": u(0.9, 1.1), "vessel_t": u(0.1, 0.14),
    }
    return Anatomy(p)


class _Canvas:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.lab = np.zeros(grid.shape, np.uint8)
        self.tis = np.zeros(grid.shape, np.uint8)

    def paint(self, sl, mask, label: int | None, tissue: int | None):
        if mask is None or not mask.any():
            return
        shape = tuple(s.stop - s.start for s in sl)
        if mask.shape != shape:
            mask = np.broadcast_to(mask, shape)
        if label is not None:
            self.lab[sl][mask] = label
        if tissue is not None:
            self.tis[sl][mask] = tissue


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice]:
    out = []
    for a in range(3):
        other = tuple(b for b in range(3) if b != a)
        hit = np.nonzero(mask.any(axis=other))[0]
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _wall_mm(organ: str, grid: Grid) -> float:
    """Hollow-organ walls are at least two voxels thick, so a wall has an inside."""
    return max(HOLLOW_WALL_MM[organ], 2.0 * max(grid.spacing))


def rasterize(an: Anatomy, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Organ labels (TotalSegmentator v2 ids) and tissue classes on `grid`."""
    cv = _Canvas(grid)
    sz, sw, sd = an["sz"], an["sw"], an["sd"]
    sp = float(np.mean(grid.spacing))
    X, Y, Z = local_coords(grid, tuple(slice(0, n) for n in grid.shape))

    # ---- body wall: skin/subcutaneous fat, muscle, cavity -------------------------
    a, b = an.body_ab(Z)
    X2, Y2 = X * X, Y * Y
    rb2 = X2 / (a * a) + Y2 / (b * b)
    cv.tis[rb2 <= 1.0] = T["fat"]
    fat, mus = an["fat"], an["muscle"]
    a1, b1 = a - fat, b - fat
    r1 = X2 / (a1 * a1) + Y2 / (b1 * b1)  # squared normalised radius, <= 1 inside
    cv.tis[r1 <= 1.0] = T["muscle"]
    a2, b2 = a1 - mus, b1 - mus
    r2 = np.sqrt(X2 / (a2 * a2) + Y2 / (b2 * b2))
    cv.tis[r2 <= 1.0] = T["fat"]
    rref = 0.5 * (a2 + b2)
    d_in = (1.0 - r2) * rref  # ~ mm inside the inner muscle surface
    del r2

    def inside(sl, margin_mm=2.0):
        return d_in[sl] >= margin_mm

    dome_full = an.dome(X, Y)  # (nx, ny, 1)

    def below(sl):
        return Z[..., sl[2]] < dome_full[sl[0], sl[1]]

    # ---- lungs and lobes: only the slab of z where a lung can be ----------------------
    z_apex = 300.0 * sz
    zs = grid.axis(2)
    kz = np.nonzero((zs > float(dome_full.min())) & (zs < z_apex))[0]
    if kz.size:
        zsl = slice(int(kz[0]), int(kz[-1]) + 1)
        Zs = Z[..., zsl]
        apex_t = np.clip((Zs - 220.0 * sz) / (z_apex - 220.0 * sz), 0, 1)
        lung = (d_in[..., zsl] >= 10.0 + 60.0 * apex_t**2) & (Zs >= dome_full)
        lung &= np.abs(X) > np.where(Y > -40, 24.0, 10.0)
        lung &= ~((np.abs(X - 20 * sw) < 40) & (Y < -60 + 30 * apex_t))  # anterior mediastinum
        if lung.any():
            zf = lerp(70.0, 205.0, np.clip((Y + b2[..., zsl]) / (2 * b2[..., zsl]), 0, 1)) * sz * an["fissure_z"]
            upper = Zs > zf
            left = X > 0
            lab = np.where(left, np.where(upper, TS["lung_upper_lobe_left"], TS["lung_lower_lobe_left"]),
                           np.where(upper, np.where(Zs > 150.0 * sz, TS["lung_upper_lobe_right"],
                                                    TS["lung_middle_lobe_right"]),
                                    TS["lung_lower_lobe_right"]))
            box = (slice(0, grid.shape[0]), slice(0, grid.shape[1]), zsl)
            cv.paint(box, lung, None, T["lung"])
            cv.lab[box][lung] = np.broadcast_to(lab, lung.shape)[lung]
            sl = _bbox(lung)
            sub = lung[sl]
            sl = (sl[0], sl[1], slice(sl[2].start + zsl.start, sl[2].stop + zsl.start))
            n1 = smooth_field(rng, sub.shape, 5.0 / sp)
            n2 = smooth_field(rng, sub.shape, 5.0 / sp)
            t = an["vessel_t"]
            cv.paint(sl, sub & (np.abs(n1) < t) & (np.abs(n2) < t * 1.6), None, T["lung_vessel"])

    # ---- small bowel (low priority: organs paint over it) -----------------------------
    sl = box_slices(grid, (-0.8 * 150 * sw, -140, -215 * sz), (0.8 * 150 * sw, 30, -45 * sz))
    if sl is not None:
        f = smooth_field(rng, tuple(s.stop - s.start for s in sl), 7.0 / sp)
        region = inside(sl, 8.0) & (Y[:, sl[1]] < 25)
        bowel = region & (f > -0.25)
        cv.paint(sl, bowel & (f < 0.0), TS["small_bowel"], T["gi_wall"])
        g = smooth_field(rng, bowel.shape, 3.0 / sp)
        cv.paint(sl, bowel & (f >= 0.0) & (g <= 1.2), TS["small_bowel"], T["gi_fluid"])
        cv.paint(sl, bowel & (f >= 0.0) & (g > 1.2), TS["small_bowel"], T["gas"])

    # ---- colon ----------------------------------------------------------------------
    rc = an["colon_r"]
    wall_c = _wall_mm("colon", grid)
    segs = [
        loft(grid, 2, -180 * sz, -40 * sz, lambda t: -100 * sw + 0 * t, lambda t: 5 + 0 * t,
             lambda t: rc * lerp(1.2, 1.0, t) * cap(t, 0.1, 0.0), lambda t: rc * lerp(1.2, 1.0, t) * cap(t, 0.1, 0.0)),
        loft(grid, 0, -100 * sw, 100 * sw, lambda t: -55 + 55 * (2 * t - 1) ** 2,
             lambda t: (-45 - 30 * (1 - (2 * t - 1) ** 2) + 15 * np.clip(2 * t - 1, 0, 1)) * sz,
             lambda t: 0.9 * rc + 0 * t, lambda t: 0.9 * rc + 0 * t),
        loft(grid, 2, -185 * sz, -30 * sz, lambda t: 100 * sw + 0 * t, lambda t: 15 + 0 * t,
             lambda t: 0.85 * rc + 0 * t, lambda t: 0.85 * rc + 0 * t),
        loft(grid, 0, 100 * sw, 0.0, lambda t: 15 - 55 * np.sin(np.pi * t),
             lambda t: (lerp(-185, -228, t) - 15 * np.sin(np.pi * t)) * sz,
             lambda t: 0.8 * rc + 0 * t, lambda t: 0.8 * rc + 0 * t),
    ]
    for seg in segs:
        if seg is None:
            continue
        sl = seg.sl
        m = (seg.rho <= 1.0) & inside(sl, 3.0)
        rmin = 0.8 * rc
        lumen = m & (seg.rho <= 1.0 - wall_c / rmin)
        cv.paint(sl, m, TS["colon"], T["gi_wall"])
        if lumen.any():
            g = smooth_field(rng, lumen.shape, 4.0 / sp)
            cv.paint(sl, lumen & (g > 0.4), TS["colon"], T["gas"])
            cv.paint(sl, lumen & (g <= 0.4), TS["colon"], T["feces"])
    # rectum, anterior to the sacrum
    rect = loft(grid, 2, -330 * sz, -225 * sz, lambda t: 0 * t,
                lambda t: an.y_spine(lerp(-330, -225, t) * sz) + 5 - 30 * t,
                lambda t: 0.9 * rc * cap(t, 0.1, 0), lambda t: 0.8 * rc * cap(t, 0.1, 0))
    if rect is not None:
        m = rect.rho <= 1.0
        cv.paint(rect.sl, m, TS["colon"], T["gi_wall"])
        cv.paint(rect.sl, m & (rect.rho <= 1.0 - wall_c / (0.8 * rc)), TS["colon"], T["feces"])

    # ---- liver ----------------------------------------------------------------------
    lw = an["liver_w"]
    z_top = an["dome_r"] + 5
    lv = loft(grid, 2, an["liver_bot"] * sz, z_top,
              lambda t: (lerp(-88, -32, t**0.8) + an["liver_x"]) * sw,
              lambda t: lerp(-8, -12, t),
              lambda t: lerp(38, 110, np.clip(t * 1.4, 0, 1) ** 0.8) * sw * lw * cap(t, 0.12, 0),
              lambda t: lerp(55, 82, np.sqrt(t)) * sd * cap(t, 0.12, 0), p=2.2)
    if lv is not None:
        x, y, z = lv.coords
        thin = 1.0 - 0.45 * np.clip((x + 20.0) / 80.0, 0, 1)
        rho = lv.rho / np.clip(thin, 0.3, 1)
        m = (rho <= 1.0) & inside(lv.sl, 3.0) & (z < dome_full[lv.sl[0], lv.sl[1]] - 2)
        cv.paint(lv.sl, m, TS["liver"], T["liver"])
        n1 = smooth_field(rng, m.shape, 6.0 / sp)
        n2 = smooth_field(rng, m.shape, 6.0 / sp)
        cv.paint(lv.sl, m & (np.abs(n1) < 0.12) & (np.abs(n2) < 0.25), TS["liver"], T["liver_vessel"])

    # ---- spleen ---------------------------------------------------------------------
    ss = an["spleen_s"]
    spl = loft(grid, 2, -25 * sz, 55 * sz, lambda t: 92 * sw - 10 * t, lambda t: 45 + 10 * t,
               lambda t: 24 * ss * cap(t, 0.4, 0.4), lambda t: 45 * ss * cap(t, 0.4, 0.4))
    if spl is not None:
        m = (spl.rho <= 1.0) & inside(spl.sl, 3.0) & below(spl.sl)
        cv.paint(spl.sl, m, TS["spleen"], T["spleen"])

    # ---- stomach ----------------------------------------------------------------------
    st = an["stomach_s"]
    wall_s = _wall_mm("stomach", grid)
    stom = loft(grid, 2, -55 * sz, 48 * sz, lambda t: lerp(5, 55, t**0.7) * sw,
                lambda t: lerp(-55, 5, t), lambda t: lerp(22, 44, t) * st * cap(t, 0.1, 0.25),
                lambda t: lerp(22, 42, t) * st * cap(t, 0.1, 0.25))
    antrum = loft(grid, 0, 10 * sw, -28 * sw, lambda t: -55 + 0 * t, lambda t: -45 * sz + 0 * t,
                  lambda t: 15 * st * cap(t, 0, 0.2), lambda t: 14 * st * cap(t, 0, 0.2))
    for part in (stom, antrum):
        if part is None:
            continue
        x, y, z = part.coords
        m = (part.rho <= 1.0) & inside(part.sl, 3.0) & (z < dome_full[part.sl[0], part.sl[1]] - 2)
        rmin = 14.0 * st if part is antrum else 22.0 * st
        lumen = m & (part.rho <= 1.0 - wall_s / rmin)
        cv.paint(part.sl, m, TS["stomach"], T["gi_wall"])
        if lumen.any():
            ymin = np.where(lumen, y, np.inf).min()
            ymax = np.where(lumen, y, -np.inf).max()
            level = ymin + an["stomach_gas"] * 0.5 * (ymax - ymin)
            cv.paint(part.sl, lumen & (y >= level), TS["stomach"], T["gi_fluid"])
            cv.paint(part.sl, lumen & (y < level), TS["stomach"], T["gas"])

    # ---- pancreas, portal and splenic veins ----------------------------------------
    ps = an["panc_s"]
    pan = loft(grid, 0, -50 * sw, 92 * sw, lambda t: lerp(-12, 28, t), lambda t: lerp(-45, -15, t) * sz,
               lambda t: lerp(17, 10, np.sqrt(t)) * ps * cap(t, 0.08, 0.1),
               lambda t: lerp(16, 10, t) * ps * cap(t, 0.08, 0.1))
    if pan is not None:
        m = (pan.rho <= 1.0) & inside(pan.sl, 3.0)
        f = smooth_field(rng, m.shape, 3.0 / sp)
        cv.paint(pan.sl, m, TS["pancreas"], T["pancreas"])
        cv.paint(pan.sl, m & (f > 1.3) & (pan.rho > 0.6), None, T["fat"])
    pv = loft(grid, 0, 5.0, -45 * sw, lambda t: lerp(8, -5, t), lambda t: lerp(-40, -8, t) * sz,
              lambda t: 7.0 + 0 * t, lambda t: 7.0 + 0 * t)
    spv = loft(grid, 0, 5.0, 85 * sw, lambda t: lerp(-12, 28, t * 0.95) + 14 * ps,
               lambda t: lerp(-42, -18, t) * sz, lambda t: 4.5 + 0 * t, lambda t: 4.5 + 0 * t)
    for v in (pv, spv):
        if v is not None:
            cv.paint(v.sl, v.rho <= 1.0, TS["portal_vein_and_splenic_vein"], T["blood_portal"])

    # ---- kidneys --------------------------------------------------------------------
    ks = an["kid_s"]
    for side, label, zc in ((-1, TS["kidney_right"], -50.0), (1, TS["kidney_left"], -35.0)):
        zc = zc * sz + an["kid_dz"]
        hz = 55.0 * ks
        kid = loft(grid, 2, zc - hz, zc + hz, lambda t, s=side: s * (72 * sw - 10 * (t - 0.5)),
                   lambda t: 55.0 + 0 * t, lambda t: 27 * ks * cap(t, 0.5, 0.5),
                   lambda t: 23 * ks * cap(t, 0.5, 0.5))
        if kid is None:
            continue
        x, y, z = kid.coords
        m = (kid.rho <= 1.0) & inside(kid.sl, 2.0)
        cx = side * 72 * sw
        medial = (side * (x - cx) < 6) & (y < 65)
        cv.paint(kid.sl, m, label, T["kidney_cortex"])
        cv.paint(kid.sl, m & (kid.rho < 0.78), label, T["kidney_medulla"])
        sinus = m & (kid.rho < 0.55) & medial
        cv.paint(kid.sl, sinus, label, T["fat"])
        cv.paint(kid.sl, sinus & (kid.rho < 0.3), label, T["urine"])

    # ---- gallbladder ----------------------------------------------------------------
    wall_g = _wall_mm("gallbladder", grid)
    gs = max(an["gb_s"], (wall_g + 2.5 * max(grid.spacing)) / 12.0)  # keep a lumen at coarse spacing
    z0 = -78 * sz + an["gb_z"]
    gb = loft(grid, 2, z0, z0 + 55 * gs, lambda t: lerp(-52, -36, t) * sw, lambda t: lerp(-55, -18, t),
              lambda t: lerp(17, 8, t) * gs * cap(t, 0.3, 0.1), lambda t: lerp(16, 8, t) * gs * cap(t, 0.3, 0.1))
    if gb is not None:
        m = (gb.rho <= 1.0) & inside(gb.sl, 2.0)
        cv.paint(gb.sl, m, TS["gallbladder"], T["gi_wall"])
        cv.paint(gb.sl, m & (gb.rho <= 1.0 - wall_g / (12.0 * gs)), TS["gallbladder"], T["bile"])

    # ---- heart ---------------------------------------------------------------------
    hs = an["heart_s"]
    hz0 = an["dome_l"] + 5
    heart = loft(grid, 2, hz0, hz0 + 115 * hs * sz, lambda t: 22 * sw + 0 * t, lambda t: -32 + 0 * t,
                 lambda t: 62 * hs * cap(t, 0.35, 0.45), lambda t: 52 * hs * cap(t, 0.35, 0.45))
    if heart is not None:
        x, y, z = heart.coords
        m = heart.rho <= 1.0
        cv.paint(heart.sl, m, TS["heart"], T["myocardium"])
        pool = m & (heart.rho < 0.8)
        left = (x - 22 * sw) + 0.7 * (y + 32) > 0
        cv.paint(heart.sl, pool & left, TS["heart"], T["blood_arterial"])
        cv.paint(heart.sl, pool & ~left, TS["heart"], T["blood_venous"])

    # ---- great vessels ----------------------------------------------------------------
    ya = lambda z: an.y_spine(z) - 32.0  # noqa: E731  just anterior to the vertebral body
    zt = 205.0 * sz
    parts = [
        loft(grid, 2, hz0 + 60 * sz, zt, lambda t: 5 * sw + 0 * t, lambda t: -18 + 0 * t,
             lambda t: 15.0 + 0 * t, lambda t: 15.0 + 0 * t),
        loft(grid, 1, -18.0, float(ya(zt)), lambda t: lerp(5 * sw, 22 * sw, t),
             lambda t: zt + 22 * np.sin(np.pi * t), lambda t: 14.0 + 0 * t, lambda t: 14.0 + 0 * t),
        loft(grid, 2, -105 * sz, zt, lambda t: lerp(5, 22, t) * sw,
             lambda t: ya(lerp(-105, 205, t) * sz), lambda t: lerp(10, 13, t), lambda t: lerp(10, 13, t)),
    ]
    for part in parts:
        if part is not None:
            cv.paint(part.sl, part.rho <= 1.0, TS["aorta"], T["blood_arterial"])
    for s, label in ((1, TS["iliac_artery_left"]), (-1, TS["iliac_artery_right"])):
        il = loft(grid, 2, -105 * sz, -205 * sz, lambda t, s=s: s * lerp(5, 55, t) * sw,
                  lambda t: lerp(float(ya(-105 * sz)), 25, t), lambda t: 6.5 + 0 * t, lambda t: 6.5 + 0 * t)
        if il is not None:
            cv.paint(il.sl, il.rho <= 1.0, label, T["blood_arterial"])
    ivc = loft(grid, 2, -110 * sz, hz0 + 15, lambda t: -24 * sw + 0 * t,
               lambda t: ya(lerp(-110, 80, t) * sz) + 6, lambda t: 13.0 + 0 * t, lambda t: 9.5 + 0 * t)
    if ivc is not None:
        cv.paint(ivc.sl, ivc.rho <= 1.0, TS["inferior_vena_cava"], T["blood_venous"])

    # ---- esophagus and trachea ------------------------------------------------------
    wall_e = _wall_mm("esophagus", grid)
    z_gej = 40.0 * sz
    ye = lambda z: an.y_spine(z) - 36.0  # noqa: E731
    eso = loft(grid, 2, z_gej, 330 * sz,
               lambda t: lerp(30, 3, np.clip(t * 1.6, 0, 1)) * sw,
               lambda t: ye(lerp(40, 330, t) * sz) - 35 * np.clip(1 - t * 6, 0, 1),
               lambda t: 10.0 + 0 * t, lambda t: 8.5 + 0 * t)
    if eso is not None:
        m = eso.rho <= 1.0
        cv.paint(eso.sl, m, TS["esophagus"], T["gi_wall"])
        if an["eso_air"] and 8.5 > wall_e + 1:
            cv.paint(eso.sl, m & (eso.rho < 1.0 - wall_e / 8.5), TS["esophagus"], T["gas"])
    yt = lambda z: ye(z) - 18.0  # noqa: E731
    tra = loft(grid, 2, 205 * sz, 340 * sz, lambda t: 0 * t, lambda t: yt(lerp(205, 340, t) * sz),
               lambda t: 9.0 + 0 * t, lambda t: 8.0 + 0 * t)
    bronchi = [loft(grid, 2, 175 * sz, 207 * sz, lambda t, s=s: s * lerp(35, 0, t),
                    lambda t: yt(205 * sz) + 5 * (1 - t), lambda t: 6.5 + 0 * t, lambda t: 6.5 + 0 * t)
               for s in (-1, 1)]
    for part in [tra, *bronchi]:
        if part is not None:
            m = part.rho <= 1.0
            cv.paint(part.sl, m, TS["trachea"], T["airway_wall"])
            cv.paint(part.sl, m & (part.rho < 0.75), TS["trachea"], T["air"])

    # ---- urinary bladder --------------------------------------------------------------
    wall_b = _wall_mm("urinary_bladder", grid)
    bz0 = an["bladder_z0"] * sz
    bl = loft(grid, 2, bz0, bz0 + an["bladder_h"], lambda t: 0 * t, lambda t: -42 + 10 * t,
              lambda t: an["bladder_rx"] * cap(t, 0.25, 0.5), lambda t: an["bladder_ry"] * cap(t, 0.25, 0.5))
    if bl is not None:
        m = (bl.rho <= 1.0) & inside(bl.sl, 3.0)
        cv.paint(bl.sl, m, TS["urinary_bladder"], T["gi_wall"])
        rmin = min(an["bladder_rx"], an["bladder_ry"])
        cv.paint(bl.sl, m & (bl.rho <= 1.0 - wall_b / rmin), TS["urinary_bladder"], T["urine"])

    # ---- muscles: psoas, paraspinal, gluteal ----------------------------------------
    for s, lab_ps, lab_au, lab_gl in (
            (1, TS["iliopsoas_left"], TS["autochthon_left"], TS["gluteus_maximus_left"]),
            (-1, TS["iliopsoas_right"], TS["autochthon_right"], TS["gluteus_maximus_right"])):
        pso = loft(grid, 2, -250 * sz, 0.0, lambda t, s=s: s * lerp(62, 30, t) * sw,
                   lambda t: lerp(10, 42, t**0.7), lambda t: lerp(22, 8, t) * cap(t, 0, 0.15),
                   lambda t: lerp(20, 9, t) * cap(t, 0, 0.15))
        if pso is not None:
            cv.paint(pso.sl, (pso.rho <= 1.0) & inside(pso.sl, 0.0), lab_ps, T["muscle"])
        au = loft(grid, 2, -200 * sz, 320 * sz, lambda t, s=s: s * 30.0 + 0 * t,
                  lambda t: an.y_spine(lerp(-200, 320, t) * sz) + 48, lambda t: 20.0 + 0 * t, lambda t: 20.0 + 0 * t)
        if au is not None:
            cv.paint(au.sl, (au.rho <= 1.0) & (r1[au.sl] <= 1.0), lab_au, T["muscle"])
        gl = loft(grid, 2, -370 * sz, -170 * sz, lambda t, s=s: s * 100 * sw + 0 * t, lambda t: 70.0 + 0 * t,
                  lambda t: 45.0 * cap(t, 0, 0.4), lambda t: 30.0 * cap(t, 0, 0.4))
        if gl is not None:
            cv.paint(gl.sl, (gl.rho <= 1.0) & (r1[gl.sl] <= 1.0), lab_gl, T["muscle"])

    _bones(an, grid, cv, d_in, sp)
    return cv.lab, cv.tis


def _bones(an: Anatomy, grid: Grid, cv: _Canvas, d_in: np.ndarray, sp: float) -> None:
    sz, sw = an["sz"], an["sw"]
    cort = max(2.0, 0.8 * sp)

    def solid(part: Loft, label: int, r_mm: float, extra=None):
        m = part.rho <= 1.0
        if extra is not None:
            m &= extra
        cv.paint(part.sl, m, label, T["cortical_bone"])
        cv.paint(part.sl, m & (part.rho < 1.0 - cort / r_mm), label, T["cancellous_bone"])

    # vertebrae T1..L5 with discs, arches, processes; spinal canal and cord
    for k, (name, (z0, z1)) in enumerate(an.level_bounds().items()):
        label = TS[f"vertebrae_{name}"]
        lumbar = name.startswith("L")
        rx = lerp(17, 25, k / 16) * sw ** 0.5
        ry = lerp(14, 19, k / 16)
        disc = 5.0 * sz
        zc = 0.5 * (z0 + z1)
        yc = float(an.y_spine(zc))
        # loft evaluates its profiles before returning; yc, rx, ry are bound like s above
        body = loft(grid, 2, z0 + disc / 2, z1 - disc / 2, lambda t: 0 * t, lambda t, yc=yc: yc + 0 * t,
                    lambda t, rx=rx: rx + 0 * t, lambda t, ry=ry: ry + 0 * t)
        if body is not None:
            solid(body, label, ry)
        dsk = loft(grid, 2, z0 - disc / 2, z0 + disc / 2, lambda t: 0 * t, lambda t, yc=yc: yc + 0 * t,
                   lambda t, rx=rx: rx + 0 * t, lambda t, ry=ry: ry + 0 * t)
        if dsk is not None:
            cv.paint(dsk.sl, dsk.rho <= 1.0, 0, T["disc"])
        yk = yc + ry + 9.0
        sl = box_slices(grid, (-48, yk - 12, z0 + 1), (48, yk + 42, z1 - 1))
        if sl is None:
            continue
        x, y, z = local_coords(grid, sl)
        r = np.sqrt(x * x + (y - yk) ** 2)
        arch = (r >= 8.0) & (r <= 14.5) & (y > yk - 9)
        mid = np.abs(z - zc) <= 0.3 * (z1 - z0)
        spinous = (np.abs(x) <= 3.5) & (y >= yk) & (y <= yk + (38 if not lumbar else 32)) & mid
        trans = (np.abs(x) >= 8.0) & (np.abs(x) <= (44 if lumbar else 36)) & (np.abs(y - yk + 2) <= 4.5) & mid
        bone = arch | spinous | trans
        cv.paint(sl, bone, label, T["cancellous_bone"])
        cv.paint(sl, bone & ((r > 13.0) | (np.abs(x) > 3.0) & spinous), label, T["cortical_bone"])
        cv.paint(sl, r < 8.0, 0, T["fat"])
        cv.paint(sl, r < 5.5, TS["spinal_cord"], T["cord"])

    # sacrum (+ S1), tilted backwards
    z_s = -155.0 * sz
    sac = loft(grid, 2, z_s, -270 * sz, lambda t: 0 * t,
               lambda t: an.y_spine(lerp(-155, -270, t) * sz) + 35 * t, lambda t: lerp(50, 15, t) * sw,
               lambda t: lerp(20, 10, t))
    if sac is not None:
        m = sac.rho <= 1.0
        z = sac.coords[2]
        s1 = z > z_s - 30 * sz
        cv.paint(sac.sl, m, TS["sacrum"], T["cancellous_bone"])
        cv.paint(sac.sl, m & (sac.rho > 0.8), TS["sacrum"], T["cortical_bone"])
        cv.paint(sac.sl, m & s1, TS["vertebrae_S1"], None)

    # ribs: ribbons along the inner chest wall, sloping down anteriorly
    bounds = an.level_bounds()
    sl = box_slices(grid, (-200 * sw, -140, bounds["T12"][0] - 140), (200 * sw, 140, 320 * sz))
    if sl is not None:
        band = (d_in[sl] >= -5.0) & (d_in[sl] <= 6.0)
        idx = np.nonzero(band)
        if idx[0].size:
            xs = grid.axis(0)[sl[0]][idx[0]]
            ys = grid.axis(1)[sl[1]][idx[1]]
            zs = grid.axis(2)[sl[2]][idx[2]]
            theta = np.arctan2(np.abs(xs), ys)  # 0 posterior, pi anterior
            ends = {k: (2.35, 2.95) for k in range(1, 8)}
            ends.update({8: (2.25, 2.7), 9: (2.2, 2.6), 10: (2.1, 2.45), 11: (1.9, 1.9), 12: (1.5, 1.5)})
            rib_lab = np.zeros(xs.shape, np.uint8)
            rib_tis = np.zeros(xs.shape, np.uint8)
            for k in range(1, 13):
                zb, zt = bounds[f"T{k}"]
                z0 = 0.5 * (zb + zt) + 8
                drop = (35.0 + 6.0 * k) * sz
                zc = z0 - drop * (theta / np.pi) ** 1.2
                on = (np.abs(zs - zc) <= 6.0) & (theta >= 0.3)
                bone_end, cart_end = ends[k]
                rib = on & (theta <= bone_end)
                cart = on & (theta > bone_end) & (theta <= cart_end)
                rib_lab[rib] = np.where(xs[rib] > 0, TS[f"rib_left_{k}"], TS[f"rib_right_{k}"])
                rib_tis[rib] = T["rib_bone"]
                rib_lab[cart] = TS["costal_cartilages"]
                rib_tis[cart] = T["cartilage"]
            hit = rib_lab > 0
            gi = tuple(ix[hit] + s.start for ix, s in zip(idx, sl))
            cv.lab[gi] = rib_lab[hit]
            cv.tis[gi] = rib_tis[hit]

    # sternum
    y_st = lambda z: -an.body_ab(z)[1] + an["fat"] + an["muscle"] + 4.0  # noqa: E731
    ster = loft(grid, 2, bounds["T9"][0], bounds["T2"][1], lambda t: 0 * t,
                lambda t: y_st(lerp(bounds["T9"][0], bounds["T2"][1], t)),
                lambda t: 17.0 * cap(t, 0.1, 0.1), lambda t: 6.0 + 0 * t)
    if ster is not None:
        solid(ster, TS["sternum"], 6.0)

    # pelvis: iliac wings, acetabular/ischial blocks, pubic rami; femoral heads and necks
    for s, hip, femur in ((1, TS["hip_left"], TS["femur_left"]), (-1, TS["hip_right"], TS["femur_right"])):
        sl = box_slices(grid, (min(0, s * 135 * sw), -60, -218 * sz), (max(0, s * 135 * sw), 110, -118 * sz))
        if sl is not None:
            x, y, z = local_coords(grid, sl)
            t = np.clip((z - (-218 * sz)) / (100 * sz), 0, 1)
            ap = lerp(85, 125, t) * sw
            bp = 70.0
            r = np.sqrt((x / ap) ** 2 + ((y - 25) / bp) ** 2)
            th = np.arctan2(np.abs(x), y - 25)
            wing = (np.abs(r - 1.0) * 0.5 * (ap + bp) <= 5.0 + 3.0 * (1 - t)) & (th >= 0.35) & (th <= 1.75)
            wing &= (s * x) > 0
            cv.paint(sl, wing, hip, T["cancellous_bone"])
            cv.paint(sl, wing & (np.abs(r - 1.0) * 0.5 * (ap + bp) > 3.5 + 3.0 * (1 - t)), hip, T["cortical_bone"])
        ace = loft(grid, 2, -270 * sz, -215 * sz, lambda t, s=s: s * 82 * sw + 0 * t, lambda t: 15 + 0 * t,
                   lambda t: 22.0 * cap(t, 0.3, 0.2), lambda t: 38.0 * cap(t, 0.3, 0.2))
        if ace is not None:
            solid(ace, hip, 22.0)
        pub = loft(grid, 0, s * 80 * sw, 0.0, lambda t: lerp(-15, -62, t), lambda t: lerp(-262, -290, t) * sz,
                   lambda t: 10.0 + 0 * t, lambda t: 12.0 + 0 * t)
        if pub is not None:
            solid(pub, hip, 10.0)
        zf = -245.0 * sz
        fh = loft(grid, 2, zf - 24, zf + 24, lambda t, s=s: s * 100 * sw + 0 * t, lambda t: 8 + 0 * t,
                  lambda t: 24.0 * cap(t, 0.5, 0.5), lambda t: 24.0 * cap(t, 0.5, 0.5))
        if fh is not None:
            solid(fh, femur, 24.0)
        fs = loft(grid, 2, -420 * sz, zf, lambda t, s=s: s * lerp(122, 104, t) * sw, lambda t: 10 + 0 * t,
                  lambda t: 16.0 + 0 * t, lambda t: 16.0 + 0 * t)
        if fs is not None:
            solid(fs, femur, 16.0)


def render(tissue: np.ndarray, phase: str, rng: np.random.Generator, spacing) -> np.ndarray:
    """Clean HU (float32): tissue means for the phase plus a smooth texture per tissue."""
    img = hu_lut(phase)[tissue]
    amp = texture_lut()[tissue]
    sp = float(np.mean(spacing))
    img += amp * smooth_field(rng, tissue.shape, 2.5 / sp)
    return img
