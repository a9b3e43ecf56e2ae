"""Pinned preprocessing definitions (docs/design.md, "Pinned definitions"): Crimmins bit-exact with the golden file,
BT.601 gray, resize rule."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import preprocess as pp

GOLDEN = np.load(Path(__file__).parent / "data" / "crimmins.npz")
CASES = sorted({k.split("__")[0] for k in GOLDEN.files})


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_crimmins_matches_golden_bit_for_bit(case, iterations):
    out = pp.crimmins(GOLDEN[f"{case}__input"], iterations)
    expected = GOLDEN[f"{case}__iter{iterations}"]
    assert out.dtype == np.uint8 and out.shape == expected.shape
    assert np.array_equal(out, expected), f"{int((out != expected).sum())} pixels differ"


def test_crimmins_does_not_modify_its_input():
    x = GOLDEN["random_224__input"].copy()
    pp.crimmins(x, 2)
    assert np.array_equal(x, GOLDEN["random_224__input"])


def test_crimmins_rejects_non_uint8():
    with pytest.raises(pp.FrameError, match="uint8"):
        pp.crimmins(np.zeros((8, 8), np.float32))


def test_gray_uses_bt601_in_the_sources_channel_order():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red only
    assert pp.to_gray(rgb, "RGB")[0, 0] == round(0.299 * 200)
    assert pp.to_gray(rgb, "BGR")[0, 0] == round(0.114 * 200)
    rgba = np.dstack([rgb, np.full((4, 4), 7, np.uint8)])
    assert np.array_equal(pp.to_gray(rgba, "RGB"), pp.to_gray(rgb, "RGB"))


def test_16bit_frames_are_windowed_min_max_or_by_dicom_window():
    x = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    assert pp.to_gray(x).tolist() == [[0, 64], [128, 255]]
    # DICOM linear window: center 2000, width 2001 maps 1000 -> 0 and 3000 -> 255
    w = pp.to_gray(x, window=(2000, 2001))
    assert w[0, 0] == 0 and w[1, 0] == 255 and abs(int(w[0, 1]) - 128) <= 1


def test_resize_uses_area_when_shrinking_and_linear_when_enlarging():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (400, 500), dtype=np.uint8)
    assert np.array_equal(pp.resize(big), cv2.resize(big, (224, 224), interpolation=cv2.INTER_AREA))
    small = rng.integers(0, 256, (100, 120), dtype=np.uint8)
    assert np.array_equal(pp.resize(small), cv2.resize(small, (224, 224), interpolation=cv2.INTER_LINEAR))


def test_auto_region_cuts_black_surround():
    img = np.zeros((300, 400), np.uint8)
    img[40:260, 70:330] = 120
    r = pp.auto_region(img)
    assert (r.x0, r.y0, r.x1, r.y1) == (70, 40, 330, 260)
    assert pp.crop(img, r).shape == (220, 260)


def test_auto_region_keeps_a_blank_frame_whole():
    r = pp.auto_region(np.zeros((10, 20), np.uint8))
    assert (r.x0, r.y0, r.x1, r.y1) == (0, 0, 20, 10)
