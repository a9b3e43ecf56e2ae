"""The booster's mask-threshold copies (TrainConfig.booster_mask_thresholds): which rows exist, which are fitted,
and that nothing of a validation patient is ever fitted. The networks here are real ONNX files whose outputs are
known in closed form (the UNet's 'probability' is the image itself, the VGG's features are the masked image's mean),
so every expected row and feature is derived in the test, never read from trained weights."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.recipe import TrainConfig, booster_features, booster_thresholds, train_bundle
from export.train import split_by_patient, train_booster
from runtime.backends.ort import OrtRunner
from runtime.errors import UserError
from runtime.graph import Graph, masked
from runtime.normalize import to_input

S = 224


def _identity_unet(path):
    """'image' [N,1,S,S] -> 'mask' = the image: the probability map is uint8 / 255."""
    g = helper.make_graph([helper.make_node("Identity", ["image"], ["mask"])], "unet",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, S, S])],
                          [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, S, S])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _mean_vgg(path):
    """'image' [N,3,S,S] -> 'features' [N,3]: the channel means of the masked image."""
    g = helper.make_graph([helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
                           helper.make_node("Flatten", ["pooled"], ["features"], axis=1)], "vgg",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, S, S])],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _ramp(lo: float, hi: float) -> np.ndarray:
    """A uint8 image whose values rise left to right from lo*255 to hi*255: each threshold keeps a known share."""
    row = np.round(np.linspace(lo, hi, S) * 255).astype(np.uint8)
    return np.ascontiguousarray(np.tile(row, (S, 1)))


def test_booster_features_add_a_copy_per_threshold_only_where_the_gate_accepts_it(tmp_path):
    graph = Graph(vgg_channels=3)   # gate: prob > 0.5, at least 5% of the image
    images = np.stack([
        _ramp(0.0, 1.0),      # accepted at every threshold
        _ramp(0.0, 0.6),      # accepted at 0.5 (prob > 0.5 on the right ~16%), rejected at 0.6 (nothing above)
        _ramp(0.0, 0.48),     # rejected at 0.5 (nothing above): no row at all, even though 0.4 would accept it
        np.zeros((S, S), np.uint8),
    ])
    with OrtRunner(_identity_unet(tmp_path / "unet.onnx")) as un, OrtRunner(_mean_vgg(tmp_path / "vgg.onnx")) as vg:
        rows, thr, feats = booster_features(graph, images, [0, 1, 2, 3], un, vg, (0.4, 0.6))
        plain_rows, plain_thr, plain = booster_features(graph, images, [0, 1, 2, 3], un, vg, ())
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert thr.tolist() == [0.5, 0.4, 0.6, 0.5, 0.4]
    # The frame's own rows are the paper's recipe unchanged: what the graph computes for the gate's mask.
    assert plain_rows.tolist() == [0, 1] and plain_thr.tolist() == [0.5, 0.5]
    np.testing.assert_array_equal(plain, feats[thr == 0.5])
    for i, t, f in zip(rows, thr, feats):
        prob = to_input(images[i], 1, graph.unet_normalization)[0, 0]   # what the identity UNet returns
        m = (prob > float(t)).astype(np.uint8)   # a Python float, as the gate compares (float32)
        want = to_input(masked(images[i], m), 3, graph.vgg_normalization)[0, 0].mean(dtype=np.float64)
        np.testing.assert_allclose(f, [want] * 3, rtol=1e-5)
    # A copy's mask differs from the gate's: more kidney at 0.4, less at 0.6.
    assert feats[1, 0] > feats[0, 0] > feats[2, 0]


def _blobs(n_patients=12, frames=4, seed=0):
    """Features that tell the grade apart, 4 grades spread over the patients."""
    rng = np.random.default_rng(seed)
    pats = np.repeat([f"P{i:03d}" for i in range(n_patients)], frames)
    y = np.repeat(np.arange(n_patients) % 4, frames)
    x = rng.normal(size=(len(y), 8)).astype(np.float32)
    x[:, 0] += y * 1.5
    return x, y, pats


def _with_copies(x, y, pats, which, shift=0.4):
    """x, y, pats plus one copy (a shifted feature vector) of every frame of the patients in `which`."""
    sel = np.isin(pats, list(which))
    cx = x[sel] + np.float32(shift)
    return (np.concatenate([x, cx]), np.concatenate([y, y[sel]]), np.concatenate([pats, pats[sel]]),
            np.r_[np.zeros(len(y), bool), np.ones(int(sel.sum()), bool)])


def test_copies_of_validation_patients_are_never_fitted_or_validated_on():
    x, y, pats = _blobs()
    val = ["P000", "P005", "P010"]
    plain, info = train_booster(x, y, pats, val_patients=val, num_boost_round=20, early_stopping_rounds=5,
                                progress=False)
    ax, ay, ap, copies = _with_copies(x, y, pats, val)       # copies of the validation patients only
    aug, ainfo = train_booster(ax, ay, ap, val_patients=val, num_boost_round=20, early_stopping_rounds=5,
                               progress=False, copies=copies)
    import xgboost as xgb
    probe = xgb.DMatrix(np.concatenate([x, ax[copies]]))
    # Same training rows, same validation rows: the very same booster.
    np.testing.assert_array_equal(plain.predict(probe), aug.predict(probe))
    assert ainfo["val_mlogloss"] == info["val_mlogloss"] and ainfo["best_iteration"] == info["best_iteration"]
    assert ainfo["val_images"] == int(np.isin(pats, val).sum()) == info["val_images"]
    assert ainfo["train_copies"] == 0 and ainfo["val_copies_left_out"] == int(copies.sum())
    assert ainfo["train_rows"] == ainfo["train_images"] == info["train_images"]


def test_copies_of_training_patients_are_fitted_with_their_frames():
    x, y, pats = _blobs()
    val = ["P000", "P005", "P010"]
    train = sorted(set(pats.tolist()) - set(val))
    plain, info = train_booster(x, y, pats, val_patients=val, num_boost_round=20, early_stopping_rounds=20,
                                progress=False)
    ax, ay, ap, copies = _with_copies(x, y, pats, train)
    aug, ainfo = train_booster(ax, ay, ap, val_patients=val, num_boost_round=20, early_stopping_rounds=20,
                               progress=False, copies=copies)
    n_train = int((~np.isin(pats, val)).sum())
    assert ainfo["train_images"] == n_train and ainfo["train_copies"] == n_train
    assert ainfo["train_rows"] == 2 * n_train and ainfo["val_copies_left_out"] == 0
    assert ainfo["train_patients"] == info["train_patients"] and ainfo["val_patients"] == sorted(val)
    import xgboost as xgb
    probe = xgb.DMatrix(x)
    assert not np.array_equal(plain.predict(probe), aug.predict(probe))   # the copies changed what was learnt


def test_a_drawn_split_is_made_on_whole_patients_and_ignores_the_copies():
    x, y, pats = _blobs(n_patients=16)
    want = sorted(set(pats[split_by_patient(y, pats, 0.25, 3)].tolist()))
    # Many copies of a few patients: a split by row, or one weighted by row counts, would be pulled towards them.
    heavy = ["P001", "P002", "P003"]
    ax, ay, ap, copies = _with_copies(x, y, pats, heavy)
    for _ in range(3):
        more = _with_copies(x, y, pats, heavy)
        ax, ay, ap = np.concatenate([ax, more[0][more[3]]]), np.concatenate([ay, more[1][more[3]]]), \
            np.concatenate([ap, more[2][more[3]]])
        copies = np.r_[copies, np.ones(int(more[3].sum()), bool)]
    _, info = train_booster(ax, ay, ap, seed=3, num_boost_round=3, progress=False, copies=copies)
    assert info["val_patients"] == want
    assert not set(info["val_patients"]) & set(info["train_patients"])
    on_val = np.isin(ap, want)
    assert info["val_images"] == int((on_val & ~copies).sum())
    assert info["val_copies_left_out"] == int((on_val & copies).sum())
    assert info["train_rows"] == int((~on_val).sum())


def test_train_booster_rejects_copies_that_do_not_fit_the_rows():
    x, y, pats = _blobs()
    with pytest.raises(ValueError, match="one boolean per row"):
        train_booster(x, y, pats, copies=np.zeros(3, bool), progress=False)
    with pytest.raises(ValueError, match="augmented copy"):
        train_booster(x, y, pats, copies=np.ones(len(y), bool), progress=False)


def test_booster_thresholds_drop_the_gate_own_and_name_a_bad_one():
    g = Graph()
    assert booster_thresholds(g, (0.55, 0.5, 0.45, 0.55)) == (0.45, 0.55)
    assert booster_thresholds(g, ()) == ()
    with pytest.raises(ValueError, match="1.5 is outside"):
        booster_thresholds(g, (0.45, 1.5))


def test_train_bundle_names_a_bad_threshold_before_reading_anything(tmp_path):
    with pytest.raises(UserError, match="booster mask threshold 0 is outside"):
        train_bundle(tmp_path / "no-such-data", tmp_path / "b", TrainConfig(booster_mask_thresholds=(0.0,)),
                     progress=False)
    assert not (tmp_path / "b").exists()


def test_train_bundle_records_the_thresholds_and_fits_the_copies(tiny_dataset, tmp_path):
    """The recipe end to end at tiny widths: the manifest records the thresholds asked for and the ones the booster
    learnt from. Which of the two branches runs depends on the tiny UNet (its masks, or the labelled ones when it
    passes too few frames); each is checked for what it must be."""
    import json

    from runtime.bundle import Bundle
    cfg = TrainConfig(unet_width=1 / 16, vgg_width=1 / 32, unet_epochs=1, vgg_epochs=1, seed=0,
                      booster_mask_thresholds=(0.55, 0.45))
    b = Bundle.load(train_bundle(tiny_dataset, tmp_path / "b", cfg, progress=False))
    prov = json.loads((b.root / "manifest.json").read_text())["provenance"]
    assert prov["config"]["booster_mask_thresholds"] == [0.55, 0.45]
    info = prov["booster"]
    assert not set(info["val_patients"]) & set(info["train_patients"])
    if prov["booster_trained_on_masks"] == "predicted":
        assert info["mask_thresholds"] == [0.5, 0.45, 0.55]
        copies = info.get("train_copies", 0)
        assert 0 <= copies <= 2 * info["train_images"]
        assert info.get("train_rows", info["train_images"]) == info["train_images"] + copies
    else:   # labelled masks: there is no probability map to take other thresholds of
        assert info["mask_thresholds"] == [0.5]
        assert "train_copies" not in info
