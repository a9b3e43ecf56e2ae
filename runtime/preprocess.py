"""Frame preprocessing, one small pure function per step (docs/design.md, "Pinned definitions").

The same functions feed inference, evaluation, training and INT8 calibration: a model only sees images made
by this module, so ranges measured at calibration match what the device sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SIZE = 224

# Crimmins passes: (dy, dx) offset of neighbour "a" (first side); "c" is the opposite neighbour.
_DIRECTIONS = ((-1, 0), (0, -1), (-1, -1), (-1, 1))  # N-S, E-W, NW-SE, NE-SW


class FrameError(ValueError):
    """A frame that cannot be turned into a network input; the message names the problem."""


def to_gray(frame: np.ndarray, channel_order: str = "RGB", window: tuple[float, float] | None = None) -> np.ndarray:
    """Any frame (gray/RGB/RGBA, 8 or 16 bit) -> uint8 luma (ITU-R BT.601).

    16-bit (or float) frames are windowed to 8 bit: `window` = (center, width) as DICOM gives it, else min-max.
    `channel_order` is the order of colour channels in the array ("RGB" or "BGR").
    """
    if frame is None or not isinstance(frame, np.ndarray) or frame.size == 0:
        raise FrameError("empty frame: the source produced no pixels")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 3:
        if frame.shape[2] not in (3, 4):
            raise FrameError(f"frame has {frame.shape[2]} channels; expected 1, 3 or 4")
        frame = frame[:, :, :3]
        if frame.dtype != np.uint8:
            frame = window_to_uint8(frame, window)
        code = cv2.COLOR_BGR2GRAY if channel_order.upper() == "BGR" else cv2.COLOR_RGB2GRAY
        return cv2.cvtColor(np.ascontiguousarray(frame), code)
    if frame.ndim != 2:
        raise FrameError(f"frame has shape {frame.shape}; expected HxW or HxWxC")
    if frame.dtype != np.uint8:
        frame = window_to_uint8(frame, window)
    return np.ascontiguousarray(frame)


def window_to_uint8(img: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map a wide-range image to uint8: DICOM linear window (center, width) when given, else min-max."""
    x = img.astype(np.float32)
    if window is not None and window[1] and window[1] > 1:
        center, width = float(window[0]), float(window[1])
        # DICOM PS3.3 C.11.2.1.2.1 linear VOI function.
        y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    else:
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Region:
    """Ultrasound image region in frame pixels: rows y0:y1, columns x0:x1."""

    x0: int
    y0: int
    x1: int
    y1: int

    def clip(self, shape: tuple[int, ...]) -> "Region":
        h, w = shape[:2]
        return Region(max(0, min(self.x0, w - 1)), max(0, min(self.y0, h - 1)),
                      max(1, min(self.x1, w)), max(1, min(self.y1, h)))


def auto_region(gray: np.ndarray, threshold: int = 8, min_fraction: float = 0.02) -> Region:
    """Bounding box of the ultrasound image: rows and columns where more than `min_fraction` of pixels exceed
    `threshold`. Black surroundings (outside a sector, letterbox) are cut; a frame with nothing bright keeps all."""
    bright = gray > threshold
    rows = np.flatnonzero(bright.mean(axis=1) > min_fraction)
    cols = np.flatnonzero(bright.mean(axis=0) > min_fraction)
    if rows.size == 0 or cols.size == 0:
        return Region(0, 0, gray.shape[1], gray.shape[0])
    return Region(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


# Scan-sector search (docs/design.md, "Pinned definitions", crop): for frames that may carry burned-in text.
SECTOR_WINDOW = 9            # side of the square window of the local statistics, pixels
SECTOR_MIN_STD = 4.0         # speckle: local standard deviation at least this (flat fills, ramps and bars are not)
SECTOR_MIN_LIT = 0.5         # ... and more than half of the window brighter than 8 (text on black is mostly black)
SECTOR_MIN_AREA = 0.02       # the sector covers at least 2% of the frame ...
SECTOR_MIN_SIDE = 24         # ... and at least 24 pixels each way
NO_SECTOR = ("no scan sector found in a frame that may carry burned-in text (DICOM Burned In Annotation YES or "
             "not stated, and no ultrasound region); not scored or shown")
# Text inside the sector (docs/design.md, "Pinned definitions", crop): strokes brighter than their surroundings.
TEXT_BACKGROUND = 31         # side of the median filter that gives each pixel's background (text is a minority)
TEXT_MIN_LEVEL = 96          # a stroke pixel is at least this bright ...
TEXT_MIN_CONTRAST = 64       # ... and at least this much above its background
TEXT_MIN_HEIGHT, TEXT_MAX_HEIGHT = 5, 64    # a glyph (or a run of touching glyphs) is this tall, pixels
TEXT_MIN_PIXELS = 6
TEXT_MIN_FILL = 0.1          # and fills at least this share of its box (a frame's outline of thin lines does not)
TEXT_MAX_CORE = 0.6          # thin: at most this share of its pixels survives a 3x3 erosion
TEXT_MIN_FLAT = 0.15         # drawn in one colour: at least this share (and 4 pixels) within 8 of its brightest
TEXT_LINE_HEIGHTS = 1.6      # glyphs of one line: heights within this ratio
TEXT_MAX_SHARE = 0.5         # text blanked over more than this share of the sector: the frame is refused
TEXT_IN_SECTOR = ("text covers more than half of the scan sector of a frame that may carry burned-in text "
                  "(DICOM Burned In Annotation YES or not stated, and no ultrasound region); not scored or shown")


@dataclass(frozen=True)
class Sector:
    """The scan sector of a frame: its bounding `region`, and `mask` (bool, the region's shape) true inside the
    sector (the convex hull of the textured area: a fan or a rectangle)."""

    region: Region
    mask: np.ndarray


def scan_sector(gray: np.ndarray) -> Sector | None:
    """The scan sector of one uint8 gray frame, found from speckle texture alone; None when there is none.

    Speckle is textured everywhere: in every SECTOR_WINDOW-square window its standard deviation is at least
    SECTOR_MIN_STD and more than SECTOR_MIN_LIT of its pixels are brighter than 8. Burned-in text on black fails the
    second test (strokes are a small part of their surroundings), flat grey bars and boxes the first. The textured
    pixels are opened with a square of side max(SECTOR_WINDOW, min(h, w) // 10) (odd), which removes every thin
    structure left (text lines, tick marks, colour bars, the rim of a grey box around text); the largest
    8-connected component that remains, if it covers at least SECTOR_MIN_AREA of the frame and SECTOR_MIN_SIDE
    pixels each way, is the sector, filled as its convex hull. Deterministic: box filters, morphology and contours
    of OpenCV on fixed parameters.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise FrameError(f"scan_sector needs a uint8 gray HxW frame, got {gray.dtype} with shape {gray.shape}")
    h, w = gray.shape
    if h < SECTOR_MIN_SIDE or w < SECTOR_MIN_SIDE:
        return None
    k = (SECTOR_WINDOW, SECTOR_WINDOW)
    g = gray.astype(np.float32)
    mean = cv2.boxFilter(g, -1, k, borderType=cv2.BORDER_REFLECT)
    var = cv2.boxFilter(g * g, -1, k, borderType=cv2.BORDER_REFLECT) - mean * mean
    lit = cv2.boxFilter((gray > 8).astype(np.float32), -1, k, borderType=cv2.BORDER_REFLECT)
    textured = ((var >= SECTOR_MIN_STD ** 2) & (lit > SECTOR_MIN_LIT)).astype(np.uint8)
    side = max(SECTOR_WINDOW, min(h, w) // 10) | 1
    opened = cv2.morphologyEx(textured, cv2.MORPH_OPEN, np.ones((side, side), np.uint8),
                              borderType=cv2.BORDER_CONSTANT, borderValue=0)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))  # argmax keeps the first of equals
    x, y, bw, bh, area = (int(v) for v in stats[best])
    if area < SECTOR_MIN_AREA * h * w or bw < SECTOR_MIN_SIDE or bh < SECTOR_MIN_SIDE:
        return None
    pts = cv2.findNonZero((labels[y:y + bh, x:x + bw] == best).astype(np.uint8))
    mask = np.zeros((bh, bw), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(pts), 1)
    return Sector(Region(x, y, x + bw, y + bh), mask.astype(bool))


def may_carry_text(region: Region | None, meta: dict | None) -> bool:
    """True when a frame has no trustworthy ultrasound region and may have text burned into its pixels: a DICOM
    frame (its meta has "burned_in_annotation") whose Burned In Annotation is YES or not stated."""
    return region is None and (meta or {}).get("burned_in_annotation", False) is not False


def text_mask(gray: np.ndarray) -> np.ndarray:
    """Where burned-in text (and other drawn marks: calipers, labels) lies in one uint8 gray frame: a uint8 0/1
    mask covering each text line with a margin.

    A stroke pixel is at least TEXT_MIN_LEVEL bright and TEXT_MIN_CONTRAST above its background (the median of its
    TEXT_BACKGROUND-square window, which a thin stroke does not move). An 8-connected group of stroke pixels is a
    glyph when it is TEXT_MIN_HEIGHT..TEXT_MAX_HEIGHT pixels tall, has TEXT_MIN_PIXELS pixels, fills
    TEXT_MIN_FILL of its box (the outline of a box of thin lines does not), is thin (at most
    TEXT_MAX_CORE of it survives a 3x3 erosion; speckle grains and flow blobs are compact) and is drawn in one
    colour (at least TEXT_MIN_FLAT of it, and 4 pixels, within 8 grey levels of its brightest; speckle is not
    flat). A glyph counts when it is part of a line (`_text_lines`: beside another glyph of its height). Each
    such glyph's box is widened by its height on both sides and by a quarter of it (at least 2 pixels)
    above and below: neighbouring glyphs of a line join, the anti-aliased fringe and any small glyph missed
    between two found ones are covered. Deterministic (a median filter, an erosion, connected components)."""
    out = np.zeros(gray.shape, np.uint8)
    bg = cv2.medianBlur(gray, TEXT_BACKGROUND)
    stroke = ((gray >= TEXT_MIN_LEVEL) & (gray.astype(np.int16) - bg >= TEXT_MIN_CONTRAST)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(stroke, connectivity=8)
    core = cv2.erode(stroke, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    hs, areas = stats[:, cv2.CC_STAT_HEIGHT], stats[:, cv2.CC_STAT_AREA]
    glyphs = []
    for i in np.flatnonzero((hs >= TEXT_MIN_HEIGHT) & (hs <= TEXT_MAX_HEIGHT) & (areas >= TEXT_MIN_PIXELS)):
        if i == 0:
            continue
        x, y, w, h, a = (int(v) for v in stats[i])
        if a < TEXT_MIN_FILL * w * h:
            continue
        sel = labels[y:y + h, x:x + w] == i
        if np.count_nonzero(core[y:y + h, x:x + w][sel]) > TEXT_MAX_CORE * a:
            continue
        vals = gray[y:y + h, x:x + w][sel]
        flat = np.count_nonzero(vals >= int(vals.max()) - 8)
        if flat < 4 or flat < TEXT_MIN_FLAT * a:
            continue
        glyphs.append((x, y, w, h))
    h_img, w_img = gray.shape
    for x, y, w, h in _text_lines(glyphs):
        my = max(2, h // 4)
        out[max(0, y - my):min(h_img, y + h + my), max(0, x - h):min(w_img, x + w + h)] = 1
    return out


def _text_lines(glyphs: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The glyph boxes (x, y, w, h) that are part of a line of text: beside another glyph of about its height
    (heights within TEXT_LINE_HEIGHTS of each other, overlapping over most of the smaller one, at most the larger
    height apart). A lone mark (a caliper's cross, one letter, a flow blob) is not text."""
    kept = []
    for i, (x, y, w, h) in enumerate(glyphs):
        for j, (x2, y2, w2, h2) in enumerate(glyphs):
            if i == j or max(h, h2) > TEXT_LINE_HEIGHTS * min(h, h2):
                continue
            overlap = min(y + h, y2 + h2) - max(y, y2)
            gap = max(x2 - (x + w), x - (x2 + w2))
            if overlap >= 0.6 * min(h, h2) and gap <= max(h, h2):
                kept.append((x, y, w, h))
                break
    return kept


def sector_frame(gray: np.ndarray, region: Region | None, meta: dict | None) -> tuple[np.ndarray, Region | None]:
    """(gray frame, region to crop) under the burned-in-text rule (docs/design.md, "Pinned definitions", crop).

    A frame that may carry text and has no source region is cut to its scan sector (`scan_sector`): the region is
    the sector's bounding box and every pixel of that box outside the sector is set to 0, so no text beside a fan
    reaches the network, the video or the viewer; text inside the sector (`text_mask`, searched over the whole
    frame so that a line the sector's edge cuts is found from its whole glyphs) is set to 0 too. No sector, or
    text over more than TEXT_MAX_SHARE of it: FrameError(NO_SECTOR / TEXT_IN_SECTOR), the frame is neither scored
    nor shown. Any other frame is returned as it is (the crop is then `region`, or `auto_region`)."""
    if not may_carry_text(region, meta):
        return gray, region
    sector = scan_sector(gray)
    if sector is None:
        raise FrameError(NO_SECTOR)
    r = sector.region
    keep = sector.mask & (text_mask(gray)[r.y0:r.y1, r.x0:r.x1] == 0)
    if np.count_nonzero(keep) < (1 - TEXT_MAX_SHARE) * np.count_nonzero(sector.mask):
        raise FrameError(TEXT_IN_SECTOR)
    out = np.zeros_like(gray)
    out[r.y0:r.y1, r.x0:r.x1] = np.where(keep, gray[r.y0:r.y1, r.x0:r.x1], 0)
    return out, r


def crop(gray: np.ndarray, region: Region) -> np.ndarray:
    r = region.clip(gray.shape)
    return gray[r.y0:r.y1, r.x0:r.x1]


def resize(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """cv2.resize to size x size: INTER_AREA when shrinking, INTER_LINEAR when enlarging (per axis product)."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(img)
    shrinking = h * w >= size * size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def crimmins(img: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Crimmins complementary-hulling speckle filter (docs/design.md, "Pinned definitions"), uint8 HxW -> uint8 HxW.

    One iteration = dark-pixel adjustment then light-pixel adjustment; each = 4 directions x 4 rules, one
    whole-image pass per rule (decided from the image before that pass), borders replicated. 32 passes.
    Implemented on a padded buffer so the neighbours are views, not copies; every pass is a handful of
    vectorised uint8 comparisons.
    """
    if img.dtype != np.uint8 or img.ndim != 2:
        raise FrameError(f"crimmins needs a uint8 HxW image, got {img.dtype} with shape {img.shape}")
    h, w = img.shape
    p = np.empty((h + 2, w + 2), np.uint8)
    p[1:-1, 1:-1] = img
    b = p[1:-1, 1:-1]
    hit = np.empty((h, w), bool)
    tmp = np.empty((h, w), bool)
    diff = np.empty((h, w), np.uint8)

    def refresh_border() -> None:
        p[0, 1:-1] = p[1, 1:-1]
        p[-1, 1:-1] = p[-2, 1:-1]
        p[:, 0] = p[:, 1]
        p[:, -1] = p[:, -2]

    def side(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx]

    for _ in range(iterations):
        for dark in (True, False):
            for dy, dx in _DIRECTIONS:
                for rule in range(4):
                    refresh_border()
                    a, c = side(dy, dx), side(-dy, -dx)
                    _crimmins_rule(rule, dark, a, b, c, hit, tmp, diff)
                    if dark:
                        np.add(b, hit, out=b, casting="unsafe")
                    else:
                        np.subtract(b, hit, out=b, casting="unsafe")
    return b.copy()


def _crimmins_rule(rule: int, dark: bool, a, b, c, hit, tmp, diff) -> None:
    """hit <- where rule `rule` fires. Dark: r1 a>=b+2; r2 a>b & b<=c; r3 c>b & b<=a; r4 c>=b+2.
    Light is the mirror image (every comparison reversed)."""
    if dark:
        gt, ge = np.greater, np.greater_equal
        sub = lambda x, y: np.subtract(x, y, out=diff)  # noqa: E731  x - y where x > y
    else:
        gt, ge = np.less, np.less_equal
        sub = lambda x, y: np.subtract(y, x, out=diff)  # noqa: E731  y - x where x < y
    if rule == 0 or rule == 3:
        n = a if rule == 0 else c
        gt(n, b, out=hit)              # strictly beyond b, so the uint8 difference below does not wrap
        sub(n, b)
        np.greater_equal(diff, 2, out=tmp)
        np.logical_and(hit, tmp, out=hit)
    else:
        n, o = (a, c) if rule == 1 else (c, a)
        gt(n, b, out=hit)
        ge(o, b, out=tmp)              # dark: b <= o ; light: b >= o
        np.logical_and(hit, tmp, out=hit)


def preprocess(gray: np.ndarray, region: Region | None = None, *, size: int = SIZE,
               crimmins_iterations: int = 1) -> tuple[np.ndarray, Region]:
    """uint8 gray frame -> (size x size uint8 network image, the region it was cropped from).

    The one preprocessing chain of the project: crop to the ultrasound region (given, else found), resize,
    Crimmins. Training, evaluation, calibration and inference all call this function.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise FrameError(f"preprocess needs a uint8 gray HxW frame, got {gray.dtype} with shape {gray.shape}")
    region = (region or auto_region(gray)).clip(gray.shape)
    img = resize(crop(gray, region), size)
    if crimmins_iterations:
        img = crimmins(img, crimmins_iterations)
    return img, region


def crop_mask(mask: np.ndarray, region: Region, size: int = SIZE) -> np.ndarray:
    """A full-frame 0/1 label mask cut and scaled exactly like its image (area average, then > 0.5)."""
    m = crop(mask.astype(np.float32), region)
    return (resize(m, size) > 0.5).astype(np.uint8)


def to_input(img: np.ndarray, channels: int = 1, dtype=np.float32) -> np.ndarray:
    """uint8 HxW (or NxHxW) -> NCHW in [0, 1]; gray repeated to `channels`."""
    x = img.astype(np.float32) * np.float32(1.0 / 255.0)
    x = x[None, None] if x.ndim == 2 else x[:, None]
    if channels > 1:
        x = np.repeat(x, channels, axis=1)
    return np.ascontiguousarray(x, dtype=dtype)
