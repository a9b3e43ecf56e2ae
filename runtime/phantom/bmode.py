"""B-mode image formation for a convex (curvilinear) abdominal probe, by the convolution model.

    echogenicity map (dB, polar grid: depth samples x scan lines)
      -> complex scatterers  s ~ CN(0, 1) * 10**(E/20)
      -> point-spread function: axial Gaussian (fixed) x lateral Gaussian whose width grows away from the focus
      -> envelope |IQ|, log compression (+ the patient's gain and a little residual TGC), grey floor in the fan
      -> scan conversion (cv2.remap) onto a Cartesian pixel grid, black outside the fan

The PSF acts on the baseband (IQ) signal, so no carrier is simulated: with random complex scatterers the carrier
phase only rotates each scatterer's phase. Kernels have unit energy (sum of squares 1), so the mean speckle power
of a region is its echogenicity whatever the local beam width. Lateral widths are applied in bands of rows with
similar width in scan-line units (the beam widens away from the focus and the lines fan out with depth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import cv2
import numpy as np

from runtime.preprocess import Region

GREY_FLOOR = 10          # the scanner's lowest grey inside the fan (>8, so auto_region sees the whole sector)
DB_RANGE = 54.0          # displayed dynamic range
REFERENCE_GREY = 92.0    # mean grey of 0 dB tissue (the liver) at unit gain


@dataclass(frozen=True)
class ConvexProbe:
    """Geometry of a curvilinear probe and of the screen it is displayed on.

    Probe frame (mm): origin at the centre of curvature, x lateral (to the right of the screen), y down into the
    body. The skin touches the array at r = radius_mm; a scan line at angle phi runs along (sin phi, cos phi).
    """

    height: int = 400
    width: int = 520
    radius_mm: float = 50.0
    fan_deg: float = 64.0
    depth_mm: float = 150.0
    margin_px: int = 6

    # -- screen ---------------------------------------------------------------------------------------------
    @cached_property
    def half_angle(self) -> float:
        return math.radians(self.fan_deg) / 2

    @cached_property
    def spacing_mm(self) -> float:
        """Isotropic pixel size chosen so the fan's bounding box fits the screen with `margin_px` to spare."""
        r1 = self.radius_mm + self.depth_mm
        w_mm = 2 * r1 * math.sin(self.half_angle)
        h_mm = r1 - self.radius_mm * math.cos(self.half_angle)
        return max(w_mm / (self.width - 2 * self.margin_px), h_mm / (self.height - 2 * self.margin_px))

    @cached_property
    def _origin(self) -> tuple[float, float]:
        """(x, y) in mm of the top-left corner of pixel (0, 0): the fan is centred on the screen."""
        r1 = self.radius_mm + self.depth_mm
        y_top = self.radius_mm * math.cos(self.half_angle)
        h_mm = r1 - y_top
        return -self.width * self.spacing_mm / 2, y_top - (self.height * self.spacing_mm - h_mm) / 2

    def pixel_to_mm(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probe-frame (x, y) in mm of pixel centres."""
        x0, y0 = self._origin
        return (x0 + (cols + 0.5) * self.spacing_mm), (y0 + (rows + 0.5) * self.spacing_mm)

    def mm_to_pixel(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probe-frame mm -> (row, col) as floats (pixel centres at integers)."""
        x0, y0 = self._origin
        return (np.asarray(y) - y0) / self.spacing_mm - 0.5, (np.asarray(x) - x0) / self.spacing_mm - 0.5

    # -- polar (acquisition) grid -------------------------------------------------------------------------
    @cached_property
    def n_samples(self) -> int:
        return int(round(self.depth_mm / self.spacing_mm))

    @cached_property
    def n_lines(self) -> int:
        arc = (self.radius_mm + self.depth_mm) * 2 * self.half_angle
        return int(round(arc / (2.0 * self.spacing_mm)))

    @cached_property
    def dr(self) -> float:
        return self.depth_mm / self.n_samples

    @cached_property
    def dphi(self) -> float:
        return 2 * self.half_angle / self.n_lines

    @cached_property
    def sample_depth(self) -> np.ndarray:
        """Depth below the skin (mm) of each sample row, float32 (n_samples,)."""
        return ((np.arange(self.n_samples) + 0.5) * self.dr).astype(np.float32)

    @cached_property
    def line_angle(self) -> np.ndarray:
        return (-self.half_angle + (np.arange(self.n_lines) + 0.5) * self.dphi).astype(np.float32)

    @cached_property
    def polar_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Probe-frame (x, y) mm of every polar sample, float32 (n_samples, n_lines) each."""
        r = self.radius_mm + self.sample_depth[:, None]
        phi = self.line_angle[None, :]
        return (r * np.sin(phi)).astype(np.float32), (r * np.cos(phi)).astype(np.float32)

    def polar_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probe-frame mm -> fractional (sample, line) indices of the polar grid."""
        r = np.hypot(x, y)
        phi = np.arctan2(x, y)
        return (r - self.radius_mm) / self.dr - 0.5, (phi + self.half_angle) / self.dphi - 0.5

    # -- scan conversion ------------------------------------------------------------------------------------
    @cached_property
    def _pixel_polar(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols = np.mgrid[0:self.height, 0:self.width].astype(np.float64)
        x, y = self.pixel_to_mm(rows, cols)
        r = np.hypot(x, y)
        phi = np.arctan2(x, y)
        inside = (r >= self.radius_mm) & (r <= self.radius_mm + self.depth_mm) & (np.abs(phi) <= self.half_angle)
        fs, fl = self.polar_index(x, y)
        return fs.astype(np.float32), fl.astype(np.float32), inside

    @cached_property
    def remap_maps(self) -> tuple[np.ndarray, np.ndarray]:
        fs, fl, inside = self._pixel_polar
        fl = np.where(inside, fl, -10).astype(np.float32)   # outside the fan: read the (black) border
        fs = np.where(inside, fs, -10).astype(np.float32)
        return cv2.convertMaps(fl, fs, cv2.CV_16SC2)

    @cached_property
    def sector(self) -> np.ndarray:
        """uint8 HxW, 1 inside the fan."""
        return self._pixel_polar[2].astype(np.uint8)

    @cached_property
    def sector_floor(self) -> np.ndarray:
        return self.sector * np.uint8(GREY_FLOOR)

    @cached_property
    def region(self) -> Region:
        rows = np.flatnonzero(self.sector.any(axis=1))
        cols = np.flatnonzero(self.sector.any(axis=0))
        return Region(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)

    def scan_convert(self, polar: np.ndarray) -> np.ndarray:
        """uint8 polar image (n_samples, n_lines) -> uint8 HxW screen image, grey floor inside, black outside."""
        m1, m2 = self.remap_maps
        img = cv2.remap(polar, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        img = cv2.multiply(img, self.sector)
        return cv2.max(img, self.sector_floor)

    def scan_convert_labels(self, polar: np.ndarray) -> np.ndarray:
        """Nearest-neighbour scan conversion of a uint8 label map (0 outside the fan)."""
        fs, fl, inside = self._pixel_polar
        out = cv2.remap(polar, fl, fs, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
        return out * inside


@lru_cache(maxsize=8)
def probe(height: int, width: int) -> ConvexProbe:
    """Shared probe geometry per screen size (the maps are built once per process)."""
    return ConvexProbe(height=height, width=width)


# -- point-spread function ---------------------------------------------------------------------------------

AXIAL_SIGMA_MM = 0.36        # ~3.5 MHz, two-cycle pulse
LATERAL_SIGMA_FOCUS_MM = 0.8
LATERAL_RAYLEIGH_MM = 38.0   # depth over which the beam widens by sqrt(2) away from the focus
LATERAL_SIGMA_MAX_MM = 3.2


def _unit_energy_gaussian(sigma: float) -> np.ndarray:
    half = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
    return (k / np.sqrt((k * k).sum())).astype(np.float32)


@dataclass(frozen=True)
class Beam:
    """The PSF of one probe focused at `focus_mm` below the skin, discretised for the polar grid."""

    axial: np.ndarray                                   # 1-D kernel along samples
    bands: tuple[tuple[int, int, np.ndarray], ...]      # (row0, row1, lateral kernel) covering all rows

    @staticmethod
    def focused(p: ConvexProbe, focus_mm: float) -> "Beam":
        d = p.sample_depth.astype(np.float64)
        sigma_mm = LATERAL_SIGMA_FOCUS_MM * np.sqrt(1 + ((d - focus_mm) / LATERAL_RAYLEIGH_MM) ** 2)
        sigma_mm = np.minimum(sigma_mm, LATERAL_SIGMA_MAX_MM)
        sigma_lines = sigma_mm / ((p.radius_mm + d) * p.dphi)
        level = np.round(np.log(sigma_lines) / np.log(1.15)).astype(int)   # bands of ~15 % width steps
        bands = []
        start = 0
        for i in range(1, len(level) + 1):
            if i == len(level) or level[i] != level[start]:
                bands.append((start, i, _unit_energy_gaussian(float(np.median(sigma_lines[start:i])))))
                start = i
        return Beam(_unit_energy_gaussian(AXIAL_SIGMA_MM / p.dr), tuple(bands))

    def apply(self, iq: np.ndarray) -> np.ndarray:
        """Convolve a complex field stored as float32 (rows, lines, 2) with the depth-dependent PSF."""
        one = np.ones(1, np.float32)
        ax = cv2.sepFilter2D(iq, -1, one, self.axial, borderType=cv2.BORDER_REFLECT)
        out = np.empty_like(ax)
        for r0, r1, k in self.bands:
            out[r0:r1] = cv2.sepFilter2D(ax[r0:r1], -1, k, one, borderType=cv2.BORDER_REFLECT)
        return out


def speckle_field(key: tuple[int, ...], shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance complex Gaussian scatterers, float32 (rows, lines, 2), a pure function of `key`."""
    entropy = [7919] + [int(k) % (1 << 64) for k in key]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    return rng.standard_normal((*shape, 2), dtype=np.float32)


def residual_tgc_db(depth_mm: np.ndarray) -> np.ndarray:
    """Depth gain left after time-gain compensation: a slight near-field dip and a far-field fall-off (dB)."""
    d = np.asarray(depth_mm, np.float64)
    return (-1.5 * np.exp(-d / 10.0) - 4.0 * np.clip((d - 100.0) / 50.0, 0.0, 1.0) ** 2).astype(np.float32)


def envelope_to_grey(iq: np.ndarray, gain_db: float) -> np.ndarray:
    """Envelope detection and log compression: 0 dB tissue -> REFERENCE_GREY on average, DB_RANGE over 255 greys.

    The speckle power of 0 dB tissue is exponential with mean 2 (CN(0, 2) scatterers, unit-energy PSF), whose
    mean in dB is 10 log10(2) - 2.507 (the log of an exponential variable sits 2.507 dB below its mean)."""
    env = cv2.magnitude(iq[..., 0], iq[..., 1])            # |IQ|
    cv2.max(env, 1e-6, dst=env)
    cv2.log(env, dst=env)                                    # ln |IQ|
    per_db = 255.0 / DB_RANGE
    env *= per_db * 20.0 / math.log(10.0)                    # -> grey levels
    env += REFERENCE_GREY + per_db * (gain_db - (10 * math.log10(2.0) - 2.507))
    np.clip(env, GREY_FLOOR, 255.0, out=env)
    return env.astype(np.uint8)
