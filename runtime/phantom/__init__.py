"""Synthetic kidney ultrasound: a simulated patient scanned by a convex abdominal probe.

`KidneyPhantom(grade, seed)` is one patient (fixed anatomy); `frame(index)` is what the scanner shows at that
moment of a probe sweep, with the exact kidney mask in the same pixel grid. Same (seed, grade, index) -> same
pixels. Anatomy and the grade's cues (with their sources): `anatomy.py`; image formation: `bmode.py`.

    >>> ph = KidneyPhantom(grade=3, seed=7)
    >>> f = ph.frame(0)            # f.image uint8 400x520, f.mask 0/1, f.region = the fan's bounding box
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from runtime.phantom.anatomy import WALL, Anatomy, Patient, Pose
from runtime.phantom.bmode import Beam, ConvexProbe, envelope_to_grey, probe, residual_tgc_db, speckle_field
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
        return PhantomFrame(image=image, mask=mask, region=self.probe.region, grade=self.grade,
                            has_kidney=bool(mask.any()), pixel_spacing_mm=float(self.probe.spacing_mm),
                            patient_id=self.patient_id)

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
