"""Drawing helpers every picture shares (the overlay and viewer, the evaluation's confusion matrix and ROC, the
soak's plot): anti-aliased text that fits, filled areas, rounded boxes.

Text goes through OpenCV's TrueType renderer (`cv2.FontFace`, OpenCV >= 5) and falls back to the Hershey fonts on
older OpenCV (the device may ship 4.x), with characters outside ASCII written plainly there; both are anti-aliased.
Sizes are in pixels (about 1.4x the height of a capital); colours are BGR.
"""
from __future__ import annotations

import cv2
import numpy as np

_FACE: list = []          # the cached cv2.FontFace, or None where this OpenCV has none
_ASCII = {"\u2014": "-", "\u2013": "-", "\u2265": ">=", "\u2264": "<=", "\u00b7": "-", "\u00d7": "x",
          "\u00b5": "u", "\u2026": "..."}


def _face():
    if not _FACE:
        try:
            _FACE.append(cv2.FontFace("sans"))
        except Exception:  # OpenCV 4.x: no TrueType renderer
            _FACE.append(None)
    return _FACE[0]


def _hershey(text: str, size: float, weight: int) -> tuple[str, float, int]:
    text = "".join(_ASCII.get(ch, ch if ord(ch) < 128 else "?") for ch in text)
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, max(1, int(round(0.72 * size))), 1)
    thickness = max(1, int(round(size * (0.09 if weight >= 600 else 0.055))))
    return text, scale, thickness


def text_width(text: str, size: float, weight: int = 400) -> int:
    """Width in pixels of `text` at font size `size` (pixels, about 1.4x the height of a capital)."""
    face = _face()
    if face is not None:
        return int(cv2.getTextSize((0, 0), text, (0, 0), face, int(round(size)), weight)[2])
    t, scale, thick = _hershey(text, size, weight)
    return int(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0])


def draw_text(img: np.ndarray, text: str, org: tuple[float, float], size: float, color, weight: int = 400,
              align: str = "left") -> int:
    """Anti-aliased text with its baseline at org[1]; `align` says whether org[0] is its left, centre or right.
    Returns the x just after the text."""
    w = text_width(text, size, weight)
    x = int(round(org[0] - {"left": 0, "center": w / 2, "right": w}[align]))
    y = int(round(org[1]))
    face = _face()
    if face is not None:
        cv2.putText(img, text, (x, y), tuple(int(c) for c in color), face, int(round(size)), weight)
    else:
        t, scale, thick = _hershey(text, size, weight)
        cv2.putText(img, t, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, tuple(int(c) for c in color), thick,
                    cv2.LINE_AA)
    return x + w


def fill(img: np.ndarray, colour) -> None:
    """Paint all of `img` (a view is painted in place); ~50x faster than numpy broadcasting a BGR tuple."""
    cv2.rectangle(img, (0, 0), (img.shape[1] - 1, img.shape[0] - 1), tuple(int(c) for c in colour), -1)


def fit_size(text: str, size: float, max_width: float, weight: int = 400, min_size: float = 8) -> float:
    """The largest font size <= `size` at which `text` fits in `max_width` pixels (never below `min_size`)."""
    w = text_width(text, size, weight)
    if w <= max_width or w == 0:
        return size
    return max(min_size, size * max_width / w * 0.98)


def wrap_text(text: str, size: float, max_width: float, weight: int = 400, max_lines: int = 6) -> list[str]:
    """Greedy word wrap to `max_width` pixels; a word longer than a line is cut; extra lines end in '...'."""
    lines: list[str] = []
    for word in text.split():
        while text_width(word, size, weight) > max_width and len(word) > 1:   # cut an over-long word
            k = len(word) - 1
            while k > 1 and text_width(word[:k], size, weight) > max_width:
                k -= 1
            if lines and not lines[-1]:
                lines[-1] = word[:k]
            else:
                lines.append(word[:k])
            lines.append("")
            word = word[k:]
        if lines and lines[-1] and text_width(lines[-1] + " " + word, size, weight) <= max_width:
            lines[-1] += " " + word
        elif lines and not lines[-1]:
            lines[-1] = word
        else:
            lines.append(word)
    lines = [ln for ln in lines if ln] or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and text_width(last + "...", size, weight) > max_width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines

def rounded_rect(img: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r: float, colour) -> None:
    """A filled box with corners rounded to radius `r` (anti-aliased corners)."""
    (x0, y0), (x1, y1) = (int(round(p0[0])), int(round(p0[1]))), (int(round(p1[0])), int(round(p1[1])))
    r = int(round(min(r, (x1 - x0) / 2, (y1 - y0) / 2)))
    cv2.rectangle(img, (x0 + r, y0), (x1 - r, y1), colour, -1)
    cv2.rectangle(img, (x0, y0 + r), (x1, y1 - r), colour, -1)
    for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
        cv2.circle(img, (cx, cy), r, colour, -1, cv2.LINE_AA)
