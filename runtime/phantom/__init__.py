"""Synthetic kidney ultrasound: a simulated patient scanned by a convex abdominal probe.

`KidneyPhantom(grade, seed)` is one patient (fixed anatomy); `frame(index)` is what the scanner shows at that
moment of a probe sweep, with the exact kidney mask in the same pixel grid. Same (seed, grade, index) -> same
pixels. Anatomy and the grade's cues (with their sources): `anatomy.py`; image formation: `bmode.py`.

    >>> ph = KidneyPhantom(grade=3, seed=7)
    >>> f = ph.frame(0)            # f.image uint8 400x520, f.mask 0/1, f.region = the fan's bounding box
    >>> f.kidney_length_mm         # the true length of the kidney as this frame shows it (None: no kidney)

The pixels are square, `pixel_spacing_mm` on a side (the probe's `spacing_mm`, about 0.42 mm on 400x520).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

from runtime.phantom.anatomy import WALL, Anatomy, Patient, Pose
from runtime.phantom.bmode import Beam, ConvexProbe, envelope_to_grey, probe, residual_tgc_db, speckle_field
from runtime.measure import max_feret
from runtime.preprocess import Region

__all__ = ["KidneyPhantom", "PhantomFrame", "Region", "DEFAULT_HEIGHT", "DEFAULT_WIDTH", "grade_from_seed"]

DEFAULT_HEIGHT = 400
DEFAULT_WIDTH = 520
MIN_KIDNEY_PX = 40            # a sliver smaller than this (a few mm^2) does not count as showing the kidney
SPECKLE_FRAMES = 2.5          # frames over which the speckle decorrelates (the probe moves through tissue)
_LN10_20 = math.log(10.0) / 20.0


@dataclass
class PhantomFrame:
    image: np.ndarray        # uint8 HxW B-mode (gray)
    mask: np.ndarray         # uint8 HxW, 1 = kidney, 0 elsewhere
    region: Region           # bounding box of the sector in image pixels
    grade: int               # 1..4 (the patient's)
    has_kidney: bool
    pixel_spacing_mm: float
    patient_id: str          # "sim-<seed>"
    pose: Pose | None = field(default=None, repr=False)                       # the probe's pose of this frame
    phantom: "KidneyPhantom | None" = field(default=None, repr=False, compare=False)

    @cached_property
    def kidney_length_mm(self) -> float | None:
        """The true length (mm) of the kidney this frame shows (`KidneyPhantom.kidney_length_mm`), None without one;
        computed on first use."""
        if not self.has_kidney or self.phantom is None or self.pose is None:
            return None
        return self.phantom.kidney_length_mm(self.pose)


def grade_from_seed(seed: int) -> int:
    """The grade of `KidneyPhantom(grade=None, seed=seed)`: uniform over 1..4."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % (1 << 64), 3571])))
    return int(rng.integers(1, 5))


class KidneyPhantom:
    """One simulated patient (fixed anatomy) under a moving probe. `grade` None draws it from the seed.

    Frames are pure functions of (seed, grade, index, height, width). One instance caches a few speckle fields,
    so use one instance per thread."""

    def __init__(self, grade: int | None = None, seed: int = 0, height: int = DEFAULT_HEIGHT,
                 width: int = DEFAULT_WIDTH):
        if grade is None:
            grade = grade_from_seed(seed)
        if grade not in (1, 2, 3, 4):
            raise ValueError(f"phantom grade {grade!r} is not an IFTA grade; use 1, 2, 3 or 4 (or None)")
        if height < 64 or width < 64:
            raise ValueError(f"phantom size {height}x{width} is too small; use at least 64x64 pixels")
        self.grade = int(grade)
        self.seed = int(seed)
        self.patient_id = f"sim-{seed}"
        self.probe: ConvexProbe = probe(int(height), int(width))
        self.patient = Patient.draw(self.grade, self.seed)
        pr = self.probe
        self.anatomy = Anatomy(self.patient, pr.sample_depth, pr.line_angle, skin_y_mm=pr.radius_mm)
        self.beam = Beam.focused(pr, self.patient.focus_mm)
        d0 = self.anatomy.deep_row
        x, y = pr.polar_xy
        self._deep_xy = (x[d0:], y[d0:])
        r = np.hypot(x[d0:], y[d0:])
        self._deep_beam = (x[d0:] / r, y[d0:] / r)
        self._deep_is_wall = pr.sample_depth[d0:, None] < self.anatomy.wall_bottom[None, :]
        self._tgc_db = residual_tgc_db(pr.sample_depth)
        self._speckle_cache: dict[int, np.ndarray] = {}

    # -- public ---------------------------------------------------------------------------------------------
    def frame(self, index: int) -> PhantomFrame:
        """The scanner's image at frame `index` of the sweep (deterministic; any integer)."""
        index = int(index)
        pose = self.patient.pose(index)
        e_db, _ = self._echo(pose, labels=False)
        iq = self._speckle(index)
        amp = cv2.exp(e_db * np.float32(_LN10_20))
        iq *= amp[..., None]
        iq = self.beam.apply(iq)
        polar = envelope_to_grey(iq, self.patient.gain_db)
        image = self.probe.scan_convert(polar)
        mask = self.kidney_mask(pose)
        has_kidney = bool(mask.any())
        return PhantomFrame(image=image, mask=mask, region=self.probe.region, grade=self.grade,
                            has_kidney=has_kidney, pixel_spacing_mm=float(self.probe.spacing_mm),
                            patient_id=self.patient_id, pose=pose, phantom=self)

    def tissue(self, index: int) -> np.ndarray:
        """uint8 HxW tissue labels of frame `index` (anatomy.WALL ... CAPSULE; 0 outside the fan), for tests and
        diagnostics; nearest-neighbour scan conversion, so boundaries are good to about a pixel."""
        _, lab = self._echo(self.patient.pose(int(index)), labels=True)
        return self.probe.scan_convert_labels(lab)

    def kidney_mask(self, pose: Pose) -> np.ndarray:
        """Exact kidney mask (capsule outline, filled) on the screen grid, zero outside the fan."""
        pr, an, k = self.probe, self.anatomy, self.patient.kidney
        mask = np.zeros((pr.height, pr.width), np.uint8)
        if abs(pose.z) >= k.b * k.rb_max:
            return mask
        bx, by = an.kidney_outline_box(pose, margin_mm=1.0)
        rows, cols = pr.mm_to_pixel(bx, by)
        r0, r1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())) + 1, pr.height)
        c0, c1 = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())) + 1, pr.width)
        if r0 >= r1 or c0 >= c1:
            return mask
        rr, cc = np.mgrid[r0:r1, c0:c1].astype(np.float32)
        x, y = pr.pixel_to_mm(rr, cc)
        _, _, u, v = an.to_kidney(x, y, pose)
        window = (k.mask_depth(u, v, pose.z) >= 0).astype(np.uint8) & pr.sector[r0:r1, c0:c1]
        if int(window.sum()) >= MIN_KIDNEY_PX:
            mask[r0:r1, c0:c1] = window
        return mask

    def kidney_length_mm(self, pose: Pose) -> float | None:
        """The true length (mm) of the kidney as the image plane at `pose` shows it: the maximum Feret diameter (the
        longest chord) of the kidney's section by the plane, cut to the fan; None when the plane misses it.

        Computed in mm from the anatomy, not from pixels: the capsule where `Kidney.mask_depth` crosses 0 (the
        surface `kidney_mask` samples at pixel centres), found by bisection along 720 rays from the kidney's axis
        (the section is star-shaped about it), moved into the probe frame, kept where it lies in the fan; plus the
        fan's edges (sampled every 0.05 mm) where they cross the kidney. The longest distance between two of those
        points is the length. A frame whose mask is empty (`has_kidney` False: a sliver under MIN_KIDNEY_PX pixels)
        has no length, which `frame()` applies."""
        pr, an, k = self.probe, self.anatomy, self.patient.kidney
        z = float(pose.z)
        if abs(z) >= k.b * k.rb_max:
            return None
        theta = np.linspace(-np.pi, np.pi, 720, endpoint=False)
        cu, su = np.cos(theta) * k.a, np.sin(theta) * k.c

        def depth(r: np.ndarray) -> np.ndarray:           # mm below the capsule at normalised radius r on each ray
            return k.mask_depth(r * cu, r * su, z)

        lo = np.full(theta.shape, 1e-4)
        hi = np.full(theta.shape, 1.05 * k.rb_max)
        ray = depth(lo) >= 0                               # rays along which the section has any extent
        for _ in range(32):                                # the crossing to ~1e-9 of the radius
            mid = 0.5 * (lo + hi)
            inside = depth(mid) >= 0
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        r = 0.5 * (lo + hi)
        x, y = an.from_kidney(r[ray] * cu[ray], r[ray] * su[ray], pose)
        keep = self._in_fan(x, y)
        pts = [np.stack([x[keep], y[keep]], axis=1)]
        # the fan's edges inside the kidney: the two side lines, the skin arc and the deepest arc
        r0, r1, half = pr.radius_mm, pr.radius_mm + pr.depth_mm, pr.half_angle
        radial = np.arange(r0, r1, 0.05)
        for phi in (-half, half):
            pts.append(np.stack([radial * math.sin(phi), radial * math.cos(phi)], axis=1))
        for rr in (r0, r1):
            phi = np.linspace(-half, half, int(2 * half * rr / 0.05) + 2)
            pts.append(np.stack([rr * np.sin(phi), rr * np.cos(phi)], axis=1))
        edges = np.concatenate(pts[1:])
        _, _, u, v = an.to_kidney(edges[:, 0], edges[:, 1], pose)
        pts[1:] = [edges[k.mask_depth(u, v, z) >= 0]]
        pts = np.concatenate(pts)
        return max_feret(pts) if len(pts) >= 2 else None

    def _in_fan(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Probe-frame mm points inside the fan (the test `ConvexProbe.sector` applies to pixel centres)."""
        pr = self.probe
        r, phi = np.hypot(x, y), np.arctan2(x, y)
        return (r >= pr.radius_mm) & (r <= pr.radius_mm + pr.depth_mm) & (np.abs(phi) <= pr.half_angle)

    # -- internals ------------------------------------------------------------------------------------------
    def _echo(self, pose: Pose, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        an, d0 = self.anatomy, self.anatomy.deep_row
        e = an.wall_db.copy()
        x, y = self._deep_xy
        deep, lab_deep = an.echo(x, y, self._deep_beam, an.muscle_fibres[d0:], pose,
                                 window=self._kidney_window(pose), labels=labels)
        e[d0:] = np.where(self._deep_is_wall, an.wall_db[d0:], deep)
        e += self._tgc_db[:, None]
        lab = None
        if labels:
            lab = np.full(e.shape, WALL, np.uint8)
            lab[d0:] = np.where(self._deep_is_wall, WALL, lab_deep)
        return e, lab

    def _kidney_window(self, pose: Pose) -> tuple[slice, slice] | None:
        """Rows and columns of the deep polar grid that can hold the kidney or its fat at this pose."""
        pr, an = self.probe, self.anatomy
        margin = self.patient.perirenal_mm + 8.0
        bx, by = an.kidney_outline_box(pose, margin_mm=margin, per_edge=8)
        rows, cols = pr.polar_index(bx, by)
        d0 = an.deep_row
        r0, r1 = max(int(np.floor(rows.min())) - d0, 0), min(int(np.ceil(rows.max())) + 1 - d0, pr.n_samples - d0)
        c0, c1 = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())) + 1, pr.n_lines)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _speckle(self, index: int) -> np.ndarray:
        """Scatterers for this frame: consecutive frames share partly correlated speckle (a smooth blend of two
        independent fields, weights cos/sin so the variance stays 1)."""
        s = index / SPECKLE_FRAMES
        k = math.floor(s)
        w = 0.5 * math.pi * (s - k)
        f0, f1 = self._field(k), self._field(k + 1)
        if w == 0.0:
            return f0.copy()
        out = f0 * np.float32(math.cos(w))
        out += f1 * np.float32(math.sin(w))
        return out

    def _field(self, key: int) -> np.ndarray:
        f = self._speckle_cache.get(key)
        if f is None:
            if len(self._speckle_cache) >= 3:
                self._speckle_cache.pop(next(iter(self._speckle_cache)))
            f = speckle_field((self.seed, self.grade, key), (self.probe.n_samples, self.probe.n_lines))
            self._speckle_cache[key] = f
        return f
