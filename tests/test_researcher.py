"""A researcher's model (docs/models.md): a class count and gate of their own on `train` and `export`, recorded in
the manifest and used everywhere (the study summary and report count the bundle's grades); a grade without
training examples named; users' ONNX files with a static batch of 1, a chosen output, and every problem of both
files at once; FP16 checked against FP32 on frames at export; `sonoscore inspect` writing each network's exact
feeds and outputs; every command-line option with its help text. Real subprocesses and files throughout."""
import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import sonoscore  # noqa: E402
from tests.test_checkpoints import Fc2, RefNet, RefVGG, make_booster, torchscript_export  # noqa: E402

UNET_W, VGG_W = 1 / 16, 1 / 32


def vgg_features_dim():
    from export.models import VGG19BN
    return VGG19BN(width=VGG_W).features_dim


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from runtime.phantom import KidneyPhantom
    d = tmp_path_factory.mktemp("frames")
    ph = KidneyPhantom(grade=2, seed=4)
    for i in range(4):
        cv2.imwrite(str(d / f"scan_{i:02d}.png"), ph.frame(i * 3).image)
    return d


@pytest.fixture(scope="module")
def three_grade_bundle(tmp_path_factory):
    """A random-weight 3-grade bundle whose gate accepts every frame (threshold 0, minimum fraction 0)."""
    d = tmp_path_factory.mktemp("three")
    booster = make_booster(d / "b3.json", vgg_features_dim(), 3)
    out = d / "bundle"
    r = sonoscore("export", "--random-weights", "--unet-width", UNET_W, "--vgg-width", VGG_W, "--booster", booster,
                  "--out", out, "--classes", "mild,moderate,severe", "--mask-threshold", 0,
                  "--min-mask-fraction", 0, "--name", "three-grades", "--version", "0.3")
    assert r.returncode == 0, r.stderr
    return out


# -- a: the class count comes from the bundle ----------------------------------------------------------------------

def test_a_three_grade_bundle_gets_a_study_grade_and_its_own_names(three_grade_bundle, frames, tmp_path):
    m = json.loads((three_grade_bundle / "manifest.json").read_text())
    assert m["classes"] == ["mild", "moderate", "severe"] and m["booster"]["num_class"] == 3
    assert m["gate"] == {"mask_threshold": 0.0, "min_mask_fraction": 0.0}
    assert (m["card"]["name"], m["card"]["version"]) == ("three-grades", "0.3")
    summary, report = tmp_path / "s.json", tmp_path / "r.html"
    r = sonoscore("run", "--bundle", three_grade_bundle, "--source", frames, "--study-summary", summary,
                  "--study-report", report, "--quiet")
    assert r.returncode == 0, r.stderr
    s = json.loads(summary.read_text())
    assert s["accepted"] == 4
    assert s["final_grade"] in (1, 2, 3) and len(s["mean_probabilities"]) == 3
    assert set(s["grade_counts"]) == {"1", "2", "3"} and sum(s["grade_counts"].values()) == 4
    page = report.read_text()
    assert "moderate" in page and "no grade" not in page


def test_a_summary_learns_the_class_count_and_refuses_a_record_that_disagrees():
    from runtime.record import FrameRecord
    from runtime.sinks.summary import StudySummary

    def rec(i, probs):
        return FrameRecord(i, "s", 0.0, accepted=True, grade=int(np.argmax(probs)) + 1, probabilities=probs)
    study = StudySummary()                          # made without the bundle: the records say 3 classes
    for i in range(3):
        study.write(rec(i, [0.2, 0.5, 0.3]))
    s = study.summary()
    assert s["final_grade"] == 2 and s["grade_counts"] == {"1": 0, "2": 3, "3": 0}
    assert "grade 2" in study.html()
    named = StudySummary(class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="has 4 class probabilities but the study summary counts 3 classes"):
        named.write(rec(0, [0.1, 0.2, 0.3, 0.4]))


# -- b, c: train with a class count, gate and card of its own ------------------------------------------------------

def test_b_c_a_three_grade_train_runs_end_to_end_and_names_the_grade_it_never_saw(tiny_dataset, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    rows = list(csv.DictReader((data / "labels.csv").open()))
    for row in rows:   # grades 1 and 2 only, of 3
        row["grade"] = str({1: 1, 2: 2, 3: 2, 4: 1}[int(row["grade"])])
    with (data / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "patient", "grade"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "card.yaml").write_text("description: three grades\nauthors: [R. Searcher]\n")
    out = tmp_path / "b"
    r = sonoscore("train", "--data", data, "--out", out, "--unet-width", UNET_W, "--vgg-width", VGG_W,
                  "--unet-epochs", 1, "--vgg-epochs", 1, "--num-class", 3, "--classes", "low,mid,high",
                  "--mask-threshold", 0.45, "--min-mask-fraction", 0.04, "--card", tmp_path / "card.yaml",
                  "--name", "site-b", "--version", "1.2")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "has no examples" in line]
    assert warnings == ["train: warning: grade 3 (high) has no examples in the training data; the bundle will "
                        "never learn to give it"]
    from runtime.bundle import Bundle
    m = Bundle.load(out).manifest
    assert m["classes"] == ["low", "mid", "high"] and m["booster"]["num_class"] == 3
    assert m["gate"] == {"mask_threshold": 0.45, "min_mask_fraction": 0.04}
    assert m["card"] == {"name": "site-b", "version": "1.2", "description": "three grades",
                         "authors": ["R. Searcher"]}
    assert m["provenance"]["config"]["classes"] == ["low", "mid", "high"]
    # A grade above the class count is refused in one sentence.
    r = sonoscore("train", "--data", tiny_dataset, "--out", tmp_path / "no", "--unet-width", UNET_W, "--vgg-width",
                  VGG_W, "--unet-epochs", 1, "--vgg-epochs", 1, "--num-class", 3)
    assert r.returncode == 2 and "has grade 4 but the bundle grades 3 classes" in r.stderr
    assert not (tmp_path / "no").exists()


def test_b_class_names_and_gate_options_are_checked():
    from export.recipe import check_gate, class_names
    from runtime.errors import UserError
    assert class_names() == ["IFTA <25%", "IFTA 25-49%", "IFTA 50-74%", "IFTA >=75%"]
    assert class_names(3) == ["grade 1", "grade 2", "grade 3"]
    assert class_names(None, "a, b") == ["a", "b"]
    with pytest.raises(UserError, match="--num-class 4 but --classes names 2"):
        class_names(4, "a,b")
    with pytest.raises(UserError, match="names 'a' twice"):
        class_names(None, "a,b,a")
    with pytest.raises(UserError, match="outside 2..64"):
        class_names(1)
    assert check_gate(None, None) == (0.5, 0.05)
    with pytest.raises(UserError, match="--mask-threshold 1 is outside"):
        check_gate(1.0, None)
    with pytest.raises(UserError, match="--min-mask-fraction -0.1 is outside"):
        check_gate(None, -0.1)


def test_b_export_refuses_a_booster_of_another_class_count_naming_the_option(tmp_path):
    booster = make_booster(tmp_path / "b4.json", vgg_features_dim(), 4)
    r = sonoscore("export", "--random-weights", "--unet-width", UNET_W, "--vgg-width", VGG_W, "--booster", booster,
                  "--out", tmp_path / "x", "--num-class", 3)
    assert r.returncode == 2 and "predicts 4 classes but the bundle grades 3" in r.stderr
    assert "--num-class 4" in r.stderr and not (tmp_path / "x").exists()


# -- d: users' ONNX files ------------------------------------------------------------------------------------------

def test_d_a_static_batch_of_one_and_a_named_output_are_taken(tmp_path, frames):
    unet = torchscript_export(RefNet(False), tmp_path / "u1.onnx", (1, 1, 224, 224), "image", ["mask"],
                              dynamic=False)
    vgg = torchscript_export(Fc2(RefVGG(fc2=48), logits=True), tmp_path / "v.onnx", (1, 3, 224, 224), "x",
                             ["fc2", "logits"], dynamic=False)
    booster = make_booster(tmp_path / "b.json", 48)
    out = tmp_path / "bundle"
    r = sonoscore("export", "--unet-onnx", unet, "--vgg-onnx", vgg, "--vgg-output", "fc2", "--booster", booster,
                  "--out", out)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["networks"]["vgg"]["output"]["name"] == "fc2"
    assert m["networks"]["unet"]["input"]["shape"][0] == 1 and m["networks"]["unet"]["static_batch"] is True
    r = sonoscore("run", "--bundle", out, "--source", frames, "--results", tmp_path / "r.jsonl", "--quiet")
    assert r.returncode == 0, r.stderr
    r = sonoscore("run", "--bundle", out, "--source", frames, "--precision", "fp16", "--quiet")
    assert r.returncode == 0, r.stderr


def test_d_every_problem_of_both_files_is_reported_at_once(tmp_path):
    small = torchscript_export(RefNet(False), tmp_path / "small.onnx", (2, 1, 64, 64), "image", ["mask"],
                               dynamic=False)   # a fixed batch of 2, 64x64 in and out: three problems
    two = torchscript_export(Fc2(RefVGG(fc2=48), logits=True), tmp_path / "two.onnx", (1, 3, 224, 224), "x",
                             ["fc2", "logits"])  # two outputs, none named
    booster = make_booster(tmp_path / "b.json", 48)
    r = sonoscore("export", "--unet-onnx", small, "--vgg-onnx", two, "--booster", booster, "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "4 problems:" in r.stderr
    assert "has a fixed batch of 2" in r.stderr and "is 64x64; the runtime feeds 224x224" in r.stderr
    assert "output 'mask' has shape [2, 1, 64, 64]" in r.stderr
    assert "has outputs fc2, logits; the runtime reads one: name the Fc2 features output with --vgg-output" \
        in r.stderr
    r = sonoscore("export", "--unet-onnx", small, "--vgg-onnx", two, "--vgg-output", "feats", "--booster", booster,
                  "--out", tmp_path / "o")
    assert r.returncode == 2 and "has no output 'feats' (--vgg-output); its outputs are fc2, logits" in r.stderr
    assert not (tmp_path / "o").exists()


# -- e: FP16 against FP32 on frames --------------------------------------------------------------------------------

class Fragile(torch.nn.Module):
    """Fc2 features that survive FP32 but not FP16: scaled by 1e-8 (zero in FP16) and back by 1e8 (beyond FP16's
    range: the converter clamps it to 65504)."""

    def __init__(self, vgg):
        super().__init__()
        self.vgg = vgg

    def forward(self, x):
        return (self.vgg.fc2(x) * 1e-8) * 1e8


def test_e_an_fp16_file_that_differs_from_fp32_is_left_out_with_one_warning(tmp_path, frames):
    unet = torchscript_export(RefNet(False), tmp_path / "u.onnx", (1, 1, 224, 224), "image", ["mask"])
    good = torchscript_export(Fc2(RefVGG(fc2=48)), tmp_path / "good.onnx", (1, 3, 224, 224), "x", ["fc2"])
    fragile = torchscript_export(Fragile(RefVGG(fc2=48)), tmp_path / "fragile.onnx", (1, 3, 224, 224), "x",
                                 ["fc2"])
    booster = make_booster(tmp_path / "b.json", 48)
    ok = tmp_path / "ok"
    r = sonoscore("export", "--unet-onnx", unet, "--vgg-onnx", good, "--booster", booster, "--out", ok)
    assert r.returncode == 0, r.stderr
    m = json.loads((ok / "manifest.json").read_text())
    for name in ("unet", "vgg"):
        check = m["networks"][name]["parity"]["fp16_vs_fp32_frames"]
        assert check["passed"] is True and check["frames"] == 6 and check["tolerance"] == 0.02
    bad = tmp_path / "bad"
    r = sonoscore("export", "--unet-onnx", unet, "--vgg-onnx", fragile, "--booster", booster, "--out", bad)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "FP16" in line]
    assert len(lines) == 1 and lines[0].startswith("export: warning: the vgg's FP16 file differs from its FP32 file")
    m = json.loads((bad / "manifest.json").read_text())
    check = m["networks"]["vgg"]["parity"]["fp16_vs_fp32_frames"]
    assert check["passed"] is False and check["max_abs_relative"] > 0.02
    assert "fp16" not in m["networks"]["vgg"]["files"] and not (bad / "vgg.fp16.onnx").exists()
    from runtime.bundle import Bundle
    assert Bundle.load(bad).precisions == ["fp32"]


# -- f: sonoscore inspect ------------------------------------------------------------------------------------------

def test_f_inspect_writes_each_networks_exact_feeds_and_outputs(three_grade_bundle, frames, tmp_path):
    import onnxruntime as ort
    import xgboost as xgb
    image = sorted(frames.glob("*.png"))[0]
    out = tmp_path / "inspect"
    r = sonoscore("inspect", "--bundle", three_grade_bundle, "--image", image, "--out", out)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "inspect.json").read_text())
    assert info["gate"]["accepted"] is True and info["grade"] in (1, 2, 3)
    m = json.loads((three_grade_bundle / "manifest.json").read_text())

    def run(net, x):
        s = ort.InferenceSession(str(three_grade_bundle / m["networks"][net]["files"]["fp32"]),
                                 providers=["CPUExecutionProvider"])
        return s.run([m["networks"][net]["output"]["name"]], {m["networks"][net]["input"]["name"]: x})[0]
    image_npy = np.load(out / "image.npy")
    assert image_npy.shape == (224, 224) and image_npy.dtype == np.uint8
    unet_in = np.load(out / "unet_input.image.npy")
    assert unet_in.shape == (1, 1, 224, 224) and unet_in.dtype == np.float32
    np.testing.assert_array_equal(unet_in, image_npy[None, None].astype(np.float32) * np.float32(1 / 255))
    np.testing.assert_allclose(run("unet", unet_in), np.load(out / "unet_output.mask.npy"), atol=1e-6)
    vgg_in = np.load(out / "vgg_input.image.npy")
    feats = np.load(out / "vgg_output.features.npy")
    np.testing.assert_allclose(run("vgg", vgg_in), feats, rtol=1e-5, atol=1e-6)
    booster = xgb.Booster()
    booster.load_model(str(three_grade_bundle / "booster.ubj"))
    want = booster.predict(xgb.DMatrix(feats))
    np.testing.assert_allclose(np.load(out / "booster_probabilities.npy"), want, atol=1e-5)


# -- h: every option has its help text -----------------------------------------------------------------------------

def options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += [f"{name} {m}" for m in options_without_help(sub)]
        elif action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(action.option_strings[-1])
    return missing


def test_h_every_option_of_every_command_has_help_text():
    from runtime.cli import build_parser
    assert options_without_help(build_parser()) == []


def test_h_the_walk_finds_an_option_without_help():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    s = sub.add_parser("x")
    s.add_argument("--bare")
    s.add_argument("--told", help="yes")
    assert options_without_help(p) == ["x --bare"]
