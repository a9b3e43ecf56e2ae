"""Synthetic labelled kidney datasets on disk: the writer behind `sonoscore sim` (runtime/labelme.py reads them, and
any labelme folder).

Written layout (what training and `sonoscore eval` read):

    out_dir/images/<patient>_<k>.png    8-bit gray B-mode frames (no metadata: training finds the region itself)
    out_dir/images/<patient>_<k>.json   labelme 5.x: the kidney as polygon(s); shapes == [] when no kidney shows
    out_dir/labels.csv                  image,patient,grade (image path relative to out_dir)
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np

from runtime.labelme import KIDNEY_LABEL
from runtime.progress import Progress

LABELME_VERSION = "5.4.1"
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
        for _ in Progress("sim", patients, unit="patient", enabled=progress, indent="").iterate(range(patients)):
            patient_rows = next(done)
            rows += patient_rows
    with open(out_dir / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "patient", "grade"])
        w.writerows(rows)
    (out_dir / SYNTHETIC_MARK).write_text(json.dumps(
        {"made_by": "sonoscore sim", "synthetic": True, "seed": seed, "patients": patients,
         "frames_per_patient": frames_per_patient}, indent=2) + "\n")
    return out_dir


# The file `sonoscore sim` writes beside its images: a bundle trained on such a folder is a phantom-trained demo
# model and carries the synthetic-data disclaimer (export/recipe.py); a user's own data folder has no such file.
SYNTHETIC_MARK = "sonoscore-sim.json"


def is_synthetic(data_dir: Path | str) -> bool:
    """Whether `data_dir` is a dataset `sonoscore sim` wrote (its SYNTHETIC_MARK says synthetic)."""
    try:
        return json.loads((Path(data_dir) / SYNTHETIC_MARK).read_text()).get("synthetic") is True
    except (OSError, ValueError, AttributeError):
        return False

