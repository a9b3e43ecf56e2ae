"""Labelme datasets as people write them: JSON files beside their images (`imagePath` relative to the JSON), with an
optional labels.csv (image,patient,grade; without it: patient = the image's stem, grade from the labelme flags or
None). The kidney's labels are matched after normalisation (case, spaces, underscores, hyphens) against a default
list of variants or the user's own (`LabelMap`, `--label kidney=...`); polygons, rectangles, circles and masks are
rasterised (`rasterise_kidney`), lines and points counted as ignored; labels that are not the kidney are counted,
and an image whose kidney annotation is missing is named, never given a silent empty mask
(`LabelledDataset.report`). `sonoscore train`, `eval` and `calibrate --qat` read datasets through `read_dataset`;
runtime/dataset.py writes the synthetic ones.
"""
from __future__ import annotations

import base64
import collections
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from runtime.preprocess import to_gray

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
KIDNEY_LABEL = "kidney"


def polygons_to_mask(polygons: Iterable[np.ndarray | list], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons (points [x, y]) into a uint8 0/1 mask of `shape` (rows, cols)."""
    mask = np.zeros(shape[:2], np.uint8)
    pts = [np.round(np.asarray(p, np.float64)).astype(np.int32).reshape(-1, 2) for p in polygons]
    pts = [p for p in pts if len(p)]
    if pts:
        cv2.fillPoly(mask, pts, 1)
    return mask


# -- labels ----------------------------------------------------------------------------------------------------

def normalise_label(text) -> str:
    """A label as it is compared: case folded, with whitespace, underscores, hyphens and dots removed
    ("Kidney_R", "kidney r" and "KIDNEY-R" are one label)."""
    return re.sub(r"[\s_\-.]+", "", str(text).casefold())


_SIDES = ("left", "right", "l", "r", "lt", "rt", "lft", "rgt")
# The labels read as the kidney when no --label is given (compared after normalise_label).
DEFAULT_KIDNEY_LABELS: tuple[str, ...] = (
    "kidney", "kidneys",
    *(f"{side} kidney" for side in _SIDES), *(f"kidney {side}" for side in _SIDES),
    "native kidney", "whole kidney", "transplant kidney", "transplanted kidney", "kidney transplant",
    "kidney graft", "kidney allograft", "renal graft", "renal allograft",
)


@dataclass(frozen=True)
class LabelMap:
    """Which labelme labels are the kidney: `kidney` holds them normalised (normalise_label); `given` the labels as
    the user wrote them (`--label kidney=...`), None for the default (DEFAULT_KIDNEY_LABELS)."""
    kidney: frozenset[str]
    given: tuple[str, ...] | None = None

    @classmethod
    def default(cls) -> "LabelMap":
        return cls(frozenset(normalise_label(t) for t in DEFAULT_KIDNEY_LABELS))

    @classmethod
    def of(cls, labels: "LabelMap | Iterable[str] | None") -> "LabelMap":
        """A LabelMap from itself, from kidney labels (exactly those), or None (the default)."""
        if labels is None:
            return cls.default()
        if isinstance(labels, LabelMap):
            return labels
        given = tuple(dict.fromkeys(str(t).strip() for t in labels if str(t).strip()))
        if not given:
            raise ValueError("no kidney label given; name at least one (e.g. kidney=\"kidney,left kidney\")")
        return cls(frozenset(normalise_label(t) for t in given), given)

    @classmethod
    def parse(cls, texts: Iterable[str] | None) -> "LabelMap":
        """The CLI's `--label kidney=LABELS` options (LABELS joined by commas; several options add up); none: the
        default. A bad one raises ValueError, one sentence."""
        labels: list[str] = []
        for text in texts or ():
            name, eq, value = str(text).partition("=")
            if not eq:
                raise ValueError(f"--label '{text}' names no class; write it as kidney=\"{text}\" (the class, '=', "
                                 f"its labelme labels joined by commas)")
            if normalise_label(name.strip().strip("'\"")) != "kidney":
                raise ValueError(f"--label '{text}': only the kidney's labels are read (kidney=...); other labels "
                                 f"are counted as not mapped and need no option")
            items = [t.strip().strip("'\"").strip() for t in value.strip().strip("'\"").split(",")]
            if not any(items):
                raise ValueError(f"--label '{text}' gives no label after '='; name at least one, e.g. "
                                 f"kidney=\"kidney,left kidney\"")
            labels += [t for t in items if t]
        return cls.of(labels) if labels else cls.default()

    def is_kidney(self, label) -> bool:
        return normalise_label(label) in self.kidney

    def describe(self) -> dict:
        """For reports: the kidney labels (as given, or the default list) and whether they are the default."""
        return {"kidney": list(self.given if self.given is not None else DEFAULT_KIDNEY_LABELS),
                "default": self.given is None}


# Grades from labelme's image-level `flags` (a flag set to true): "grade_3", "grade 3", "IFTA 3", "IFTA grade 3",
# or the IFTA range of the paper's grades, "IFTA 50-74%" (the "IFTA" and "%" optional; case, spaces and
# underscores ignored). Range forms per grade:
FLAG_RANGES = {
    1: ("<25", "<=24", "≤24", "0-24", "0-25"),
    2: ("25-49", "25-50"),
    3: ("50-74", "50-75"),
    4: (">=75", "≥75", ">75", "75-100"),
}
_RANGE_GRADE = {r: g for g, rs in FLAG_RANGES.items() for r in rs}
# Flags that say the image shows no kidney (compared after normalise_label): its empty mask is then the truth.
NO_KIDNEY_FLAGS = ("no kidney", "no kidney visible", "kidney not visible")
_NO_KIDNEY = frozenset(normalise_label(t) for t in NO_KIDNEY_FLAGS)
# Shape types rasterised into the kidney mask; any other kidney shape (line, linestrip, point, ...) is counted
# as ignored.
AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")


def flag_grade(name) -> int | None:
    """The IFTA grade (1-4) a labelme flag's name stands for, or None (see FLAG_RANGES)."""
    t = re.sub(r"[\s_%]+", "", str(name).casefold()).replace("–", "-").replace("—", "-")
    m = re.fullmatch(r"(ifta|grade|iftagrade)([1-4])", t.replace("-", "").replace(":", ""))
    if m:
        return int(m.group(2))
    t = t.removeprefix("ifta").lstrip("-:")
    return _RANGE_GRADE.get(t)


@dataclass
class Annotation:
    """What one labelme file says, read once when the dataset is read: kidney shapes with an area, the labels not
    mapped to the kidney (as written), kidney shapes that are not rasterised (by shape type), the image-level
    grade and no-kidney flags, and true flags that are neither."""
    shapes: int = 0
    kidney_shapes: int = 0
    unmapped: collections.Counter = field(default_factory=collections.Counter)
    ignored: collections.Counter = field(default_factory=collections.Counter)
    grade: int | None = None
    no_kidney: bool = False
    unread_flags: collections.Counter = field(default_factory=collections.Counter)


def read_annotation(doc: dict, path: Path, labels: LabelMap) -> Annotation:
    shapes = doc.get("shapes")
    if not isinstance(shapes, list):
        raise ValueError(f"{path}: 'shapes' is not a list; is this a labelme file?")
    a = Annotation(shapes=len(shapes))
    for shape in shapes:
        if not isinstance(shape, dict):
            raise ValueError(f"{path}: a shape is not a JSON object; is this a labelme file?")
        label = str(shape.get("label", ""))
        if not labels.is_kidney(label):
            a.unmapped[label] += 1
            continue
        kind = shape.get("shape_type") or "polygon"
        if kind in AREA_SHAPES:
            a.kidney_shapes += 1
        else:
            a.ignored[str(kind)] += 1
    flags = doc.get("flags") or {}
    if not isinstance(flags, dict):
        raise ValueError(f"{path}: 'flags' is not a JSON object of name: true/false; is this a labelme file?")
    grades = set()
    for name, value in flags.items():
        if value is not True:
            continue
        g = flag_grade(name)
        if g is not None:
            grades.add(g)
        elif normalise_label(name) in _NO_KIDNEY:
            a.no_kidney = True
        else:
            a.unread_flags[str(name)] += 1
    if len(grades) > 1:
        raise ValueError(f"{path}: its flags set grades {', '.join(map(str, sorted(grades)))} at once; keep the "
                         f"one that is right")
    a.grade = grades.pop() if grades else None
    return a


# -- reading ---------------------------------------------------------------------------------------------------

# What a labelled image's kidney annotation is (LabelledImage.kidney):
OUTLINED = "outlined"   # at least one kidney shape with an area (AREA_SHAPES)
NO_KIDNEY = "none"      # the image shows no kidney: its labelme file has no shapes and no grade flag (what
                        # `sonoscore sim` writes), or a no-kidney flag (NO_KIDNEY_FLAGS); the empty mask is the truth
MISSING = "missing"     # no labelme file, or shapes but none for the kidney with an area, or only a grade flag:
                        # the mask is unknown; `eval` leaves the image out of the IoU and gate agreement, `train`
                        # leaves it out, and both name it


@dataclass
class LabelledImage:
    image_path: Path
    patient: str
    grade: int | None
    json_path: Path | None
    labels: LabelMap = field(default_factory=LabelMap.default)
    kidney: str = MISSING                        # OUTLINED, NO_KIDNEY or MISSING (above)
    relative: str = ""                           # the image's path relative to the dataset folder
    grade_from: str | None = None                # "labels.csv", "flags" or None
    annotation: Annotation | None = None

    @property
    def kidney_missing(self) -> bool:
        return self.kidney == MISSING

    def load_gray(self) -> np.ndarray:
        """uint8 HxW; colour images converted with BT.601 (runtime.preprocess.to_gray), 16-bit ones windowed."""
        img = None
        if self.image_path.is_file():
            img = cv2.imread(str(self.image_path), cv2.IMREAD_UNCHANGED)
        elif self.json_path is not None:
            img = _embedded_image(self.json_path)
        if img is None:
            raise ValueError(f"cannot read image {self.image_path}: missing or not an image file")
        return to_gray(img, channel_order="BGR")      # OpenCV decodes colour as BGR(A)

    def load_mask(self) -> np.ndarray:
        """uint8 HxW 0/1: the kidney shapes (labels of `labels`) rasterised (rasterise_kidney). Zeros without a
        labelme file or kidney shape: check `kidney` to tell an image without kidney from one not annotated."""
        if self.json_path is None:
            return np.zeros(self.load_gray().shape, np.uint8)
        doc = _read_json(self.json_path)
        h, w = doc.get("imageHeight"), doc.get("imageWidth")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            h, w = self.load_gray().shape
        return rasterise_kidney(doc.get("shapes") or [], (h, w), self.labels, self.json_path)


def rasterise_kidney(shapes: list, shape: tuple[int, int], labels: LabelMap, path: Path | str = "labelme file"
                     ) -> np.ndarray:
    """The union of the kidney shapes as a uint8 0/1 mask of `shape` (rows, cols). Points are labelme's [x, y]
    (x = column, y = row of a pixel centre).

    polygon:   points rounded to whole pixels and filled with cv2.fillPoly (edges included).
    rectangle: the polygon of its four corners (from its two opposite corners): the same rule.
    circle:    [centre, a point on the circle]: every pixel whose centre lies within the radius (distance <= r).
    mask:      labelme's `mask` (a base64 PNG, nonzero = inside) placed at its points' box: the first point, cut
               to whole pixels as labelme does, is its top-left pixel; the PNG must be the box's size.
    Any other kidney shape (line, linestrip, point) is not rasterised (read_annotation counts it)."""
    rows, cols = shape[:2]
    mask = np.zeros((rows, cols), np.uint8)
    polys = []
    for s in shapes:
        if not isinstance(s, dict):
            raise ValueError(f"{path}: a shape is not a JSON object; is this a labelme file?")
        if not labels.is_kidney(s.get("label", "")):
            continue
        kind = s.get("shape_type") or "polygon"
        if kind not in AREA_SHAPES:
            continue
        pts = _points(s, path, kind)
        if kind == "polygon":
            polys.append(pts)
        elif kind == "rectangle":
            if len(pts) == 2:
                (xa, ya), (xb, yb) = pts
                pts = np.array([[xa, ya], [xb, ya], [xb, yb], [xa, yb]])
            polys.append(pts)
        elif kind == "circle":
            _fill_circle(mask, pts, path)
        else:
            _fill_mask(mask, s, pts, path)
    pts = [np.round(p).astype(np.int32).reshape(-1, 2) for p in polys if len(p)]
    if pts:
        cv2.fillPoly(mask, pts, 1)
    return mask


def _points(shape: dict, path, kind: str) -> np.ndarray:
    try:
        pts = np.asarray(shape.get("points") or [], np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: a kidney {kind}'s points are not [x, y] pairs") from None
    if not np.isfinite(pts).all():
        raise ValueError(f"{path}: a kidney {kind}'s points are not finite numbers")
    if kind in ("circle", "mask") and len(pts) < 2:
        what = "its centre and a point on it" if kind == "circle" else "the corners of its box"
        raise ValueError(f"{path}: a kidney {kind} needs two points ({what}), it has {len(pts)}")
    return pts


def _fill_circle(mask: np.ndarray, pts: np.ndarray, path) -> None:
    (cx, cy), (px, py) = pts[:2]
    r = float(np.hypot(px - cx, py - cy))
    rows, cols = mask.shape
    y0, y1 = max(0, int(np.floor(cy - r))), min(rows - 1, int(np.ceil(cy + r)))
    x0, x1 = max(0, int(np.floor(cx - r))), min(cols - 1, int(np.ceil(cx + r)))
    if y0 > y1 or x0 > x1:
        return
    yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    mask[y0:y1 + 1, x0:x1 + 1] |= inside.astype(np.uint8)


def _fill_mask(mask: np.ndarray, shape: dict, pts: np.ndarray, path) -> None:
    data = shape.get("mask")
    if not isinstance(data, str) or not data:
        raise ValueError(f"{path}: a kidney mask shape has no mask data (a base64 PNG); re-save it in labelme")
    try:
        img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)
    except (ValueError, TypeError, cv2.error):
        img = None
    if img is None:
        raise ValueError(f"{path}: a kidney mask shape's mask is not a base64 PNG; re-save it in labelme")
    if img.ndim == 3:
        img = img[:, :, :3].max(axis=2) if img.shape[2] >= 3 else img[:, :, 0]
    (xa, ya), (xb, yb) = pts[:2].astype(int)          # labelme: np.asarray(points).astype(int)
    x1, y1, x2, y2 = min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)
    if img.shape != (y2 - y1 + 1, x2 - x1 + 1):
        raise ValueError(f"{path}: a kidney mask shape's PNG is {img.shape[1]}x{img.shape[0]} pixels but its "
                         f"points span {x2 - x1 + 1}x{y2 - y1 + 1}; re-save it in labelme")
    rows, cols = mask.shape
    ty0, tx0 = max(0, y1), max(0, x1)
    ty1, tx1 = min(rows, y2 + 1), min(cols, x2 + 1)
    if ty0 < ty1 and tx0 < tx1:
        mask[ty0:ty1, tx0:tx1] |= (img[ty0 - y1:ty1 - y1, tx0 - x1:tx1 - x1] > 0).astype(np.uint8)


class LabelledDataset(list):
    """read_dataset's answer: the LabelledImages (a list, sorted by path), with the dataset's folder, its label
    map, and `report()` / `summary_line()`: what its annotations hold and what was not used."""

    def __init__(self, items: Iterable[LabelledImage], root: Path, labels: LabelMap):
        super().__init__(items)
        self.root, self.labels = root, labels

    def report(self) -> dict:
        """Counts over the dataset's images: kidney outlined / no kidney / annotation missing (with the missing
        ones' paths relative to the folder), labels not mapped to the kidney (as written, with counts), kidney
        shapes not rasterised (by type), where the grades came from, and true flags that were not read."""
        unmapped, ignored, unread = collections.Counter(), collections.Counter(), collections.Counter()
        for it in self:
            if it.annotation is not None:
                unmapped += it.annotation.unmapped
                ignored += it.annotation.ignored
                unread += it.annotation.unread_flags
        count = collections.Counter(it.kidney for it in self)
        grades = collections.Counter(it.grade_from for it in self if it.grade_from)

        def ordered(c):
            return {k: n for k, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))}
        return {
            "labels": self.labels.describe(),
            "images": len(self),
            "kidney_outlined": count[OUTLINED], "no_kidney": count[NO_KIDNEY], "kidney_missing": count[MISSING],
            "kidney_missing_images": [it.relative for it in self if it.kidney == MISSING],
            "unmapped_labels": ordered(unmapped),
            "ignored_shapes": ordered(ignored),
            "grades_from": {"labels.csv": grades["labels.csv"], "flags": grades["flags"]},
            "unread_flags": ordered(unread),
        }

    def summary_line(self, names: int = 3) -> str:
        """One line for the terminal: the report in words (the first `names` missing images named)."""
        r = self.report()
        parts = [f"dataset {self.root}: {r['images']} images; kidney outlined in {r['kidney_outlined']}, "
                 f"no kidney in {r['no_kidney']}, kidney annotation missing in {r['kidney_missing']}"]
        if r["kidney_missing"]:
            shown = r["kidney_missing_images"][:names]
            more = r["kidney_missing"] - len(shown)
            parts[-1] += f" ({', '.join(shown)}{f' and {more} more' if more else ''}: mask unknown, left out of the IoU and of training)"
        label = ("the default kidney labels" if r["labels"]["default"]
                 else "kidney = " + ", ".join(r["labels"]["kidney"]))
        parts.append(f"labels read as the kidney: {label}")
        for key, what in (("unmapped_labels", "labels not mapped to the kidney"),
                          ("ignored_shapes", "kidney shapes not rasterised"), ("unread_flags", "flags not read")):
            if r[key]:
                parts.append(f"{what}: " + ", ".join(f"{k!r} x{n}" for k, n in r[key].items()))
        parts.append(f"grades from labels.csv {r['grades_from']['labels.csv']}, from flags {r['grades_from']['flags']}")
        return "; ".join(parts)


def read_dataset(root: Path, labels: LabelMap | Iterable[str] | None = None) -> LabelledDataset:
    """Every labelled image under `root`, sorted by path. With root/labels.csv (columns image, patient, grade;
    grade may be empty; read as UTF-8 with or without a byte-order mark) the CSV lists the images; without it,
    every image file under root counts, its patient being its stem. Each image's labelme JSON is the one whose
    imagePath names it, else <stem>.json beside it. `labels`: which labels are the kidney (LabelMap.of).

    A grade comes from labels.csv, or, where its cell is empty or there is no CSV, from the labelme file's flags
    (flag_grade); a flag grade that contradicts the CSV's is refused in one sentence."""
    root = Path(root)
    labels = LabelMap.of(labels)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist; write one with `sonoscore sim --out {root}`")
    by_image = _labelme_index(root, labels)
    table = root / "labels.csv"
    items: list[LabelledImage] = []
    base = root.resolve()
    if table.is_file():
        for line, row in _csv_rows(table):
            image = (root / row["image"]).resolve()
            if not image.is_file() and image not in by_image:
                raise ValueError(f"{table} line {line}: image {row['image']} does not exist under {root}")
            grade = _grade(row["grade"], table, line)
            items.append(_labelled(image, row["patient"] or image.stem, grade, by_image, labels, base,
                                   f"{table} line {line}"))
    else:
        images = {p.resolve() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
        images |= set(by_image)
        for image in images:
            items.append(_labelled(image, image.stem, None, by_image, labels, base, None))
        if not items:
            raise ValueError(f"dataset folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) or labelme JSON")
    return LabelledDataset(sorted(items, key=lambda it: str(it.image_path)), root, labels)


def _labelled(image: Path, patient: str, grade: int | None, by_image: dict, labels: LabelMap, base: Path,
              csv_line: str | None) -> LabelledImage:
    json_path, note = _json_for(image, by_image, labels)
    grade_from = "labels.csv" if grade is not None else None
    if note is not None and note.grade is not None:
        if grade is None:
            grade, grade_from = note.grade, "flags"
        elif grade != note.grade:
            raise ValueError(f"{json_path}: its flags say grade {note.grade} but {csv_line} says {grade}; correct "
                             f"the one that is wrong")
    if note is None:
        kidney = MISSING
    elif note.kidney_shapes:
        kidney = OUTLINED
    elif note.no_kidney or (note.shapes == 0 and note.grade is None):
        kidney = NO_KIDNEY
    else:
        kidney = MISSING
    return LabelledImage(image, patient, grade, json_path, labels=labels, kidney=kidney,
                         relative=Path(os.path.relpath(image, base)).as_posix(), grade_from=grade_from,
                         annotation=note)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read labelme file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a labelme file (its top level is not a JSON object)")
    return doc


def _labelme_index(root: Path, labels: LabelMap) -> dict[Path, tuple[Path, Annotation]]:
    """image path -> (labelme JSON, what it says), for every labelme JSON under root (other JSON files are
    ignored). Only the annotation is kept, never the document (an embedded image would fill the memory)."""
    index: dict[Path, tuple[Path, Annotation]] = {}
    for path in sorted(root.rglob("*.json")):
        doc = _read_json(path)
        if "shapes" not in doc or "imagePath" not in doc:
            continue                                   # not labelme (a manifest, a report, ...)
        if not isinstance(doc["imagePath"], str) or not doc["imagePath"]:
            raise ValueError(f"{path}: imagePath is empty; it should name the image, relative to the JSON")
        image = (path.parent / doc["imagePath"].replace("\\", "/")).resolve()
        if not image.is_file() and not doc.get("imageData"):
            raise ValueError(f"{path} names image {doc['imagePath']}, which does not exist beside it")
        index[image] = (path.resolve(), read_annotation(doc, path, labels))
    return index


def _json_for(image: Path, by_image: dict, labels: LabelMap) -> tuple[Path | None, Annotation | None]:
    if image in by_image:
        return by_image[image]
    beside = image.with_suffix(".json")
    if beside.is_file():
        doc = _read_json(beside)
        if "shapes" in doc:
            return beside, read_annotation(doc, beside, labels)
    return None, None


def _csv_rows(table: Path) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        fh = open(table, newline="", encoding="utf-8-sig")     # a byte-order mark (Excel's "CSV UTF-8") is fine
    except OSError as exc:
        raise ValueError(f"cannot read {table}: {exc}") from None
    with fh:
        try:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = {"image", "patient", "grade"} - set(header)
            if missing:
                raise ValueError(f"{table} lacks column(s) {', '.join(sorted(missing))}; expected image,patient,grade")
            at = {k: header.index(k) for k in ("image", "patient", "grade")}
            for line, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue                           # a blank line
                row = {k: (cells[i] if i < len(cells) else "").strip() for k, i in at.items()}
                if not row["image"]:
                    raise ValueError(f"{table} line {line}: the image column is empty")
                yield line, row
        except UnicodeDecodeError:
            raise ValueError(f"{table} is not UTF-8 text; save it as CSV UTF-8") from None


def _grade(text: str, table: Path, line: int) -> int | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value not in (1.0, 2.0, 3.0, 4.0):
        raise ValueError(f"{table} line {line}: grade {text!r} is not 1, 2, 3 or 4 (or empty)")
    return int(value)


def _embedded_image(json_path: Path) -> np.ndarray | None:
    data = _read_json(json_path).get("imageData")
    if not data:
        return None
    try:
        buf = np.frombuffer(base64.b64decode(data), np.uint8)
    except (ValueError, TypeError):
        return None
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def labels_table(folder: Path | str) -> dict[Path, tuple[str, int]] | None:
    """A labelled dataset's labels.csv (image,patient[,grade], as `sonoscore sim` writes it) in `folder` or the
    folder above it, as resolved image path -> (patient, grade; 0 where the grade is empty or not a number, or the
    file has no grade column); None when there is none with those columns. Calibration groups its frames into
    studies by it, and the scope reference its held-out patients."""
    folder = Path(folder)
    for d in (folder, folder.parent):
        table = d / "labels.csv"
        if not table.is_file():
            continue
        try:
            with open(table, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error):
            return None
        if not rows or not {"image", "patient"} <= set(rows[0]):
            return None
        out = {}
        for row in rows:
            if not row.get("image"):
                continue
            try:
                grade = int((row.get("grade") or "0").strip())
            except ValueError:
                grade = 0
            out[(d / row["image"]).resolve()] = ((row["patient"] or "").strip(), grade)
        return out
    return None
