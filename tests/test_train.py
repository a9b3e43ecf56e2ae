"""Training recipes: a few seconds of training must lower the loss; the booster validates on whole patients."""
import math

import numpy as np
import pytest

from export.train import mask_iou, split_by_patient, train_booster, train_unet, train_vgg


def discs(n: int, seed: int = 0):
    """Bright ellipses on dark noise; the label sets the ellipse's brightness (something a net can learn fast)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:224, :224]
    labels = np.arange(n) % 4
    masks = np.stack([((yy - 112 - rng.integers(-20, 20)) / 55.0) ** 2 + ((xx - 112) / 80.0) ** 2 < 1
                      for _ in range(n)]).astype(np.uint8)
    images = (rng.integers(0, 50, (n, 224, 224)) + masks * (70 + 45 * labels[:, None, None])).astype(np.uint8)
    return images, masks, labels


def test_train_unet_two_epochs_lower_the_mse_and_report_val_iou():
    images, masks, _ = discs(8)
    model, hist = train_unet(images, masks, width=1 / 16, epochs=2, batch_size=4, lr=3e-3, seed=0,
                             val=(images[:4], masks[:4]), progress=False)
    assert len(hist["train_loss"]) == 2 and len(hist["val_iou"]) == 2 and len(hist["epoch_seconds"]) == 2
    assert hist["train_loss"][1] < hist["train_loss"][0]
    assert 0.0 <= hist["val_iou"][-1] <= 1.0
    assert not model.training
    assert model.conv1[0].weight.shape == (2, 1, 3, 3)


def test_train_unet_is_reproducible_for_a_seed():
    images, masks, _ = discs(4)
    kw = dict(width=1 / 32, epochs=1, batch_size=2, seed=3, progress=False)
    _, a = train_unet(images, masks, **kw)
    _, b = train_unet(images, masks, **kw)
    assert a["train_loss"] == b["train_loss"]


def test_train_vgg_two_epochs_lower_the_cross_entropy_and_report_val_accuracy():
    images, masks, labels = discs(16, seed=1)
    masked = images * masks
    model, hist = train_vgg(masked, labels, width=1 / 32, in_channels=3, epochs=2, batch_size=8, lr=1e-3, seed=0,
                            val=(masked[:8], labels[:8]), progress=False)
    assert hist["train_loss"][1] < hist["train_loss"][0]
    assert hist["train_loss"][0] == pytest.approx(math.log(4), abs=0.2)  # starts near chance
    assert len(hist["val_accuracy"]) == 2 and 0.0 <= hist["val_accuracy"][-1] <= 1.0
    assert model.in_channels == 3 and not model.training


def test_train_rejects_non_uint8_images_with_a_clear_message():
    with pytest.raises(ValueError, match="uint8"):
        train_vgg(np.zeros((2, 224, 224), np.float32), np.array([0, 1]), progress=False)
    with pytest.raises(ValueError, match="0..3"):
        train_vgg(np.zeros((2, 224, 224), np.uint8), np.array([0, 4]), progress=False)


def test_mask_iou_counts_two_empty_masks_as_perfect():
    a = np.zeros((3, 4, 4), bool)
    b = a.copy()
    a[1, :2] = True
    b[1, :1] = True  # 4 of 8
    a[2, 0, 0] = True  # vs empty
    assert mask_iou(a, b).tolist() == [1.0, 0.5, 0.0]


def clustered_features(patients: int = 16, per: int = 5, seed: int = 0):
    """Fc2-like features (ReLU'd, 1024-d): one grade per patient, a grade-specific mean plus noise."""
    rng = np.random.default_rng(seed)
    grade = np.repeat(np.arange(patients) % 4, per)
    centers = rng.normal(0, 1, (4, 1024))
    x = np.maximum(0, centers[grade] + rng.normal(0, 1, (patients * per, 1024))).astype(np.float32)
    pats = np.repeat([f"P{i:03d}" for i in range(patients)], per)
    return x, grade, pats


def test_split_by_patient_never_puts_one_patient_on_both_sides():
    rng = np.random.default_rng(0)
    for seed in range(20):
        pats = rng.integers(0, 12, 200).astype(str)
        labels = rng.integers(0, 4, 200)
        is_val = split_by_patient(labels, pats, 0.25, seed)
        assert set(pats[is_val]).isdisjoint(pats[~is_val])
        assert is_val.any() and (~is_val).any()
    assert not split_by_patient(np.zeros(5, int), np.array(["A"] * 5), 0.25, 0).any()


def test_split_by_patient_holds_out_a_patient_of_every_grade_that_has_two():
    _, grade, pats = clustered_features(patients=16, per=3)
    is_val = split_by_patient(grade, pats, 0.25, seed=1)
    assert sorted(set(grade[is_val])) == [0, 1, 2, 3]
    assert len(set(pats[is_val])) == 4  # 25% of 16 patients, one per grade


def test_train_booster_validates_on_held_out_patients_and_keeps_the_best_trees():
    x, y, pats = clustered_features()
    booster, info = train_booster(x, y, pats, seed=0, num_boost_round=40, early_stopping_rounds=10,
                                  progress=False)
    assert set(info["train_patients"]).isdisjoint(info["val_patients"])
    assert set(info["train_patients"]) | set(info["val_patients"]) == set(pats)
    assert info["train_images"] + info["val_images"] == len(y) and info["val_images"] == 20
    assert 0 <= info["best_iteration"] < 40
    assert booster.num_boosted_rounds() == info["best_iteration"] + 1
    assert info["num_trees"] == 4 * booster.num_boosted_rounds()
    assert info["val_mlogloss"] < math.log(4)  # better than the uniform guess
    assert info["val_accuracy"] >= 0.75
    p = info["params"]
    assert (p["objective"], p["num_class"], p["eta"], p["max_depth"], p["subsample"], p["lambda"],
            p["eval_metric"]) == ("multi:softprob", 4, 0.01, 16, 0.5, 10.0, "mlogloss")
    import xgboost as xgb
    prob = booster.predict(xgb.DMatrix(x[:3]))
    assert prob.shape == (3, 4) and np.allclose(prob.sum(1), 1, atol=1e-5)


def test_train_booster_validates_on_the_patients_it_is_given():
    x, y, pats = clustered_features(patients=8, per=4)
    _, info = train_booster(x, y, pats, val_patients=["P001", "P006"], num_boost_round=5, progress=False)
    assert info["val_patients"] == ["P001", "P006"] and info["val_images"] == 8
    assert "P001" not in info["train_patients"]


def test_train_booster_grid_search_picks_the_lowest_validation_logloss():
    x, y, pats = clustered_features(patients=8, per=4, seed=2)
    _, info = train_booster(x, y, pats, seed=0, num_boost_round=8, early_stopping_rounds=4, grid_search=True,
                            progress=False)
    assert len(info["grid"]) == 8
    assert info["val_mlogloss"] == min(g["val_mlogloss"] for g in info["grid"])


def test_train_booster_with_one_patient_trains_without_validation():
    x, y, pats = clustered_features(patients=1, per=8)
    booster, info = train_booster(x, np.arange(8) % 4, pats, num_boost_round=5, progress=False)
    assert info["val_patients"] == [] and info["val_mlogloss"] is None and info["val_accuracy"] is None
    assert booster.num_boosted_rounds() == 5


def test_only_a_bundle_trained_on_the_phantom_carries_the_synthetic_disclaimer(tiny_bundle, tiny_dataset, tmp_path):
    """`sonoscore sim` marks its folder; a user's own data (the same files without the mark) trains a bundle with
    no synthetic-data disclaimer and no demo name."""
    import json
    import shutil

    from export.recipe import TrainConfig, train_bundle
    from runtime.bundle import DEMO_DISCLAIMER, Bundle
    from runtime.dataset import SYNTHETIC_MARK, is_synthetic
    assert is_synthetic(tiny_dataset)
    demo = Bundle.load(tiny_bundle)
    assert demo.disclaimer == DEMO_DISCLAIMER and "synthetic" in demo.manifest["name"]
    own = tmp_path / "own"
    shutil.copytree(tiny_dataset, own)
    (own / SYNTHETIC_MARK).unlink()
    assert not is_synthetic(own)
    cfg = TrainConfig(unet_width=1 / 16, vgg_width=1 / 32, unet_epochs=1, vgg_epochs=1, seed=0)
    b = Bundle.load(train_bundle(own, tmp_path / "bundle", cfg, progress=False))
    assert b.disclaimer is None and "synthetic" not in b.manifest["name"]
    assert json.loads((b.root / "manifest.json").read_text())["disclaimer"] is None
