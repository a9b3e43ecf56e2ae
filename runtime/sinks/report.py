"""The study report: a study's timeline in bounded memory, and the one-page HTML report drawn from it.

`Timeline` keeps the per-frame course of a study (gate state, grade probabilities, their smoothed values) in at
most `capacity` bins of consecutive records: while the study fits, one bin is one frame; past that, neighbouring
bins merge pairwise and each bin covers twice as many frames. A study of any length therefore costs a fixed few
hundred kilobytes, and the plot never has more than `capacity` points per line.

`render_html(summary, timeline)` is the report: a self-contained page (inline CSS and SVG, no script, no external
asset) with the study grade and its confidence, the smoothed grade when smoothing is on, the frame counts, the
four grade probabilities over the study with the frames the gate rejected marked, the grade distribution, latency
percentiles, the model (its card's name, version, authors, intended use and references: the summary's `model`)
and the bundle's disclaimer (with the synthetic-data warning only for the phantom-trained demo's). It carries
no patient identifier: the source's opaque id is the only name in it, and it holds no date. Under the cards one
line gives the kidney's size: length and area in mm over the measured frames, and why others were not measured.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.bundle import CLASS_NAMES, DEMO_DISCLAIMER
from runtime.files import atomic_write
from runtime.sinks.overlay import DEFAULT_CLASS_NAMES

STATUSES = ("accepted", "rejected", "error", "dropped")
STATUS_ACCEPTED, STATUS_REJECTED, STATUS_ERROR, STATUS_DROPPED = range(4)   # indices into STATUSES

# Grade colours on white: the overlay's green-to-red scale (runtime/sinks/overlay.py GRADE_COLOURS), darkened to
# read as thin lines on paper.
GRADE_HEX = ("#2f9e5a", "#c49b00", "#e07a12", "#d13a3a")
STATUS_HEX = ("#5fb37c", "#f0a040", "#d9534f", "#b9bcc0")


def default_class_names(n: int) -> tuple[str, ...]:
    """The names shown for `n` classes when none are given: the IFTA ranges for 4, "grade 1".."grade n" otherwise."""
    return tuple(DEFAULT_CLASS_NAMES) if n == len(DEFAULT_CLASS_NAMES) else tuple(f"grade {g}" for g in range(1, n + 1))


def display_class_names(classes: Sequence[str] | None) -> tuple[str, ...]:
    """The class names the sinks show for a bundle's `classes`: the paper's four as the overlay writes them
    ("1: <25%", ...), any other names as the bundle gives them."""
    if classes is None or list(classes) == list(CLASS_NAMES):
        return tuple(DEFAULT_CLASS_NAMES)
    return tuple(str(c) for c in classes)


class Timeline:
    """A study's course in at most `capacity` bins (an even number) of consecutive records. `n_classes` None: set
    by `set_classes` before the first record with probabilities (the study summary learns it from that record)."""

    def __init__(self, n_classes: int | None = 4, capacity: int = 1024, smoothing: bool = False):
        if capacity < 2 or capacity % 2:
            raise ValueError(f"timeline capacity must be an even number >= 2, got {capacity}")
        self.n_classes = n_classes
        self.capacity = capacity
        self.smoothing = smoothing
        self.width = 1                     # records per bin
        self.bins = 0                      # bins in use
        self.records = 0
        self._fill = 0                     # records in the last bin
        self.first = np.zeros(capacity, np.int64)        # frame number of each bin's first record
        self.last = np.zeros(capacity, np.int64)         # ... and of its last
        self.status = np.zeros((capacity, len(STATUSES)), np.int64)   # records per gate state
        self.scored = np.zeros(capacity, np.int64)       # records with probabilities
        self.raw = self.smooth = None
        self.set_classes(n_classes)

    def set_classes(self, n_classes: int | None) -> None:
        """Size the probability sums for `n_classes` (None: not yet known; no record with probabilities so far)."""
        self.n_classes = n_classes
        n = n_classes or 0
        self.raw = np.zeros((self.capacity, n), np.float64)           # sum of probabilities
        self.smooth = np.zeros((self.capacity, n), np.float64) if self.smoothing else None

    def add(self, frame: int, status: int, probabilities: np.ndarray | None = None,
            smoothed: np.ndarray | None = None) -> None:
        if self.bins == 0 or self._fill == self.width:
            if self.bins == self.capacity:
                self._halve()
            self.bins += 1
            self._fill = 0
            self.first[self.bins - 1] = frame
        i = self.bins - 1
        self.last[i] = frame
        self.status[i, status] += 1
        self._fill += 1
        self.records += 1
        if probabilities is not None:
            self.scored[i] += 1
            self.raw[i] += probabilities
            if self.smooth is not None and smoothed is not None:
                self.smooth[i] += smoothed

    def _halve(self) -> None:
        """Merge bins pairwise: half as many, each twice as wide. Only called when all bins are full."""
        k = self.bins // 2
        self.first[:k] = self.first[0:self.bins:2]
        self.last[:k] = self.last[1:self.bins:2]
        for a in (self.status, self.scored, self.raw, self.smooth):
            if a is not None:
                a[:k] = a[0:self.bins:2] + a[1:self.bins:2]
                a[k:] = 0
        self.bins = k
        self.width *= 2
        self._fill = self.width

    def centres(self) -> np.ndarray:
        """The frame number at the middle of each bin."""
        return (self.first[:self.bins] + self.last[:self.bins]) / 2.0

    def mean(self, smoothed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(frame numbers, mean probabilities n x classes) of the bins with scored frames."""
        _, frames, probs = self.scored_bins(smoothed)
        return frames, probs

    def scored_bins(self, smoothed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin indices, frame numbers, mean probabilities n x classes) of the bins with scored frames."""
        src = self.smooth if smoothed else self.raw
        if src is None:
            raise ValueError("this timeline keeps no smoothed probabilities (smoothing is off)")
        idx = np.flatnonzero(self.scored[:self.bins] > 0)
        return idx, self.centres()[idx], src[idx] / self.scored[idx, None]


# -- the HTML report -------------------------------------------------------------------------------------------
def write_html(path: str | Path, text: str) -> None:
    """Write atomically: the report appears complete or not at all."""
    atomic_write(path, text)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _grade_label(name: str) -> str:
    """'3: 50-74%' -> '50-74%'."""
    return name.split(":", 1)[1].strip() if ":" in name else name


def _grade_text(name: str) -> str:
    """The study grade's caption: 'IFTA 50-74%' for the overlay's '3: 50-74%', a bundle's own name as it is."""
    label = _grade_label(name)
    return label if label.lower().startswith(("ifta", "grade")) or ":" not in name else f"IFTA {label}"


def _colour(i: int) -> str:
    return GRADE_HEX[i % len(GRADE_HEX)]


def _nice_step(span: float, target: int = 8) -> float:
    raw = max(span, 1e-9) / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return float(m * mag)
    return float(10 * mag)


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if abs(v - round(v)) > 1e-9 else str(int(round(v)))


def _plot_svg(tl: Timeline, class_names: Sequence[str], width: int = 760, height: int = 300) -> str:
    """The four grade probabilities over the study (frame number on x), the gate's state below as a strip."""
    ml, mr, mt = 46, 14, 12
    strip_h, gap, axis_h = 16, 8, 30
    ph = height - mt - strip_h - gap - axis_h           # plot area height
    pw = width - ml - mr
    n = tl.bins
    parts: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
                        f'height="{height}" role="img" aria-label="grade probabilities over the study" '
                        f'class="plot" font-family="inherit" font-size="11">']
    if n == 0:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#666">no frames</text></svg>')
        return "".join(parts)
    f0, f1 = float(tl.first[0]), float(tl.last[n - 1])
    if f1 <= f0:
        f0, f1 = f0 - 0.5, f1 + 0.5
    span = f1 - f0

    def x(f: np.ndarray | float) -> np.ndarray | float:
        return ml + (np.asarray(f, np.float64) - f0) / span * pw

    def y(p: np.ndarray | float) -> np.ndarray | float:
        return mt + (1.0 - np.asarray(p, np.float64)) * ph

    bin_l = x(tl.first[:n] - 0.5 * (tl.width > 1 or n > 1))
    bin_r = x(tl.last[:n] + 0.5 * (tl.width > 1 or n > 1))
    bin_l, bin_r = np.clip(bin_l, ml, ml + pw), np.clip(bin_r, ml, ml + pw)
    status = tl.status[:n]
    # Rejected or failed frames with nothing scored around them: shaded across the plot, and the lines break there.
    # Frames only dropped by the live policy are neither: they say nothing about the view.
    unscored = tl.scored[:n] == 0
    blocking = unscored & (status[:, STATUS_REJECTED] + status[:, STATUS_ERROR] > 0)
    blocked_before = np.cumsum(blocking)
    for a, b in _runs(unscored):
        if not blocking[a:b + 1].any():
            continue
        parts.append(f'<rect class="unscored" x="{bin_l[a]:.1f}" y="{mt}" width="{max(1.0, bin_r[b] - bin_l[a]):.1f}" '
                     f'height="{ph}" fill="#f3c892" fill-opacity="0.28"/>')
    # Grid and y axis.
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        yy = y(v)
        grid = "#999" if v == 0 else "#e2e2e2"
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{grid}" stroke-width="1"/>')
        parts.append(f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#555">{v:.2f}</text>')
    parts.append(f'<text x="12" y="{mt + ph / 2:.1f}" transform="rotate(-90 12 {mt + ph / 2:.1f})" '
                 f'text-anchor="middle" fill="#555">probability</text>')
    # X axis: frame numbers.
    step = _nice_step(span)
    t = math.ceil(f0 / step) * step
    axis_y = mt + ph + gap + strip_h
    while t <= f1 + 1e-9:
        xx = x(t)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{axis_y}" y2="{axis_y + 4}" stroke="#999"/>')
        parts.append(f'<text x="{xx:.1f}" y="{axis_y + 15}" text-anchor="middle" fill="#555">{_fmt(t)}</text>')
        t += step
    parts.append(f'<text x="{ml + pw}" y="{height - 1}" text-anchor="end" fill="#555">frame</text>')
    # Gate strip: the share of each bin's frames in each gate state, stacked (accepted at the bottom), so that
    # rejected frames stay visible however many frames a bin holds.
    sy = mt + ph + gap
    share = status / np.maximum(status.sum(axis=1, keepdims=True), 1)
    top = np.zeros(n)
    for code in (STATUS_DROPPED, STATUS_ERROR, STATUS_REJECTED, STATUS_ACCEPTED):   # from the strip's top down
        bottom = top + share[:, code]
        if share[:, code].any():
            upper = " ".join(f"{a:.1f},{sy + t * strip_h:.1f} {b:.1f},{sy + t * strip_h:.1f}"
                             for a, b, t in zip(bin_l, bin_r, top))
            lower = " ".join(f"{b:.1f},{sy + t * strip_h:.1f} {a:.1f},{sy + t * strip_h:.1f}"
                             for a, b, t in zip(bin_l[::-1], bin_r[::-1], bottom[::-1]))
            parts.append(f'<polygon class="gate-{STATUSES[code]}" points="{upper} {lower}" '
                         f'fill="{STATUS_HEX[code]}"/>')
        top = bottom
    parts.append(f'<text x="{ml - 6}" y="{sy + strip_h - 2}" text-anchor="end" fill="#555">gate</text>')
    # The probability lines, one path per grade, broken where no frame was scored: raw per frame (faint when the
    # smoothed ones are drawn too), then smoothed.
    idx, fx, raw = tl.scored_bins()
    starts = {0, *(np.flatnonzero(np.diff(blocked_before[idx]) > 0) + 1).tolist()}   # after rejected frames
    series = [("raw", raw)] + ([("smoothed", tl.mean(smoothed=True)[1])] if tl.smooth is not None else [])
    series = series if len(fx) else []
    px = x(fx)
    for kind, probs in series:
        faint = kind == "raw" and len(series) > 1
        for c in range(tl.n_classes or 0):
            py = y(probs[:, c])
            d = [f"{'M' if k in starts else 'L'}{a:.1f},{b:.1f}" for k, (a, b) in enumerate(zip(px, py))]
            parts.append(f'<path class="line" data-series="{kind}" data-class="{c + 1}" d="{" ".join(d)}" '
                         f'fill="none" stroke="{_colour(c)}" stroke-width="{0.9 if faint else 2.0}" '
                         f'stroke-opacity="{0.25 if faint else 0.95}" stroke-linejoin="round"/>')
            if len(fx) <= 40:                     # few points: mark each
                parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{1.8 if faint else 2.4}" fill="{_colour(c)}" '
                             f'fill-opacity="{0.25 if faint else 0.95}"/>' for a, b in zip(px, py))
    if not len(fx):
        parts.append(f'<text x="{ml + pw / 2}" y="{mt + ph / 2}" text-anchor="middle" fill="#8a5a00" font-size="14">'
                     f'no frame passed the quality gate</text>')
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
    parts.append("</svg>")
    return "".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True."""
    if not flags.any():
        return []
    d = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1))


def _bars_svg(counts: Sequence[int], class_names: Sequence[str], final: int | None, width: int = 360) -> str:
    """Grade distribution over the accepted frames: one horizontal bar per grade, count and share at its end."""
    row, top, label_w, value_w = 30, 6, 92, 104
    height = top + row * len(counts) + 4
    total = sum(counts)
    bw = width - label_w - value_w
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="grade distribution" class="bars" font-family="inherit" font-size="13">']
    for i, n in enumerate(counts):
        yy = top + i * row
        share = n / total if total else 0.0
        bold = ' font-weight="700"' if final == i + 1 else ""
        out.append(f'<text x="0" y="{yy + 17}" fill="#222"{bold}>{_e(class_names[i])}</text>')
        out.append(f'<rect x="{label_w}" y="{yy + 5}" width="{bw}" height="16" fill="#eef0f2" rx="2"/>')
        if n:
            out.append(f'<rect class="bar" data-class="{i + 1}" x="{label_w}" y="{yy + 5}" '
                       f'width="{max(1.5, share * bw):.1f}" height="16" fill="{_colour(i)}" rx="2"/>')
        out.append(f'<text x="{width}" y="{yy + 17}" text-anchor="end" fill="#222"{bold}>{n:,} '
                   f'<tspan fill="#666">({share:.0%})</tspan></text>')
    out.append("</svg>")
    return "".join(out)


_CSS = """
@page { size: A4; margin: 12mm; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d1f22; -webkit-print-color-adjust: exact; print-color-adjust: exact;
       font: 13px/1.4 "Helvetica Neue", Helvetica, Arial, "DejaVu Sans", sans-serif; }
.page { width: 820px; margin: 16px auto; background: #fff; padding: 22px 28px 18px; box-shadow: 0 1px 4px #0002; }
@media print { body { background: #fff; } .page { margin: 0; box-shadow: none; width: auto; padding: 0; } }
header { display: flex; flex-wrap: wrap; justify-content: space-between; align-items: baseline; gap: 2px 16px;
         border-bottom: 2px solid #1d1f22; padding-bottom: 6px; }
h1 { font-size: 20px; margin: 0; }
header .meta { color: #555; font-size: 12px; text-align: right; }
code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
.disclaimer { margin: 12px 0 14px; border: 2px solid #b07800; background: #fff3cd; color: #4a3300; border-radius: 4px;
              padding: 8px 12px; display: flex; gap: 12px; align-items: center; }
.disclaimer .icon { font-size: 26px; line-height: 1; }
.disclaimer b { font-size: 15px; text-transform: uppercase; letter-spacing: .03em; }
.cards { display: grid; gap: 12px; }
.cards.c3 { grid-template-columns: 1.1fr 1.1fr 1fr; }
.cards.c2 { grid-template-columns: 1.4fr 1fr; }
.card { border: 1px solid #d9dce0; border-radius: 6px; padding: 10px 14px; }
.card h2, section h2 { font-size: 11px; letter-spacing: .08em; text-transform: uppercase; color: #5a5f66;
                       margin: 0 0 4px; }
.grade { display: flex; align-items: center; gap: 12px; }
.grade .digit { font-size: 58px; font-weight: 800; line-height: 1; }
.grade .what { font-size: 16px; font-weight: 700; }
.grade .conf { color: #444; }
.none { font-size: 16px; font-weight: 700; color: #8a5a00; padding: 12px 0; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
td, th { padding: 3px 6px; text-align: right; border-bottom: 1px solid #eceef0; }
td:first-child, th:first-child { text-align: left; padding-left: 0; }
th { color: #5a5f66; font-weight: 600; font-size: 12px; }
tr.total td { font-weight: 700; border-top: 1px solid #999; }
section { margin-top: 16px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; color: #333; font-size: 12px; margin: 2px 0 4px; }
.legend span { display: inline-flex; align-items: center; gap: 5px; }
.legend i { display: inline-block; width: 16px; height: 3px; border-radius: 2px; }
.legend i.box { height: 10px; width: 12px; }
.legend .sep { width: 10px; }
.cols { display: grid; grid-template-columns: 1.05fr 1fr; gap: 22px; }
.swatch { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 5px; }
footer { margin-top: 16px; border-top: 1px solid #d9dce0; padding-top: 8px; color: #555; font-size: 11px; }
footer p { margin: 3px 0; }
"""


def _size_line(summary: dict[str, Any], accepted: int) -> str:
    """The report's kidney-size line: median (p10-p90) length and area over the measured frames, and why the others
    were not measured (the summary's `kidney_length_mm`, `kidney_area_mm2`, `kidney_size`: runtime/measure.py)."""
    size = summary.get("kidney_size")
    if not size or not accepted:
        return '<p class="size" id="kidney-size"><b>Kidney size:</b> no accepted frame to measure.</p>'
    parts = []
    n, length, area = size.get("measured", 0), summary.get("kidney_length_mm"), summary.get("kidney_area_mm2")
    if n and length and area:
        parts.append(f'length {length["median"]:.1f} mm (p10&ndash;p90 {length["p10"]:.1f}&ndash;{length["p90"]:.1f}),'
                     f' area {area["median"]:,.0f} mm&sup2; (p10&ndash;p90 {area["p10"]:,.0f}&ndash;'
                     f'{area["p90"]:,.0f}), median over {n:,} of {accepted:,} accepted frames')
    else:
        parts.append("not measured on any accepted frame")
    reasons = size.get("not_measured_reasons") or {}
    if reasons:
        parts.append("not measured: " + "; ".join(
            f'{_e(str(k).removeprefix("not measured: "))} ({v:,})' for k, v in reasons.items()))
    return f'<p class="size" id="kidney-size"><b>Kidney size:</b> {" &middot; ".join(parts)}.</p>'


def render_html(summary: dict[str, Any], timeline: Timeline, class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
                title: str = "Kidney ultrasound study \u2014 IFTA grade") -> str:
    """The one-page report of a study: `summary` is StudySummary.summary(), `timeline` its Timeline."""
    n_classes = timeline.n_classes or 0
    names = list(class_names)[:n_classes]
    names += [f"{i + 1}" for i in range(len(names), n_classes)]
    disclaimer = summary.get("disclaimer")
    final, conf = summary.get("final_grade"), summary.get("confidence")
    smoothing = summary.get("smoothing")
    frames = summary.get("frames", 0)

    def grade_card(heading: str, grade: int | None, confidence: float | None, note: str) -> str:
        if grade is None:
            why = summary.get("no_grade_reason") or "no frame passed the quality gate"
            return (f'<div class="card"><h2>{_e(heading)}</h2><div class="none">no grade</div>'
                    f'<div class="conf" id="no-grade-reason">{_e(why)}</div></div>')
        return (f'<div class="card"><h2>{_e(heading)}</h2><div class="grade">'
                f'<div class="digit" style="color:{_colour(grade - 1)}">{grade}</div>'
                f'<div><div class="what">{_e(_grade_text(names[grade - 1]))}</div>'
                f'<div class="conf">confidence {confidence:.2f}</div><div class="conf">{_e(note)}</div></div>'
                f'</div></div>')

    cards = [grade_card("Study grade", final, conf, f"mean over {summary.get('accepted', 0):,} accepted frames")]
    if smoothing:
        cards.append(grade_card("Smoothed grade", smoothing.get("final_grade"), smoothing.get("confidence"),
                                f"EMA, half-life {_fmt(smoothing['half_life_frames'])} accepted frames, at study end"))

    def pct(n: int) -> str:
        return f"{n / frames:.0%}" if frames else "-"

    counts_rows = "".join(
        f'<tr><td><span class="swatch" style="background:{STATUS_HEX[i]}"></span>{label}</td>'
        f'<td>{summary.get(key, 0):,}</td><td>{pct(summary.get(key, 0))}</td></tr>'
        for i, (key, label) in enumerate((("accepted", "accepted"), ("rejected", "not graded (gates)"),
                                          ("errors", "errors"), ("dropped", "dropped (live)"))))
    refused = {why: n for why, n in (summary.get("refused_counts") or {}).items() if n}
    refused_rows = "".join(f'<tr class="why"><td>&nbsp;&nbsp;{_e(why)}</td><td>{n:,}</td><td>{pct(n)}</td></tr>'
                           for why, n in refused.items())
    cards.append(f'<div class="card"><h2>Frames</h2><table>{counts_rows}'
                 f'<tr class="total"><td>total</td><td>{frames:,}</td><td></td></tr></table>'
                 + (f'<table id="refused"><tr><th>not graded, by reason</th><th></th><th></th></tr>{refused_rows}'
                    f'</table>' if refused else '') + '</div>')

    legend = "".join(f'<span><i style="background:{_colour(i)}"></i>{_e(n)}</span>' for i, n in enumerate(names))
    legend += '<span class="sep"></span>'
    legend += "".join(f'<span><i class="box" style="background:{STATUS_HEX[i]}"></i>{s}</span>'
                      for i, s in enumerate(STATUSES))
    if smoothing:
        legend += ('<span class="sep"></span><span>thin: per frame &middot; bold: smoothed</span>')
    if timeline.width > 1:
        legend += (f'<span class="sep"></span><span>each point: mean of {timeline.width} consecutive frames</span>')

    mean_probs = summary.get("mean_probabilities")
    counts = [summary.get("grade_counts", {}).get(str(i + 1), 0) for i in range(n_classes)]
    mean_rows = "".join(
        f'<tr><td><span class="swatch" style="background:{_colour(i)}"></span>{_e(n)}</td>'
        f'<td>{"-" if mean_probs is None else f"{mean_probs[i]:.3f}"}</td>'
        + (f'<td>{smoothing["probabilities"][i]:.3f}</td>' if smoothing and smoothing.get("probabilities") else
           ('<td>-</td>' if smoothing else '')) + '</tr>'
        for i, n in enumerate(names))
    mean_head = '<tr><th>grade</th><th>mean p</th>' + ('<th>smoothed p (end)</th>' if smoothing else '') + '</tr>'

    latency = summary.get("latency_ms") or {}
    lat_rows = "".join(
        f'<tr{" class=total" if s == "total" else ""}><td>{_e(s)}</td><td>{v["p50"]:.1f}</td><td>{v["p95"]:.1f}</td>'
        f'<td>{v["p99"]:.1f}</td><td>{v["max"]:.1f}</td></tr>' for s, v in latency.items())
    lat_table = (f'<table><tr><th>stage (ms)</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>{lat_rows}'
                 f'</table>' if lat_rows else '<p>no timings</p>')

    fr = summary.get("frame_range")
    model = summary.get("model") or {}
    model_name = " ".join(str(model[k]) for k in ("name", "version") if model.get(k))
    meta = ([f'model <b>{_e(model_name)}</b>'] if model_name else []) + [
        f'source <code>{_e(summary.get("source_id") or "-")}</code>']
    if fr:
        meta.append(f"frames {fr[0]}&ndash;{fr[1]}")
    if summary.get("duration_s") is not None:
        meta.append(_duration(summary["duration_s"]))
    agreement = summary.get("final_grade_agreement")

    banner = ""
    if disclaimer:
        synthetic = ('<br>The grades in this report were made by a model trained on synthetic images. They are not '
                     'a diagnosis and must not guide care.' if disclaimer == DEMO_DISCLAIMER else '')
        banner = (f'<div class="disclaimer" role="alert"><span class="icon">&#9888;</span><div><b>{_e(disclaimer)}</b>'
                  f'{synthetic}</div></div>')
    model_lines = []
    if model_name:
        authors = ", ".join(map(str, model.get("authors") or []))
        model_lines.append(f'<p>Model: <b>{_e(model_name)}</b>' + (f' &middot; {_e(authors)}' if authors else '')
                           + (f' &middot; licence {_e(model["license"])}' if model.get("license") else '') + '</p>')
        if model.get("intended_use"):
            model_lines.append(f'<p>Intended use: {_e(model["intended_use"])}</p>')
        if model.get("references"):
            model_lines.append('<p>References: ' + "; ".join(_e(str(r)) for r in model["references"]) + '</p>')
    method = ("Study grade: the grade with the highest probability averaged over the frames that passed the quality "
              "gate and the scope gate (a kidney view like the training frames); its confidence is that mean "
              "probability.")
    if agreement is not None:
        method += f" {agreement:.0%} of the accepted frames were graded {final} on their own."
    if smoothing:
        method += (f" Smoothed grade: exponential moving average of the probabilities over accepted frames "
                   f"(half-life {_fmt(smoothing['half_life_frames'])} frames), read at the last accepted frame.")

    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<div class="page">
<header><h1>{_e(title)}</h1><div class="meta">{" &middot; ".join(meta)}</div></header>
{banner}
<div class="cards c{len(cards)}">{"".join(cards)}</div>
{_size_line(summary, summary.get("accepted", 0))}
<section>
<h2>Grade probabilities over the study</h2>
<div class="legend">{legend}</div>
{_plot_svg(timeline, names)}
</section>
<div class="cols">
<section><h2>Grade distribution (accepted frames)</h2>
{_bars_svg(counts, names, final)}
<table style="margin-top:8px">{mean_head}{mean_rows}</table>
</section>
<section><h2>Latency</h2>{lat_table}</section>
</div>
<footer>
<p>{_e(method)}</p>
{"".join(model_lines)}
<p>This report holds no patient identifier: the source's opaque id is its only name, and it holds no date.</p>
{f'<p><b>{_e(disclaimer)}</b></p>' if disclaimer else ''}
<p>sonoscore</p>
</footer>
</div>
</body>
</html>
"""
