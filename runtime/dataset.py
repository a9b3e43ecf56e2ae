"""Labelled kidney datasets on disk: the synthetic writer behind `sonoscore sim`, and a reader for any labelme folder.

Written layout (what training and `sonoscore eval` read):

    out_dir/images/<patient>_<k>.png    8-bit gray B-mode frames (no metadata: training finds the region itself)
    out_dir/images/<patient>_<k>.json   labelme 5.x: the kidney as polygon(s); shapes == [] when no kidney shows
    out_dir/labels.csv                  image,patient,grade (image path relative to out_dir)

The reader takes any labelme dataset: JSON files beside their images (`imagePath` relative to the JSON), with an
optional labels.csv (without it: grade None, patient = the image's stem).
"""
from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from runtime.preprocess import to_gray

LABELME_VERSION = "5.4.1"
KIDNEY_LABEL = "kidney"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PATIENTS_PER_SEED = 100_000        # patient i of dataset seed s is phantom seed s * PATIENTS_PER_SEED + i


# -- writing ---------------------------------------------------------------------------------------------------

def balanced_grades(patients: int, seed: int) -> list[int]:
    """Grades 1..4 spread evenly over the patients (counts differ by at most one), order shuffled by seed."""
    grades = [1 + i % 4 for i in range(patients)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % (1 << 64), 4999])))
    return [grades[j] for j in rng.permutation(patients)]


def mask_to_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Outer contours of a 0/1 mask as polygons of pixel coordinates [[x, y], ...] (labelme's convention:
    x = column, y = row of a pixel centre). Runs along rows/columns are compressed to their end points, so
    rasterising the polygons back with cv2.fillPoly gives the mask again."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1, 2).tolist() for c in contours if len(c) >= 3]
    return sorted(polys, key=lambda p: (min(q[1] for q in p), min(q[0] for q in p)))


def polygons_to_mask(polygons: Iterable[np.ndarray | list], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons (points [x, y]) into a uint8 0/1 mask of `shape` (rows, cols)."""
    mask = np.zeros(shape[:2], np.uint8)
    pts = [np.round(np.asarray(p, np.float64)).astype(np.int32).reshape(-1, 2) for p in polygons]
    pts = [p for p in pts if len(p)]
    if pts:
        cv2.fillPoly(mask, pts, 1)
    return mask


def labelme_document(image_name: str, mask: np.ndarray) -> dict:
    """The labelme 5.x JSON for one image and its kidney mask."""
    shapes = [{"label": KIDNEY_LABEL, "points": poly, "group_id": None, "shape_type": "polygon", "flags": {}}
              for poly in mask_to_polygons(mask)]
    return {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_name,
            "imageData": None, "imageHeight": int(mask.shape[0]), "imageWidth": int(mask.shape[1])}


def sweep_indices(period: float, frames: int, offset: float) -> list[int]:
    """`frames` frame indices spread evenly over one sweep period, starting `offset` (0..1) of a step in."""
    step = period / frames
    return [int(round((k + offset) * step)) for k in range(frames)]


def simulated_patient(seed: int, i: int, grade: int, frames: int):
    """Patient i of the dataset made with `seed`: its phantom and the frame indices the writer saves."""
    from runtime.phantom import KidneyPhantom

    phantom = KidneyPhantom(grade=grade, seed=int(seed) * PATIENTS_PER_SEED + i)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % (1 << 64), 7013, i])))
    return phantom, sweep_indices(phantom.patient.sweep_period, frames, float(rng.random()))


def _write_patient(images: Path, seed: int, i: int, grade: int, frames: int) -> list[tuple[str, str, int]]:
    """Patient i's frames (PNG) and kidney outlines (labelme JSON) into `images`; its labels.csv rows."""
    phantom, indices = simulated_patient(seed, i, grade, frames)
    rows = []
    for k, index in enumerate(indices):
        frame = phantom.frame(index)
        stem = f"{phantom.patient_id}_{k:02d}"
        png = images / f"{stem}.png"
        if not cv2.imwrite(str(png), frame.image):
            raise ValueError(f"could not write {png}; check the folder is writable and the disk not full")
        doc = labelme_document(png.name, frame.mask)
        (images / f"{stem}.json").write_text(json.dumps(doc, separators=(",", ":")))
        rows.append((f"images/{png.name}", phantom.patient_id, phantom.grade))
    return rows


def write_dataset(out_dir: Path, patients: int, seed: int = 0, frames_per_patient: int = 12,
                  progress: bool = True, workers: int | None = None) -> Path:
    """Simulate `patients` patients (grades balanced) and write `frames_per_patient` frames of each, spread over
    one probe sweep (so ~10 % of them show no kidney and carry no shapes). Returns out_dir.

    Patients are simulated in `workers` processes (default: one per core); every patient has its
    own seed, so the files are the same whatever the number of workers."""
    if patients < 1 or frames_per_patient < 1:
        raise ValueError("write_dataset needs at least 1 patient and 1 frame per patient")
    if patients > PATIENTS_PER_SEED:
        raise ValueError(f"write_dataset writes at most {PATIENTS_PER_SEED} patients per seed; use several seeds")
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    grades = balanced_grades(patients, seed)
    workers = max(1, min(workers or (os.cpu_count() or 1), patients))
    jobs = [(images, seed, i, grades[i], frames_per_patient) for i in range(patients)]
    rows: list[tuple[str, str, int]] = []
    with contextlib.ExitStack() as stack:
        if workers > 1:   # spawn: no fork of a process whose OpenCV/BLAS threads may hold locks
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
            done = pool.map(_write_patient, *zip(*jobs))
        else:
            done = (_write_patient(*job) for job in jobs)
        done = iter(done)
        for _ in _progress(range(patients), patients, progress):
            patient_rows = next(done)
            rows += patient_rows
    with open(out_dir / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "patient", "grade"])
        w.writerows(rows)
    return out_dir


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _progress(items: Iterable[int], total: int, enabled: bool) -> Iterator[int]:
    """A bar on a terminal; elsewhere (logs, CI, pipes) a line at every tenth of the patients, not a bar's
    carriage returns."""
    tqdm = _tqdm() if enabled and sys.stderr.isatty() else None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc="sim", unit="patient", file=sys.stderr)
        return
    every = max(1, total // 10)
    for n, item in enumerate(items, 1):
        yield item
        if enabled and (n % every == 0 or n == total):
            print(f"sim: {n}/{total} patients", file=sys.stderr, flush=True)


# -- reading ---------------------------------------------------------------------------------------------------

@dataclass
class LabelledImage:
    image_path: Path
    patient: str
    grade: int | None
    json_path: Path | None

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
        """uint8 HxW 0/1: the polygons labelled "kidney", rasterised with cv2.fillPoly (zeros without JSON)."""
        if self.json_path is None:
            return np.zeros(self.load_gray().shape, np.uint8)
        doc = _read_json(self.json_path)
        h, w = doc.get("imageHeight"), doc.get("imageWidth")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            h, w = self.load_gray().shape
        polys = []
        for shape in doc.get("shapes") or []:
            if not isinstance(shape, dict):
                raise ValueError(f"{self.json_path}: a shape is not a JSON object; is this a labelme file?")
            if str(shape.get("label", "")).strip().lower() != KIDNEY_LABEL:
                continue
            if shape.get("shape_type") not in (None, "polygon"):
                continue
            try:
                polys.append(np.asarray(shape.get("points") or [], np.float64).reshape(-1, 2))
            except (TypeError, ValueError):
                raise ValueError(f"{self.json_path}: a kidney polygon's points are not [x, y] pairs") from None
        return polygons_to_mask(polys, (h, w))


def read_dataset(root: Path) -> list[LabelledImage]:
    """Every labelled image under `root`, sorted by path. With root/labels.csv (columns image, patient, grade;
    grade may be empty) the CSV lists the images; without it, every image file under root counts, its patient
    being its stem. Each image's labelme JSON is the one whose imagePath names it, else <stem>.json beside it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist; write one with `sonoscore sim --out {root}`")
    by_image = _labelme_index(root)
    table = root / "labels.csv"
    items: list[LabelledImage] = []
    if table.is_file():
        for line, row in _csv_rows(table):
            image = (root / row["image"]).resolve()
            if not image.is_file() and image not in by_image:
                raise ValueError(f"{table} line {line}: image {row['image']} does not exist under {root}")
            items.append(LabelledImage(image, row["patient"] or image.stem, _grade(row["grade"], table, line),
                                       _json_for(image, by_image)))
    else:
        images = {p.resolve() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
        images |= set(by_image)
        for image in images:
            items.append(LabelledImage(image, image.stem, None, _json_for(image, by_image)))
        if not items:
            raise ValueError(f"dataset folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) or labelme JSON")
    return sorted(items, key=lambda it: str(it.image_path))


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read labelme file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a labelme file (its top level is not a JSON object)")
    return doc


def _labelme_index(root: Path) -> dict[Path, Path]:
    """image path -> labelme JSON, for every labelme JSON under root (other JSON files are ignored)."""
    index: dict[Path, Path] = {}
    for path in sorted(root.rglob("*.json")):
        doc = _read_json(path)
        if "shapes" not in doc or "imagePath" not in doc:
            continue                                   # not labelme (a manifest, a report, ...)
        if not isinstance(doc["imagePath"], str) or not doc["imagePath"]:
            raise ValueError(f"{path}: imagePath is empty; it should name the image, relative to the JSON")
        image = (path.parent / doc["imagePath"].replace("\\", "/")).resolve()
        if not image.is_file() and not doc.get("imageData"):
            raise ValueError(f"{path} names image {doc['imagePath']}, which does not exist beside it")
        index[image] = path.resolve()
    return index


def _json_for(image: Path, by_image: dict[Path, Path]) -> Path | None:
    if image in by_image:
        return by_image[image]
    beside = image.with_suffix(".json")
    return beside if beside.is_file() and "shapes" in _read_json(beside) else None


def _csv_rows(table: Path) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        fh = open(table, newline="")
    except OSError as exc:
        raise ValueError(f"cannot read {table}: {exc}") from None
    with fh:
        reader = csv.DictReader(fh)
        missing = {"image", "patient", "grade"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{table} lacks column(s) {', '.join(sorted(missing))}; expected image,patient,grade")
        for line, row in enumerate(reader, start=2):
            if not (row.get("image") or "").strip():
                raise ValueError(f"{table} line {line}: the image column is empty")
            yield line, {k: (row.get(k) or "").strip() for k in ("image", "patient", "grade")}


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
