"""Labelme as people write it (issue 13 item 6): kidney label variants and `--label kidney=...`, polygon, rectangle,
circle and mask shapes rasterised (against pixel sets computed here by hand), lines and points ignored and counted,
labels not mapped counted, an image whose kidney annotation is missing named and left out of the IoU, labels.csv
with a byte-order mark, and grades from labelme flags; `sonoscore eval` and `train` end to end."""
import base64
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.labelme import (DEFAULT_KIDNEY_LABELS, MISSING, NO_KIDNEY, OUTLINED, LabelMap, flag_grade,
                             normalise_label, rasterise_kidney, read_dataset)
from tests.conftest import sonoscore
from tests.known_bundle import write_known_bundle


def labelme(path: Path, image: str, shapes: list, h: int = 40, w: int = 50, flags: dict | None = None) -> None:
    path.write_text(json.dumps({"version": "5.4.1", "flags": flags or {}, "shapes": shapes, "imagePath": image,
                                "imageData": None, "imageHeight": h, "imageWidth": w}))


def shape(label: str, kind: str, points, **extra) -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}, **extra}


def png_b64(mask01: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", mask01.astype(np.uint8))
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    """{(x, y)} of the mask's foreground: column, row, as labelme writes points."""
    ys, xs = np.nonzero(mask)
    return set(zip(xs.tolist(), ys.tolist()))


def box(x0, y0, x1, y1) -> set[tuple[int, int]]:
    """Every pixel of columns x0..x1 and rows y0..y1, edges included."""
    return {(x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)}


# -- labels ----------------------------------------------------------------------------------------------------

def test_the_default_reads_the_usual_kidney_variants_and_nothing_else():
    m = LabelMap.default()
    for label in ("kidney", "Kidney", "KIDNEY", "left kidney", "Left Kidney", "right_kidney", "kidney_l", "Kidney_R",
                  "kidney left", "Kidney-Right", "lt kidney", "Lt. Kidney", "RT-KIDNEY", "kidneys", " kidney ",
                  "transplant kidney", "Renal allograft"):
        assert m.is_kidney(label), label
    for label in ("kidney cyst", "liver", "renal pelvis", "cortex", "", "kidney stone", "spleen"):
        assert not m.is_kidney(label), label
    assert m.given is None and m.describe() == {"kidney": list(DEFAULT_KIDNEY_LABELS), "default": True}
    assert normalise_label("Kidney_R") == normalise_label("kidney r") == normalise_label("KIDNEY-R") == "kidneyr"


def test_label_option_lists_exactly_the_kidney_labels_the_user_names():
    m = LabelMap.parse(['kidney=kidney,left kidney,Kidney_R'])
    assert m.given == ("kidney", "left kidney", "Kidney_R")
    assert all(m.is_kidney(t) for t in ("KIDNEY", "Left_Kidney", "kidney-r", "kidney r"))
    assert not m.is_kidney("right kidney") and not m.is_kidney("kidney_l")     # not listed: the list is exact
    both = LabelMap.parse(['kidney="renal outline"', "kidney=Niere"])          # quotes kept by a shell script
    assert both.given == ("renal outline", "Niere") and both.is_kidney("Renal_Outline")
    assert LabelMap.parse(None) == LabelMap.parse([]) == LabelMap.default()


@pytest.mark.parametrize("text, phrase", [
    ("left kidney", "names no class"),
    ("liver=liver", "only the kidney's labels"),
    ("kidney=", "gives no label"),
    ("kidney= , ", "gives no label"),
])
def test_a_bad_label_option_is_one_sentence(text, phrase):
    with pytest.raises(ValueError, match=phrase) as e:
        LabelMap.parse([text])
    assert "\n" not in str(e.value)


def test_flag_names_for_grades():
    table = {"grade_3": 3, "Grade 1": 1, "grade-4": 4, "GRADE2": 2, "IFTA 3": 3, "IFTA grade 2": 2,
             "IFTA <25%": 1, "IFTA 0-24%": 1, "ifta_25-49": 2, "IFTA 25-49%": 2, "IFTA 50-74%": 3, "50-74%": 3,
             "IFTA 50–74 %": 3, "IFTA >=75%": 4, "IFTA ≥75%": 4, "IFTA 75-100%": 4,
             "3": None, "grade_5": None, "grade_0": None, "fibrosis": None, "IFTA 30-60%": None, "kidney": None}
    assert {k: flag_grade(k) for k in table} == table


# -- rasterising -----------------------------------------------------------------------------------------------

def test_polygon_rectangle_circle_and_mask_shapes_rasterise_to_the_hand_computed_pixels():
    labels = LabelMap.default()
    patch = np.array([[1, 0, 0, 1],
                      [1, 1, 0, 0],
                      [0, 1, 1, 1]], np.uint8)                 # 4 columns x 3 rows
    shapes = {
        "polygon": shape("left kidney", "polygon", [[2, 2], [10, 2], [10, 8], [2, 8]]),
        "rectangle": shape("Kidney_R", "rectangle", [[12.4, 3.6], [17, 9.2]]),      # corners round to 12,4 / 17,9
        "circle": shape("KIDNEY", "circle", [[5, 30], [5, 31]]),                      # radius 1: centre + 4
        "mask": shape("kidney left", "mask", [[20.7, 10.2], [23.9, 12.8]], mask=png_b64(patch)),  # box 20,10-23,12
    }
    expected = {
        "polygon": box(2, 2, 10, 8),
        "rectangle": box(12, 4, 17, 9),
        "circle": {(5, 30), (4, 30), (6, 30), (5, 29), (5, 31)},
        "mask": {(20, 10), (23, 10), (20, 11), (21, 11), (21, 12), (22, 12), (23, 12)},
    }
    for kind in shapes:
        got = pixels(rasterise_kidney([shapes[kind]], (40, 50), labels))
        assert got == expected[kind], kind
    # a circle with a fractional centre and radius: every pixel whose centre is within the radius
    got = pixels(rasterise_kidney([shape("kidney", "circle", [[30.5, 20], [30.5, 23]])], (40, 50), labels))
    assert got == {(x, y) for x in range(50) for y in range(40) if (x - 30.5) ** 2 + (y - 20) ** 2 <= 9}
    assert len(got) == 6 + 2 * 6 + 2 * 4           # rows dy = 0, +-1, +-2 (dx = +-0.5, +-1.5[, +-2.5]); +-3: none
    # together: the union; lines, points and other labels add nothing
    extra = [shape("kidney", "line", [[0, 0], [49, 39]]), shape("kidney", "point", [[45, 35]]),
             shape("liver", "polygon", [[30, 30], [40, 30], [40, 38]])]
    got = pixels(rasterise_kidney(list(shapes.values()) + extra, (40, 50), labels))
    assert got == set().union(*expected.values())


def test_shapes_at_the_frame_edge_are_clipped_and_a_mask_of_the_wrong_size_is_named(tmp_path):
    labels = LabelMap.default()
    m = rasterise_kidney([shape("kidney", "mask", [[47, 38], [50, 40]], mask=png_b64(np.ones((3, 4))))],
                         (40, 50), labels)
    assert pixels(m) == box(47, 38, 49, 39)
    m = rasterise_kidney([shape("kidney", "circle", [[0, 0], [0, 2]])], (40, 50), labels)
    assert pixels(m) == {(x, y) for x in range(3) for y in range(3) if x * x + y * y <= 4}
    with pytest.raises(ValueError, match=r"a\.json: a kidney mask shape's PNG is 4x3 pixels but its points span 5x3"):
        rasterise_kidney([shape("kidney", "mask", [[0, 0], [4, 2]], mask=png_b64(np.ones((3, 4))))],
                         (40, 50), labels, tmp_path / "a.json")
    with pytest.raises(ValueError, match="not a base64 PNG"):
        rasterise_kidney([shape("kidney", "mask", [[0, 0], [4, 2]], mask="bm90IGEgcG5n")], (40, 50), labels, "x")


# -- the dataset's report --------------------------------------------------------------------------------------

def write_png(path: Path, h: int = 40, w: int = 50, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w), value, np.uint8))


@pytest.fixture()
def people_dataset(tmp_path):
    """Labelme as people write it: every case the reader must tell apart, with a labels.csv saved with a BOM."""
    d = tmp_path / "d"
    for name in ("a", "b", "c", "d", "e", "sub/f", "g"):
        write_png(d / f"{name}.png")
    labelme(d / "a.json", "a.png", [shape("left kidney", "polygon", [[2, 2], [10, 2], [10, 8], [2, 8]]),
                                    shape("liver", "polygon", [[20, 20], [30, 20], [30, 30]])])
    labelme(d / "b.json", "b.png", [shape("Kidney_R", "rectangle", [[12, 4], [17, 9]])])
    labelme(d / "c.json", "c.png", [shape("liver", "polygon", [[20, 20], [30, 20], [30, 30]]),
                                    shape("Kidney cyst", "circle", [[5, 5], [5, 7]])])   # no kidney outline
    # d.png: no labelme file at all
    labelme(d / "e.json", "e.png", [])                                                    # shows no kidney
    labelme(d / "sub" / "f.json", "f.png", [shape("kidney", "circle", [[20, 20], [20, 25]]),
                                            shape("kidney", "line", [[0, 0], [10, 10]])],
            flags={"IFTA 50-74%": True, "grade_1": False, "needs review": True})
    labelme(d / "g.json", "g.png", [shape("kidney", "point", [[3, 3]])], flags={"no kidney": False})
    rows = "image,patient,grade\r\na.png,p1,1\r\nb.png,p1,2\r\nc.png,p2,\r\nd.png,p2,4\r\ne.png,p3,1\r\n" \
           "sub/f.png,p3,\r\ng.png,p4,\r\n"
    (d / "labels.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())      # Excel's "CSV UTF-8"
    return d


def test_every_image_is_outlined_shows_no_kidney_or_has_its_annotation_missing_and_the_report_counts_it(
        people_dataset):
    ds = read_dataset(people_dataset)
    by = {it.relative: it for it in ds}
    assert list(by) == ["a.png", "b.png", "c.png", "d.png", "e.png", "g.png", "sub/f.png"]
    assert {k: it.kidney for k, it in by.items()} == {
        "a.png": OUTLINED, "b.png": OUTLINED, "c.png": MISSING, "d.png": MISSING, "e.png": NO_KIDNEY,
        "g.png": MISSING, "sub/f.png": OUTLINED}
    assert {k: (it.grade, it.grade_from) for k, it in by.items()} == {
        "a.png": (1, "labels.csv"), "b.png": (2, "labels.csv"), "c.png": (None, None), "d.png": (4, "labels.csv"),
        "e.png": (1, "labels.csv"), "g.png": (None, None), "sub/f.png": (3, "flags")}
    assert pixels(by["a.png"].load_mask()) == box(2, 2, 10, 8)
    assert pixels(by["b.png"].load_mask()) == box(12, 4, 17, 9)
    assert pixels(by["sub/f.png"].load_mask()) == {(x, y) for x in range(50) for y in range(40)
                                                   if (x - 20) ** 2 + (y - 20) ** 2 <= 25}
    r = ds.report()
    assert (r["images"], r["kidney_outlined"], r["no_kidney"], r["kidney_missing"]) == (7, 3, 1, 3)
    assert r["kidney_missing_images"] == ["c.png", "d.png", "g.png"]
    assert r["unmapped_labels"] == {"liver": 2, "Kidney cyst": 1}
    assert r["ignored_shapes"] == {"line": 1, "point": 1}
    assert r["grades_from"] == {"labels.csv": 4, "flags": 1}
    assert r["unread_flags"] == {"needs review": 1}
    line = ds.summary_line()
    assert "\n" not in line
    for part in ("7 images", "kidney outlined in 3", "no kidney in 1", "kidney annotation missing in 3",
                 "c.png, d.png, g.png", "'liver' x2", "'Kidney cyst' x1", "'line' x1", "'point' x1",
                 "grades from labels.csv 4, from flags 1"):
        assert part in line, (part, line)


def test_the_label_option_decides_what_is_the_kidney(people_dataset):
    ds = read_dataset(people_dataset, labels=LabelMap.parse(["kidney=Kidney cyst,left kidney"]))
    by = {it.relative: it.kidney for it in ds}
    assert by["c.png"] == OUTLINED and by["a.png"] == OUTLINED
    assert by["b.png"] == MISSING and by["sub/f.png"] == MISSING      # "Kidney_R" and "kidney" are not listed
    r = ds.report()
    assert r["unmapped_labels"] == {"kidney": 3, "liver": 2, "Kidney_R": 1}
    assert r["labels"] == {"kidney": ["Kidney cyst", "left kidney"], "default": False}


def test_labels_csv_with_a_bom_and_excel_headers_reads(tmp_path):
    write_png(tmp_path / "f1.png")
    (tmp_path / "labels.csv").write_bytes("\ufeffImage, Patient ,GRADE\r\nf1.png,p7,3\r\n\r\n".encode("utf-8"))
    (item,) = read_dataset(tmp_path)
    assert (item.image_path.name, item.patient, item.grade) == ("f1.png", "p7", 3)


def test_grades_from_flags_without_a_csv_and_contradictions_are_one_sentence(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    labelme(tmp_path / "a.json", "a.png", [shape("kidney", "polygon", [[1, 1], [5, 1], [5, 5]])],
            flags={"grade_1": False, "grade_4": True})
    labelme(tmp_path / "b.json", "b.png", [], flags={"IFTA 25-49%": True})     # graded, not outlined: missing
    a, b = read_dataset(tmp_path)
    assert (a.grade, a.grade_from, a.kidney) == (4, "flags", OUTLINED)
    assert (b.grade, b.grade_from, b.kidney) == (2, "flags", MISSING)
    labelme(tmp_path / "b.json", "b.png", [], flags={"grade_2": True, "IFTA >=75%": True})
    with pytest.raises(ValueError, match=r"b\.json: its flags set grades 2, 4 at once"):
        read_dataset(tmp_path)
    labelme(tmp_path / "b.json", "b.png", [], flags={"grade_2": True})
    (tmp_path / "labels.csv").write_text("image,patient,grade\na.png,p,4\nb.png,p,3\n")
    with pytest.raises(ValueError, match=r"b\.json: its flags say grade 2 but .*labels\.csv line 3 says 3"):
        read_dataset(tmp_path)


# -- `sonoscore eval` and `train` ------------------------------------------------------------------------------
# A bundle of known functions (as in tests/test_evaluate.py): the "UNet" passes the image through, so the mask is
# exactly the bright rectangle drawn in the frame; frames are 512 x 512 with a black border of 32 pixels, which the
# pipeline crops, halving the 448 x 448 content to 224: a rectangle with even edges maps exactly onto 224 pixels.
BORDER, BACKGROUND, BRIGHT = 32, 20, 200
KIDNEY = (50, 130, 60, 160)                    # rows r0:r1, columns c0:c1 in the 224 x 224 network image


def make_identity_bundle(b: Path) -> Path:
    """The known-function bundle (tests/known_bundle.py) with a booster mapping brightness 0..0.2 to grades 1..4."""
    return write_known_bundle(b, np.linspace(0.0, 0.2, 40)[:, None], np.repeat(np.arange(4), 10))


def in_frame(rect=KIDNEY) -> tuple[int, int, int, int]:
    """A 224-pixel rectangle (r0, r1, c0, c1) as rows/columns of the 512 x 512 frame."""
    return tuple(BORDER + 2 * v for v in rect)


def kidney_frame(kidney: bool = True) -> np.ndarray:
    frame = np.zeros((512, 512), np.uint8)
    frame[BORDER:-BORDER, BORDER:-BORDER] = BACKGROUND
    if kidney:
        r0, r1, c0, c1 = in_frame()
        frame[r0:r1, c0:c1] = BRIGHT
    return frame


@pytest.fixture(scope="module")
def identity_bundle(tmp_path_factory):
    return make_identity_bundle(tmp_path_factory.mktemp("known") / "bundle")


@pytest.fixture(scope="module")
def variants_dataset(tmp_path_factory):
    """The drawn kidney labelled as people label it; each outline covers exactly the drawn pixels."""
    d = tmp_path_factory.mktemp("variants")
    r0, r1, c0, c1 = in_frame()
    poly = [[c0, r0], [c1 - 1, r0], [c1 - 1, r1 - 1], [c0, r1 - 1]]         # pixel centres, edges included
    patch = np.ones((r1 - r0, c1 - c0), np.uint8)
    docs = {
        "f0": [shape("left kidney", "polygon", poly)],
        "f1": [shape("Kidney_R", "rectangle", [[c0, r0], [c1 - 1, r1 - 1]])],
        "f2": [shape("KIDNEY-L", "mask", [[c0, r0], [c1 - 1, r1 - 1]], mask=png_b64(patch))],
        "f3": [shape("liver", "polygon", poly)],                             # kidney annotation missing
        "f4": None,                                                          # no labelme file: missing
        "f5": [],                                                            # shows no kidney, and none drawn
        "f6": [shape("renal outline", "polygon", poly)],                     # not a default variant
    }
    for name, shapes in docs.items():
        cv2.imwrite(str(d / f"{name}.png"), kidney_frame(kidney=name != "f5"))
        if shapes is not None:
            labelme(d / f"{name}.json", f"{name}.png", shapes, h=512, w=512,
                    flags={"grade_2": True} if name == "f1" else None)
    rows = ["image,patient,grade"] + [f"{n}.png,{n},{'' if n == 'f1' else 3}" for n in docs]
    (d / "labels.csv").write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode())
    return d


def test_the_premise_the_identity_bundle_finds_exactly_the_drawn_rectangle(identity_bundle):
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.sources import Frame
    with Pipeline(Bundle.load(identity_bundle), threads=1) as pipe:
        rec = pipe.process(Frame(0, "t", 0.0, kidney_frame()))
    expected = np.zeros((224, 224), np.uint8)
    expected[KIDNEY[0]:KIDNEY[1], KIDNEY[2]:KIDNEY[3]] = 1
    assert (rec.region.x0, rec.region.y0, rec.region.x1, rec.region.y1) == (32, 32, 480, 480)
    assert np.array_equal(rec.mask, expected) and rec.accepted


def test_eval_reads_the_variants_names_the_missing_and_counts_the_unmapped(identity_bundle, variants_dataset,
                                                                           tmp_path):
    report = tmp_path / "eval.json"
    r = sonoscore("eval", "--bundle", identity_bundle, "--data", variants_dataset, "--report", report)
    assert r.returncode == 0, r.stderr
    out = json.loads(report.read_text())
    # f0-f2 (left kidney, Kidney_R, KIDNEY-L): outlines exactly on the drawn kidney
    assert out["iou_images"] == 3 and out["iou_mean"] == 1.0
    assert out["kidney_missing_images"] == ["f3.png", "f4.png", "f6.png"] and out["kidney_missing"] == 3
    assert out["gate_images"] == 4 and out["gate_agreement"] == 1.0          # f0-f2 kidney, f5 none
    assert out["unmapped_labels"] == {"liver": 1, "renal outline": 1}
    assert out["grades_from"] == {"labels.csv": 6, "flags": 1}
    # graded: f0-f2 (outlined, passed) and f3, f4, f6 (no outline, passed the gate, have a grade)
    assert out["graded_frames"] == 6 and out["graded_without_outline"] == 3
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("eval: dataset")]
    assert len(lines) == 1 and "kidney annotation missing in 3 (f3.png, f4.png, f6.png" in lines[0]
    assert "'liver' x1" in lines[0] and "'renal outline' x1" in lines[0]
    assert "IoU 1.000 on 3 (3 without a kidney annotation left out)" in r.stderr

    custom = tmp_path / "custom.json"
    r = sonoscore("eval", "--bundle", identity_bundle, "--data", variants_dataset, "--report", custom,
                  "--label", "kidney=renal outline,Left_Kidney", "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(custom.read_text())
    assert out["iou_images"] == 2 and out["iou_mean"] == 1.0                 # f0 and f6
    assert out["kidney_missing_images"] == ["f1.png", "f2.png", "f3.png", "f4.png"]
    assert out["unmapped_labels"] == {"KIDNEY-L": 1, "Kidney_R": 1, "liver": 1}
    assert out["labels"] == {"kidney": ["renal outline", "Left_Kidney"], "default": False}


def test_a_bad_label_option_exits_2_in_one_sentence_for_eval_and_train(identity_bundle, variants_dataset, tmp_path):
    for args in (("eval", "--bundle", identity_bundle), ("train", "--out", tmp_path / "b")):
        r = sonoscore(*args, "--data", variants_dataset, "--label", "liver=liver")
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
        assert "only the kidney's labels are read" in r.stderr
    assert not (tmp_path / "b").exists()


def test_training_reads_the_label_option_and_leaves_out_images_without_a_kidney_annotation(variants_dataset, capsys):
    from export.recipe import load_preprocessed
    from runtime.graph import Graph
    images, masks, grades, patients = load_preprocessed(variants_dataset, Graph(crimmins_iterations=0),
                                                        progress=False, kidney_labels=("renal outline",))
    err = capsys.readouterr().err
    assert "kidney annotation missing in 5" in err and "kidney = renal outline" in err
    assert sorted(patients.tolist()) == ["f5", "f6"]                   # f5: no kidney (empty truth), f6: outlined
    expected = np.zeros((224, 224), np.uint8)
    expected[KIDNEY[0]:KIDNEY[1], KIDNEY[2]:KIDNEY[3]] = 1
    by = dict(zip(patients.tolist(), masks))
    assert np.array_equal(by["f6"], expected) and not by["f5"].any()


def test_train_reads_the_label_option_from_the_command_line(variants_dataset, tmp_path):
    """Through the CLI: the dataset's line names the labels given, and with them f1 (graded by its flag only,
    "Kidney_R") is left out; what is left has no grade, which stops the training before any network is made."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(variants_dataset, data)
    (data / "labels.csv").write_text("image,patient,grade\n" + "".join(f"f{i}.png,f{i},\n" for i in range(7)))
    r = sonoscore("train", "--data", data, "--out", tmp_path / "b", "--label", "kidney=renal outline")
    assert r.returncode == 2, r.stderr
    assert "labels read as the kidney: kidney = renal outline" in r.stderr
    assert "kidney annotation missing in 5 (f0.png, f1.png, f2.png and 2 more" in r.stderr
    assert "has no grades" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "b").exists()
