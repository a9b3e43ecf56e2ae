"""Kidney size in mm from the network's 224x224 mask: length and area, measured in the source frame.

    kidney_size(mask224, region, frame_shape, meta, prob=None, image=None, threshold=0.5)
        -> (length_mm | None, area_mm2 | None, size_note | None)

The definition (docs/design.md, "Kidney size"):

- The kidney is the largest 8-connected component of the 224x224 mask (ties: the first in OpenCV's label order).
- The mask was cut from `region` of the source frame and stretched to 224x224 (runtime.preprocess: crop, resize),
  so mask pixel (row i, column j) stands for the source-frame point x = x0 + (j + 0.5) * sx - 0.5,
  y = y0 + (i + 0.5) * sy - 0.5 (pixel centres at integers), sx = (x1 - x0) / 224 and sy = (y1 - y0) / 224 source
  pixels per mask pixel. Everything below is measured on those source-frame coordinates, then converted to mm with
  the row spacing and the column spacing separately (pixels need not be square): mm_x = x * col_mm,
  mm_y = y * row_mm.
- Length: the maximum Feret diameter (the longest distance between two points) of the component's outline, the
  iso-line at 0.5 between its pixels and the pixels outside (it passes through the midpoints between an inside
  and an outside pixel centre, as marching squares draws it), taken in mm. Along a row or column, a shape sampled
  at pixel centres reaches half a pixel beyond its outermost centres on average, which that line adds; at other
  angles it adds a little too much, so lengths come out about half a pixel long on average (within a pixel).
- Area: the component's pixel count times the area one mask pixel covers in the source frame,
  (sx * col_mm) * (sy * row_mm) mm^2 (equivalently: its pixel count in the source frame times row mm x col mm).

Calibration (where row_mm and col_mm come from), and when the size is not reported (`size_note` says why):

- A DICOM frame (its meta has "us_regions", every region of its Sequence of Ultrasound Regions, see
  runtime/sources/dicom.py) is measured only with the physical deltas of the one region that holds the kidney.
  Pixel Spacing (0028,0030) never counts for a DICOM frame: the ultrasound IODs calibrate pixels per region
  (PS3.3 C.8.5.5), not with the Image Plane module; one Pixel Spacing for a whole screen cannot say which part it
  describes (a dual view at two depths, a Doppler strip whose axes are seconds and cm/s), and where a scanner
  writes it anyway nothing says what it was meant for. So: no region -> not measured; the kidney in no region, or in more than one
  (regions overlap it: a colour box over the kidney, a region inside another), or reaching outside its region ->
  not measured; a region that is not 2-D, not in cm on both axes, without usable deltas, or that does not fit the
  image (the image was resized after the header was written) -> not measured.
- Any other source is calibrated by the pixel spacing it declares for the whole frame (`pixel_spacing_rc_mm`:
  the simulated probe's true spacing, an OpenIGTLink IMAGE's spacing); none -> not measured (image and video
  files, capture cards).

Whether the outline can be measured at all (`prob` and `image` given, as the pipelines give them; docs/design.md,
"Kidney size", has the figures behind the two limits):

- The network must be sure where the outline is: the length of the kidney in the mask at half the threshold
  (p > t/2) and at the threshold's mirror (p > (1 + t)/2; 0.25 and 0.75 for t = 0.5) may differ by at most
  MAX_OUTLINE_SPREAD of the reported length. A probability that ramps slowly across the outline puts the 0.5
  line anywhere on the ramp.
- The outline must be visible in the image: the mean grey level of a 4-pixel band just outside the component and
  that of a 4-pixel band just inside it (the preprocessed 224x224 image the network saw) must differ by at least
  MIN_OUTLINE_CONTRAST. A kidney whose cortex is as echogenic as the fat around it has no outline to follow. A
  component that fills the crop has no band outside it, and is not judged by this rule.

A frame that fails either is not measured (its grade is unaffected), with the reason in its `size_note`.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from runtime.preprocess import Region

# DICOM codes (PS3.3 C.8.5.5.1): Region Spatial Format 1 = 2-D; Physical Units 3 = cm.
SPATIAL_2D = 1
UNITS_CM = 3

# The reasons a kidney is not measured (a record's `size_note`); fixed sentences, so a summary can count them.
NO_KIDNEY = "not measured: the mask holds no kidney"
NO_SPACING = "not measured: the frame has no calibration (its source gives no pixel spacing)"
NO_REGIONS = ("not measured: the frame has no calibration (the DICOM has no Sequence of Ultrasound Regions; "
              "Pixel Spacing does not calibrate ultrasound)")
IN_NO_REGION = "not measured: the kidney lies in no calibrated ultrasound region"
SEVERAL_REGIONS = "not measured: several ultrasound regions overlap the kidney"
BEYOND_REGION = "not measured: the kidney reaches outside its ultrasound region"
NOT_2D = "not measured: the kidney's ultrasound region is not a 2-D image"
NOT_CM = "not measured: the kidney's ultrasound region is not calibrated in cm"
NO_DELTA = "not measured: the kidney's ultrasound region has no usable physical deltas"
UNFIT_REGION = "not measured: the kidney's ultrasound region does not fit the image (resized after calibration)"
UNSURE_OUTLINE = "not measured: the network is unsure where the kidney's outline lies (its length is not determined)"
FAINT_OUTLINE = "not measured: the kidney's outline barely stands out from the tissue around it"
NO_REGION_GIVEN = "not measured: the frame's crop region is unknown or not inside the frame"
NOTE_MISSING = "not measured: no size was computed for this frame"    # an accepted record without size or note
NOTES = (NO_KIDNEY, NO_SPACING, NO_REGIONS, IN_NO_REGION, SEVERAL_REGIONS, BEYOND_REGION, NOT_2D, NOT_CM, NO_DELTA,
         UNFIT_REGION, UNSURE_OUTLINE, FAINT_OUTLINE, NO_REGION_GIVEN, NOTE_MISSING)

# Whether an outline can be measured (module docstring): the most the length may move between the p > t/2 and the
# p > (1 + t)/2 masks, relative to it, and the least grey-level step across the outline (bands of OUTLINE_BAND px).
MAX_OUTLINE_SPREAD = 0.07
MIN_OUTLINE_CONTRAST = 16.0
OUTLINE_BAND = 4


def kidney_size(mask224: np.ndarray | None, region: Region | None, frame_shape: tuple[int, ...],
                meta: dict[str, Any] | None, *, prob: np.ndarray | None = None, image: np.ndarray | None = None,
                threshold: float = 0.5) -> tuple[float | None, float | None, str | None]:
    """(length mm, area mm^2, None) of the kidney in a 0/1 mask cut from `region` of a frame of `frame_shape`
    (rows, columns), or (None, None, the reason) when it cannot be measured (see the module docstring). Calibration
    is checked first: a frame that cannot be calibrated gets that reason whatever its mask; a region not inside the
    frame is refused. With `prob` (the network's probability map the mask was thresholded from at `threshold`) and
    `image` (the preprocessed image it saw), an outline the network is unsure of or that the image barely shows is
    refused too; without them (a labelled mask) it is measured as it is."""
    meta = meta or {}
    note = calibration_note(meta)
    if note is not None:
        return None, None, note
    mask = np.asarray(mask224) if mask224 is not None else np.zeros((0, 0), np.uint8)
    if mask.ndim != 2 or mask.size == 0 or not mask.any():
        return None, None, NO_KIDNEY
    h0, w0 = (int(frame_shape[0]), int(frame_shape[1])) if len(frame_shape) >= 2 else (0, 0)
    if region is None or not (0 <= region.x0 < region.x1 <= w0 and 0 <= region.y0 < region.y1 <= h0):
        return None, None, NO_REGION_GIVEN
    comp = largest_component(mask)
    h, w = mask.shape
    sx, sy = (region.x1 - region.x0) / w, (region.y1 - region.y0) / h
    spacing = _calibration(comp, region, (sx, sy), meta)
    if isinstance(spacing, str):
        return None, None, spacing
    row_mm, col_mm = spacing
    length = feret_mm(comp, region, (sx, sy), (row_mm, col_mm))
    if prob is not None and outline_spread(prob, threshold, length, region, (sx, sy), spacing) > MAX_OUTLINE_SPREAD:
        return None, None, UNSURE_OUTLINE
    if image is not None and outline_contrast(image, comp) < MIN_OUTLINE_CONTRAST:
        return None, None, FAINT_OUTLINE
    area = float(np.count_nonzero(comp)) * (sx * col_mm) * (sy * row_mm)
    return round(length, 3), round(area, 2), None


def calibration_note(meta: dict[str, Any] | None) -> str | None:
    """The reason no frame with this meta can be measured, whatever its mask (no spacing, no ultrasound region);
    None when a mask may be (a pipeline need not fetch the mask otherwise)."""
    meta = meta or {}
    if "us_regions" in meta:
        return None if meta.get("us_regions") else NO_REGIONS
    return None if _positive_pair(meta.get("pixel_spacing_rc_mm")) is not None else NO_SPACING


def measure_record(rec, mask: np.ndarray | None, region: Region | None, frame, *, prob: np.ndarray | None = None,
                   image: np.ndarray | None = None, threshold: float = 0.5) -> None:
    """Fill a record's `kidney_length_mm`, `kidney_area_mm2` and `size_note` for an accepted frame; `region` is the
    crop in the SOURCE frame (before `pipeline.shown_part`), `frame` the runtime.sources.Frame, `prob`, `image` and
    `threshold` as `kidney_size` takes them. Never raises."""
    try:
        shape = frame.pixels.shape[:2] if frame.pixels is not None else (0, 0)
        rec.kidney_length_mm, rec.kidney_area_mm2, rec.size_note = kidney_size(
            mask, region, shape, frame.meta, prob=prob, image=image, threshold=threshold)
    except Exception as e:  # a measurement must never cost the frame its grade
        rec.kidney_length_mm = rec.kidney_area_mm2 = None
        rec.size_note = f"not measured: {type(e).__name__}"


# -- geometry ------------------------------------------------------------------------------------------------------

def largest_component(mask: np.ndarray) -> np.ndarray:
    """uint8 0/1: the largest 8-connected component of a 0/1 mask (the first of equals)."""
    m = (np.asarray(mask) > 0).astype(np.uint8)
    n, labels = cv2.connectedComponents(m, connectivity=8)    # (its ...WithStats is several times slower)
    if n <= 2:
        return m
    best = 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n)[1:]))
    return (labels == best).astype(np.uint8)


def to_source(cols: np.ndarray, rows: np.ndarray, region: Region,
              scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Mask coordinates (column, row; pixel centres at integers) -> source-frame (x, y), same convention."""
    sx, sy = scale
    return region.x0 + (np.asarray(cols, np.float64) + 0.5) * sx - 0.5, \
        region.y0 + (np.asarray(rows, np.float64) + 0.5) * sy - 0.5


def outline_points(comp: np.ndarray) -> np.ndarray:
    """(N, 2) float (column, row) points whose convex hull is that of the component's 0.5 iso-line: the four
    edge midpoints of every pixel on its outer boundary."""
    contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    offsets = np.array([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])
    return (pts[:, None, :] + offsets[None, :, :]).reshape(-1, 2)


def max_feret(points_mm: np.ndarray) -> float:
    """Largest distance between two of the (N, 2) points: the diameter of their convex hull, over its antipodal
    pairs (rotating calipers, Shamos 1978), vectorised: for each hull edge, the vertex farthest from its line is the
    one whose outward-normal range holds the edge's direction turned by pi (a search in the sorted edge angles);
    each edge's two ends paired with that vertex and its neighbours are all the candidates."""
    pts = np.asarray(points_mm, np.float64).reshape(-1, 2)
    if len(pts) < 2:
        return 0.0
    hull = pts[cv2.convexHull(pts.astype(np.float32), returnPoints=False).reshape(-1)]
    n = len(hull)
    if n < 3:
        return float(np.hypot(*(hull[0] - hull[-1])))
    x, y = hull[:, 0], hull[:, 1]
    if float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) < 0:
        hull = hull[::-1]                               # counter-clockwise: edge angles increase
    edge = np.roll(hull, -1, axis=0) - hull
    angle = np.unwrap(np.arctan2(edge[:, 1], edge[:, 0]))
    turns = np.concatenate([angle, angle + 2 * np.pi, angle + 4 * np.pi])
    far = np.searchsorted(turns, angle + np.pi) % n     # vertex k starts edge k
    cand = (far[:, None] + np.array([-1, 0, 1])[None, :]) % n
    ends = np.stack([np.arange(n), (np.arange(n) + 1) % n], axis=1)
    d = hull[ends][:, :, None, :] - hull[cand][:, None, :, :]
    return float(np.sqrt((d * d).sum(axis=-1).max()))


def feret_mm(comp: np.ndarray, region: Region, scale: tuple[float, float], spacing_rc: tuple[float, float]) -> float:
    """The component's maximum Feret diameter in mm (its outline mapped into the source frame, then to mm)."""
    pts = outline_points(comp)
    x, y = to_source(pts[:, 0], pts[:, 1], region, scale)
    row_mm, col_mm = spacing_rc
    return max_feret(np.stack([x * col_mm, y * row_mm], axis=1))


def outline_spread(prob: np.ndarray, threshold: float, length: float, region: Region, scale: tuple[float, float],
                   spacing_rc: tuple[float, float]) -> float:
    """How far the length moves with the threshold: (length of the largest component of p > t/2 minus that of
    p > (1 + t)/2) / `length`, both measured like `length` (infinite when the second mask is empty)."""
    p = np.asarray(prob, np.float32).reshape(np.shape(prob)[-2:])
    outer, inner = p > threshold / 2, p > (1 + threshold) / 2
    if not inner.any() or length <= 0:
        return math.inf
    lengths = [feret_mm(largest_component(m), region, scale, spacing_rc) for m in (outer, inner)]
    return (lengths[0] - lengths[1]) / length


def outline_contrast(image: np.ndarray, comp: np.ndarray, band: int = OUTLINE_BAND) -> float:
    """|mean grey level of the `band`-pixel ring just outside the 0/1 component - that of the ring just inside it|
    on the image (HxW, or 1xHxW / HxWx1); infinite when nothing lies outside (the component fills the image)."""
    img = np.asarray(image, np.float32)
    img = img.reshape(img.shape[-2:]) if img.ndim == 3 and img.shape[0] == 1 else img.reshape(img.shape[:2])
    kernel = np.ones((3, 3), np.uint8)
    inside = comp - cv2.erode(comp, kernel, iterations=band)
    outside = cv2.dilate(comp, kernel, iterations=band) - comp
    if not outside.any() or not inside.any():
        return math.inf
    return abs(float(img[outside > 0].mean()) - float(img[inside > 0].mean()))


def mask_to_source(mask224: np.ndarray, region: Region | None, frame_shape: tuple[int, ...]) -> np.ndarray:
    """The network's 224x224 mask in a frame's geometry: uint8 0/1 of `frame_shape`, 0 outside `region` (None: the
    whole frame). The one mapping of a mask back to a frame: the overlay's and the viewer's contour, `--save-masks
    --mask-size original`, the DICOM SEG and the measurements all use it (docs/design.md, "Kidney size").

    The rule: the 0/1 mask is interpolated bilinearly onto the region's pixels, then > 0.5, with the pixel-centre
    convention of `to_source` and `cv2.resize` (frame pixel x samples mask column (x - x0 + 0.5) / sx - 0.5, edges
    replicated). So the mapped mask is the inside of the outline the measurements measure (the 0.5 iso-line
    between a mask pixel inside and one outside), not a staircase of whole mask pixels shifted by nearest
    neighbour's rounding; a pixel exactly on that line (value 0.5) is outside."""
    h, w = int(frame_shape[0]), int(frame_shape[1])
    r = (region or Region(0, 0, w, h)).clip((h, w))
    out = np.zeros((h, w), np.uint8)
    if r.x1 <= r.x0 or r.y1 <= r.y0:
        return out
    m = cv2.resize((np.asarray(mask224) > 0).astype(np.float32), (r.x1 - r.x0, r.y1 - r.y0),
                   interpolation=cv2.INTER_LINEAR)
    out[r.y0:r.y1, r.x0:r.x1] = m > 0.5
    return out


# -- calibration --------------------------------------------------------------------------------------------------

def _calibration(comp: np.ndarray, region: Region, scale: tuple[float, float],
                 meta: dict[str, Any]) -> tuple[float, float] | str:
    """(row mm, column mm) for this kidney, or the reason there is none."""
    if "us_regions" not in meta:                      # not DICOM: the spacing the source declares for the frame
        spacing = _positive_pair(meta.get("pixel_spacing_rc_mm"))
        return spacing if spacing is not None else NO_SPACING
    regions = meta.get("us_regions") or ()
    if not regions:
        return NO_REGIONS
    rows, cols = np.nonzero(comp)
    x, y = to_source(cols, rows, region, scale)        # the kidney's pixel centres in the source frame
    holding = []
    for item in regions:
        try:
            x0, y0, x1, y1 = (float(v) for v in item["bounds"])
        except (KeyError, TypeError, ValueError):
            continue
        inside = (x >= x0 - 0.5) & (x < x1 - 0.5) & (y >= y0 - 0.5) & (y < y1 - 0.5)   # pixel centres in its box
        if inside.any():
            holding.append((item, bool(inside.all())))
    if not holding:
        return IN_NO_REGION
    if len(holding) > 1:
        return SEVERAL_REGIONS
    item, whole = holding[0]
    if not whole:
        return BEYOND_REGION
    if not item.get("fits", True):
        return UNFIT_REGION
    if item.get("spatial_format") != SPATIAL_2D:
        return NOT_2D
    units = item.get("units") or (None, None)
    if tuple(units) != (UNITS_CM, UNITS_CM):
        return NOT_CM
    delta = item.get("delta") or (None, None)
    try:
        dx, dy = abs(float(delta[0])), abs(float(delta[1]))
    except (TypeError, ValueError, IndexError):
        return NO_DELTA
    if not (math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0):
        return NO_DELTA
    return dy * 10.0, dx * 10.0                        # cm per pixel -> mm; (row = delta Y, column = delta X)


def _positive_pair(value) -> tuple[float, float] | None:
    try:
        a, b = float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (a, b) if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0 else None


# -- the study's aggregate ------------------------------------------------------------------------------------------

MAX_REASONS = 16                     # distinct notes counted one by one; any further ones together as OTHER
OTHER = "not measured: other reasons"


class SizeStats:
    """The kidney size of a study's accepted frames in bounded memory, for `StudySummary.summary()`:

        "kidney_length_mm": {"median", "p10", "p90", "min", "max"} over the measured frames, or None
        "kidney_area_mm2":  the same for the area, or None
        "kidney_size":      {"measured": frames with a size, "not_measured": accepted frames without one,
                             "not_measured_reasons": {size_note: count}, most frequent first}

    The percentiles come from runtime.stats.LatencySketch: exact for the first 2048 measured frames, then
    within 0.5 % (relative); at most MAX_REASONS distinct notes are counted apart (any further ones as OTHER)."""

    def __init__(self) -> None:
        from runtime.stats import LatencySketch
        self.length, self.area = LatencySketch(), LatencySketch()
        self.measured = 0
        self.reasons: dict[str, int] = {}

    def add(self, rec) -> None:
        """One accepted frame's record."""
        length, area = rec.kidney_length_mm, rec.kidney_area_mm2
        if length is not None and area is not None:
            self.measured += 1
            self.length.add(float(length))
            self.area.add(float(area))
            return
        note = rec.size_note or NOTE_MISSING
        if note not in self.reasons and len(self.reasons) >= MAX_REASONS:
            note = OTHER
        self.reasons[note] = self.reasons.get(note, 0) + 1

    def summary(self) -> dict[str, Any]:
        def stats(sketch) -> dict[str, float] | None:
            if not self.measured:
                return None
            q = sketch.quantiles((10, 50, 90))
            return {"median": q["p50"], "p10": q["p10"], "p90": q["p90"], "min": round(sketch.min, 4),
                    "max": round(sketch.max, 4)}

        return {"kidney_length_mm": stats(self.length), "kidney_area_mm2": stats(self.area),
                "kidney_size": {"measured": self.measured, "not_measured": sum(self.reasons.values()),
                                "not_measured_reasons": dict(sorted(self.reasons.items(),
                                                                    key=lambda kv: (-kv[1], kv[0])))}}
