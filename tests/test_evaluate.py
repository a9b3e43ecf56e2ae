"""Evaluation metrics against hand-computed examples, and their pictures."""
import cv2
import numpy as np
import pytest

from runtime.evaluate import classification_report, confusion_matrix, confusion_png, iou, latency_png


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
