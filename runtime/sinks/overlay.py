"""The overlay picture: what a sonographer sees for one frame.

The video sink writes it and the display window shows it (the browser viewer draws only its frame and contour,
`render_frame`), so it is one pure function of a record: `render_overlay(record) -> BGR image`. Layout, left to
right and top to bottom:

    +------------------------------+-------------------+
    | the frame, grey, with the    | IFTA GRADE  3     |
    | kidney contour in green      | probability bars  |
    | (top-left of the picture,    | model name version|
    |  scaled by `frame_scale`)    | ACCEPTED / ...    |
    |                              | frame, fps, ms    |
    +------------------------------+-------------------+
    | disclaimer banner (always, when given)           |
    +--------------------------------------------------+

The model line (the bundle's card: "<name> <version>") and the banner (the bundle's disclaimer) are drawn only
when given: callers pass the bundle's own (`Bundle.label`, `Bundle.disclaimer`), never a default.

Text and shapes are drawn with runtime/drawing.py's helpers, which the evaluation and soak pictures use too.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from runtime.drawing import draw_text, fill, fit_size, rounded_rect, text_width, wrap_text
from runtime.measure import mask_to_source
from runtime.preprocess import Region, window_to_uint8
from runtime.record import FrameRecord

DEFAULT_CLASS_NAMES = ("1: <25%", "2: 25-49%", "3: 50-74%", "4: >=75%")

MIN_HEIGHT = 480          # small frames are enlarged to this many rows so that text and contour are legible
MAX_HEIGHT = 1080         # huge frames are shrunk to this
PLACEHOLDER_SIZE = (480, 640)   # rows, columns of the grey picture drawn for a record without a frame

# Colours, BGR.
CONTOUR = (60, 220, 60)
PANEL_BG = (34, 30, 28)
RULE = (72, 68, 66)
TEXT = (240, 240, 240)
MUTED = (165, 165, 165)
BAR_BG = (62, 58, 56)
BAR_OTHER = (150, 145, 140)
ACCEPTED_COLOUR = (70, 165, 40)
REJECTED_COLOUR = (0, 118, 214)
ERROR_COLOUR = (60, 60, 215)
BANNER_BG = (0, 190, 255)
BANNER_TEXT = (20, 20, 20)
PLACEHOLDER_BG = (92, 92, 92)
# Grade colours run from green (mild) to red (severe).
GRADE_COLOURS = ((110, 200, 60), (40, 205, 235), (30, 140, 250), (70, 70, 235))


# -- geometry --------------------------------------------------------------------------------------------------
def frame_scale(shape: tuple[int, ...]) -> float:
    """How much the overlay enlarges (or shrinks) a display frame of this shape: small frames grow to
    MIN_HEIGHT rows, huge ones shrink to MAX_HEIGHT, others stay 1:1. The frame sits at the top-left corner."""
    h = shape[0]
    if h < MIN_HEIGHT:
        return MIN_HEIGHT / h
    if h > MAX_HEIGHT:
        return MAX_HEIGHT / h
    return 1.0


def mask_to_frame(mask: np.ndarray, region: Region | None, shape: tuple[int, ...]) -> np.ndarray:
    """The network's 224x224 mask as a 0/1 mask of the display frame, placed in the region it was cropped from
    (`region` None: the whole frame): runtime.measure.mask_to_source, the one mapping of a mask back to a frame
    (bilinear, > 0.5), which the saved masks, the DICOM SEG and the measurements use too."""
    return mask_to_source(mask, region, shape)


def _display_bgr(display: np.ndarray) -> np.ndarray:
    img = display
    if img.dtype != np.uint8:
        img = window_to_uint8(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img[:, :, :3])


def _draw_contour(canvas: np.ndarray, frame_mask: np.ndarray, scale: float, thickness: int,
                  block: float = 1.0) -> None:
    """Green outline of `frame_mask` on the picture, enlarged by `scale`.

    Contour points are the centres of the mask's border pixels; they are mapped to the centres of the enlarged
    pixels and drawn with 4 fractional bits, so the anti-aliased line sits where the border is. `block` is the
    size in frame pixels of one network-mask pixel: where it exceeds 1.5, the staircase of the enlarged mask is
    smoothed by a circular moving average over about two blocks of contour (it moves the line by at most half a
    block: the model cannot place the border more finely than that), which keeps large frames clean.
    """
    contours, _ = cv2.findContours(frame_mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    k = int(round(2 * block)) | 1 if block > 1.5 else 1
    pts = []
    for c in contours:
        xy = c[:, 0, :].astype(np.float64)
        if k > 1 and len(xy) > 2 * k:
            padded = np.concatenate([xy[-(k // 2):], xy, xy[:k // 2]])
            kernel = np.full(k, 1.0 / k)
            xy = np.stack([np.convolve(padded[:, i], kernel, mode="valid") for i in (0, 1)], axis=1)
        pts.append(np.round(((xy + 0.5) * scale - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2))
    cv2.polylines(canvas, pts, True, CONTOUR, thickness, cv2.LINE_AA, shift=4)


# -- the picture -----------------------------------------------------------------------------------------------
def render_overlay(record: FrameRecord, *, fps: float | None = None,
                   disclaimer: str | None = None,
                   class_names: Sequence[str] = DEFAULT_CLASS_NAMES, model: str | None = None) -> np.ndarray:
    """One record -> the annotated BGR uint8 picture (even width and height, so any video encoder takes it).

    Never raises for a record without a frame or mask: a grey placeholder carries the record's error instead.
    `fps` is the processing rate to show (None: not shown as a number). `disclaimer`: the bundle's, drawn as a
    banner under the picture; `model`: the bundle's "<name> <version>", drawn in the panel above the gate state.
    """
    display = record.display
    if display is not None and getattr(display, "ndim", 0) in (2, 3) and display.size:
        scale = frame_scale(display.shape)
        h, w = display.shape[:2]
        H, W = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        img = _display_bgr(display)
        interp = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
        img = img if (H, W) == (h, w) else cv2.resize(img, (W, H), interpolation=interp)
    else:
        scale, (H, W) = 0.0, PLACEHOLDER_SIZE
        img = None
    u = H / MIN_HEIGHT                                   # layout unit: 1 at 480 rows
    panel_w = int(round(300 * u))
    banner_h = int(round(36 * u)) if disclaimer else 0
    panel_w += (W + panel_w) % 2                         # even picture size
    banner_h += (H + banner_h) % 2
    canvas = np.empty((H + banner_h, W + panel_w, 3), np.uint8)
    fill(canvas, PANEL_BG)

    if img is not None:
        canvas[:H, :W] = img
        if record.mask is not None and getattr(record.mask, "ndim", 0) == 2 and record.mask.size:
            frame_mask = mask_to_frame(record.mask, record.region, display.shape)
            r = (record.region or Region(0, 0, w, h)).clip(display.shape)
            block = max((r.x1 - r.x0) / record.mask.shape[1], (r.y1 - r.y0) / record.mask.shape[0])
            _draw_contour(canvas, frame_mask, scale, max(2, int(round(2 * u))), block)
    else:
        _draw_placeholder(canvas[:H, :W], record.error, u)

    _draw_panel(canvas[:H, W:], record, u, fps, class_names, model)
    if disclaimer:
        _draw_banner(canvas[H:], disclaimer, u)
    return canvas


def _draw_placeholder(area: np.ndarray, error: str | None, u: float) -> None:
    fill(area, PLACEHOLDER_BG)
    h, w = area.shape[:2]
    draw_text(area, "NO IMAGE", (w / 2, h / 2 - 10 * u), 30 * u, TEXT, 700, align="center")
    if error:
        size = 16 * u
        for i, line in enumerate(wrap_text(error, size, w - 80 * u, max_lines=5)):
            draw_text(area, line, (w / 2, h / 2 + (24 + 22 * i) * u), size, TEXT, align="center")


def _grade_text(name: str) -> str:
    """'3: 50-74%' -> '50-74%' (the big digit already says 3)."""
    return name.split(":", 1)[1].strip() if ":" in name else name


def _draw_panel(p: np.ndarray, rec: FrameRecord, u: float, fps: float | None, class_names: Sequence[str],
                model: str | None = None) -> None:
    h, w = p.shape[:2]
    m = 18 * u                                            # margin
    cv2.line(p, (0, 0), (0, h - 1), RULE, max(1, int(round(u))))
    probs = rec.probabilities if rec.error is None else None
    scored = rec.accepted and rec.grade is not None and probs is not None

    # Grade block.
    y = m + 12 * u
    draw_text(p, "IFTA GRADE", (m, y), 15 * u, MUTED, 600)
    if rec.error:
        draw_text(p, "ERROR", (m, y + 46 * u), 40 * u, ERROR_COLOUR, 800)
        size = 15 * u
        lines = wrap_text(rec.error, size, w - 2 * m, max_lines=9)
        for i, line in enumerate(lines):
            draw_text(p, line, (m, y + (76 + 21 * i) * u), size, TEXT)
    else:
        base = y + 88 * u
        if scored:
            g = int(rec.grade)
            colour = GRADE_COLOURS[(g - 1) % len(GRADE_COLOURS)]
            x = draw_text(p, str(g), (m - 4 * u, base), 104 * u, colour, 800)
            name = class_names[g - 1] if 0 < g <= len(class_names) else f"grade {g}"
            tx = x + 14 * u
            draw_text(p, _grade_text(name), (tx, base - 40 * u), fit_size(_grade_text(name), 26 * u, w - m - tx, 700),
                      TEXT, 700)
            draw_text(p, f"p = {probs[g - 1]:.2f}", (tx, base - 8 * u), 17 * u, MUTED)
        else:
            cv2.line(p, (int(m + 4 * u), int(base - 36 * u)), (int(m + 44 * u), int(base - 36 * u)), MUTED,
                     max(2, int(round(4 * u))), cv2.LINE_AA)
            tx = m + 66 * u
            head, why = not_graded_text(rec)
            draw_text(p, head, (tx, base - 40 * u), 24 * u, TEXT, 700)
            for i, line in enumerate(wrap_text(why, 17 * u, w - m - tx, max_lines=2)):
                draw_text(p, line, (tx, base - (8 - 19 * i) * u), 17 * u, MUTED)

        # Probability bars.
        y = base + 26 * u
        cv2.line(p, (int(m), int(y)), (int(w - m), int(y)), RULE, max(1, int(round(u))))
        y += 28 * u
        draw_text(p, "PROBABILITIES", (m, y), 14 * u, MUTED, 600)
        label_size = 16 * u
        label_w = max(text_width(n, label_size) for n in class_names) + 12 * u
        value_w = text_width("0.00", label_size) + 10 * u
        x0, x1 = m + label_w, w - m - value_w
        bar_h = 14 * u
        for i, name in enumerate(class_names):
            y += 31 * u
            draw_text(p, name, (m, y), label_size, TEXT)
            top = y - 0.55 * label_size - bar_h / 2
            cv2.rectangle(p, (int(x0), int(top)), (int(x1), int(top + bar_h)), BAR_BG, -1)
            if probs is not None and i < len(probs):
                v = float(np.clip(probs[i], 0.0, 1.0))
                best = scored and i == int(rec.grade) - 1
                colour = GRADE_COLOURS[i % len(GRADE_COLOURS)] if best else BAR_OTHER
                if v > 0:
                    cv2.rectangle(p, (int(x0), int(top)), (int(round(x0 + v * (x1 - x0))), int(top + bar_h)),
                                  colour, -1)
                draw_text(p, f"{v:.2f}", (w - m, y), label_size, TEXT if best else MUTED, 700 if best else 400,
                          align="right")
            else:
                draw_text(p, "-", (w - m, y), label_size, MUTED, align="right")

    # Gate state, and above it the model that made the numbers.
    pill_top, pill_h = h - 128 * u, 50 * u
    if model:
        text = f"model {model}"
        draw_text(p, text, (m, pill_top - 12 * u), fit_size(text, 14 * u, w - 2 * m, 500), MUTED, 500)
    if rec.error:
        state, colour, detail = "NOT PROCESSED", ERROR_COLOUR, "see the error above"
    else:
        state, detail = gate_state(rec)
        colour = ACCEPTED_COLOUR if rec.accepted else REJECTED_COLOUR
    rounded_rect(p, (m, pill_top), (w - m, pill_top + pill_h), 8 * u, colour)
    draw_text(p, state, (m + 12 * u, pill_top + 22 * u), 18 * u, (255, 255, 255), 800)
    draw_text(p, detail, (m + 12 * u, pill_top + 42 * u), fit_size(detail, 15 * u, w - 2 * m - 24 * u, 500),
              (255, 255, 255), 500)

    # Frame, rate, latency.
    cv2.line(p, (int(m), int(h - 62 * u)), (int(w - m), int(h - 62 * u)), RULE, max(1, int(round(u))))
    total = rec.latency_ms.get("total")
    draw_text(p, f"frame {rec.frame}", (m, h - 36 * u), 16 * u, TEXT, 600)
    draw_text(p, f"{fps:.1f} fps" if fps else "-- fps", (w - m, h - 36 * u), 16 * u, TEXT, 600, align="right")
    draw_text(p, "latency", (m, h - 14 * u), 15 * u, MUTED)
    draw_text(p, f"{total:.1f} ms" if total is not None else "-- ms", (w - m, h - 14 * u), 15 * u, MUTED,
              align="right")




def scope_refused(rec: FrameRecord) -> bool:
    """The mask gate passed the frame and the scope gate refused it (runtime.graph, docs/scope.md)."""
    return not rec.accepted and rec.error is None and rec.scope is not None and rec.refused is not None


def not_graded_text(rec: FrameRecord) -> tuple[str, str]:
    """What the panel says in place of a grade for a processed frame without one: ("NOT GRADED", the reason)."""
    if scope_refused(rec):
        return "NOT GRADED", str(rec.refused)
    return "NOT GRADED", "no kidney: too little kidney in view"


def gate_state(rec: FrameRecord) -> tuple[str, str]:
    """The gate state of a processed record (the overlay's pill; the viewer's page says the same): (state, detail)."""
    if rec.accepted:
        return "ACCEPTED", f"kidney {rec.mask_fraction:.1%} of scan area"
    if scope_refused(rec):
        return "NOT GRADED", f"{rec.refused}"
    return "REJECTED", f"kidney {rec.mask_fraction:.1%}: below the gate"


def _draw_banner(b: np.ndarray, text: str, u: float) -> None:
    fill(b, BANNER_BG)
    h, w = b.shape[:2]
    # A warning triangle, then the text, centred together.
    size = fit_size(text, 18 * u, w - 80 * u, 700)
    tri = 0.9 * size
    tw = text_width(text, size, 700)
    x = (w - tw - tri - 10 * u) / 2
    cy = h / 2
    pts = np.array([[x + tri / 2, cy - tri / 2], [x, cy + tri / 2 - u], [x + tri, cy + tri / 2 - u]])
    cv2.fillPoly(b, [np.round(pts * 16).astype(np.int32)], BANNER_TEXT, cv2.LINE_AA, shift=4)
    draw_text(b, "!", (x + tri / 2, cy + tri / 2 - 3 * u), 0.62 * tri * 1.4, BANNER_BG, 800, align="center")
    draw_text(b, text, (x + tri + 10 * u, cy + 0.36 * size), size, BANNER_TEXT, 700)
