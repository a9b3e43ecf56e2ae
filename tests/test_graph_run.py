"""`Graph.run`, the per-frame graph's one composition, with the options its callers use (outputs given instead of
computed, `until`), the one source preparation (`Graph.prepare_source`), the one kidney rule (`Graph.is_kidney`,
`kidney_frames`) and the one mapping of a mask back to a frame (`runtime.measure.mask_to_source`).

The networks are real ONNX files whose outputs are known in closed form (tests/test_booster_aug.py: the UNet's
'probability' is the image itself, the VGG's features the masked image's channel means) and the booster a real
XGBoost model run by `runtime.booster.Booster`, so every expected value is derived here, never read from trained
weights. A runner a stage must not use is passed as None: `Graph.run` refuses to run a stage without its runner."""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from runtime import preprocess as pp
from runtime.backends.ort import OrtRunner
from runtime.graph import STAGES, Graph, masked
from runtime.measure import mask_to_source
from runtime.normalize import to_input
from runtime.preprocess import Region
from runtime.sources import Frame
from tests.test_booster_aug import _identity_unet, _mean_vgg, _ramp

GRAPH = Graph(vgg_channels=3)      # gate: prob > 0.5, at least 5 % of the image


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    with OrtRunner(_identity_unet(d / "unet.onnx")) as un, OrtRunner(_mean_vgg(d / "vgg.onnx")) as vg:
        yield un, vg


@pytest.fixture(scope="module")
def booster(tmp_path_factory):
    """A real 4-class XGBoost model on the mean VGG's 3 features."""
    import xgboost as xgb

    from runtime.booster import Booster
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = np.digitize(x.sum(1), [-1.0, 0.0, 1.0])
    path = tmp_path_factory.mktemp("booster") / "b.ubj"
    xgb.train({"objective": "multi:softprob", "num_class": 4, "max_depth": 3, "nthread": 1},
              xgb.DMatrix(x, label=y), 5).save_model(str(path))
    return Booster.load(path, backend="gtil")


def mean_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What the mean VGG returns for the image under the mask."""
    x = to_input(masked(image, mask), 3, GRAPH.vgg_normalization)
    return x.mean(axis=(2, 3), dtype=np.float64)


# -- Graph.run ------------------------------------------------------------------------------------------------------

def test_run_is_unet_gate_vgg_booster_and_laps_each_stage(nets, booster):
    un, vg = nets
    image = _ramp(0.0, 1.0)
    laps = []
    r = GRAPH.run(image, un, vg, booster, laps.append)
    assert laps == list(STAGES)
    want_mask = (image.astype(np.float32) / 255 > 0.5).astype(np.uint8)
    assert np.array_equal(r.gate.mask, want_mask) and r.gate.accepted
    np.testing.assert_allclose(r.features, mean_features(image, want_mask), rtol=1e-5)
    assert (r.probabilities, r.grade) == booster.predict_one(r.features)


def test_until_gate_gives_the_vgg_input_and_runs_no_vgg(nets):
    un, _ = nets
    image = _ramp(0.0, 1.0)
    laps = []
    r = GRAPH.run(image, un, None, None, laps.append, until="gate")   # a VGG needed would be refused
    assert laps == ["unet", "gate"] and r.features is None
    np.testing.assert_array_equal(r.vgg_feeds["image"], GRAPH.vgg_feeds(image, r.gate.mask)["image"])
    rejected = GRAPH.run(_ramp(0.0, 0.48), un, until="gate")
    assert not rejected.gate.accepted and rejected.vgg_feeds is None


def test_until_vgg_stops_at_the_features_even_with_a_booster(nets, booster):
    un, vg = nets
    laps = []
    r = GRAPH.run(_ramp(0.0, 1.0), un, vg, booster, laps.append, until="vgg")
    assert laps == ["unet", "gate", "vgg"] and r.features is not None and r.grade is None


def test_a_mask_given_replaces_the_unet_and_its_threshold(nets, booster):
    _, vg = nets
    image = _ramp(0.0, 1.0)
    mask = np.zeros(image.shape, np.uint8)
    mask[:, :30] = 1                                   # the dark side, which the UNet would never pick
    prob = np.full(image.shape, 0.25, np.float32)      # carried, not thresholded
    laps = []
    r = GRAPH.run(image, None, vg, booster, laps.append, mask=mask, prob=prob)
    assert laps == ["gate", "vgg", "booster"]
    assert r.gate.mask is mask and r.gate.fraction == pytest.approx(30 / 224) and r.prob is prob
    np.testing.assert_allclose(r.features, mean_features(image, mask), rtol=1e-5)
    small = mask.copy()
    small[:, 5:] = 0                                   # 2 % of the image: the gate rejects what it is given
    assert not GRAPH.run(image, None, None, booster, mask=small).gate.accepted


def test_a_probability_map_given_is_thresholded_by_the_graph_it_runs_in(nets):
    _, vg = nets
    image = _ramp(0.0, 1.0)
    prob = image.astype(np.float32) / 255
    for t in (0.4, 0.5, 0.6):
        r = replace(GRAPH, mask_threshold=t).run(image, None, vg, prob=prob, until="vgg")
        assert np.array_equal(r.gate.mask, (prob > t).astype(np.uint8))
        np.testing.assert_allclose(r.features, mean_features(image, r.gate.mask), rtol=1e-5)


def test_features_given_replace_the_vgg_and_reach_the_booster(nets, booster):
    un, _ = nets
    f = np.array([0.3, -1.0, 2.0], np.float32)
    laps = []
    r = GRAPH.run(_ramp(0.0, 1.0), un, None, booster, laps.append, features=f)
    assert laps == ["unet", "gate", "booster"] and r.vgg_feeds is None
    assert r.features.shape == (1, 3) and (r.probabilities, r.grade) == booster.predict_one(f[None])
    closed = GRAPH.run(_ramp(0.0, 0.48), un, None, booster, features=f)
    assert not closed.gate.accepted and closed.features is None and closed.grade is None


def test_a_stage_without_its_runner_or_an_unknown_stage_is_refused(nets):
    un, _ = nets
    with pytest.raises(ValueError, match="UNet runner"):
        GRAPH.run(_ramp(0.0, 1.0))
    with pytest.raises(ValueError, match="VGG runner"):
        GRAPH.run(_ramp(0.0, 1.0), un)
    with pytest.raises(ValueError, match="until='score'"):
        GRAPH.run(_ramp(0.0, 1.0), un, until="score")


def test_agreement_outputs_with_masks_given_are_those_of_the_run_that_made_them(nets, booster):
    """runtime.agreement.graph_outputs, calibrate's and the INT8 check's frame loop, is Graph.run frame by frame:
    the masks of one run given to another (no UNet) give the same gate, features and grades."""
    from runtime.agreement import graph_outputs
    un, vg = nets
    images = [_ramp(0.0, 1.0), _ramp(0.0, 0.6), _ramp(0.0, 0.48), _ramp(0.3, 0.9)]
    first = graph_outputs(GRAPH, un, vg, booster, images, num_classes=4, keep_prob=True)
    again = graph_outputs(GRAPH, None, vg, booster, images, num_classes=4, masks_from=first, keep_prob=True)
    stored = graph_outputs(GRAPH, None, None, booster, images, num_classes=4, prob=first.prob,
                           features=first.features)
    assert first.accepted.tolist() == [True, True, False, True]
    for o in (again, stored):
        np.testing.assert_array_equal(o.masks, first.masks)
        np.testing.assert_array_equal(o.accepted, first.accepted)
        np.testing.assert_array_equal(o.features, first.features)
        np.testing.assert_array_equal(o.probabilities, first.probabilities)
    np.testing.assert_array_equal(again.prob, first.prob)


# -- the source preparation ---------------------------------------------------------------------------------------

def test_prepare_source_windows_a_16_bit_frame_with_the_sources_window():
    rng = np.random.default_rng(1)
    px = rng.integers(0, 4096, (300, 400)).astype(np.uint16)
    frame = Frame(0, "t", 0.0, px, window=(1000.0, 800.0))
    gray, image, region = GRAPH.prepare_source(frame)
    assert np.array_equal(gray, pp.to_gray(px, "RGB", (1000.0, 800.0)))
    assert not np.array_equal(gray, pp.to_gray(px))                    # min-max would be another image
    assert np.array_equal(image, GRAPH.preprocess(gray, region)[0])


def test_prepare_source_keeps_only_the_scan_sector_of_a_frame_that_may_carry_text():
    from runtime.phantom import KidneyPhantom
    fan = KidneyPhantom(grade=2, seed=3).frame(0).image
    fan = fan if fan.ndim == 2 else cv2.cvtColor(fan, cv2.COLOR_BGR2GRAY)
    screen = np.zeros((fan.shape[0] + 60, fan.shape[1] + 200), np.uint8)
    screen[30:30 + fan.shape[0], 100:100 + fan.shape[1]] = fan
    cv2.putText(screen, "PATIENT NAME 1970-01-01", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1)
    meta = {"burned_in_annotation": None}                              # not stated: it may carry text
    gray, image, region = GRAPH.prepare_source(Frame(0, "t", 0.0, screen, meta=meta))
    assert region.y0 >= 25 and not gray[:25].any()                     # the text line is not in the input
    plain, _, plain_region = GRAPH.prepare_source(Frame(0, "t", 0.0, screen))
    assert plain_region.y0 < 25                                        # a frame without the rule keeps it
    with pytest.raises(pp.FrameError):
        GRAPH.prepare_source(Frame(0, "t", 0.0, np.zeros((200, 300), np.uint8), meta=meta))


def test_bench_features_use_the_pipelines_source_preparation(tiny_bundle):
    """The bench's warm-booster features come from the frame as the pipeline prepares it: a 16-bit frame with a
    window gives the features of its windowed image, not of a min-max one."""
    from runtime.bench import bench_features
    from runtime.bundle import Bundle
    from runtime.phantom import KidneyPhantom
    from runtime.pipeline import Pipeline
    img = KidneyPhantom(grade=2, seed=3).frame(0).image
    img = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    px = img.astype(np.uint16) * 16 + 2000                            # a 16-bit frame
    frame = Frame(0, "t", 0.0, px, window=(3000.0, 2000.0))
    with Pipeline(Bundle.load(tiny_bundle), threads=1, min_mask_fraction=0.0) as pipe:
        (feats,) = bench_features(pipe, [frame])
        _, prepared, _ = pipe.prepare(frame)
        want = pipe.graph.run(prepared, pipe.unet, pipe.vgg, until="vgg").features
        minmax, _ = pipe.graph.preprocess(pp.to_gray(px))
        other = pipe.graph.run(minmax, pipe.unet, pipe.vgg, until="vgg").features
    np.testing.assert_array_equal(feats, want)
    assert not np.array_equal(prepared, minmax) and not np.array_equal(feats, other)


# -- which frames count as kidney -------------------------------------------------------------------------------

def test_a_labelled_frame_is_kidney_when_its_mask_passes_the_gate():
    g = Graph(min_mask_fraction=0.25)
    m = np.zeros((4, 4), np.uint8)
    m[0, :] = 1                                        # 25 %: at the minimum
    assert g.is_kidney(m) and g.is_kidney(m * 255)     # 0/255 is the same mask
    m[0, 0] = 0
    assert not g.is_kidney(m)
    full, empty = np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    masks = [full, empty, full, full]
    assert g.kidney_frames(masks).tolist() == [True, False, True, True]
    assert g.kidney_frames(masks, np.array([2, 3, 0, 4])).tolist() == [True, False, False, True]   # 0: unknown
    assert g.kidney_frames(masks, [2, 3, None, 1]).tolist() == [True, False, False, True]         # None too


# -- the one mask-to-frame mapping --------------------------------------------------------------------------------

def bilinear_back(mask: np.ndarray, region: Region, shape: tuple[int, int]) -> np.ndarray:
    """The documented rule, written out: frame pixel (y, x) of the region samples the 0/1 mask at
    ((y - y0 + 0.5) / sy - 0.5, (x - x0 + 0.5) / sx - 0.5) (sx = region width / 224), bilinearly, edges
    replicated; > 0.5 is kidney."""
    out = np.zeros(shape, np.uint8)
    m = (mask > 0).astype(np.float64)

    def axis(n_out, n_in):
        u = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        i0 = np.floor(u).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), u - i0

    r0, r1, a = axis(region.y1 - region.y0, m.shape[0])
    c0, c1, b = axis(region.x1 - region.x0, m.shape[1])
    top = m[r0][:, c0] * (1 - b) + m[r0][:, c1] * b
    bottom = m[r1][:, c0] * (1 - b) + m[r1][:, c1] * b
    out[region.y0:region.y1, region.x0:region.x1] = top * (1 - a[:, None]) + bottom * a[:, None] > 0.5
    return out


def blob_mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (cv2.GaussianBlur(rng.random((224, 224)), (0, 0), 3) > 0.5).astype(np.uint8)


# Enlarged (288 x 416) and shrunk (160 x 96): the sizes are multiples of 32, so no frame pixel falls exactly half way
# between two mask pixels and the rule's > 0.5 is never a tie the float rounding could decide.
REGIONS = [Region(13, 7, 13 + 288, 7 + 416), Region(40, 3, 40 + 160, 3 + 96)]


@pytest.mark.parametrize("region", REGIONS)
def test_the_mask_goes_back_to_the_frame_bilinearly_and_no_other_way(region):
    shape = (region.y1 + 20, region.x1 + 30)
    for seed in range(3):
        m = blob_mask(seed)
        want = bilinear_back(m, region, shape)
        assert np.array_equal(mask_to_source(m, region, shape), want)
        # the rule is what is pinned: nearest neighbour (either of OpenCV's), area or cubic give other masks
        for interpolation in (cv2.INTER_NEAREST, cv2.INTER_NEAREST_EXACT, cv2.INTER_AREA, cv2.INTER_CUBIC):
            other = np.zeros(shape, np.uint8)
            other[region.y0:region.y1, region.x0:region.x1] = cv2.resize(
                m.astype(np.float32), (region.x1 - region.x0, region.y1 - region.y0),
                interpolation=interpolation) > 0.5
            assert not np.array_equal(other, want), interpolation


def test_overlay_viewer_saved_masks_and_seg_use_the_one_mapping():
    from runtime.record import FrameRecord
    from runtime.sinks.masks import frame_mask
    from runtime.sinks.overlay import mask_to_frame
    region, shape = REGIONS[0], (REGIONS[0].y1 + 20, REGIONS[0].x1 + 30)
    m = blob_mask(7)
    want = bilinear_back(m, region, shape)
    assert np.array_equal(mask_to_frame(m, region, shape), want)        # the overlay's and the viewer's contour
    rec = FrameRecord(0, "t", 0.0, mask=m)
    rec.frame_shape, rec.frame_region = shape, region
    assert np.array_equal(frame_mask(rec), want)                       # --mask-size original
    shown = FrameRecord(0, "t", 0.0, mask=m)
    shown.display, shown.region = np.zeros(shape, np.uint8), region
    assert np.array_equal(frame_mask(shown), want)
    assert np.array_equal(mask_to_source(m, None, (224, 224)), m)      # no region: the whole frame
    # the SEG writes mask_to_source too: tests/test_dicom_out.py compares the pixels it holds with it
