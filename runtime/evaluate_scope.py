"""`sonoscore eval`'s scope figures (runtime.scope, docs/scope.md): how many in-scope kidney frames the scope check
keeps, how many out-of-scope frames (`--out-of-scope DIR`) it refuses and for what reason, and a picture of each
test's scores on both.

Evaluation runs the pipeline with the scope gate open (`open_pipeline(scope_open=True)`): every test runs on every
frame the mask gate accepts and each frame is graded, so one pass gives the figures with the check and without it.
The decision the closed gate would take is `closed_reason`: the tests before the VGG (picture, mask shape,
outline) in their order, then the view test, as `Graph.run` checks them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime import scope as sc
from runtime.drawing import draw_text, fill, fit_size

# The order the closed scope gate refuses in (Graph.run: the tests that need no features first, then the view).
CLOSED_ORDER = ("ultrasound", "kidney", "outline", "view")


def closed_reason(scope: dict[str, Any] | None) -> str | None:
    """The reason the closed scope gate gives a frame, from its verdict as recorded under the open gate
    (`Verdict.record()`: scores, None for a non-finite one); None when it keeps the frame or was not checked."""
    if not scope:
        return None
    scores = scope.get("scores") or {}
    for test in CLOSED_ORDER:
        if test in scores and not (scores[test] is not None and scores[test] <= 1.0):
            return sc.TESTS[test]
    return None


@dataclass
class Tally:
    """Frames through the open scope gate: what the closed gate would refuse, and each test's scores."""
    frames: int = 0
    errors: int = 0
    mask_gate_refused: int = 0
    checked: int = 0                                   # the mask gate accepted them: the scope check ran
    refused: dict[str, int] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in sc.TESTS})

    def add(self, rec) -> str | None:
        """Count one record; returns the closed gate's refusal (`no kidney` for the mask gate) or None."""
        self.frames += 1
        if rec.error:
            self.errors += 1
            return None
        if not rec.accepted:
            self.mask_gate_refused += 1
            return sc.NO_KIDNEY
        if rec.scope is None:
            return None
        self.checked += 1
        for t, v in (rec.scope.get("scores") or {}).items():
            self.scores.setdefault(t, []).append(math.inf if v is None else float(v))
        reason = closed_reason(rec.scope)
        if reason is not None:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        return reason

    @property
    def scope_refused(self) -> int:
        return sum(self.refused.values())

    def by_reason(self) -> dict[str, int]:
        return {r: self.refused[r] for r in sc.REASONS if r in self.refused}


def out_of_scope(pipe, spec: str, *, say=None) -> tuple[dict[str, Any], Tally]:
    """Every frame of `spec` (images, DICOM, videos, a folder at any depth) through the pipeline: the share refused
    (by the mask gate or the scope check) and graded, with and without the scope check, and the refusals by reason."""
    from runtime.errors import UserError
    from runtime.sources import SourceError, open_source
    try:
        source = open_source(str(spec), realtime=False)
    except SourceError as e:
        raise UserError(f"--out-of-scope: {e}") from None
    tally = Tally()
    with source:
        for frame in source:
            tally.add(pipe.process(frame))
            if say and tally.frames % 50 == 0:
                say(f"  out-of-scope: {tally.frames} frames")
    n = tally.frames - tally.errors
    graded_before = n - tally.mask_gate_refused
    graded = graded_before - tally.scope_refused
    share = (lambda k: round(k / n, 4) if n else None)
    out = {"source": str(spec), "frames": tally.frames, "errors": tally.errors,
           "refused": n - graded, "refused_share": share(n - graded), "graded": graded, "graded_share": share(graded),
           "refused_by_mask_gate": tally.mask_gate_refused, "refused_by_reason": tally.by_reason(),
           "without_scope": {"graded": graded_before, "graded_share": share(graded_before)}}
    return out, tally


# -- the picture ---------------------------------------------------------------------------------------------------
WHITE, INK, GREY, GRID = (255, 255, 255), (40, 40, 40), (120, 120, 120), (225, 225, 225)
IN_COLOUR, OUT_COLOUR, LIMIT_COLOUR = (180, 119, 31), (14, 127, 255), (40, 40, 215)      # BGR
LO, HI, BINS = 1e-2, 1e2, 40          # scores on a log axis from 0.01 to 100 (beyond: the end bins)


def scores_png(inside: dict[str, list[float]], outside: dict[str, list[float]] | None, path: Path | str,
               title: str) -> Path:
    """One histogram per test (ultrasound, kidney, view, outline) of the scores of the in-scope frames (blue) and
    the out-of-scope frames the mask gate accepted (orange), on a log axis, each normalised to its own count, with
    the limit (score 1) marked. Scores at or below 0.01 fall in the first bin, above 100 (and inf) in the last."""
    tests = list(sc.TESTS)
    pw, ph, left, top, gap = 520, 170, 60, 112, 64
    W = left + pw + 30
    H = top + len(tests) * (ph + gap) + 20
    img = np.empty((H, W, 3), np.uint8)
    fill(img, WHITE)
    draw_text(img, title, (W / 2, 34), fit_size(title, 20, W - 30, 700), INK, 700, align="center")
    n_in = max((len(v) for v in inside.values()), default=0)
    n_out = max((len(v) for v in (outside or {}).values()), default=0)
    keys = [(f"in-scope kidney frames ({n_in})", IN_COLOUR)]
    if outside is not None:
        keys.append((f"out-of-scope frames ({n_out})", OUT_COLOUR))
    x = left
    for text, colour in keys:
        cv2.rectangle(img, (x, 52), (x + 14, 66), colour, -1)
        x = draw_text(img, text, (x + 20, 65), 14, INK) + 24
    edges = np.linspace(math.log10(LO), math.log10(HI), BINS + 1)

    def x_of(v: float) -> int:
        return int(round(left + (math.log10(v) - edges[0]) / (edges[-1] - edges[0]) * pw))

    for k, test in enumerate(tests):
        y0 = top + k * (ph + gap)
        cv2.rectangle(img, (left, y0), (left + pw, y0 + ph), GRID, 1)
        name = f"{test}: {sc.TESTS[test]}"
        draw_text(img, name, (left, y0 - 10), fit_size(name, 15, pw, 600), INK, 600)
        hists = []
        for values, colour in ((inside.get(test, []), IN_COLOUR), ((outside or {}).get(test, []), OUT_COLOUR)):
            v = np.asarray(values, np.float64)
            if v.size == 0:
                continue
            logs = np.log10(np.clip(np.nan_to_num(v, nan=HI, posinf=HI), LO, HI * 0.999))
            h = np.histogram(logs, edges)[0] / v.size
            hists.append((h, colour))
        top_share = max([float(h.max()) for h, _ in hists] + [1e-9])
        bw = pw / BINS
        for h, colour in hists:
            overlay = img.copy()
            for b, share in enumerate(h):
                if share <= 0:
                    continue
                bh = int(round(share / top_share * (ph - 8)))
                cv2.rectangle(overlay, (int(left + b * bw) + 1, y0 + ph - bh), (int(left + (b + 1) * bw) - 1, y0 + ph),
                              colour, -1)
            cv2.addWeighted(overlay, 0.55, img, 0.45, 0, img)
        xl = x_of(1.0)
        cv2.line(img, (xl, y0), (xl, y0 + ph), LIMIT_COLOUR, 2)
        draw_text(img, "limit", (xl + 4, y0 + 14), 12, LIMIT_COLOUR, 600)
        for v in (0.01, 0.1, 1, 10, 100):
            draw_text(img, f"{v:g}", (x_of(v), y0 + ph + 16), 12, GREY, align="center")
        draw_text(img, f"{top_share:.0%}", (left - 6, y0 + 14), 11, GREY, align="right")
    draw_text(img, "score (refused above 1; log scale; bars: share of each set's frames)", (W / 2, H - 10), 13, GREY,
              align="center")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write picture {path}: check that the folder is writable")
    return path
