"""The simulated patient: abdominal wall, liver or spleen window, retroperitoneum and a kidney whose IFTA grade
changes what the literature says it changes.

What the grade does, and where that comes from (our reading; no numbers below are taken from these papers):

- Hricak H et al., Radiology 1982 ("Renal parenchymal disease: sonographic-histologic correlation"): cortical
  echogenicity, graded against the adjacent liver, spleen and renal sinus in patients scanned just before biopsy,
  rose with the nature and severity of *interstitial* change (focal disease a little, diffuse scarring more) and did
  not follow the glomerular lesion. In their series the clarity of corticomedullary definition did not track any
  histological finding, so of the cues below the fading of corticomedullary differentiation (asked for by the
  issue, and common teaching for end-stage kidneys) has the weakest evidence.
- Platt JF et al., AJR 1988 ("The inability to detect kidney disease on the basis of echogenicity"): many kidneys
  with normal function are as echogenic as the liver; "kidney >= liver" was neither sensitive nor specific, while
  "kidney > liver" was specific but caught only a minority of diseased kidneys. Hence: normal cortex sits a little
  below the liver, the grades' echogenicity distributions overlap, and brightness alone cannot grade.
- Moghazi S et al., Kidney Int 2005 ("Correlation of renal histopathology with sonographic findings"): in biopsied
  kidneys, cortical echogenicity rose with chronic damage (glomerular sclerosis, tubular atrophy, interstitial
  fibrosis), whereas kidney size on its own said less about the histology (it falls late and varies with body size).
- Beland MD et al., AJR 2010 ("Renal cortical thickness measured at ultrasound: is it better than renal length as
  an indicator of renal function in chronic kidney disease?"): in CKD, cortical thickness measured over a pyramid
  tracked eGFR more closely than pole-to-pole length; thin cortex goes with poor function.

So, per grade g (1 = IFTA <25 % ... 4 = >=75 %), each patient draws mean + step * (g - 1) + N(0, sd):

    cue                               grade 1   step      patient sd   step / sd
    cortical echogenicity vs liver    -4.5 dB   +2.9 dB   1.25 dB      2.3     (display: ~4.7 grey levels per dB)
    cortical thickness                 9.5 mm   -1.8 mm   0.85 mm      2.1
    kidney length                      116 mm   -9 mm     6 mm         1.5     (thickness and width scale with it)
    pyramid - cortex contrast        -11.5 dB   +3.0 dB   1.3 dB       2.3     (corticomedullary differentiation)
    cortical heterogeneity (sd)        0.6 dB   +0.6 dB   0.3 dB       2.0     (patchy fibrosis; mostly lost in speckle)
    cortical scars                     0        +0.5/grade (Poisson count of 1-4 mm capsular dents)
    overall receive gain               0 dB      0        0.5 dB               (whole image, a patient's setting)

Every cue overlaps its neighbouring grades (one threshold on one cue sorts two neighbouring grades ~85-88 % right);
a classifier has to combine them. Single frames add their own noise (which section of the kidney, speckle), and
the grader sees only the kidney (image x mask): so the gain varies less than one grade step of cortical brightness,
and the renal sinus (fat, +8 dB, grade independent) stays inside the mask as a within-kidney reference. Pyramids
get brighter by both steps (cortex and contrast), which makes them the most telling single region.

Coordinates (mm): the probe frame of bmode.ConvexProbe (origin at the array's centre of curvature); the body frame
has its origin on the skin under the probe's centre, y = depth below the skin, and moves with the probe's pose
(lateral drift, in-plane tilt); the kidney frame has u along the long axis (towards the lower pole,
screen right), v across it (deeper = positive) and z the elevational offset of the image plane. Sagittal
convention: the head is to the left of the screen; the upper pole lies deeper than the lower one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

# Tissue labels of `Anatomy.echo` (label maps are for tests and diagnostics).
WALL, ORGAN, RETRO, MUSCLE, PERIRENAL, CORTEX, PYRAMID, SINUS, VESSEL, CAPSULE = range(1, 11)
KIDNEY_LABELS = (CORTEX, PYRAMID, SINUS, CAPSULE)


@dataclass(frozen=True)
class Cue:
    grade1: float
    per_grade: float
    patient_sd: float

    def mean(self, grade: int) -> float:
        return self.grade1 + self.per_grade * (grade - 1)

    def draw(self, grade: int, rng: np.random.Generator) -> float:
        return self.mean(grade) + self.patient_sd * float(rng.standard_normal())


CORTEX_DB = Cue(-4.5, 2.9, 1.25)
CORTEX_MM = Cue(9.5, -1.8, 0.85)
LENGTH_MM = Cue(116.0, -9.0, 6.0)
PYRAMID_CONTRAST_DB = Cue(-11.5, 3.0, 1.3)
HETEROGENEITY_DB = Cue(0.6, 0.6, 0.3)
GAIN_SD_DB = 0.5
SINUS_DB = 8.0
PERIRENAL_DB = 9.0

SWEEP_DWELL = 1.6                      # z = amplitude * |triangle| ** SWEEP_DWELL
TEXTURE_MM = 0.5                       # body texture grid pitch
TEXTURE_X = (-160.0, 160.0)
TEXTURE_Y = (-20.0, 180.0)


@dataclass(frozen=True)
class Kidney:
    cx: float
    cy: float
    angle: float              # long axis vs screen x (rad); negative: upper pole (left) deeper
    a: float                  # half length
    c: float                  # in-plane (antero-posterior) half thickness
    b: float                  # elevational half width
    cortex_mm: float
    medulla_mm: float
    cortex_db: float
    pyramid_db: float
    heterogeneity_db: float
    harmonics: tuple[tuple[int, float, float], ...]    # (k, amplitude, phase) of the outline, normalised radius
    scars: tuple[tuple[float, float, float], ...]      # (angle, half-width rad, depth mm) cortical scars
    sinus: tuple[float, float, float, float]           # (a_s, c_s, b_s, v offset)
    pyramid_cells: int
    pyramid_phase: float
    pyramid_widths: tuple[float, ...]                  # base width / cell pitch, per cell
    arc_length: float                                  # perimeter of the corticomedullary junction (mm)
    arc_by_cos: tuple[np.ndarray, np.ndarray] = field(repr=False, compare=False)  # cos(angle) -> arc (mm)

    @cached_property
    def rb_max(self) -> float:
        """Largest normalised outline radius (the kidney's elevational extent is b * rb_max)."""
        t = np.linspace(-np.pi, np.pi, 721)
        return float(self.outline(np.cos(t), np.sin(t)).max())

    def outline(self, cos_t: np.ndarray, sin_t: np.ndarray) -> np.ndarray:
        """Normalised outline radius at in-plane angle theta (given as cos, sin): 1 + low harmonics."""
        rb = np.ones_like(cos_t)
        ck, sk = cos_t, sin_t                                   # cos(k t), sin(k t) by the angle-sum recurrence
        for k in range(1, 1 + max(h[0] for h in self.harmonics)):
            if k > 1:
                ck, sk = ck * cos_t - sk * sin_t, sk * cos_t + ck * sin_t
            for kk, amp, ph in self.harmonics:
                if kk == k:                                     # amp cos(k t + ph)
                    rb += (amp * math.cos(ph)) * ck - (amp * math.sin(ph)) * sk
        return rb

    def scar_depth(self, cos_t: np.ndarray, sin_t: np.ndarray) -> np.ndarray:
        """mm by which scars pull the capsule in: von Mises bumps in the in-plane angle."""
        d = np.zeros_like(cos_t)
        for ang, width, depth in self.scars:
            cos_diff = cos_t * math.cos(ang) + sin_t * math.sin(ang)
            d += depth * cv2.exp((cos_diff - 1.0) * (1.0 / (width * width)))
        return d

    def depth_inside(self, u: np.ndarray, v: np.ndarray, z: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(mm below the smooth outline, (cos, sin) of the normalised in-plane angle) for kidney-frame points;
        depth is negative outside.

        Distance is the first-order (Sampson) distance to the level set rho = outline(theta) of the ellipsoid
        (a, c, b), accurate within a few cm of the surface, which is where it is used."""
        pu = u * (1.0 / self.a)
        pv = v * (1.0 / self.c)
        pz2 = (z / self.b) ** 2
        r2 = pu * pu + pv * pv
        rho = np.sqrt(r2 + pz2)
        np.maximum(rho, 1e-3, out=rho)
        r_in = np.sqrt(r2)
        np.maximum(r_in, 1e-6, out=r_in)
        cos_t, sin_t = pu / r_in, pv / r_in
        gu = pu * (1.0 / self.a)
        gv = pv * (1.0 / self.c)
        grad = np.sqrt(gu * gu + gv * gv + pz2 / self.b ** 2) / rho
        return (self.outline(cos_t, sin_t) - rho) / grad, (cos_t, sin_t)

    def mask_depth(self, u: np.ndarray, v: np.ndarray, z: float) -> np.ndarray:
        """Depth below the capsule (mm), scars included: >= 0 is kidney."""
        d, angle = self.depth_inside(u, v, z)
        if self.scars:
            d = d - self.scar_depth(*angle)
        return d


@dataclass(frozen=True)
class Pose:
    z: float        # elevational offset of the image plane from the kidney's centre (mm)
    dx: float       # lateral drift of the probe (mm)
    tilt: float     # in-plane rotation of the probe (rad)
    breath: float   # displacement of the organs along the kidney axis by breathing (mm)


@dataclass(frozen=True)
class Patient:
    grade: int
    seed: int
    organ: str                # "liver" (right kidney) or "spleen" (left kidney)
    organ_db: float
    gain_db: float
    focus_mm: float
    fat_mm: float
    muscle_mm: float
    wall_phase: tuple[float, float]
    organ_gap_mm: float
    organ_cranial_slope: float
    organ_caudal_slope: float
    spleen_tip_mm: float
    posterior_gap_mm: float
    perirenal_mm: float
    kidney: Kidney
    sweep_amplitude_mm: float
    sweep_period: float
    drift_mm: float
    tilt_rad: float
    breath_mm: float
    phases: tuple[float, float, float]

    @staticmethod
    def draw(grade: int, seed: int) -> "Patient":
        """All of a patient's anatomy from (grade, seed); the grade's cues are drawn first, so a patient's
        cues do not depend on how many other numbers the anatomy happens to draw."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_u64(seed), 104729, grade])))
        cortex_db = CORTEX_DB.draw(grade, rng)
        cortex_mm = float(np.clip(CORTEX_MM.draw(grade, rng), 2.8, 13.0))
        length = float(np.clip(LENGTH_MM.draw(grade, rng), 72.0, 135.0))
        contrast = min(PYRAMID_CONTRAST_DB.draw(grade, rng), -0.5)
        hetero = max(HETEROGENEITY_DB.draw(grade, rng), 0.1)
        gain = GAIN_SD_DB * float(rng.standard_normal())

        organ = "liver" if rng.random() < 0.7 else "spleen"
        fat = float(rng.uniform(8.0, 20.0))
        muscle = float(rng.uniform(7.0, 13.0))
        a = length / 2
        c = a * float(rng.uniform(0.42, 0.50))
        b = a * float(rng.uniform(0.46, 0.54))
        medulla = float(rng.uniform(8.0, 10.5)) - 0.3 * (grade - 1)
        parenchyma = cortex_mm + medulla
        sinus = (max(a - 1.25 * parenchyma - 4.0, 6.0), max(c - parenchyma + 1.0, 3.5),
                 max(b - parenchyma, 4.0), float(rng.normal(0.0, 1.2)))
        harmonics = ((1, float(rng.uniform(-0.04, 0.04)), float(rng.uniform(0, 2 * np.pi))),
                     (2, float(rng.uniform(0.0, 0.03)), float(rng.uniform(0, 2 * np.pi))),
                     (3, float(rng.uniform(0.0, 0.02)), float(rng.uniform(0, 2 * np.pi))))
        n_scars = int(rng.poisson(0.5 * (grade - 1)))
        scars = tuple((float(rng.uniform(-np.pi, np.pi)), float(rng.uniform(0.12, 0.25)),
                       float(rng.uniform(1.0, 0.45 * cortex_mm))) for _ in range(n_scars))
        # pyramids: cells of ~17 mm along the corticomedullary junction, an integer number round the kidney
        arc = _arc_table(a - cortex_mm, c - cortex_mm)
        cells = max(6, int(round(arc[-1] / rng.uniform(15.0, 19.0))))
        widths = tuple(float(w) for w in rng.uniform(0.5, 0.72, size=cells))
        depth_below_skin = fat + muscle + c + float(rng.uniform(14.0, 30.0)) + (6.0 if organ == "spleen" else 0.0)
        kidney = Kidney(
            cx=float(rng.uniform(-8.0, 8.0)), cy=depth_below_skin,
            angle=math.radians(float(rng.normal(-12.0, 6.0))), a=a, c=c, b=b,
            cortex_mm=cortex_mm, medulla_mm=medulla, cortex_db=cortex_db, pyramid_db=cortex_db + contrast,
            heterogeneity_db=hetero, harmonics=harmonics, scars=scars, sinus=sinus, pyramid_cells=cells,
            pyramid_phase=float(rng.uniform(0, 1)), pyramid_widths=widths, arc_length=float(arc[-1]),
            arc_by_cos=_arc_by_cos(arc))
        return Patient(
            grade=grade, seed=seed, organ=organ,
            organ_db=float(rng.normal(0.0, 0.8)) + (1.5 if organ == "spleen" else 0.0), gain_db=gain,
            focus_mm=depth_below_skin + float(rng.normal(0.0, 6.0)), fat_mm=fat, muscle_mm=muscle,
            wall_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
            organ_gap_mm=float(rng.uniform(2.5, 6.0)), organ_cranial_slope=float(rng.uniform(0.4, 0.9)),
            organ_caudal_slope=float(rng.uniform(0.2, 0.5)), spleen_tip_mm=float(rng.uniform(-0.3, 0.2)) * a,
            posterior_gap_mm=float(rng.uniform(5.0, 12.0)), perirenal_mm=float(rng.uniform(6.0, 13.0)),
            kidney=kidney,
            # the sweep leaves the kidney ~10 % of the time: |z| > b * rb_max for |triangle| > 0.93
            sweep_amplitude_mm=b * kidney.rb_max / 0.93 ** SWEEP_DWELL,
            sweep_period=float(rng.uniform(150.0, 200.0)),
            drift_mm=float(rng.uniform(2.0, 5.0)), tilt_rad=math.radians(float(rng.uniform(1.5, 3.5))),
            breath_mm=float(rng.uniform(3.0, 7.0)),
            phases=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, size=3)))

    def pose(self, index: int) -> Pose:
        """The probe's pose at frame `index`: a back-and-forth elevational sweep through the kidney (a triangle
        wave with rounded turns, bent so the probe lingers near the central plane and crosses the edges quickly),
        slow lateral drift and tilt, and breathing. Starts at the kidney's centre; goes on forever."""
        t = float(index)
        w = math.sin(2 * math.pi * t / self.sweep_period)
        tri = math.asin(0.995 * w) / math.asin(0.995)
        # dwell near the central plane (the sonographer looks for the longest section), pass the edges quickly
        z = math.copysign(abs(tri) ** SWEEP_DWELL, tri)
        p1, p2, p3 = self.phases
        return Pose(z=self.sweep_amplitude_mm * z,
                    dx=self.drift_mm * math.sin(2 * math.pi * t / 237.0 + p1),
                    tilt=self.tilt_rad * math.sin(2 * math.pi * t / 311.0 + p2),
                    breath=self.breath_mm * math.sin(2 * math.pi * t / 127.0 + p3))


def _u64(seed: int) -> int:
    return int(seed) % (1 << 64)


def _arc_table(a: float, c: float, n: int = 720) -> np.ndarray:
    """Arc length (mm) of the ellipse (a cos t, c sin t) from t = -pi, at n + 1 evenly spaced t."""
    t = np.linspace(-np.pi, np.pi, n + 1)
    ds = np.hypot(a * np.sin(t), c * np.cos(t))
    s = np.concatenate([[0.0], np.cumsum(0.5 * (ds[1:] + ds[:-1]) * (t[1] - t[0]))])
    return s.astype(np.float32)


_COS_TABLE = 2048


def _arc_by_cos(arc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tables of arc length against cos(nu), for nu >= 0 and nu <= 0 (so a lookup needs no arccos)."""
    nu = np.arccos(np.linspace(1.0, -1.0, _COS_TABLE + 1))
    grid = np.linspace(-np.pi, np.pi, len(arc))
    return np.interp(nu, grid, arc).astype(np.float32), np.interp(-nu, grid, arc).astype(np.float32)


def _arc_from_cos(tables: tuple[np.ndarray, np.ndarray], cos_nu: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Arc length at parametric angle nu = +-arccos(cos_nu), the sign of nu being that of `sign`."""
    i = ((1.0 - np.clip(cos_nu, -1.0, 1.0)) * (0.5 * _COS_TABLE)).astype(np.int32)
    return np.where(sign >= 0, tables[0][i], tables[1][i])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_rows: float, sigma_cols: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation."""
    x = rng.standard_normal(shape, dtype=np.float32)
    x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma_cols, sigmaY=sigma_rows, borderType=cv2.BORDER_REFLECT)
    x -= x.mean()
    x /= max(float(x.std()), 1e-6)
    return x


def _soft_relu(x: np.ndarray, scale: float) -> np.ndarray:
    """max(x, 0) with a rounded corner of size `scale` (a hyperbola: cheap, unlike softplus)."""
    return 0.5 * (x + np.sqrt(x * x + scale * scale))


def _clip01(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0, out=x)


class Anatomy:
    """A patient's echogenicity (dB re liver) at probe-frame points, for any probe pose.

    Built once per patient: random textures in the body frame (sampled with cv2.remap each frame) and the
    abdominal-wall layers, which move with the probe and so are fixed on the probe's polar grid.
    """

    def __init__(self, patient: Patient, sample_depth: np.ndarray, line_angle: np.ndarray, skin_y_mm: float):
        self.patient = p = patient
        self.skin_y = float(skin_y_mm)           # probe-frame y of the skin under the probe's centre
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_u64(p.seed), 15485863, p.grade])))
        ny = int((TEXTURE_Y[1] - TEXTURE_Y[0]) / TEXTURE_MM)
        nx = int((TEXTURE_X[1] - TEXTURE_X[0]) / TEXTURE_MM)
        s = 1.0 / TEXTURE_MM
        # body textures: coarse, fine, and two slices of a vessel field (blended along the sweep)
        self.textures = np.dstack([_smooth_noise(rng, (ny, nx), 5.0 * s, 5.0 * s),
                                   _smooth_noise(rng, (ny, nx), 1.0 * s, 1.6 * s),
                                   _smooth_noise(rng, (ny, nx), 2.2 * s, 2.2 * s),
                                   _smooth_noise(rng, (ny, nx), 2.2 * s, 2.2 * s)])
        # abdominal wall on the polar grid: skin, subcutaneous fat with septa, fascia, muscle, peritoneum
        d = sample_depth[:, None]
        phi = line_angle[None, :]
        f1 = p.fat_mm * (1 + 0.12 * np.sin(2.3 * phi * 4 + p.wall_phase[0]))
        f2 = f1 + p.muscle_mm * (1 + 0.15 * np.sin(3.1 * phi * 3 + p.wall_phase[1]))
        shape = (len(sample_depth), len(line_angle))
        septa = _smooth_noise(rng, shape, 1.0, 5.0)
        fibres = _smooth_noise(rng, shape, 0.8, 9.0)
        wall = np.where(d < f1, -11.0 + 10.0 * np.clip(septa - 1.0, 0.0, 1.0), -7.0 + 3.0 * fibres)
        wall = np.where(d < 1.6, 7.0, wall)
        wall = np.where(np.abs(d - f1) < 0.8, 4.0, wall)
        wall = np.where(np.abs(d - f2) < 1.0, 7.0, wall)
        self.wall_db = wall.astype(np.float32)
        self.wall_bottom = (f2[0] + 1.0).astype(np.float32)      # per scan line, mm below the skin
        self.deep_row = int(np.searchsorted(sample_depth, float(f2.min())))
        # posterior muscle fibres (along the kidney axis, roughly parallel to the screen)
        self.muscle_fibres = _smooth_noise(rng, shape, 0.8, 7.0)

    # -- geometry ---------------------------------------------------------------------------------------
    def to_kidney(self, x: np.ndarray, y: np.ndarray, pose: Pose) -> tuple[np.ndarray, ...]:
        """Probe-frame points -> (body x, body y, kidney u, kidney v). Organs move with breathing, the body
        frame with the probe (tilt about the skin contact point, then lateral drift)."""
        k = self.patient.kidney
        ct, st = math.cos(pose.tilt), math.sin(pose.tilt)
        yr = y - self.skin_y
        bx = ct * x - st * yr + pose.dx
        by = st * x + ct * yr
        ca, sa = math.cos(k.angle), math.sin(k.angle)
        ox = bx - (k.cx + pose.breath * ca)
        oy = by - (k.cy + pose.breath * sa)
        return bx, by, ca * ox + sa * oy, -sa * ox + ca * oy

    def from_kidney(self, u: np.ndarray, v: np.ndarray, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        """Kidney frame -> probe frame (inverse of to_kidney)."""
        k = self.patient.kidney
        ca, sa = math.cos(k.angle), math.sin(k.angle)
        bx = ca * u - sa * v + k.cx + pose.breath * ca
        by = sa * u + ca * v + k.cy + pose.breath * sa
        ct, st = math.cos(pose.tilt), math.sin(pose.tilt)
        xr = bx - pose.dx
        return ct * xr + st * by, -st * xr + ct * by + self.skin_y

    def kidney_outline_box(self, pose: Pose, margin_mm: float, per_edge: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Probe-frame points on a box round the kidney (plus margin): its corners, or `per_edge` points per
        edge (to bound the box in polar coordinates, where its edges are curves)."""
        k = self.patient.kidney
        ea = k.a * k.rb_max + margin_mm
        ec = k.c * k.rb_max + margin_mm
        t = np.linspace(-1.0, 1.0, per_edge + 1)[:-1] if per_edge > 1 else np.array([-1.0])
        ones = np.ones_like(t)
        u = np.concatenate([t * ea, ea * ones, -t * ea, -ea * ones])
        v = np.concatenate([-ec * ones, t * ec, ec * ones, -t * ec])
        return self.from_kidney(u, v, pose)

    def sample_textures(self, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
        mx = ((bx - TEXTURE_X[0]) * (1.0 / TEXTURE_MM)).astype(np.float32)
        my = ((by - TEXTURE_Y[0]) * (1.0 / TEXTURE_MM)).astype(np.float32)
        return cv2.remap(self.textures, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    # -- echogenicity -----------------------------------------------------------------------------------------
    def echo(self, x: np.ndarray, y: np.ndarray, beam: tuple[np.ndarray, np.ndarray], fibres: np.ndarray,
             pose: Pose, window: tuple[slice, slice] | None,
             labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Echogenicity (dB, float32) of the deep anatomy (below the abdominal wall) at probe-frame points
        x, y (2-D arrays), with the beam direction (sin phi, cos phi) and the muscle-fibre texture there.
        `window` (rows, cols of those arrays) bounds the kidney and its fat, None when the plane misses both.
        With labels=True also a uint8 tissue label map."""
        p, k = self.patient, self.patient.kidney
        bx, by, u, v = self.to_kidney(x, y, pose)
        tex = self.sample_textures(bx, by)
        t_low, t_mid = tex[..., 0], tex[..., 1]
        zn = pose.z / max(p.sweep_amplitude_mm, 1e-3)
        wv = 0.25 * math.pi * (zn + 1.0)
        vessel_field = math.cos(wv) * tex[..., 2] + math.sin(wv) * tex[..., 3]
        lab = np.full(x.shape, RETRO, np.uint8) if labels else None

        # retroperitoneum / bowel: mid-grey, coarse
        e = -4.0 + 3.0 * t_mid + 1.5 * t_low
        # posterior muscle (quadratus lumborum / psoas) and, deeper, paraspinal muscle
        back = v - (k.c + p.posterior_gap_mm + 3.0 * t_low)
        e = np.where(back > 0, np.where(back < 28.0, -6.0 + 2.5 * fibres, -9.0 + 2.0 * t_low), e)
        e = np.where(np.abs(back) < 0.8, np.float32(5.0), e)
        if labels:
            lab[back > 0] = MUSCLE

        # perirenal fat: a shell round the kidney, bright and heterogeneous (only near the kidney)
        d_smooth = theta = None
        if window is not None:
            w = window
            d_smooth, theta = k.depth_inside(u[w], v[w], pose.z)
            fat = (d_smooth > -(p.perirenal_mm + 3.0 * t_low[w])) & (d_smooth < 0)
            e[w] = np.where(fat, PERIRENAL_DB + 2.5 * t_mid[w], e[w])
            if labels:
                lab[w][fat] = PERIRENAL

        # liver / spleen: above a boundary that hugs the kidney's anterior surface, deepens over the upper pole
        # (left) and rises towards the organ's tip caudally (right)
        s_z = math.sqrt(max(0.0, 1.0 - (pose.z / k.b) ** 2))
        a_z, c_z = k.a * s_z, k.c * s_z
        if s_z > 0:
            hug = c_z * np.sqrt(np.clip(1.0 - (u * (1.0 / a_z)) ** 2, 0.0, 1.0))
            top = 2.5 * t_low - (hug + p.organ_gap_mm)
        else:
            top = 2.5 * t_low - p.organ_gap_mm
        top += p.organ_cranial_slope * _soft_relu(-u - 0.8 * k.a, 10.0)
        top -= p.organ_caudal_slope * _soft_relu(u - 0.5 * k.a, 10.0)
        organ = v < top
        if p.organ == "spleen":
            organ &= (u + 0.5 * v) < p.spleen_tip_mm + 4.0 * t_low
        e = np.where(organ, p.organ_db + 1.2 * t_low + 0.7 * t_mid, e)
        e = np.where(organ & (np.abs(v - top) < 0.8), np.float32(4.0), e)     # organ capsule
        vessels = _clip01((vessel_field - 2.1) * 4.0) * organ
        e = e * (1.0 - vessels) - 30.0 * vessels
        if p.organ == "liver":
            wall = organ & (np.abs(vessel_field - 1.95) < 0.1)
            e = np.where(wall, np.maximum(e, np.float32(5.0)), e)
        if labels:
            lab[organ] = ORGAN
            lab[vessels > 0.5] = VESSEL

        # the kidney
        if d_smooth is not None:
            w = window
            d_mask = d_smooth - k.scar_depth(*theta) if k.scars else d_smooth
            idx = np.flatnonzero(d_mask >= 0)          # work on the kidney's own points only
            if idx.size:
                def take(a: np.ndarray) -> np.ndarray:
                    return np.ascontiguousarray(a).reshape(-1)[idx]
                e_k, lab_k = self._kidney_echo(
                    take(u[w]), take(v[w]), take(d_smooth), take(d_mask), take(t_low[w]), take(t_mid[w]),
                    take(vessel_field[w]), (take(beam[0][w]), take(beam[1][w])), pose, labels)
                sub = np.ascontiguousarray(e[w])
                sub.reshape(-1)[idx] = e_k
                e[w] = sub
                if labels:
                    sub = np.ascontiguousarray(lab[w])
                    sub.reshape(-1)[idx] = lab_k
                    lab[w] = sub
        return e.astype(np.float32, copy=False), lab

    def _kidney_echo(self, u, v, d_smooth, d_mask, t_low, t_mid, vessel_field, beam, pose, labels):
        """Echogenicity (and labels) at points inside the kidney (1-D arrays)."""
        k = self.patient.kidney
        # cortex, patchy in proportion to fibrosis
        e = k.cortex_db + k.heterogeneity_db * (0.8 * t_low + 0.6 * t_mid)
        # renal sinus: central fat (an irregular ellipsoid), and the distance of every point to it
        a_s, c_s, b_s, dv = k.sinus
        su, sv, sz2 = u * (1.0 / a_s), (v - dv) * (1.0 / c_s), (pose.z / b_s) ** 2
        rho_s = np.sqrt(su * su + sv * sv + sz2) * (1.0 + 0.12 * t_low + 0.03 * t_mid)
        np.maximum(rho_s, 1e-3, out=rho_s)
        g_s = np.sqrt((su / a_s) ** 2 + (sv / c_s) ** 2 + sz2 / b_s ** 2) / rho_s
        d_sinus = (rho_s - 1.0) / g_s                                  # mm outside the sinus
        # medullary pyramids: rounded triangles with their base on the corticomedullary junction (CMJ) and their
        # apex (papilla) at the sinus. Across the medulla they follow the hyperbolae of the elliptic coordinates
        # confocal with the CMJ ellipse, which cross it at right angles; along it, cells of equal arc length.
        s_z = max(math.sqrt(max(1.0 - (pose.z / k.b) ** 2, 0.0)), 0.2)
        ac, cc = k.a - k.cortex_mm, k.c - k.cortex_mm
        f = math.sqrt(max(ac * ac - cc * cc, 1.0)) * s_z
        v2 = v * v
        cos_nu = (np.sqrt((u + f) ** 2 + v2) - np.sqrt((u - f) ** 2 + v2)) * (0.5 / f)
        s_arc = _arc_from_cos(k.arc_by_cos, cos_nu, v)                  # arc length along the CMJ (mm)
        pitch = k.arc_length / k.pyramid_cells
        cell = s_arc / pitch + k.pyramid_phase
        idx = np.floor(cell)
        w = np.abs(cell - idx - 0.5) * pitch                           # mm from the cell's axis, at the CMJ
        widths = np.asarray(k.pyramid_widths, np.float32)[idx.astype(np.int64) % k.pyramid_cells] * pitch
        depth = d_smooth - k.cortex_mm
        q = depth / np.maximum(depth + d_sinus, 0.5)                   # 0 at the CMJ, 1 at the sinus
        qc = np.clip(q, 0.0, 1.0)
        half = 0.5 * widths * (1.0 - 0.55 * qc * np.sqrt(qc))
        m_p = _clip01((half - w) / 0.9 + 0.5)
        m_p *= _clip01(depth / 0.7 + 0.5)
        m_p *= _clip01((0.97 - q) * 8.0)
        e = e + (k.pyramid_db - k.cortex_db) * m_p
        # the sinus: bright fat with vessels and collecting system as dark branches
        m_s = _clip01(-d_sinus / 0.8 + 0.5)
        e_s = SINUS_DB + 2.0 * t_mid - 18.0 * _clip01((vessel_field - 1.3) * 2.0)
        e = e * (1.0 - m_s) + e_s * m_s
        # capsule: thin specular rim, brightest where the beam meets the surface head-on
        pu, pv = u / (k.a * k.a), v / (k.c * k.c)
        ca, sa = math.cos(k.angle - pose.tilt), math.sin(k.angle - pose.tilt)     # kidney axis on screen
        nx, ny = ca * pu - sa * pv, sa * pu + ca * pv
        cos2 = (nx * beam[0] + ny * beam[1]) ** 2 / np.maximum(nx * nx + ny * ny, 1e-12)
        rim = d_mask < 0.9
        e = np.where(rim, np.maximum(e, 7.0 + 9.0 * cos2), e)
        lab = None
        if labels:
            lab = np.full(u.shape, CORTEX, np.uint8)
            lab[m_p > 0.5] = PYRAMID
            lab[m_s > 0.5] = SINUS
            lab[rim] = CAPSULE
        return e, lab
