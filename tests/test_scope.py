"""runtime/scope.py: the scope check's descriptors, its k-NN reference, its limits and its file.

Descriptors are pinned on shapes and maps whose answer is known (a disc, an ellipse, two blobs, a step and a ramp of
probability); "not ultrasound" on real ultrasound (every US file pydicom and pydicom-data ship, through the runtime's
own DICOM source and preprocessing), on the simulated probe, and on pictures made here (colour shapes, a text page,
a flat ellipse phantom); the reference on feature clusters whose distances are known. Nothing here depends on
trained weights.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from runtime import preprocess as pp
from runtime import scope
from runtime.graph import Graph
from runtime.scope import Descriptors, Reference, ScopeError, describe, fit_reference

GRAPH = Graph()


def prepare(frame):
    """The pipelines' source preparation (Graph.prepare_source): (preprocessed image, crop region)."""
    _, image, region = GRAPH.prepare_source(frame)
    return image, region


def picture_values(pixels: np.ndarray, channel_order: str = "BGR") -> dict[str, float]:
    """colour and flat of a picture given as an image file would be (no region: the automatic crop)."""
    from runtime.sources import Frame
    frame = Frame(0, "t", 0.0, pixels, channel_order=channel_order)
    image, region = prepare(frame)
    return {"colour": scope.colour_share(pixels, region),
            "flat": scope.flat_share(image, (region.y1 - region.y0, region.x1 - region.x0))}


# -- "not ultrasound" -------------------------------------------------------------------------------------------

def test_colour_share_counts_coloured_pixels_of_the_crop_only():
    grey = np.full((100, 200, 3), 90, np.uint8)
    assert scope.colour_share(grey) == 0.0
    assert scope.colour_share(grey[..., 0]) == 0.0                       # a 2-D frame has no colour
    half = grey.copy()
    half[:, 100:] = (200, 40, 40)                                         # right half red
    assert scope.colour_share(half) == pytest.approx(0.5, abs=0.02)
    assert scope.colour_share(half, pp.Region(100, 0, 200, 100)) == 1.0   # the crop is all red
    assert scope.colour_share(half, pp.Region(0, 0, 100, 100)) == 0.0
    faint = grey.copy()
    faint[..., 2] += scope.COLOUR_CHROMA                                  # a tint at the limit is not colour
    assert scope.colour_share(faint) == 0.0
    bgra = np.dstack([half, np.full((100, 200), 255, np.uint8)])          # alpha is not a colour channel
    assert scope.colour_share(bgra) == pytest.approx(0.5, abs=0.02)
    assert scope.colour_share((half.astype(np.uint16) * 257)) == pytest.approx(0.5, abs=0.02)   # 16-bit


def test_flat_share_sees_speckle_as_texture_and_flat_areas_as_flat():
    rng = np.random.default_rng(0)
    speckle = np.clip(rng.rayleigh(40, (224, 224)), 0, 255).astype(np.uint8)
    assert scope.flat_share(speckle) < 0.01
    flat = np.full((224, 224), 120, np.uint8)
    assert scope.flat_share(flat) == 1.0
    assert scope.flat_share(np.zeros((224, 224), np.uint8)) == 0.0       # nothing lit: nothing to judge
    half = speckle.copy()
    half[:, :112] = 150
    assert scope.flat_share(half) == pytest.approx(110 / 224, abs=0.03)  # the flat half, less the 5x5 seam


def test_flat_share_judges_an_upscaled_crop_at_its_own_resolution():
    """A 40x40 speckle crop stretched to 224x224 (INTER_LINEAR, as preprocess.resize does) is smooth at 224; told
    the crop's shape, flat_share measures it at 40x40, where it is speckle."""
    rng = np.random.default_rng(1)
    small = np.clip(rng.rayleigh(8, (40, 40)) + 50, 0, 255).astype(np.uint8)     # faint speckle
    big = cv2.resize(small, (224, 224), interpolation=cv2.INTER_LINEAR)
    assert scope.flat_share(big) > 0.3
    assert scope.flat_share(big, (40, 40)) < 0.1


def _phantom_frames(n=4):
    from runtime.sources import open_source
    return list(open_source(f"sim://kidney?frames={n}&fps=0&seed=3", realtime=False))


def test_the_simulated_probe_is_ultrasound():
    for frame in _phantom_frames():
        image, region = prepare(frame)
        assert scope.colour_share(frame.pixels, region) == 0.0
        assert scope.flat_share(image, (region.y1 - region.y0, region.x1 - region.x0)) < 0.05


# Every ultrasound file pydicom 3 and pydicom-data 1.0 ship (tests/test_dicom.py holds that list to what they ship).
US_FILES = ["ExplVR_BigEnd.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "OBXXXX1A.dcm", "OBXXXX1A_2frame.dcm",
            "OBXXXX1A_expb.dcm", "OBXXXX1A_expb_2frame.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_rle_2frame.dcm",
            "US1_J2KI.dcm", "US1_J2KR.dcm", "US1_UNCI.dcm", "US1_UNCR.dcm", "color-pl.dcm", "color-px.dcm",
            "color3d_jpeg_baseline.dcm", "examples_jpeg2k.dcm", "examples_palette.dcm", "examples_rgb_color.dcm",
            "examples_ybr_color.dcm", "gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"]


def test_real_ultrasound_is_not_refused_as_not_ultrasound():
    """Every frame of every ultrasound DICOM pydicom and pydicom-data ship (echocardiography, obstetric, pelvic,
    a lymph node under power Doppler, a 3-D cine), read by the runtime's DICOM source and preprocessed as the
    pipeline does, stays under both fixed limits, with room: colour <= 0.25 (Doppler boxes; 0.15 measured) and flat
    <= 0.2 (0.10 measured).
    Left out: the second frame of pydicom's `*_2frame` files, which pydicom made by mapping the first frame's fan to
    one flat colour (no echo in it: 'not ultrasound' is the right answer, and it gets it). A frame that has no scan
    sector is not scored at all (runtime.preprocess.sector_frame) and is skipped here."""
    pydicom_data = pytest.importorskip("pydicom.data")
    from runtime.sources import open_source
    checked, worst = 0, {"colour": 0.0, "flat": 0.0}
    for name in US_FILES:
        path = pydicom_data.get_testdata_file(name, download=False)
        assert path is not None, f"{name} is not available offline: install pydicom-data (the dev extra)"
        for frame in open_source(path, realtime=False):
            assert frame.error is None, (name, frame.error)
            try:
                image, region = prepare(frame)
            except pp.FrameError:
                continue
            colour = scope.colour_share(frame.pixels, region)
            flat = scope.flat_share(image, (region.y1 - region.y0, region.x1 - region.x0))
            if name.endswith("_2frame.dcm") and frame.index == 1:
                assert colour > scope.COLOUR_LIMIT or flat > scope.FLAT_LIMIT, (name, colour, flat)
                continue
            worst = {"colour": max(worst["colour"], colour), "flat": max(worst["flat"], flat)}
            checked += 1
    assert checked >= 150
    assert worst["colour"] <= 0.25 and worst["flat"] <= 0.2, worst


def _text_page(rng):
    page = np.full((700, 520, 3), 235, np.uint8)
    for y in range(40, 680, 28):
        words = "".join(chr(int(c)) for c in rng.integers(97, 123, 38))
        cv2.putText(page, words, (20, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (25, 25, 25), 1, cv2.LINE_AA)
    return page


def _ellipse_phantom():
    """A Shepp-Logan-like drawing: flat grey ellipses in a flat skull on black."""
    img = np.zeros((400, 400), np.uint8)
    cv2.ellipse(img, (200, 200), (138, 184), 0, 0, 360, 200, -1)
    cv2.ellipse(img, (200, 208), (131, 174), 0, 0, 360, 60, -1)
    cv2.ellipse(img, (255, 200), (31, 82), -18, 0, 360, 30, -1)
    cv2.ellipse(img, (145, 200), (41, 62), 18, 0, 360, 30, -1)
    cv2.ellipse(img, (200, 130), (50, 42), 0, 0, 360, 90, -1)
    return img


def _colour_shapes(rng):
    img = np.zeros((480, 640, 3), np.uint8)
    img[:] = np.linspace(40, 200, 640)[None, :, None].astype(np.uint8) * np.array([1, 0.6, 0.3])[None, None, :] \
        .astype(np.uint8)
    for _ in range(8):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, (int(rng.integers(0, 640)), int(rng.integers(0, 480))), int(rng.integers(40, 160)), colour, -1)
    return img


def test_pictures_that_are_not_ultrasound_are_refused_as_such():
    rng = np.random.default_rng(2)
    shapes = picture_values(_colour_shapes(rng))
    assert shapes["colour"] > scope.COLOUR_LIMIT
    for name, pixels in (("text page", _text_page(rng)), ("ellipse phantom", _ellipse_phantom())):
        v = picture_values(pixels)
        assert v["flat"] > scope.FLAT_LIMIT, (name, v)
    ref = _fitted()[0]
    for pixels in (_colour_shapes(rng), _text_page(rng), _ellipse_phantom()):
        image, region = prepare(__import__("runtime.sources", fromlist=["Frame"]).Frame(0, "t", 0.0, pixels))
        mask = np.zeros((224, 224), np.uint8)
        cv2.ellipse(mask, (112, 112), (60, 35), 0, 0, 360, 1, -1)
        desc = describe(image, mask.astype(np.float32), mask, None,
                        crop_shape=(region.y1 - region.y0, region.x1 - region.x0),
                        colour=scope.colour_share(pixels, region))
        verdict = ref.check(desc)
        assert not verdict.in_scope and verdict.reason == scope.NOT_ULTRASOUND, verdict


# -- the mask's shape and the outline ----------------------------------------------------------------------------

def test_mask_shape_of_known_shapes():
    disc = np.zeros((224, 224), np.uint8)
    cv2.circle(disc, (112, 112), 40, 1, -1)
    s = scope.mask_shape(disc)
    assert s["area"] == pytest.approx(math.pi * 40 ** 2 / 224 ** 2, rel=0.03)
    assert s["largest"] == 1.0 and s["solidity"] > 0.97 and s["axis_ratio"] > 0.98 and s["border"] == 0.0
    ellipse = np.zeros((224, 224), np.uint8)
    cv2.ellipse(ellipse, (112, 112), (80, 30), 30, 0, 360, 1, -1)
    assert scope.mask_shape(ellipse)["axis_ratio"] == pytest.approx(30 / 80, abs=0.02)
    two = np.zeros((224, 224), np.uint8)
    cv2.circle(two, (60, 112), 30, 1, -1)
    cv2.circle(two, (170, 112), 20, 1, -1)
    assert scope.mask_shape(two)["largest"] == pytest.approx(30 ** 2 / (30 ** 2 + 20 ** 2), abs=0.02)
    ring = np.zeros((224, 224), np.uint8)
    cv2.circle(ring, (112, 112), 60, 1, 12)
    assert scope.mask_shape(ring)["solidity"] < 0.5
    c_shape = np.zeros((224, 224), np.uint8)
    cv2.ellipse(c_shape, (112, 112), (60, 60), 0, 40, 320, 1, 14)
    assert 0.2 < scope.mask_shape(c_shape)["solidity"] < 0.6
    full = np.ones((224, 224), np.uint8)
    assert scope.mask_shape(full)["border"] == 1.0 and scope.mask_shape(full)["area"] == 1.0
    bottom = np.zeros((224, 224), np.uint8)
    bottom[150:, :] = 1                                                   # runs along 3 of the 4 sides, partly
    assert scope.mask_shape(bottom)["border"] == pytest.approx((224 + 2 * 74) / (4 * 224 - 4), abs=0.01)
    assert scope.mask_shape(np.zeros((224, 224), np.uint8)) == {
        "area": 0.0, "largest": 0.0, "solidity": 0.0, "axis_ratio": 0.0, "border": 0.0}


def test_outline_confidence_of_a_step_a_ramp_and_haze():
    yy, xx = np.mgrid[:224, :224]
    r = np.hypot(yy - 112, xx - 112)
    step = (r < 50).astype(np.float32)
    mask = (step > 0.5).astype(np.uint8)
    o = scope.outline_confidence(step, mask)
    assert o == {"outline_confidence": 1.0, "uncertain": 0.0}
    ramp = np.clip(0.5 - (r - 50) / 40, 0, 1).astype(np.float32)   # 0.5 at r = 50, 1 at r = 30, 0 at r = 70
    o = scope.outline_confidence(ramp, (ramp > 0.5).astype(np.uint8))
    assert 0.0 < o["outline_confidence"] < 0.1
    area = int((ramp > 0.5).sum())
    assert o["uncertain"] == pytest.approx(int(((ramp > 0.2) & (ramp < 0.8)).sum()) / area)
    flat = np.full((224, 224), 0.5, np.float32)
    assert scope.outline_confidence(flat, mask)["outline_confidence"] == 0.0
    bad = step.copy()
    bad[3, 3] = np.nan
    assert scope.outline_confidence(bad, mask)["uncertain"] == math.inf


# -- the reference ----------------------------------------------------------------------------------------------

F = 64


def _features(rng, n, centre, spread=0.35):
    """ReLU-like non-negative features around a centre pattern; the last 8 units are dead in this cluster."""
    f = np.maximum(centre[None, :] + spread * rng.normal(size=(n, F)), 0).astype(np.float32)
    f[:, -8:] = 0
    return f


def _kidney_values(rng):
    return {"area": float(rng.uniform(0.12, 0.2)), "largest": float(rng.uniform(0.97, 1.0)),
            "solidity": float(rng.uniform(0.9, 0.97)), "axis_ratio": float(rng.uniform(0.45, 0.6)),
            "border": float(rng.uniform(0.0, 0.02)), "outline_confidence": float(rng.uniform(0.8, 0.9)),
            "uncertain": float(rng.uniform(0.02, 0.06)), "colour": 0.0, "flat": float(rng.uniform(0, 0.02))}


def _fitted(keep=0.98, seed=0, n_ref=300, n_held=400):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0, 1, F).astype(np.float32)
    ref = [Descriptors(_kidney_values(rng), f) for f in _features(rng, n_ref, centre)]
    held = [Descriptors(_kidney_values(rng), f) for f in _features(rng, n_held, centre)]
    return fit_reference(ref, held, keep=keep, k=5), centre, rng


def test_the_distance_is_the_kth_nearest_prototype_after_normalisation():
    ref, centre, rng = _fitted()
    full = np.zeros((len(ref.prototypes), F), np.float32)
    full[:, ref.dims] = ref.prototypes                                   # the prototypes in all F dimensions
    assert ref.num_features == F and len(ref.dims) < F                   # some ReLU units are 0 in every prototype
    unused = np.setdiff1d(np.arange(F), ref.dims)
    for f in _features(rng, 5, centre) * rng.uniform(0.1, 10):           # any scale: the features are normalised
        f[unused[:2]] = 3.0                                              # a unit no prototype uses still counts
        z = f / np.linalg.norm(f)
        d = np.sort(np.linalg.norm(full - z[None, :], axis=1))
        assert ref.distance(f) == pytest.approx(d[ref.k - 1], abs=1e-5)
    assert ref.distance(np.zeros(F, np.float32)) == pytest.approx(1.0)  # unit prototypes, all at 1 from 0
    assert np.allclose(np.linalg.norm(ref.prototypes, axis=1), 1, atol=1e-3)


def test_fit_keeps_the_stated_share_of_held_out_frames_and_says_so():
    for keep in (0.98, 0.9):
        ref, centre, rng = _fitted(keep=keep)
        assert keep <= ref.kept_share <= 1.0
        for t, w in scope.DEFAULT_WEIGHTS.items():                       # each test spends its part of the budget
            assert ref.kept_by_test[t] >= 1 - w * (1 - keep) - 1 / 400 - 1e-9
        # new in-scope frames from the same distribution: kept at about the stated share (binomial, 1000 frames)
        new = [Descriptors(_kidney_values(rng), f) for f in _features(rng, 1000, centre)]
        kept = np.mean([ref.check(d).in_scope for d in new])
        assert kept >= keep - 0.025, (keep, kept)
    assert ref.frames == {"reference": 300, "held_out": 400, "prototypes": 300}


def test_check_gives_each_reason_with_its_score():
    ref, centre, rng = _fitted()
    base = Descriptors(_kidney_values(rng), _features(rng, 1, centre)[0])
    while not ref.check(base).in_scope:
        base = Descriptors(_kidney_values(rng), _features(rng, 1, centre)[0])
    v = ref.check(base)
    assert v.reason is None and set(v.scores) == {"ultrasound", "kidney", "view", "outline"}
    assert all(s <= 1 for s in v.scores.values())

    def changed(features=None, **values):
        return ref.check(Descriptors({**base.values, **values},
                                     base.features if features is None else features))

    assert changed(colour=0.9).reason == scope.NOT_ULTRASOUND
    assert changed(flat=0.6).reason == scope.NOT_ULTRASOUND
    assert changed(largest=0.5).reason == scope.NO_KIDNEY                # fragments
    assert changed(solidity=0.4).reason == scope.NO_KIDNEY
    assert changed(border=0.5).reason == scope.NO_KIDNEY
    assert changed(area=0.7).reason == scope.NO_KIDNEY
    assert changed(outline_confidence=0.3).reason == scope.OUTLINE_UNSURE
    assert changed(uncertain=0.8).reason == scope.OUTLINE_UNSURE
    other = np.maximum(rng.uniform(0, 1, F) - centre, 0).astype(np.float32)   # another cluster
    far = changed(features=other)
    assert far.reason == scope.UNLIKE_TRAINING and far.scores["view"] > 1
    # the reasons' order: not ultrasound first, outline last
    assert changed(features=other, colour=0.9, largest=0.5).reason == scope.NOT_ULTRASOUND
    assert changed(features=other, largest=0.5, uncertain=0.8).reason == scope.NO_KIDNEY
    assert changed(features=other, uncertain=0.8).reason == scope.UNLIKE_TRAINING
    # before the VGG: no view test, the others as above
    early = ref.check(Descriptors(base.values, None))
    assert early.in_scope and "view" not in early.scores
    assert ref.check(Descriptors({**base.values, "largest": 0.5}, None)).reason == scope.NO_KIDNEY
    record = far.record()
    assert record["in_scope"] is False and record["reason"] == scope.UNLIKE_TRAINING


def test_non_finite_input_is_refused():
    ref, centre, rng = _fitted()
    f = _features(rng, 1, centre)[0]
    values = _kidney_values(rng)
    for bad in (np.nan, np.inf, -np.inf):
        g = f.copy()
        g[7] = bad
        v = ref.check(Descriptors(values, g))
        assert not v.in_scope and v.reason == scope.UNLIKE_TRAINING and v.scores["view"] == math.inf
        for name in ("area", "largest", "solidity", "axis_ratio", "border", "outline_confidence", "uncertain",
                     "colour", "flat"):
            v = ref.check(Descriptors({**values, name: bad}, f))
            assert not v.in_scope, (name, bad, v)
    prob = np.zeros((224, 224), np.float32)
    prob[80:140, 60:170] = 1
    prob[100, 100] = np.nan
    mask = (np.nan_to_num(prob) > 0.5).astype(np.uint8)
    v = ref.check(describe(np.full((224, 224), 60, np.uint8), prob, mask, f))
    assert not v.in_scope
    assert v.reason in (scope.NOT_ULTRASOUND, scope.OUTLINE_UNSURE) and v.scores["outline"] == math.inf


def test_save_load_round_trip_and_the_manifest_section(tmp_path):
    ref, centre, rng = _fitted()
    path = ref.save(tmp_path / scope.FILE)
    back = Reference.load(path, ref.manifest_section())
    assert back.prototypes.dtype == np.float32 and back.prototypes.shape == ref.prototypes.shape
    assert np.array_equal(back.prototypes, ref.prototypes)   # fitted on the float16-rounded prototypes
    assert np.array_equal(back.dims, ref.dims) and back.num_features == F
    assert back.thresholds == ref.thresholds and back.kept_share == ref.kept_share
    for f in _features(rng, 20, centre):
        d = Descriptors(_kidney_values(rng), f)
        assert back.check(d) == ref.check(d)
    section = ref.manifest_section()
    assert section["file"] == "scope.npz" and section["method"] == "knn" and section["k"] == 5
    assert section["keep_share"] == 0.98 and section["kept_share"] >= 0.98
    assert section["frames"] == {"reference": 300, "held_out": 400, "prototypes": 300}
    assert section["reasons"] == list(scope.REASONS)
    import json
    json.dumps(section)                                                   # JSON-ready
    tampered = {**section, "thresholds": {**section["thresholds"], "view": section["thresholds"]["view"] * 2}}
    with pytest.raises(ScopeError, match="scope.thresholds"):
        Reference.load(path, tampered)


def test_load_refuses_what_is_not_a_scope_reference(tmp_path):
    ref, _, _ = _fitted()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ScopeError, match="not a readable scope reference"):
        Reference.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ScopeError, match="not a scope reference"):
        Reference.load(tmp_path / "other.npz")
    import json
    cfg = ref.config()
    cfg["thresholds"]["view"] = float("nan")
    np.savez(tmp_path / "nan.npz", prototypes=ref.prototypes.astype(np.float16), dims=ref.dims,
             config=np.array(json.dumps(cfg)))
    with pytest.raises(ScopeError, match="positive and finite"):
        Reference.load(tmp_path / "nan.npz")
    protos = ref.prototypes.astype(np.float16)
    protos[0, 0] = np.inf
    np.savez(tmp_path / "inf.npz", prototypes=protos, dims=ref.dims, config=np.array(json.dumps(ref.config())))
    with pytest.raises(ScopeError, match="finite float16"):
        Reference.load(tmp_path / "inf.npz")
    np.savez(tmp_path / "dims.npz", prototypes=ref.prototypes.astype(np.float16), dims=ref.dims[::-1],
             config=np.array(json.dumps(ref.config())))
    with pytest.raises(ScopeError, match="feature dimensions"):
        Reference.load(tmp_path / "dims.npz")
    with pytest.raises(ScopeError, match="finite float16"):
        Reference.load(tmp_path / "inf.npz")
    with pytest.raises(ScopeError, match="features have 10 values"):
        ref.distance(np.ones(10, np.float32))


def test_fit_refuses_what_it_cannot_fit_on():
    rng = np.random.default_rng(4)
    centre = rng.uniform(0, 1, F).astype(np.float32)
    ok = [Descriptors(_kidney_values(rng), f) for f in _features(rng, 40, centre)]
    with pytest.raises(ScopeError, match="too few"):
        fit_reference(ok, ok[:5])
    with pytest.raises(ScopeError, match="no features"):
        fit_reference([Descriptors(ok[0].values, None)], ok)
    bad = [Descriptors(d.values, np.full(F, np.nan, np.float32)) for d in ok]
    with pytest.raises(ScopeError, match="non-finite features"):
        fit_reference(ok, bad)
    with pytest.raises(ScopeError, match="keep share"):
        fit_reference(ok, ok, keep=1.0)
    with pytest.raises(ScopeError, match="non-finite descriptor"):
        fit_reference(ok, [Descriptors({**d.values, "solidity": math.nan}, d.features) for d in ok])


def test_prototypes_are_bounded():
    rng = np.random.default_rng(5)
    centre = rng.uniform(0, 1, F).astype(np.float32)
    rows = [Descriptors(_kidney_values(rng), f) for f in _features(rng, 300, centre)]
    ref = fit_reference(rows, rows[:100], max_prototypes=64)
    assert ref.prototypes.shape == (64, F - 8) and ref.frames["prototypes"] == 64 and ref.frames["reference"] == 300


def test_describe_on_the_graph_of_a_real_bundle(tiny_bundle, tmp_path):
    """The descriptors of what a real bundle's graph computes (the tiny test bundle, gate opened so every frame
    reaches the VGG): the right shapes and ranges, a reference fitted on them, saved and loaded from the bundle's
    folder, and a colour picture refused as not ultrasound. Its weights are meaningless; nothing here depends on
    them."""
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle
    b = Bundle.load(tiny_bundle)
    g = b.graph(min_mask_fraction=0.0)
    descs = []
    with OrtRunner(b.network_file("unet", "fp32")) as unet, OrtRunner(b.network_file("vgg", "fp32")) as vgg:
        for frame in _phantom_frames(24):
            image, region = prepare(frame)
            res = g.run(image, unet, vgg)
            d = describe(image, res.prob, res.gate.mask, res.features,
                         crop_shape=(region.y1 - region.y0, region.x1 - region.x0),
                         colour=scope.colour_share(frame.pixels, region))
            assert set(d.values) == set(scope.DESCRIPTORS) and d.features.shape == (b.num_features,)
            assert all(0 <= d.values[n] <= 1 for n in ("area", "largest", "solidity", "axis_ratio", "border",
                                                       "outline_confidence", "colour", "flat"))
            assert d.values["colour"] == 0.0 and d.values["flat"] < scope.FLAT_LIMIT
            descs.append(d)
        ref = fit_reference(descs[:12], descs[12:] * 2, keep=0.9)   # (repeated: the fit needs 20 held-out rows)
        path = ref.save(tmp_path / scope.FILE)
        back = Reference.load(path, ref.manifest_section())
        assert [back.check(d) for d in descs] == [ref.check(d) for d in descs]
        pixels = _colour_shapes(np.random.default_rng(6))
        from runtime.sources import Frame
        image, region = prepare(Frame(0, "t", 0.0, pixels))
        res = g.run(image, unet, vgg)
        v = back.check(describe(image, res.prob, res.gate.mask, res.features,
                                crop_shape=(region.y1 - region.y0, region.x1 - region.x0),
                                colour=scope.colour_share(pixels, region)))
        assert v.reason == scope.NOT_ULTRASOUND


def test_limits_from_patients_when_the_held_out_frames_say_whose_they_are():
    """With held_out_groups, a limit is the quantile of the patients' largest scores: one unusual held-out patient
    (all of their frames far out on the kidney test) moves the limit above them, where the frame quantile, with
    that patient's frames a few per cent of all, leaves them refused. And the z-score limits never fall under
    Z_FLOOR spreads."""
    rng = np.random.default_rng(7)
    centre = rng.uniform(0, 1, F).astype(np.float32)
    ref_rows = [Descriptors(_kidney_values(rng), f) for f in _features(rng, 200, centre)]
    held, groups = [], []
    for p in range(40):
        for _ in range(6):
            v = _kidney_values(rng)
            if p == 3:
                v["solidity"] = float(rng.uniform(0.7, 0.8))             # a kidney drawn with a notch
            held.append(Descriptors(v, _features(rng, 1, centre)[0]))
            groups.append(f"patient-{p}")
    by_frame = fit_reference(ref_rows, held, keep=0.98)
    by_patient = fit_reference(ref_rows, held, keep=0.98, held_out_groups=groups)
    odd = [d for d, g in zip(held, groups) if g == "patient-3"]
    z_odd = max(by_frame._z("kidney", d.values) for d in odd)
    assert min(by_frame._z("kidney", d.values) for d in odd) > scope.Z_FLOOR["kidney"]
    assert not all(by_frame.check(d).in_scope for d in odd)             # 6 of 240 frames, over the 0.5 % budget
    assert all(by_patient.check(d).in_scope for d in odd)
    assert by_patient.thresholds["kidney"] >= z_odd and by_patient.frames["held_out_patients"] == 40
    assert by_patient.kept_share == 1.0 and by_frame.kept_share >= 0.98
    assert min(by_frame.thresholds["kidney"], by_frame.thresholds["outline"]) >= scope.Z_FLOOR["kidney"]
    with pytest.raises(ScopeError, match="one patient per frame"):
        fit_reference(ref_rows, held, held_out_groups=groups[:-1])
    with pytest.raises(ScopeError, match="too few"):
        fit_reference(ref_rows, held, held_out_groups=["a", "b"] * 120)
