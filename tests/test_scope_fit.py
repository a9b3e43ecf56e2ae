"""Fitting a bundle's scope reference (runtime/scope_fit.py): the split into reference and held-out patients, the
limits set on the held-out ones, `train` writing scope.npz with a manifest section whose hash is checked, `sonoscore
scope` refitting, and `eval` reporting the scope figures and the out-of-scope frames' refused share with a picture.

No figure that depends on trained weights is asserted: the bundle here is trained for one epoch with the mask gate
opened (minimum mask fraction 0), so every frame reaches the scope check."""
import json
import shutil

import cv2
import numpy as np
import pytest

from runtime import scope as sc
from runtime.scope_fit import Described, fit_described, split_groups
from tests.conftest import sonoscore


def _desc(rng, centre, noise):
    f = np.maximum(centre + rng.normal(0, noise, centre.shape), 0).astype(np.float32)
    values = {"area": 0.2, "largest": 1.0, "solidity": 0.95, "axis_ratio": 0.5, "border": 0.0,
              "outline_confidence": 0.9, "uncertain": 0.05, "colour": 0.0, "flat": 0.0}
    values = {k: v + float(rng.normal(0, 0.005)) for k, v in values.items()}
    return sc.Descriptors(values, f)


def test_limits_are_set_on_the_held_out_patients_not_on_the_reference_frames():
    """The reference patients' frames sit close to their prototypes (as the networks fit their training frames);
    new patients' frames lie further out. Limits set on the held-out patients keep them; limits set on the
    reference frames themselves (each one's own neighbours) would refuse most of them."""
    rng = np.random.default_rng(0)
    centre = rng.uniform(0, 1, 64)
    d = Described()
    for p in range(30):                                   # reference patients: tight around the centre
        for _ in range(4):
            d.add(f"r{p}", _desc(rng, centre, 0.05))
    for p in range(10):                                   # held-out patients: looser
        for _ in range(4):
            d.add(f"h{p}", _desc(rng, centre, 0.25))
    held = {f"h{p}" for p in range(10)}
    ref = fit_described(d, held, keep=0.98)
    assert ref.frames["reference"] == 120 and ref.frames["held_out"] == 40 and ref.frames["held_out_patients"] == 10
    held_rows = [r for r, g in zip(d.rows, d.groups) if g in held]
    kept = np.mean([ref.check(r).in_scope for r in held_rows])
    assert kept >= 0.98 and ref.kept_share >= 0.98
    # The same limits taken from the reference frames (held out = a quarter of the reference patients) refuse the
    # new patients: the fit must not set them there.
    tight = fit_described(Described([r for r, g in zip(d.rows, d.groups) if g not in held],
                                    [g for g in d.groups if g not in held]), {f"r{p}" for p in range(10)})
    assert tight.thresholds["view"] < ref.thresholds["view"]
    assert np.mean([tight.check(r).in_scope for r in held_rows]) < 0.5


def test_split_holds_out_whole_groups_named_or_a_quarter_at_random():
    groups = [f"p{i // 3}" for i in range(3 * 40)]
    chosen, how = split_groups(groups, held_out=["p1", "p2", "nobody"])
    assert chosen == {"p1", "p2"} and "named" in how
    chosen, how = split_groups(groups)
    assert len(chosen) == 10 and chosen <= set(groups)
    assert split_groups(groups)[0] == chosen                       # the same seed, the same split
    assert len(split_groups([f"p{i}" for i in range(20)])[0]) == sc.MIN_HELD_OUT_GROUPS   # enough to fit on
    assert len(split_groups([f"p{i}" for i in range(12)])[0]) == 3   # a quarter; fit_reference says if too few


def test_too_few_held_out_patients_is_one_sentence():
    rng = np.random.default_rng(1)
    centre = rng.uniform(0, 1, 16)
    d = Described()
    for p in range(6):
        for _ in range(5):
            d.add(f"p{p}", _desc(rng, centre, 0.1))
    with pytest.raises(sc.ScopeError, match="too few"):
        fit_described(d, {"p0", "p1"})


# -- a bundle trained with the scope reference ------------------------------------------------------------------
@pytest.fixture(scope="module")
def scoped(tmp_path_factory):
    """A one-epoch bundle on 36 phantom patients (9 held for validation), mask gate opened: train fits the scope."""
    from export.recipe import TrainConfig, train_bundle
    from runtime.dataset import write_dataset
    d = tmp_path_factory.mktemp("scoped")
    data = write_dataset(d / "data", patients=36, seed=5, frames_per_patient=3, progress=False)
    cfg = TrainConfig(unet_width=1 / 16, vgg_width=1 / 32, unet_epochs=1, vgg_epochs=1, seed=0,
                      min_mask_fraction=0.0)
    bundle = train_bundle(data, d / "bundle", cfg, progress=False)
    ood = d / "ood" / "deeper"
    ood.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):                                     # a coloured picture, a flat drawing, noise
        img = np.zeros((240, 320, 3), np.uint8)
        img[:] = (30 + 60 * i, 200, 90)
        cv2.circle(img, (160, 120), 90, (255, 255, 255), -1)
        cv2.imwrite(str(ood / f"picture{i}.png"), img)
        cv2.imwrite(str(d / "ood" / f"noise{i}.png"), rng.integers(0, 255, (200, 200), dtype=np.uint8))
    return {"dir": d, "data": data, "bundle": bundle, "ood": d / "ood"}


def test_train_writes_scope_npz_covered_by_the_manifest_hash(scoped, tmp_path):
    from runtime.bundle import Bundle, BundleError
    b = Bundle.load(scoped["bundle"])
    section = b.manifest["scope"]
    assert section["file"] == sc.FILE and section["file"] in b.manifest["files"]
    assert section["keep_share"] == 0.98 and section["frames"]["held_out_patients"] >= sc.MIN_HELD_OUT_GROUPS
    validation = set(b.manifest["provenance"]["validation_patients"])
    assert section["fitted_on"]["held_out"].startswith(f"{section['frames']['held_out_patients']} named")
    assert section["frames"]["held_out_patients"] <= len(validation)
    ref = sc.Reference.load(scoped["bundle"] / sc.FILE, section)
    assert set(ref.thresholds) == set(sc.FITTED_TESTS) and b.scope is not None and b.scope_warning is None
    tampered = tmp_path / "tampered"
    shutil.copytree(scoped["bundle"], tampered)
    with np.load(tampered / sc.FILE) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["prototypes"] = arrays["prototypes"] * np.float16(0.5)
    np.savez(tampered / sc.FILE, **arrays)
    with pytest.raises(BundleError, match="scope.npz does not match the sha256"):
        Bundle.load(tampered)


def test_sonoscore_scope_refits_an_existing_bundle(scoped, tmp_path):
    from runtime.bundle import Bundle
    b = tmp_path / "b"
    shutil.copytree(scoped["bundle"], b)
    before = json.loads((b / "manifest.json").read_text())
    r = sonoscore("scope", "--bundle", b, "--frames", scoped["data"], "--keep", "0.95")
    assert r.returncode == 0, r.stderr
    assert "scope reference written" in r.stdout
    after = Bundle.load(b).manifest            # manifest.sha256 and every hash consistent
    assert after["scope"]["keep_share"] == 0.95 and before["scope"]["keep_share"] == 0.98
    assert after["files"][sc.FILE] != before["files"][sc.FILE]
    bad = sonoscore("scope", "--bundle", b, "--frames", scoped["data"], "--keep", "1.2")
    assert bad.returncode == 2 and "--keep 1.2" in bad.stderr


def test_eval_reports_the_scope_figures_and_the_out_of_scope_share_with_a_picture(scoped, tmp_path):
    report = tmp_path / "eval.json"
    r = sonoscore("eval", "--bundle", scoped["bundle"], "--data", scoped["data"], "--report", report,
                  "--out-of-scope", scoped["ood"], "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(report.read_text())
    for key in ("graded_frames", "kidney_outlined", "accuracy", "graded_share", "in_scope_kept", "refused_by_reason",
                "without_scope"):
        assert key in out, key
    assert out["scope_reference"] is True
    assert out["without_scope"]["graded_frames"] >= out["graded_frames"]
    kept = out["in_scope_kept"]
    assert 0 <= kept <= 1 and out["in_scope_checked"] - round(kept * out["in_scope_checked"]) == \
        sum(out["refused_by_reason"].values())
    o = out["out_of_scope"]
    assert o["frames"] == 6 and o["errors"] == 0                  # a folder at any depth
    assert o["refused"] + o["graded"] == 6 and o["refused_share"] == pytest.approx(o["refused"] / 6, abs=1e-4)
    assert o["refused"] == o["refused_by_mask_gate"] + sum(o["refused_by_reason"].values())
    assert set(o["refused_by_reason"]) <= set(sc.REASONS)
    assert o["refused_by_reason"].get(sc.NOT_ULTRASOUND, 0) >= 3  # the coloured pictures: a fixed limit
    png = report.with_suffix(".scope.png")
    assert png.is_file() and cv2.imread(str(png)).shape[0] > 500
    assert "out-of-scope" in r.stderr + r.stdout
