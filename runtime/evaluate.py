"""Evaluation metrics (kidney IoU, grade classification report) and their pictures (confusion matrix, latency
distribution), drawn with OpenCV so the device needs no plotting library.

Conventions, as in the paper: classes are 0-based indices (grade - 1); confusion-matrix rows are the true class,
columns the predicted one; per-class "accuracy" is that class's recall (the paper's per-grade accuracy).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from runtime.drawing import draw_text, fill, fit_size, text_width


# -- metrics ---------------------------------------------------------------------------------------------------
def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two binary masks (any value > 0 is foreground). Both empty -> 1.0: a model
    that finds no kidney where there is none is exactly right."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: prediction {p.shape}, truth {t.shape}; compare like with like")
    union = int(np.count_nonzero(p | t))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & t)) / union


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = 4) -> np.ndarray:
    """n x n counts; rows = true class, columns = predicted class (0-based class indices)."""
    yt, yp = _labels(y_true, y_pred, n_classes)
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (yt, yp), 1)
    return cm


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = 4,
                          class_names: Sequence[str] | None = None) -> dict:
    """Accuracy, macro precision/recall/F1, the confusion matrix and per-class figures.

    Zero division is defined as 0.0: precision of a class never predicted, recall of a class with no true
    sample, and F1 where precision + recall = 0. Macro averages are the unweighted mean over the classes that
    occur in `y_true` or `y_pred` (scikit-learn's default), so a class absent from both does not count as a
    zero; `f1_macro` is the mean of the per-class F1s (not the F1 of the macro precision and recall).
    `per_class` lists every class, keyed by `class_names` (default "1".."n", the grades); its `accuracy` is
    the class's recall, the paper's per-grade accuracy.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    names = list(class_names) if class_names is not None else [str(i + 1) for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names given for {n_classes} classes")
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (predicted + support) > 0
    n = int(cm.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "confusion_matrix": cm.tolist(),
        "per_class": {names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(support[i]), "accuracy": float(recall[i])}
                      for i in range(n_classes)},
    }


def _labels(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    yt, yp = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if yt.shape != yp.shape:
        raise ValueError(f"{yt.size} true labels but {yp.size} predictions; they must pair up")
    if yt.size == 0:
        raise ValueError("no labels to evaluate")
    for name, y in (("true", yt), ("predicted", yp)):
        if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"{name} labels must be class indices, got {y.dtype} values")
        if y.min() < 0 or y.max() >= n_classes:
            raise ValueError(f"{name} labels must be class indices 0..{n_classes - 1} (grade - 1), "
                             f"got values from {y.min()} to {y.max()}")
    return yt.astype(np.int64), yp.astype(np.int64)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.zeros_like(a)
    np.divide(a, b, out=out, where=b > 0)
    return out


# -- pictures --------------------------------------------------------------------------------------------------
WHITE = (255, 255, 255)
INK = (40, 40, 40)
GREY = (120, 120, 120)
GRID = (225, 225, 225)
# matplotlib's "Blues" ramp (RGB anchors), light -> dark.
_BLUES = np.array([(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)], np.float64)


def _blue(t: float) -> tuple[int, int, int]:
    """BGR colour of a fraction t in [0, 1] on the Blues ramp."""
    x = float(np.clip(t, 0, 1)) * (len(_BLUES) - 1)
    i = min(int(x), len(_BLUES) - 2)
    rgb = _BLUES[i] + (x - i) * (_BLUES[i + 1] - _BLUES[i])
    return int(round(rgb[2])), int(round(rgb[1])), int(round(rgb[0]))


def _vertical_text(img: np.ndarray, text: str, centre: tuple[float, float], size: float, color, weight=400) -> None:
    """Text rotated 90 degrees counter-clockwise (reads bottom to top), centred on `centre`."""
    w = text_width(text, size, weight) + 4
    h = int(round(size * 1.4))
    strip = np.empty((h, w, 3), np.uint8)
    strip[:] = img[int(centre[1]), int(centre[0])]         # the local background
    draw_text(strip, text, (2, 0.78 * h), size, color, weight)
    rot = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    x0, y0 = int(round(centre[0] - rot.shape[1] / 2)), int(round(centre[1] - rot.shape[0] / 2))
    img[y0:y0 + rot.shape[0], x0:x0 + rot.shape[1]] = rot


def _write_png(img: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write picture {path}: check that the folder is writable and the name ends in .png")
    return path


def confusion_png(cm, path: str | Path, class_names: Sequence[str], title: str) -> Path:
    """The confusion matrix as a picture (as the paper's Figure 5): each cell shows its count and its share of
    the true class's row, shaded by that share; rows = true grade, columns = predicted grade."""
    cm = np.asarray(cm, np.int64)
    n = cm.shape[0]
    if cm.ndim != 2 or cm.shape[1] != n or len(class_names) != n:
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    row = cm.sum(axis=1, keepdims=True)
    frac = _safe_div(cm, np.broadcast_to(row, cm.shape))
    cell = 116 if n <= 5 else max(48, 560 // n)
    tick = 14 if n <= 5 else 12
    tick_w = max(text_width(c, 16) for c in class_names)
    left = 40 + tick_w + 16                          # rotated axis label, tick labels
    top = 96
    grid = cell * n
    bar_x = left + grid + 34
    W = bar_x + 18 + 12 + text_width("100%", tick) + 28
    H = top + grid + 90
    img = np.empty((H, W, 3), np.uint8)
    fill(img, WHITE)

    total = int(cm.sum())
    acc = float(np.trace(cm) / total) if total else 0.0
    draw_text(img, title, (W / 2, 36), fit_size(title, 22, W - 30, 700), INK, 700, align="center")
    sub = f"n = {total}, accuracy {acc:.2f}; shading = share of the true grade's row"
    draw_text(img, sub, (W / 2, 62), fit_size(sub, 14, W - 30), GREY, align="center")

    for i in range(n):
        for j in range(n):
            x0, y0 = left + j * cell, top + i * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), _blue(frac[i, j]), -1)
            ink = WHITE if frac[i, j] > 0.5 else INK
            cx, cy = x0 + cell / 2, y0 + cell / 2
            draw_text(img, str(int(cm[i, j])), (cx, cy + 4), 30 if n <= 5 else 18, ink, 700, align="center")
            if n <= 5:
                draw_text(img, f"{frac[i, j]:.0%}" if row[i, 0] else "-", (cx, cy + 28), 15, ink, align="center")
    for k in range(n + 1):                            # cell borders
        cv2.line(img, (left + k * cell, top), (left + k * cell, top + grid), WHITE, 2)
        cv2.line(img, (left, top + k * cell), (left + grid, top + k * cell), WHITE, 2)
    for k, name in enumerate(class_names):            # tick labels
        draw_text(img, name, (left - 10, top + k * cell + cell / 2 + 6), 16, INK, align="right")
        draw_text(img, name, (left + k * cell + cell / 2, top + grid + 26), 16, INK, align="center")
    draw_text(img, "predicted grade", (left + grid / 2, top + grid + 62), 18, INK, 700, align="center")
    _vertical_text(img, "true grade", (20, top + grid / 2), 18, INK, 700)

    # Colour bar: row share 0..100 %.
    for y in range(grid):
        cv2.line(img, (bar_x, top + y), (bar_x + 18, top + y), _blue(1 - y / (grid - 1)), 1)
    cv2.rectangle(img, (bar_x, top), (bar_x + 18, top + grid), GRID, 1)
    for t in (0.0, 0.5, 1.0):
        y = top + (1 - t) * grid
        cv2.line(img, (bar_x + 18, int(y)), (bar_x + 23, int(y)), GREY, 1)
        draw_text(img, f"{t:.0%}", (bar_x + 27, y + 5), tick, GREY)
    return _write_png(img, path)


# Marker colours of the latency picture, BGR.
_P50, _P95, _P99 = (40, 40, 40), (0, 140, 255), (40, 40, 215)
_DOTS, _BOX = (214, 170, 120), (240, 214, 186)


def latency_png(samples_by_stage: dict[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """Latency distribution per stage on a log-ms axis: every sample as a dot, the interquartile box, whiskers
    from min to max, and p50 (bar), p95 and p99 (coloured marks), with their values printed on the right."""
    stages = list(samples_by_stage)
    data = {s: np.asarray(samples_by_stage[s], np.float64).ravel() for s in stages}
    data = {s: v[np.isfinite(v)] for s, v in data.items()}
    positive = np.concatenate([v[v > 0] for v in data.values()] + [np.empty(0)])
    if positive.size:
        lo = 10.0 ** np.floor(np.log10(positive.min()))
        hi = 10.0 ** np.ceil(np.log10(positive.max()))
        if hi / lo < 10:
            hi = lo * 10
    else:
        lo, hi = 0.01, 100.0
    label_w = max([text_width(s, 16, 600) for s in stages] + [60])
    left, right_text = 28 + label_w + 18, 330
    plot_w = 640
    row_h, top = 64, 92
    W = left + plot_w + 24 + right_text
    H = top + row_h * max(1, len(stages)) + 100
    img = np.empty((H, W, 3), np.uint8)
    fill(img, WHITE)
    rng = np.random.default_rng(0)

    def x_of(v):
        v = np.clip(np.asarray(v, np.float64), lo, hi)
        return left + (np.log10(v) - np.log10(lo)) / (np.log10(hi) - np.log10(lo)) * plot_w

    draw_text(img, title, (W / 2, 36), fit_size(title, 22, W - 30, 700), INK, 700, align="center")
    n_max = max([v.size for v in data.values()] + [0])
    sub = f"{n_max} samples per stage; log scale"
    draw_text(img, sub, (W / 2, 62), 14, GREY, align="center")

    # Grid: decades with labels, 2..9 minor lines.
    bottom = top + row_h * max(1, len(stages))
    d = int(round(np.log10(lo)))
    while 10.0 ** d <= hi * 1.0001:
        for m in range(1, 10):
            v = m * 10.0 ** d
            if lo <= v <= hi * 1.0001:
                x = int(round(float(x_of(v))))
                cv2.line(img, (x, top - 6), (x, bottom), GRID if m > 1 else (200, 200, 200), 1)
                if m == 1 or (hi / lo <= 100 and m in (2, 5)):
                    draw_text(img, f"{v:g}", (x, bottom + 22), 14, INK if m == 1 else GREY, align="center")
        d += 1
    draw_text(img, "latency per frame (ms)", (left + plot_w / 2, bottom + 50), 16, INK, 600, align="center")

    draw_text(img, "p50", (left + plot_w + 24 + 60, top - 12), 14, _P50, 700, align="right")
    draw_text(img, "p95", (left + plot_w + 24 + 150, top - 12), 14, _P95, 700, align="right")
    draw_text(img, "p99", (left + plot_w + 24 + 240, top - 12), 14, _P99, 700, align="right")
    draw_text(img, "max", (left + plot_w + 24 + 320, top - 12), 14, GREY, 700, align="right")
    for k, s in enumerate(stages):
        v = data[s]
        cy = top + k * row_h + row_h / 2
        bold = s == "total"
        if bold and k > 0:
            cv2.line(img, (16, int(top + k * row_h)), (W - 16, int(top + k * row_h)), (190, 190, 190), 1)
        draw_text(img, s, (left - 18, cy + 6), 16, INK, 700 if bold else 500, align="right")
        if v.size == 0:
            draw_text(img, "no samples", (left + 10, cy + 6), 14, GREY)
            continue
        p25, p50, p75, p95, p99 = np.percentile(v, [25, 50, 75, 95, 99])
        show = v if v.size <= 3000 else rng.choice(v, 3000, replace=False)
        xs = x_of(show)
        ys = cy + rng.uniform(-row_h * 0.28, row_h * 0.28, show.size)
        for x, y in zip(xs, ys):
            cv2.circle(img, (int(round(x * 4)), int(round(y * 4))), 6, _DOTS, -1, cv2.LINE_AA, shift=2)
        bh = row_h * 0.22
        xmin, xmax = float(x_of(v.min())), float(x_of(v.max()))
        cv2.line(img, (int(xmin), int(cy)), (int(xmax), int(cy)), GREY, 1, cv2.LINE_AA)
        for xe in (xmin, xmax):
            cv2.line(img, (int(xe), int(cy - bh / 2)), (int(xe), int(cy + bh / 2)), GREY, 1, cv2.LINE_AA)
        b0, b1 = int(round(float(x_of(p25)))), int(round(float(x_of(p75))))
        cv2.rectangle(img, (b0, int(cy - bh)), (max(b1, b0 + 1), int(cy + bh)), _BOX, -1)
        cv2.rectangle(img, (b0, int(cy - bh)), (max(b1, b0 + 1), int(cy + bh)), (150, 120, 90), 1)
        xm = int(round(float(x_of(p50))))
        cv2.line(img, (xm, int(cy - bh - 3)), (xm, int(cy + bh + 3)), _P50, 2)
        for pv, colour in ((p95, _P95), (p99, _P99)):
            x = float(x_of(pv))
            tri = np.array([[x - 6, cy - bh - 12], [x + 6, cy - bh - 12], [x, cy - bh - 2]])
            cv2.fillPoly(img, [np.round(tri * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
        tx = left + plot_w + 24
        for off, val, colour in ((60, p50, _P50), (150, p95, _P95), (240, p99, _P99), (320, v.max(), GREY)):
            draw_text(img, _ms(val), (tx + off, cy + 6), 15, colour, 700 if bold else 400, align="right")

    # Legend.
    ly = H - 16
    x = 24
    cv2.rectangle(img, (x, ly - 12), (x + 24, ly), _BOX, -1)
    cv2.rectangle(img, (x, ly - 12), (x + 24, ly), (150, 120, 90), 1)
    x = draw_text(img, "p25-p75", (x + 32, ly), 14, GREY) + 24
    cv2.line(img, (x, ly - 6), (x + 24, ly - 6), GREY, 1)
    x = draw_text(img, "min-max", (x + 32, ly), 14, GREY) + 24
    cv2.line(img, (x + 4, ly - 14), (x + 4, ly + 2), _P50, 3)
    x = draw_text(img, "p50", (x + 14, ly), 14, GREY) + 24
    for name, colour in (("p95", _P95), ("p99", _P99)):
        tri = np.array([[x, ly - 12], [x + 12, ly - 12], [x + 6, ly - 2]])
        cv2.fillPoly(img, [np.round(tri * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
        x = draw_text(img, name, (x + 18, ly), 14, GREY) + 24
    cv2.circle(img, (x + 6, ly - 6), 3, _DOTS, -1, cv2.LINE_AA)
    draw_text(img, "one frame", (x + 16, ly), 14, GREY)
    return _write_png(img, path)


def _ms(v: float) -> str:
    """A latency in ms to about 3 significant figures, trailing zeros kept so columns line up."""
    for limit, fmt in ((0.01, "{:.4f}"), (1, "{:.3f}"), (10, "{:.2f}"), (100, "{:.1f}")):
        if v < limit:
            return fmt.format(v)
    return f"{v:.0f}"


# -- `sonoscore eval` ------------------------------------------------------------------------------------------
def evaluate_bundle(bundle_path, data_dir, *, precision="fp32", backend="ort", report=None, quiet=False,
                    cache_dir=None, labels=None, out_of_scope=None) -> dict:
    """`sonoscore eval`: kidney IoU, gate agreement and grade metrics on a labelme dataset, through the deployed
    pipeline. Each labelled mask is cut and scaled exactly like its image (the region the pipeline used), and the
    graph's kidney rule (`Graph.is_kidney`: the labelled mask passes the gate) says whether it shows a kidney; a frame is graded when both the label and the
    pipeline say it does and it has a labelled grade.

    `labels`: which labelme labels are the kidney (runtime.labelme.LabelMap.of; None: the default variants). An
    image whose kidney annotation is missing (runtime.labelme: no labelme file, or no kidney shape with an area)
    has no known mask: it is left out of the IoU and the gate agreement, named in the report
    (`kidney_missing_images`) and counted on the terminal; it is graded when the pipeline's gate passes it and it
    has a grade (`graded_without_outline` counts those). The dataset's annotation report (runtime.labelme,
    `LabelledDataset.report`: labels not mapped, shapes ignored, where grades came from) is printed as one line
    and merged into the report JSON.

    The scope gate (runtime.scope, docs/scope.md): the pipeline runs with it open, so every frame the mask gate
    accepts is checked and graded, and the figures are given both ways (runtime.evaluate_scope). The report's
    `graded_frames`, `graded_share` (of `kidney_outlined`, the images with a kidney outline) and the grade
    metrics are the bundle's as deployed: with the check where the bundle has a reference; `without_scope` has
    them without it; `in_scope_kept` is the share of the labelled kidneys the mask gate accepted that the check
    keeps, `refused_by_reason` why it refused the others. `out_of_scope` (a folder of frames that are not kidney
    views: images, DICOM, videos, at any depth): the share of its frames refused and graded, by reason (report
    key `out_of_scope`). With `report` and a reference, a picture of each test's scores goes beside it
    (`<report>.scope.png`)."""
    import json
    import time

    from runtime import logs
    from runtime import preprocess as pp
    from runtime.bundle import Bundle
    from runtime.labelme import MISSING, OUTLINED, read_dataset
    from runtime.errors import UserError
    from runtime.evaluate_scope import Tally, closed_reason, scores_png
    from runtime.evaluate_scope import out_of_scope as run_out_of_scope
    from runtime.pipelines import open_pipeline
    from runtime.sources import Frame

    say = logs.get("eval").info

    bundle = Bundle.load(bundle_path)
    try:
        samples = read_dataset(Path(data_dir), labels=labels)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not samples:
        raise UserError(f"dataset {data_dir} has no labelled images; point --data at a labelme folder")
    say(f"eval: {samples.summary_line()}")
    ious, y_true, y_pred, errors = [], [], [], []
    kept, lined = [], []            # per graded frame (without the check): kept by the scope check; outlined
    gate_ok = gate_n = without_outline = 0
    inside, ood = Tally(), None     # the scope check on the labelled kidneys the mask gate accepts
    scoped = bundle.scope is not None
    with open_pipeline(bundle, backend=backend, precision=precision, cache_dir=cache_dir, keep_mask=True,
                       scope_open=True) as pipe:
        graph = pipe.graph
        for i, s in enumerate(samples):
            if not quiet and i and i % 25 == 0:
                say(f"  evaluated {i}/{len(samples)} images")
            try:
                gray = s.load_gray()
                truth = None if s.kidney == MISSING else s.load_mask()
            except Exception as e:  # unreadable image or annotation: counted, reported, evaluation goes on
                errors.append(f"{s.relative or s.image_path.name}: {e}")
                continue
            rec = pipe.process(Frame(i, "eval", time.time(), gray))
            if rec.error:
                errors.append(rec.error)
                continue
            if truth is None:       # no known mask: no IoU, no gate agreement; graded if the gate passes it
                if s.grade is not None and rec.accepted:
                    y_true.append(s.grade - 1)
                    y_pred.append(rec.grade - 1)
                    kept.append(closed_reason(rec.scope) is None)
                    lined.append(False)
                    without_outline += 1
                continue
            truth_mask = pp.crop_mask(truth, rec.frame_region, graph.size)   # the source frame's crop
            has_kidney = graph.is_kidney(truth_mask)    # the one rule (runtime.graph)
            if truth_mask.any():
                ious.append(iou(rec.mask, truth_mask))
            gate_n += 1
            gate_ok += rec.accepted == has_kidney
            reason = inside.add(rec) if has_kidney and rec.accepted else None
            if has_kidney and s.grade is not None and rec.accepted:
                y_true.append(s.grade - 1)
                y_pred.append(rec.grade - 1)
                kept.append(reason is None)
                lined.append(s.kidney == OUTLINED)
        if out_of_scope is not None:
            say(f"eval: out-of-scope frames from {out_of_scope}")
            ood_report, ood = run_out_of_scope(pipe, out_of_scope, say=None if quiet else say)
    graded_truth = sum(1 for s in samples if s.grade is not None)
    annotations = samples.report()
    out = {"bundle": str(bundle.root), "precision": precision, "images": len(samples),
           "iou_mean": float(np.mean(ious)) if ious else None, "iou_images": len(ious),
           "gate_agreement": gate_ok / gate_n if gate_n else None, "gate_images": gate_n, "errors": errors,
           **{k: v for k, v in annotations.items() if k != "images"}}
    grades = [str(g) for g in range(1, bundle.num_classes + 1)]
    outlined = annotations["kidney_outlined"]
    if scoped:                      # as deployed: the frames the scope check refuses get no grade
        out["without_scope"] = _graded(y_true, y_pred, lined, outlined)
        y_true, y_pred, lined = ([v for v, k in zip(col, kept) if k] for col in (y_true, y_pred, lined))
    out.update({k: v for k, v in _graded(y_true, y_pred, lined, outlined).items()
                if k != "accuracy"})
    out["scope_reference"] = scoped
    if scoped:
        out["in_scope_kept"] = round(1 - inside.scope_refused / inside.checked, 4) if inside.checked else None
        out["in_scope_checked"] = inside.checked
        out["refused_by_reason"] = inside.by_reason()
    if ood is not None:
        out["out_of_scope"] = ood_report
    if y_true:
        out.update(classification_report(y_true, y_pred, n_classes=bundle.num_classes, class_names=grades))
    elif graded_truth:
        out["note"] = "no labelled kidney frame passed the gate: no grade metrics"
    if bundle.disclaimer:
        out["disclaimer"] = bundle.disclaimer
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        if scoped:
            out["scope_picture"] = str(scores_png(
                inside.scores, None if ood is None else ood.scores, Path(report).with_suffix(".scope.png"),
                f"Scope check scores, {inside.checked} labelled kidneys"
                + (f" and {ood.checked} out-of-scope frames" if ood is not None else "") + " the mask gate accepted"))
        Path(report).write_text(json.dumps(out, indent=2) + "\n")
        if y_true:
            confusion_png(np.array(out["confusion_matrix"]), Path(report).with_suffix(".confusion.png"),
                          [f"grade {g}" for g in grades], f"IFTA grade, {len(y_true)} frames ({precision})")
    acc, mean_iou = out.get("accuracy"), out["iou_mean"]
    missing = annotations["kidney_missing"]
    say(f"eval: {len(samples)} images, kidney IoU {mean_iou if mean_iou is not None else float('nan'):.3f} on "
        f"{len(ious)}" + (f" ({missing} without a kidney annotation left out)" if missing else "")
        + f", gate agreement {out['gate_agreement'] or 0:.3f}, grade accuracy "
        f"{acc if acc is not None else float('nan'):.3f} on {len(y_true)} frames, {len(errors)} errors")
    if scoped:
        w = out["without_scope"]
        say(f"eval: scope check keeps {_pct(out['in_scope_kept'])} of {inside.checked} labelled kidneys the mask gate "
            f"accepted ({_reasons(out['refused_by_reason'])}); graded {_pct(out['graded_share'])} of outlined "
            f"kidneys (without the check {_pct(w['graded_share'])}), accuracy "
            f"{_num(acc)} (without {_num(w['accuracy'])})")
    if ood is not None:
        o = out["out_of_scope"]
        say(f"eval: out-of-scope {out_of_scope}: {o['frames']} frames, refused {_pct(o['refused_share'])} "
            f"(mask gate {o['refused_by_mask_gate']}; {_reasons(o['refused_by_reason'])}), graded "
            f"{o['graded']} (without the scope check {o['without_scope']['graded']}), {o['errors']} errors")
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _reasons(counts: dict) -> str:
    return ", ".join(f"{r} {n}" for r, n in counts.items()) or "none refused by the scope check"


def _graded(y_true, y_pred, lined, outlined: int) -> dict:
    """The graded frames' figures: graded_frames, graded_without_outline, graded_share (the graded frames with a
    kidney outline, of the dataset's `kidney_outlined`) and accuracy (None without a graded frame)."""
    n_lined = sum(bool(x) for x in lined)
    correct = sum(int(t == p) for t, p in zip(y_true, y_pred))
    return {"graded_frames": len(y_true), "graded_without_outline": len(lined) - n_lined,
            "graded_share": round(n_lined / outlined, 4) if outlined else None,
            "accuracy": correct / len(y_true) if y_true else None}
