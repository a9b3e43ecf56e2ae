"""Labelled datasets: the synthetic writer round-trips through the labelme reader (pixels, grades, masks), and the
reader takes any labelme folder and names the file when something is wrong."""
import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.dataset import balanced_grades, labelme_document, mask_to_polygons, simulated_patient, write_dataset
from runtime.labelme import LabelledImage, polygons_to_mask, read_dataset
from runtime.phantom import KidneyPhantom


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert write_dataset(out, patients=3, seed=4, frames_per_patient=3, progress=False) == out
    return out


def test_writer_lays_out_images_json_and_csv(written):
    pngs = sorted((written / "images").glob("*.png"))
    assert len(pngs) == 9 and len(list((written / "images").glob("*.json"))) == 9
    with open(written / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "patient", "grade"] and len(rows) == 9
    assert {r["image"] for r in rows} == {f"images/{p.name}" for p in pngs}
    per_patient = {r["patient"]: int(r["grade"]) for r in rows}
    assert sorted(per_patient) == ["sim-400000", "sim-400001", "sim-400002"]
    assert len(set(per_patient.values())) == 3                  # 3 patients, 3 different grades
    for r in rows:
        assert Path(r["image"]).name.startswith(r["patient"] + "_")


def test_labelme_json_follows_the_5x_layout(written):
    doc = json.loads((written / "images" / "sim-400000_00.json").read_text())
    assert set(doc) == {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}
    assert doc["version"].startswith("5.") and doc["imagePath"] == "sim-400000_00.png" and doc["imageData"] is None
    assert (doc["imageHeight"], doc["imageWidth"]) == (400, 520)
    for shape in doc["shapes"]:
        assert shape["label"] == "kidney" and shape["shape_type"] == "polygon"
        assert shape["group_id"] is None and shape["flags"] == {} and len(shape["points"]) >= 3


def test_round_trip_gives_the_phantoms_pixels_grades_and_masks(written):
    items = read_dataset(written)
    assert len(items) == 9 and all(isinstance(it, LabelledImage) for it in items)
    with open(written / "labels.csv", newline="") as fh:
        truth = {r["image"]: (r["patient"], int(r["grade"])) for r in csv.DictReader(fh)}
    checked = 0
    for i, patient in enumerate(sorted({it.patient for it in items})):
        mine = [it for it in items if it.patient == patient]
        phantom, indices = simulated_patient(4, i, mine[0].grade, 3)
        assert phantom.patient_id == patient
        for it in mine:
            rel = it.image_path.relative_to(written.resolve()).as_posix()
            assert truth[rel] == (it.patient, it.grade)
            assert it.json_path == it.image_path.with_suffix(".json")
            gray, mask = it.load_gray(), it.load_mask()
            assert gray.dtype == np.uint8 and mask.dtype == np.uint8 and gray.shape == mask.shape == (400, 520)
            # the PNG is the phantom's frame, pixel for pixel, and the polygons give back its exact mask
            frame = phantom.frame(indices[int(it.image_path.stem.rsplit("_", 1)[1])])
            assert np.array_equal(frame.image, gray)
            assert iou(mask, frame.mask) >= 0.98
            assert frame.has_kidney == bool(json.loads(it.json_path.read_text())["shapes"])
            checked += 1
    assert checked == 9


def test_polygons_rasterise_back_to_the_exact_mask():
    for seed, index in ((0, 0), (1, 30), (2, 44), (3, 90)):
        mask = KidneyPhantom(seed=seed).frame(index).mask
        back = polygons_to_mask(mask_to_polygons(mask), mask.shape)
        assert iou(back, mask) >= 0.98


def test_a_frame_without_kidney_has_no_shapes():
    doc = labelme_document("x.png", np.zeros((40, 50), np.uint8))
    assert doc["shapes"] == [] and (doc["imageHeight"], doc["imageWidth"]) == (40, 50)


def test_grades_are_balanced_and_shuffled_by_seed():
    for n in (1, 2, 5, 8, 13):
        counts = Counter(balanced_grades(n, seed=0))
        assert max(counts.values()) - min(counts.get(g, 0) for g in (1, 2, 3, 4)) <= 1
    assert balanced_grades(12, 0) != balanced_grades(12, 1)
    assert balanced_grades(12, 3) == balanced_grades(12, 3)


def test_progress_goes_to_stderr(tmp_path, capsys):
    write_dataset(tmp_path / "a", patients=1, frames_per_patient=1, progress=True)
    quiet = capsys.readouterr()
    assert quiet.out == "" and "1/1" in quiet.err
    write_dataset(tmp_path / "b", patients=1, frames_per_patient=1, progress=False)
    assert capsys.readouterr().err == ""


def _labelme(path: Path, image_path: str, shapes: list, h: int = 20, w: int = 30) -> None:
    path.write_text(json.dumps({"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
                                "imageData": None, "imageHeight": h, "imageWidth": w}))


def _polygon(label: str, pts) -> dict:
    return {"label": label, "points": pts, "group_id": None, "shape_type": "polygon", "flags": {}}


def test_any_labelme_folder_reads_without_csv(tmp_path):
    (tmp_path / "scans" / "a").mkdir(parents=True)
    (tmp_path / "json").mkdir()
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[..., 2] = 200                                          # pure red, stored BGR by OpenCV
    cv2.imwrite(str(tmp_path / "scans" / "a" / "red.png"), colour)
    # the JSON lives elsewhere; imagePath is relative to it
    _labelme(tmp_path / "json" / "red.json", "../scans/a/red.png",
             [_polygon("kidney", [[2, 2], [10, 2], [10, 8], [2, 8]]),
              _polygon("liver", [[20, 10], [25, 10], [25, 15]])])
    cv2.imwrite(str(tmp_path / "plain.png"), np.full((5, 6), 77, np.uint8))     # no JSON at all
    (tmp_path / "notes.json").write_text('{"about": "not labelme"}')            # ignored
    items = read_dataset(tmp_path)
    assert [it.image_path.name for it in items] == ["plain.png", "red.png"]
    plain, red = items
    assert (plain.patient, plain.grade, plain.json_path) == ("plain", None, None)
    assert plain.load_mask().shape == (5, 6) and plain.load_mask().sum() == 0
    assert red.patient == "red" and red.json_path == (tmp_path / "json" / "red.json").resolve()
    assert red.load_gray()[0, 0] == round(0.299 * 200)           # BT.601 from the file's real channel order
    mask = red.load_mask()
    assert mask.sum() == 9 * 7 and mask[2:9, 2:11].all()          # only the "kidney" polygon, edges included


def test_labels_csv_decides_patients_and_grades(tmp_path):
    cv2.imwrite(str(tmp_path / "f1.png"), np.zeros((4, 4), np.uint8))
    cv2.imwrite(str(tmp_path / "f2.png"), np.zeros((4, 4), np.uint8))
    (tmp_path / "labels.csv").write_text("image,patient,grade\nf1.png,p7,3\nf2.png,p8,\n")
    items = read_dataset(tmp_path)
    assert [(it.image_path.name, it.patient, it.grade) for it in items] == [("f1.png", "p7", 3), ("f2.png", "p8", None)]


@pytest.mark.parametrize("case, match", [
    ("bad_json", "broken.json"),
    ("csv_missing_image", "gone.png"),
    ("json_missing_image", "orphan.json"),
    ("bad_grade", "grade '7'"),
    ("missing_column", "lacks column"),
])
def test_broken_datasets_raise_one_sentence_naming_the_file(tmp_path, case, match):
    cv2.imwrite(str(tmp_path / "f1.png"), np.zeros((4, 4), np.uint8))
    if case == "bad_json":
        (tmp_path / "broken.json").write_text("{not json")
    elif case == "csv_missing_image":
        (tmp_path / "labels.csv").write_text("image,patient,grade\nf1.png,p,1\ngone.png,p,1\n")
    elif case == "json_missing_image":
        _labelme(tmp_path / "orphan.json", "nowhere.png", [])
    elif case == "bad_grade":
        (tmp_path / "labels.csv").write_text("image,patient,grade\nf1.png,p,7\n")
    elif case == "missing_column":
        (tmp_path / "labels.csv").write_text("image,grade\nf1.png,1\n")
    with pytest.raises(ValueError, match=match):
        read_dataset(tmp_path)


def test_missing_folder_and_unreadable_image_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "fake.png").write_bytes(b"not a png")
    (item,) = read_dataset(tmp_path)
    with pytest.raises(ValueError, match="fake.png"):
        item.load_gray()


def test_the_dataset_is_the_same_file_for_file_whatever_the_number_of_workers(tmp_path):
    import filecmp
    one = write_dataset(tmp_path / "one", 3, seed=5, frames_per_patient=2, progress=False, workers=1)
    two = write_dataset(tmp_path / "two", 3, seed=5, frames_per_patient=2, progress=False, workers=2)
    names = sorted(p.name for p in (one / "images").iterdir())
    assert len(names) == 12 and names == sorted(p.name for p in (two / "images").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(one / "images", two / "images", names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == 12
    assert (one / "labels.csv").read_text() == (two / "labels.csv").read_text()
