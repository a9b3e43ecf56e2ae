"""Evaluation metrics against hand-computed examples, and their pictures."""
import json

import cv2
import numpy as np
import pytest

from runtime.evaluate import classification_report, confusion_matrix, confusion_png, iou, latency_png
from tests.known_bundle import write_known_bundle


def test_iou_of_hand_made_masks():
    assert iou(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]])) == pytest.approx(1 / 3)
    assert iou(np.array([[255, 0], [0, 0]], np.uint8), np.array([[1, 0], [0, 0]], bool)) == 1.0
    assert iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0                 # both empty: exactly right
    assert iou(np.zeros((4, 4)), np.ones((4, 4))) == 0.0
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[0:4, 0:5], b[2:6, 0:5] = 1, 1                                       # 10 shared of 30
    assert iou(a, b) == pytest.approx(10 / 30)
    with pytest.raises(ValueError, match="shape"):
        iou(np.zeros((2, 2)), np.zeros((3, 3)))


# y_true / y_pred of the hand example; confusion matrix (rows true, columns predicted):
#   [2 1 0 0]
#   [0 1 1 0]
#   [0 0 2 0]
#   [1 0 0 2]
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
Y_PRED = [0, 0, 1, 1, 2, 2, 2, 3, 3, 0]


def test_classification_report_matches_the_hand_computed_example():
    r = classification_report(Y_TRUE, Y_PRED, n_classes=4)
    assert r["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [1, 0, 0, 2]]
    assert r["n"] == 10 and r["accuracy"] == pytest.approx(0.7)
    precision = [2 / 3, 1 / 2, 2 / 3, 1.0]
    recall = [2 / 3, 1 / 2, 1.0, 2 / 3]
    f1 = [2 / 3, 1 / 2, 0.8, 0.8]
    assert r["precision_macro"] == pytest.approx(np.mean(precision)) == pytest.approx(0.708333, abs=1e-6)
    assert r["recall_macro"] == pytest.approx(np.mean(recall))
    assert r["f1_macro"] == pytest.approx(np.mean(f1)) == pytest.approx(0.691667, abs=1e-6)
    assert list(r["per_class"]) == ["1", "2", "3", "4"]
    for i, name in enumerate(["1", "2", "3", "4"]):
        c = r["per_class"][name]
        assert c["precision"] == pytest.approx(precision[i])
        assert c["recall"] == pytest.approx(recall[i]) == pytest.approx(c["accuracy"])   # the paper's per-grade
        assert c["f1"] == pytest.approx(f1[i])
    assert [r["per_class"][k]["support"] for k in "1234"] == [3, 2, 2, 3]
    named = classification_report(Y_TRUE, Y_PRED, class_names=["a", "b", "c", "d"])
    assert list(named["per_class"]) == ["a", "b", "c", "d"]


def test_zero_division_is_zero_and_absent_classes_stay_out_of_the_macro_average():
    r = classification_report([0, 0, 1, 1], [0, 0, 0, 0], n_classes=4)
    one, two, four = r["per_class"]["1"], r["per_class"]["2"], r["per_class"]["4"]
    assert (one["precision"], one["recall"], one["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert (two["precision"], two["recall"], two["f1"], two["support"]) == (0.0, 0.0, 0.0, 2)   # never predicted
    assert (four["precision"], four["recall"], four["f1"], four["support"]) == (0.0, 0.0, 0.0, 0)
    assert r["precision_macro"] == pytest.approx(0.25)          # mean over grades 1 and 2 only
    assert r["recall_macro"] == pytest.approx(0.5)
    assert r["f1_macro"] == pytest.approx(1 / 3)
    assert r["accuracy"] == pytest.approx(0.5)


def test_classification_report_refuses_bad_labels():
    with pytest.raises(ValueError, match="0..3"):
        classification_report([1, 2, 4], [1, 2, 3])             # grades, not grade - 1
    with pytest.raises(ValueError, match="pair up"):
        classification_report([0, 1], [0])
    with pytest.raises(ValueError, match="no labels"):
        classification_report([], [])
    assert confusion_matrix([0, 1, 1], [1, 1, 0], 2).tolist() == [[0, 1], [1, 1]]


DARKEST_BLUE = (107, 48, 8)      # BGR of the Blues ramp at 100 %


def test_confusion_png_shades_full_rows_darkest_and_survives_empty_rows(tmp_path):
    path = confusion_png(np.diag([5, 3, 0, 7]), tmp_path / "sub" / "cm.png", [f"grade {g}" for g in range(1, 5)],
                         "IFTA grade, 15 frames")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] >= 400 and img.shape[1] >= 400
    darkest = np.all(img == DARKEST_BLUE, axis=2)
    # three full diagonal cells (the empty row has none) of about 116x116 pixels each, less the text
    assert 3 * 80 * 80 < darkest.sum() < 3 * 120 * 120
    with pytest.raises(ValueError, match="class names"):
        confusion_png(np.eye(4), tmp_path / "x.png", ["a", "b"], "t")


def test_latency_png_draws_every_stage_including_zero_and_empty_ones(tmp_path):
    rng = np.random.default_rng(0)
    samples = {"preprocess": list(rng.normal(3, 0.2, 100)), "unet": list(rng.lognormal(2, 0.2, 100)),
               "gate": [0.0] * 50 + [0.01] * 50, "vgg": [], "total": list(rng.normal(40, 2, 100))}
    path = latency_png(samples, tmp_path / "lat.png", "bench")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] >= 5 * 64 and img.shape[1] >= 800
    p95_marks = np.all(img == (0, 140, 255), axis=2).sum()    # the orange p95 markers and values
    assert p95_marks > 50


# -- `sonoscore eval` end to end, against figures computed by hand -----------------------------------------------
# A bundle whose networks are known functions, so every mask and grade the pipeline produces is known in advance:
# the "UNet" passes the image through (kidney pixels are bright, so image / 255 > 0.5 is exactly the bright
# rectangle), the "VGG" gives the mean of the masked image (one feature: the kidney's brightness times its area),
# and the booster is trained to map the four brightnesses used below to grades 1-4. Frames are 512 x 512 with a
# black border of 32 pixels: the pipeline crops the 448 x 448 content and halves it to 224, so a rectangle with even
# edges maps exactly onto 224-pixel coordinates, and so does its labelled outline.
BORDER, BACKGROUND = 32, 20
KIDNEY = (50, 130, 60, 160)                     # rows r0:r1, columns c0:c1 in the 224 x 224 network image
GRADE_OF_BRIGHTNESS = {140: 1, 170: 2, 200: 3, 230: 4}
# name, kidney brightness (None: no kidney), drawn kidney, labelled kidney (None: no outline), labelled grade
FRAMES = [
    ("f0", 140, KIDNEY, KIDNEY, 1),
    ("f1", 170, KIDNEY, (50, 130, 70, 170), 2),              # outline 10 columns right: IoU 7200 / 8800
    ("f2", 200, KIDNEY, KIDNEY, 2),                          # graded 3, labelled 2
    ("f3", 230, KIDNEY, (70, 150, 60, 160), 4),              # outline 20 rows down: IoU 6000 / 10000
    ("f4", 230, KIDNEY, (60, 120, 70, 150), 3),              # graded 4, labelled 3; outline inside: 4800 / 8000
    ("f5", 140, KIDNEY, KIDNEY, 1),
    ("f6", None, None, None, 1),                             # no kidney in either: rejected, and rightly so
    ("f7", 200, (100, 110, 100, 110), KIDNEY, 2),            # 100 pixels found (below the gate's 5 %) of 8000
]


def _area(r):
    return (r[1] - r[0]) * (r[3] - r[2])


def _rect_iou(a, b):
    rows = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    cols = max(0, min(a[3], b[3]) - max(a[2], b[2]))
    inter = rows * cols
    return inter / (_area(a) + _area(b) - inter)


def _in_frame(rect):
    """224-pixel rectangle -> (row slice, column slice) of the 512 x 512 frame."""
    r0, r1, c0, c1 = (BORDER + 2 * v for v in rect)
    return slice(r0, r1), slice(c0, c1)


def _feature(brightness):
    return brightness / 255 * _area(KIDNEY) / 224 ** 2


@pytest.fixture(scope="module")
def known_bundle(tmp_path_factory):
    xgb = pytest.importorskip("xgboost")
    # Each grade's feature +-3 % (the four are 14-23 % apart): the splits fall in the gaps, far from the features
    # the float32 ONNX Runtime computes.
    spread = np.linspace(0.97, 1.03, 7)
    x = np.array([[_feature(v) * k] for v in GRADE_OF_BRIGHTNESS for k in spread])
    y = np.repeat([g - 1 for g in GRADE_OF_BRIGHTNESS.values()], len(spread))
    b = write_known_bundle(tmp_path_factory.mktemp("known") / "bundle", x, y, eta=0.5, tree_method="exact",
                           num_boost_round=10)
    booster = xgb.Booster(model_file=str(b / "booster.ubj"))
    assert (booster.predict(xgb.DMatrix(x)).argmax(1) == y).all()
    return b


@pytest.fixture(scope="module")
def known_dataset(tmp_path_factory):
    from runtime.dataset import labelme_document
    d = tmp_path_factory.mktemp("known-data")
    rows = ["image,patient,grade"]
    for name, brightness, drawn, labelled, grade in FRAMES:
        frame = np.zeros((512, 512), np.uint8)
        frame[BORDER:-BORDER, BORDER:-BORDER] = BACKGROUND
        truth = np.zeros((512, 512), np.uint8)
        if brightness is not None:
            frame[_in_frame(drawn)] = brightness
        if labelled is not None:
            truth[_in_frame(labelled)] = 1
        cv2.imwrite(str(d / f"{name}.png"), frame)
        (d / f"{name}.json").write_text(json.dumps(labelme_document(f"{name}.png", truth)))
        rows.append(f"{name}.png,{name},{grade}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


def test_the_known_bundle_finds_exactly_the_drawn_rectangle(known_bundle, known_dataset):
    """The premise of the eval test below, checked on the pipeline itself: the mask is the drawn rectangle."""
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.sources import Frame
    with Pipeline(Bundle.load(known_bundle), threads=1) as pipe:
        for name, brightness, drawn, _, _ in FRAMES:
            rec = pipe.process(Frame(0, "t", 0.0, cv2.imread(str(known_dataset / f"{name}.png"), 0)))
            expected = np.zeros((224, 224), np.uint8)
            if drawn is not None:
                expected[drawn[0]:drawn[1], drawn[2]:drawn[3]] = 1
            assert (rec.region.x0, rec.region.y0, rec.region.x1, rec.region.y1) == (32, 32, 480, 480)
            assert np.array_equal(rec.mask, expected), name


def test_eval_matches_the_hand_computed_iou_gate_and_grade_metrics(known_bundle, known_dataset, tmp_path):
    from tests.conftest import sonoscore
    report = tmp_path / "eval.json"
    r = sonoscore("eval", "--bundle", known_bundle, "--data", known_dataset, "--report", report)
    assert r.returncode == 0, r.stderr
    out = json.loads(report.read_text())

    ious = [_rect_iou(drawn, labelled) for _, _, drawn, labelled, _ in FRAMES if labelled is not None]
    assert ious == pytest.approx([1, 7200 / 8800, 1, 6000 / 10000, 4800 / 8000, 1, 100 / 8000])
    assert out["iou_images"] == 7 and out["iou_mean"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert out["images"] == 8 and out["gate_agreement"] == pytest.approx(7 / 8)   # f7: kidney labelled, not found

    # Graded: frames with a labelled kidney the gate passed, f0-f5. Labelled 1 2 2 4 3 1, graded 1 2 3 4 4 1.
    assert out["graded_frames"] == 6
    assert out["confusion_matrix"] == [[2, 0, 0, 0],      # rows: labelled grade 1..4; columns: graded 1..4
                                       [0, 1, 1, 0],
                                       [0, 0, 0, 1],
                                       [0, 0, 0, 1]]
    assert out["accuracy"] == pytest.approx(4 / 6)
    per = out["per_class"]
    assert [per[g]["precision"] for g in "1234"] == pytest.approx([1.0, 1.0, 0.0, 0.5])
    assert [per[g]["recall"] for g in "1234"] == pytest.approx([1.0, 0.5, 0.0, 1.0])
    assert [per[g]["support"] for g in "1234"] == [2, 2, 1, 1]
    assert report.with_suffix(".confusion.png").is_file()
