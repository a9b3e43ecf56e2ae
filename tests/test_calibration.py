"""INT8 calibration: real onnxruntime quantization of a real (tiny) bundle, the accuracy report, the command's
outcomes, and the TensorRT-readiness rules checked on the files it writes."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.checks import trt_readiness
from calibration.quantize import output_tail, quantize_int8, spread_indices
from calibration.report import Criteria, Outputs, compare
from runtime.bundle import Bundle, write_manifest
from tests.conftest import sonoscore

SIM = "sim://kidney?frames=16&fps=30&seed=4"   # fps=30 on purpose: calibration reads it unpaced
# Every criterion off (a tiny one-epoch model's INT8 agreement is not what these tests are about); the noise floor is
# still measured and reported (--grade-noise stays 1).
OPEN = ["--min-study", 0, "--min-grade", 0, "--min-gate", 0, "--min-iou", 0, "--max-accuracy-drop", 1]


def _open_gate(bundle_dir: Path, min_mask_fraction: float = 0.0) -> None:
    """The tiny bundle's one-epoch UNet finds little or no kidney (how much depends on the machine it trained on),
    so its gate may reject every frame and leave nothing to calibrate the VGG on. Opening the gate (a manifest
    setting, not a hashed file) lets every frame through, whatever the weights (a manifest's fraction must lie in
    [0, 1]). The networks and their files stay exactly as trained."""
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["gate"]["min_mask_fraction"] = min_mask_fraction
    write_manifest(bundle_dir, m)     # manifest.sha256 follows: a hand edit alone is refused at load


def _drop_fp16(bundle_dir: Path) -> None:
    """Take the FP16 files out of a bundle's manifest (they stay on disk, unreferenced): calibrate then checks INT8
    alone."""
    from runtime.bundle import write_manifest
    m = json.loads((bundle_dir / "manifest.json").read_text())
    for net in m["networks"].values():
        net["files"].pop("fp16", None)
    write_manifest(bundle_dir, m)


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle calibrated through the real command line (thresholds relaxed: a one-epoch model's
    INT8 agreement is not what this fixture is about)."""
    b = tmp_path_factory.mktemp("cal") / "bundle"
    shutil.copytree(tiny_bundle, b)
    _open_gate(b)
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8,
                  *OPEN)
    assert r.returncode == 0, r.stderr
    return b, r


def test_calibrate_adds_int8_networks_with_hashes_and_provenance(calibrated):
    b, r = calibrated
    bundle = Bundle.load(b)                       # verifies every sha256, the new files' included
    assert "int8" in bundle.precisions and bundle.int8_networks == ["unet", "vgg"]
    m = bundle.manifest
    for net in ("unet", "vgg"):
        assert m["networks"][net]["files"]["int8"] == f"{net}.int8.onnx"
        assert m["files"][f"{net}.int8.onnx"]
        info = m["networks"][net]["int8"]
        assert info["weight_bits"] == 7 and info["biases"] == "float"
    assert m["networks"]["unet"]["int8"]["conv_transpose_weights"] == "per-channel (sub-pixel Conv + DepthToSpace)"
    cal = m["calibration"]
    assert cal["method"] == "minmax" and cal["frames"] == 8 and cal["versions"]["onnxruntime"]
    assert cal["sources"][0]["source_id"].startswith("sim-kidney")
    report = json.loads((b / "calibration_report.json").read_text())
    assert report["frames"] == {**report["frames"], "read": 16, "calibration": 8, "held_out": 8}
    held = report["accuracy"]["held-out"]
    assert set(held) == {"int8", "fp16"}
    for key in ("mask_iou_mean", "mask_fraction_error_mean", "gate_agreement", "feature_cosine_mean",
                "grade_agreement", "probability_l1_mean"):
        assert key in held["int8"]
    assert held["fp16"]["gate_agreement"] == 1.0  # the gate is open: every frame passes at every precision
    for key in ("study_agreement", "grade_agreement", "grade_floor", "near_tie_share", "mask_iou_accepted_mean",
                "accuracy", "accuracy_reference", "criteria"):
        assert key in held["int8"]
    # the noise floor was measured on the held-out frames (the gate is open: FP32 accepts every frame), the sim://
    # source is one simulated patient, one study, whose grade is the label accuracy is measured against
    assert held["int8"]["grade_floor"] is not None and held["int8"]["grade_noise"] == 1
    assert held["int8"]["studies"] == 1 and held["int8"]["frames_labelled_reference"] == 8
    assert report["criteria"] == {**report["criteria"], "min_study": 0.0, "min_gate": 0.0, "grade_noise": 1}
    assert m["calibration"]["criteria"] == report["criteria"]
    assert "prec" in r.stderr and "criteria:" in r.stderr      # the table on the terminal


@pytest.mark.parametrize("net", ["unet", "vgg"])
def test_int8_files_are_tensorrt_ready(calibrated, net):
    b, _ = calibrated
    assert trt_readiness(b / f"{net}.int8.onnx") == []
    model = onnx.load(str(b / f"{net}.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_runs_in_run_and_bench_in_one_run(calibrated, tmp_path):
    b, _ = calibrated
    res = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", b, "--source", "sim://kidney?fps=0&frames=4&seed=2", "--precision", "int8",
                  "--results", res, "--quiet")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in res.read_text().splitlines()]
    assert len(recs) == 4 and all(x["error"] is None and x["grade"] in (1, 2, 3, 4) for x in recs)
    out = tmp_path / "bench.json"
    r = sonoscore("bench", "--bundle", b, "--precision", "fp32,int8", "--frames", 3, "--warmup", 1, "--json", out)
    assert r.returncode == 0, r.stderr
    bench = json.loads(out.read_text())
    assert bench["precision"] == "fp32" and set(bench["precisions"]) == {"fp32", "int8"}
    assert bench["precisions"]["int8"]["files"] == {"unet": "unet.int8.onnx", "vgg": "vgg.int8.onnx"}
    assert bench["speedup"]["int8"]["networks_p50"] > 0
    assert "int8 vs fp32" in r.stderr


def test_networks_vgg_quantizes_only_the_vgg_and_the_unet_stays_fp32_in_the_int8_set(calibrated, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(calibrated[0], b)   # already has both INT8 files: the VGG-only calibration replaces that
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8, "--networks", "vgg",
                  *OPEN)
    assert r.returncode == 0, r.stderr
    bundle = Bundle.load(b)
    m = bundle.manifest
    assert m["networks"]["unet"]["files"]["int8"] == "unet.onnx"
    assert m["networks"]["vgg"]["files"]["int8"] == "vgg.int8.onnx"
    assert m["calibration"]["networks"] == ["vgg"] and "not quantized" in m["networks"]["unet"]["int8"]["format"]
    assert not (b / "unet.int8.onnx").exists() and "unet.int8.onnx" not in m["files"]
    assert trt_readiness(b / "vgg.int8.onnx") == []
    report = json.loads((b / "calibration_report.json").read_text())
    assert report["int8_networks"] == ["vgg"] and set(report["networks"]) == {"vgg"}
    # with the UNet in FP32 on both sides, the INT8 set's masks are the FP32 masks
    held = report["accuracy"]["held-out"]["int8"]
    assert held["mask_iou_mean"] == 1.0 and held["gate_agreement"] == 1.0
    res = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", b, "--source", "sim://kidney?fps=0&frames=3&seed=2", "--precision", "int8",
                  "--results", res, "--quiet")
    assert r.returncode == 0, r.stderr
    assert all(json.loads(x)["error"] is None for x in res.read_text().splitlines())
    bad = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--networks", "vgg,booster")
    assert bad.returncode == 2 and "unet, vgg or both" in bad.stderr and "Traceback" not in bad.stderr


def _threshold_at_the_median(bundle_dir: Path) -> None:
    """Set the bundle's mask threshold to the median of its FP32 UNet's probabilities on the SIM frames, so that
    about half of every mask is kidney whatever the weights a training run produced on this machine (a one-epoch
    UNet may otherwise find no kidney at all, and then no mask IoU can be measured)."""
    from runtime.pipeline import Pipeline
    from runtime.sources import open_source
    probs = []
    with Pipeline(Bundle.load(bundle_dir), threads=1) as pipe, open_source(SIM, realtime=False) as source:
        for frame in source:
            probs.append(pipe.graph.segment(pipe.unet, pipe.prepare(frame)[1]))
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["gate"]["mask_threshold"] = float(np.median(probs))
    write_manifest(bundle_dir, m)


def test_networks_auto_installs_both_when_both_pass_else_the_vgg_alone(calibrated, tmp_path):
    relaxed = ["--min-study", 0, "--min-grade", 0, "--min-gate", 0, "--max-accuracy-drop", 1]   # OPEN but the IoU
    base = tmp_path / "base"
    shutil.copytree(calibrated[0], base)
    _threshold_at_the_median(base)
    b = tmp_path / "both"
    shutil.copytree(base, b)
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8, "--networks", "auto",
                  "--min-iou", 0, *relaxed)
    assert r.returncode == 0, r.stderr
    report = json.loads((b / "calibration_report.json").read_text())
    assert report["int8_networks"] == ["unet", "vgg"] and report["int8_both_missed"] is None
    assert set(report["accuracy"]["held-out"]) == {"int8", "int8-vgg", "fp16"}
    assert Bundle.load(b).manifest["networks"]["unet"]["files"]["int8"] == "unet.int8.onnx"

    both_iou = report["accuracy"]["held-out"]["int8"]["mask_iou_accepted_mean"]
    assert report["accuracy"]["held-out"]["int8-vgg"]["mask_iou_accepted_mean"] == 1.0   # the FP32 UNet's masks

    # An IoU floor between what this run's INT8 UNet reached and 1 (what the VGG alone in INT8 keeps, by
    # construction) separates the two sets. Derived from the run, not assumed: how far INT8 moves the masks depends
    # on the CPU's integer kernels and on the weights a training run produced on this machine. FP16 is taken out
    # of this copy so that its own IoU (also just below 1) cannot fail the run.
    b = tmp_path / "vgg"
    shutil.copytree(base, b)
    _drop_fp16(b)
    floor = (both_iou + 1.0) / 2
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8, "--networks", "auto",
                  "--min-iou", floor, *relaxed)
    assert r.returncode == 0, r.stderr
    report = json.loads((b / "calibration_report.json").read_text())
    held = report["accuracy"]["held-out"]
    assert set(held) == {"int8", "int8-vgg"} and held["int8"]["mask_iou_accepted_mean"] == both_iou   # same run
    m = Bundle.load(b).manifest
    assert m["networks"]["vgg"]["files"]["int8"] == "vgg.int8.onnx"
    if both_iou < 1.0:   # the INT8 UNet moved some mask pixel: it misses the floor, the VGG alone is installed
        assert report["int8_networks"] == ["vgg"] and report["passed"] is True
        assert report["int8_both_missed"] and "mask IoU" in report["int8_both_missed"][0]
        assert "the VGG alone in INT8 passes" in r.stderr
        assert m["networks"]["unet"]["files"]["int8"] == "unet.onnx" and not (b / "unet.int8.onnx").exists()
        kept = b / "calibration-rejected" / "unet.int8.onnx"   # the UNet file that missed, kept for inspection
        assert kept.is_file() and report["rejected_files"] == str(b / "calibration-rejected")
        assert not (b / "calibration-rejected" / "vgg.int8.onnx").exists()
    else:                # INT8 kept every mask pixel here: both pass the floor of 1 and both are installed
        assert report["int8_networks"] == ["unet", "vgg"] and report["int8_both_missed"] is None
        assert m["networks"]["unet"]["files"]["int8"] == "unet.int8.onnx"

    # and when neither passes, nothing is installed and the command says so (exit 4)
    b = tmp_path / "none"
    shutil.copytree(base, b)
    before = (b / "manifest.json").read_text()
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8, "--networks", "auto",
                  *OPEN, "--min-cosine", 1.5)
    assert r.returncode == 4 and (b / "manifest.json").read_text() == before


def test_a_missed_criterion_fails_names_itself_and_by_how_much_and_keeps_the_bundle_unchanged(tiny_bundle, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    _open_gate(b)
    before = (b / "manifest.json").read_text()
    # the gate is open: both precisions accept every frame, gate agreement 1.0, which cannot reach 1.01: the check
    # must fail, say which criterion, its figure, limit and shortfall, and leave the bundle as it was
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 6, "--holdout", 6, *OPEN, "--min-gate", 1.01)
    assert r.returncode == 4, r.stderr
    assert "gate agreement 1.0000 < 1.0100 (short by 0.0100)" in r.stderr and "Traceback" not in r.stderr
    assert (b / "manifest.json").read_text() == before
    assert (b / "calibration-rejected" / "unet.int8.onnx").is_file()
    assert not (b / "unet.int8.onnx").exists()
    report = json.loads((b / "calibration_report.json").read_text())
    assert report["passed"] is False and "gate agreement 1.0000 < 1.0100" in report["failures"][0]
    row = report["accuracy"]["held-out"]["int8"]["criteria"][0]
    assert row == {**row, "criterion": "gate agreement", "figure": 1.0, "limit": 1.01, "margin": -0.01,
                   "passed": False}


def test_each_criterion_in_the_report_has_its_figure_limit_and_margin(tiny_bundle, tmp_path):
    """Every criterion on, at limits a figure may or may not meet on this CPU with these weights: whatever the
    verdict, each row's margin is its figure minus its limit (the limit minus the figure for the accuracy drop),
    it passed exactly when that is >= 0, and the grade's limit is the FP32 noise floor measured in the same run."""
    from calibration.run import CalibrationFailed, calibrate_bundle
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    _open_gate(b)
    _drop_fp16(b)
    try:
        calibrate_bundle(b, [SIM], count=6, holdout=6, quiet=True, report=b / "r.json",
                         thresholds=Criteria(min_cosine=0.5))
    except CalibrationFailed:
        pass
    m = json.loads((b / "r.json").read_text())["accuracy"]["held-out"]["int8"]
    rows = {r["criterion"]: r for r in m["criteria"]}
    assert list(rows) == ["study grade", "grade agreement", "gate agreement", "mask IoU (accepted frames)",
                          "accuracy drop", "feature cosine"]
    assert rows["grade agreement"]["limit"] == m["grade_floor"] and "noise" in rows["grade agreement"]["limit_is"]
    figures = {"study grade": m["study_agreement"], "grade agreement": m["grade_agreement"],
               "gate agreement": m["gate_agreement"], "mask IoU (accepted frames)": m["mask_iou_accepted_mean"],
               "feature cosine": m["feature_cosine_mean"]}
    for name, row in rows.items():
        if row["figure"] is None:
            assert not row["passed"] and "not measured" in row["note"]
            continue
        want = (m["accuracy_reference"] - m["accuracy"]) if name == "accuracy drop" else figures[name]
        assert row["figure"] == pytest.approx(want, abs=1e-6)
        margin = row["limit"] - row["figure"] if name == "accuracy drop" else row["figure"] - row["limit"]
        assert row["margin"] == pytest.approx(margin, abs=1e-6) and row["passed"] == (row["margin"] >= 0)
    assert m["passed"] == all(r["passed"] for r in rows.values())


def test_calibrate_user_errors_are_one_sentence(tiny_bundle, tmp_path):
    r = sonoscore("calibrate", "--bundle", tiny_bundle, "--frames", tmp_path / "nope")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    # a gate closed to every frame: nothing to calibrate the VGG on, said in one sentence
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["gate"]["mask_threshold"] = 1.0        # no sigmoid exceeds 1: every mask empty, every frame below the gate
    write_manifest(b, m)
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 4, "--holdout", 4)
    assert r.returncode == 2 and "quality gate" in r.stderr and "Traceback" not in r.stderr
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", SIM, "--precision", "int8")
    assert r.returncode == 2 and "sonoscore calibrate" in r.stderr


# -- the pieces, on small real models --------------------------------------------------------------------------
def _conv_model(path: Path, transpose: bool = False) -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w1")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    inits = [w1]
    if transpose:
        wt = numpy_helper.from_array(rng.normal(0, 0.3, (4, 2, 4, 4)).astype(np.float32), "wt")
        nodes.append(helper.make_node("ConvTranspose", ["r1", "wt"], ["t1"], strides=[2, 2], pads=[1, 1, 1, 1],
                                      name="up1"))
        inits.append(wt)
        last, ch, size = "t1", 2, 16
    else:
        last, ch, size = "r1", 4, 8
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (1, ch, 1, 1)).astype(np.float32), "w2")
    nodes += [helper.make_node("Conv", [last, "w2"], ["c2"], name="head"),
              helper.make_node("Sigmoid", ["c2"], ["y"], name="sig")]
    inits.append(w2)
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, size, size])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _inputs(n=8):
    rng = np.random.default_rng(1)
    return [rng.random((1, 1, 8, 8), dtype=np.float32) for _ in range(n)]


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_method_gives_a_ready_qdq_model_with_a_float_output_tail(tmp_path, method):
    src = _conv_model(tmp_path / "m.onnx", transpose=True)
    r = quantize_int8(src, tmp_path / "q.onnx", "x", _inputs(), method=method, conv_transpose="per-tensor")
    assert trt_readiness(r.path) == []
    assert r.quantized_ops == {"Conv": 1, "ConvTranspose": 1}      # the head conv stays float (output tail)
    assert r.float_ops == {"Conv": 1}
    assert output_tail(onnx.load(str(src))) == ["sig", "head"]
    model = onnx.load(str(r.path))
    dq_w = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "wt_quantized"]
    assert dq_w, "the ConvTranspose weight is quantized"
    scale = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[dq_w[0].input[1]]
    assert scale.size == 1                                          # per tensor, as TensorRT needs


def test_conv_transpose_can_stay_float(tmp_path):
    r = quantize_int8(_conv_model(tmp_path / "m.onnx", transpose=True), tmp_path / "q.onnx", "x", _inputs(),
                      conv_transpose="float")
    assert r.quantized_ops == {"Conv": 1} and r.float_ops == {"ConvTranspose": 1, "Conv": 1}
    assert trt_readiness(r.path) == []


def test_readiness_catches_what_tensorrt_rejects(tmp_path):
    """onnxruntime's own defaults (asymmetric activations, per-channel ConvTranspose on axis 1, INT32 biases)
    produce exactly the files TensorRT refuses: the check must say so for each."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self):
            self.it = iter(_inputs())

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    bad = tmp_path / "bad.onnx"
    w = _conv_model(tmp_path / "m.onnx", transpose=True)
    quantize_static(str(w), str(bad), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    problems = " | ".join(trt_readiness(bad))
    assert "non-zero zero point" in problems or "quantizes to uint8" in problems
    assert "ConvTranspose weight per channel" in problems
    assert trt_readiness(w) and "no QuantizeLinear" in trt_readiness(w)[0]


def test_spread_indices_cover_the_whole_source():
    idx = spread_indices(1000, 10)
    assert len(idx) == 10 and idx[0] < 100 and idx[-1] > 900 and idx == sorted(set(idx))
    assert spread_indices(5, 10) == [0, 1, 2, 3, 4]


def test_compare_metrics_against_hand_computed_values():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2] = True               # 8 px
    masks[1, :1] = True               # 4 px
    other = masks.copy()
    other[0, 2, :] = True             # frame 0: 8 vs 12 px, IoU 8/12
    feats = np.array([[1, 0], [0, 1], [np.nan, np.nan]], np.float32)
    ofeats = np.array([[1, 1], [0, 1], [np.nan, np.nan]], np.float32)
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [np.nan, np.nan]])
    oprobs = np.array([[0.4, 0.6], [0.4, 0.6], [np.nan, np.nan]])
    ref = Outputs(masks, np.array([0.5, 0.25, 0.0]), np.array([True, True, False]), feats, probs)
    oth = Outputs(other, np.array([0.75, 0.25, 0.0]), np.array([True, True, True]), ofeats, oprobs)
    m = compare(ref, oth)
    assert m["frames_with_kidney"] == 2                        # frame 2 has no kidney in either: not counted
    assert m["mask_iou_mean"] == pytest.approx((8 / 12 + 1) / 2, abs=1e-6)
    assert m["gate_agreement"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["feature_cosine_mean"] == pytest.approx((1 / np.sqrt(2) + 1) / 2, abs=1e-6)
    assert m["grade_agreement"] == 0.5
    # frame 0's FP32 gap is 0.4, frame 1's 0.2: both clear of a near-tie, the same agreement
    assert m["frames_clear"] == 2 and m["grade_agreement_clear"] == 0.5
    assert m["probability_l1_mean"] == pytest.approx(0.3, abs=1e-6)
    assert Criteria().missed(m)                                # far below every default
    assert Criteria.off().missed(m) == []


def test_clear_grade_agreement_leaves_out_only_frames_where_fp32_nearly_ties():
    """Three accepted frames: FP32 gaps 0.02 (a near-tie, swapped), exactly CLEAR_GAP (swapped) and 0.5 (kept).
    Agreement 1/3 over all three; over the clear ones (gap >= CLEAR_GAP) 1/2; the check still decides on 1/3."""
    from runtime.agreement import CLEAR_GAP
    masks = np.ones((3, 2, 2), bool)
    feats = np.ones((3, 2), np.float32)
    half = CLEAR_GAP / 2
    probs = np.array([[0.51, 0.49], [0.5 + half, 0.5 - half], [0.75, 0.25]])
    oprobs = np.array([[0.49, 0.51], [0.4, 0.6], [0.7, 0.3]])
    accepted = np.ones(3, bool)
    m = compare(Outputs(masks, np.ones(3), accepted, feats, probs), Outputs(masks, np.ones(3), accepted, feats, oprobs))
    assert m["grade_agreement"] == pytest.approx(1 / 3, abs=1e-6)
    assert m["frames_clear"] == 2 and m["grade_agreement_clear"] == 0.5
    assert Criteria.off(min_grade=0.5).missed(m)              # 1/3 < 0.5: the clear figure does not decide


# (what an unmeasured or non-finite figure does to its check: tests/test_agreement_criteria.py)


def test_demo_timing_bundle_quantizes_what_the_demo_int8_set_quantizes(calibrated, tiny_bundle, tmp_path):
    """The demo's bench times the INT8 set that passed its accuracy check: the full-width timing bundle follows
    the demo bundle's choice (here the VGG alone), and follows it again when that choice changes."""
    from export.demo import calibrate_bench
    demo = tmp_path / "demo"
    shutil.copytree(calibrated[0], demo)
    r = sonoscore("calibrate", "--bundle", demo, "--frames", SIM, "--count", 8, "--holdout", 8, "--networks", "vgg",
                  *OPEN)
    assert r.returncode == 0, r.stderr
    assert Bundle.load(demo).int8_networks == ["vgg"]
    bench = tmp_path / "bench"
    shutil.copytree(tiny_bundle, bench)
    _open_gate(bench)
    assert Bundle.load(bench).int8_networks == []
    assert calibrate_bench(demo, bench, frames=SIM, count=8) == ("vgg",)
    timing = Bundle.load(bench)
    assert "int8" in timing.precisions and timing.int8_networks == ["vgg"]
    assert timing.network_file("unet", "int8") == timing.network_file("unet", "fp32")
    stamp = (bench / "manifest.json").stat().st_mtime_ns
    assert calibrate_bench(demo, bench, frames=SIM, count=8) == ("vgg",)   # already right: left as it is
    assert (bench / "manifest.json").stat().st_mtime_ns == stamp
    assert calibrate_bench(calibrated[0], bench, frames=SIM, count=8) == ("unet", "vgg")
    assert Bundle.load(bench).int8_networks == ["unet", "vgg"]


def test_float_layers_puts_one_layer_back_in_float_and_keeps_the_rest_quantized(tmp_path):
    """float_layers (`calibrate --diagnose` tries one layer at a time with it): the named layer reads the FP32
    weight and the float activation, the other layer keeps its Q/DQ and scales, nothing dangles, and with every
    node reading float inputs (the Relu's and the float head's inputs have Q/DQ pairs of their own) the model
    computes what the FP32 model computes."""
    from calibration.quantize import float_layers, quantized_layers
    src = _conv_model(tmp_path / "m.onnx", transpose=True)
    quantize_int8(src, tmp_path / "q.onnx", "x", _inputs(), conv_transpose="per-tensor")
    fp32, qdq = onnx.load(str(src)), onnx.load(str(tmp_path / "q.onnx"))
    assert quantized_layers(qdq) == ["conv1", "up1"]
    one = float_layers(qdq, fp32, ["up1"])
    assert quantized_layers(one) == ["conv1"]
    node = {n.name: n for n in one.graph.node}["up1"]
    inits = {i.name: numpy_helper.to_array(i) for i in one.graph.initializer}
    fp_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    assert node.input[1] == "wt" and np.array_equal(inits["wt"], fp_inits["wt"])   # the original, not dequantized
    producers = {o: n for n in one.graph.node for o in n.output}
    assert node.input[0] == "r1" and producers["r1"].op_type == "Relu"
    used = {x for n in one.graph.node for x in n.input} | {"y"}
    assert all(any(o in used for o in n.output) for n in one.graph.node)           # no dangling Q/DQ
    assert set(inits) <= used and "wt_quantized" not in inits
    onnx.checker.check_model(one)
    onnx.save(one, str(tmp_path / "one.onnx"))
    assert trt_readiness(tmp_path / "one.onnx") == []

    import onnxruntime as ort
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": _inputs(1)[0]})[0]
    everything = [n.name for n in qdq.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    none_left = float_layers(qdq, fp32, everything)
    assert quantized_layers(none_left) == []
    assert not {n.op_type for n in none_left.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    assert np.abs(run(qdq) - run(fp32)).max() > 1e-4                     # the premise: INT8 moves the output
    assert np.allclose(run(none_left), run(fp32), atol=1e-6)
    with pytest.raises(ValueError, match="no node named"):
        float_layers(qdq, fp32, ["nope"])



def test_reused_masks_give_what_running_the_same_unet_again_gives(tiny_bundle, tmp_path):
    """calibrate reuses the FP32 reference's masks for a set whose UNet is the FP32 file (int8-vgg)."""
    from calibration.report import run_precision
    from calibration.run import read_frames
    from runtime.booster import Booster
    from runtime.pipeline import Pipeline
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    _open_gate(b)
    bundle = Bundle.load(b)
    images = read_frames([SIM], Pipeline(bundle), max_frames=6, quiet=True).images
    booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes)
    files = {n: bundle.network_file(n, "fp32") for n in ("unet", "vgg")}
    ref = run_precision(bundle, files, booster, images)
    again = run_precision(bundle, files, booster, images, masks_from=ref)
    assert ref.accepted.all() and np.isfinite(ref.features).all()
    np.testing.assert_array_equal(run_precision(bundle, files, booster, images).masks, ref.masks)  # the premise
    for field in ("masks", "fractions", "accepted", "features", "probabilities"):
        np.testing.assert_array_equal(getattr(again, field), getattr(ref, field))
    with pytest.raises(ValueError, match="another set of images"):
        run_precision(bundle, files, booster, images[:2], masks_from=ref)


def test_a_timing_only_calibration_does_not_need_frames_the_gate_accepts(tiny_bundle, tmp_path):
    """A random-weight timing bundle's UNet may find no kidney anywhere: with --timing-only the whole image then
    calibrates the VGG (an accuracy check would refuse such frames; timing has none)."""
    from calibration.run import calibrate_bundle
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["gate"]["min_mask_fraction"] = 1.0          # no frame can pass the gate
    write_manifest(b, m)
    calibrate_bundle(b, ["sim://kidney?frames=8&fps=0&seed=5"], count=4, holdout=4, timing_only=True, quiet=True)
    bundle = Bundle.load(b)
    assert "int8" in bundle.precisions and set(bundle.int8_networks) == {"unet", "vgg"}


def test_gain_is_pixels_times_gain_rounded_and_saturating():
    from calibration.run import with_gain
    img = np.array([[0, 3, 100], [160, 200, 255]], np.uint8)
    assert with_gain(img, 1.0) is img
    assert with_gain(img, 1.6).tolist() == [[0, 5, 160], [255, 255, 255]]     # 3 * 1.6 = 4.8 -> 5; 256 -> 255
    assert with_gain(img, 0.5).tolist() == [[0, 2, 50], [80, 100, 128]]       # 1.5 and 127.5 round half to even
    assert with_gain(img, 0.5).dtype == np.uint8


def test_unet_gains_widen_the_unet_ranges_to_the_gained_frames_and_leave_the_vgg_alone(tiny_bundle, tmp_path):
    """Calibrating with gains (1, 4): the UNet's input range is the largest input of the calibration frames and of
    their copies at 4x (computed here from the same frames), a quarter of the frames' own range or more; every other
    UNet range stays defined; the VGG, which calibrates on the frames as they are, gets the same file byte for
    byte; the manifest and the report name the gains."""
    from calibration.run import calibrate_bundle, read_frames, with_gain
    from runtime.pipeline import Pipeline
    source = "sim://kidney?frames=16&fps=0&seed=6"
    files, outs = {}, {}
    for gains in ((1.0,), (1.0, 4.0)):
        b = tmp_path / f"b{len(gains)}"
        shutil.copytree(tiny_bundle, b)
        _open_gate(b)
        outs[gains] = calibrate_bundle(b, [source], count=6, holdout=6, timing_only=True, quiet=True,
                                       unet_gains=gains)
        files[gains] = b

    def input_scale(path):
        m = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        x = m.graph.input[0].name
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == x)
        return float(inits[q.input[1]])

    bundle = Bundle.load(files[(1.0,)])
    graph = bundle.graph()
    data = read_frames([source], Pipeline(bundle), max_frames=3000, quiet=True)
    frames = [data.images[i] for i in spread_indices(len(data.images), min(6, len(data.images) // 2))]
    plain = max(float(np.abs(graph.unet_feeds(f)[graph.unet_input]).max()) for f in frames)
    gained = max(plain, *(float(np.abs(graph.unet_feeds(with_gain(f, 4.0))[graph.unet_input]).max()) for f in frames))
    assert gained > plain                          # the copies at 4x reach further: the test can tell them apart
    s1 = input_scale(files[(1.0,)] / "unet.int8.onnx")
    s4 = input_scale(files[(1.0, 4.0)] / "unet.int8.onnx")
    assert s4 / s1 == pytest.approx(gained / plain, rel=1e-5)
    assert (files[(1.0,)] / "vgg.int8.onnx").read_bytes() == (files[(1.0, 4.0)] / "vgg.int8.onnx").read_bytes()
    m = Bundle.load(files[(1.0, 4.0)]).manifest
    assert m["networks"]["unet"]["int8"]["calibration_gains"] == [1.0, 4.0]
    assert "calibration_gains" not in m["networks"]["vgg"]["int8"]
    assert outs[(1.0, 4.0)]["unet_gains"] == [1.0, 4.0] and outs[(1.0,)]["unet_gains"] == [1.0]


@pytest.mark.parametrize("gains, says", [("0,1", "holds 0, not a gain"), ("1,x", "holds 'x', not a gain"),
                                         ("2", "leaves out the frames as they are"),
                                         ("1,inf", "holds inf, not a gain")])
def test_bad_unet_gains_are_one_sentence(tiny_bundle, gains, says):
    r = sonoscore("calibrate", "--bundle", tiny_bundle, "--frames", SIM, "--unet-gains", gains)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.count(". ") == 0


def test_unet_gains_are_refused_with_qat(tiny_bundle, tmp_path):
    r = sonoscore("calibrate", "--bundle", tiny_bundle, "--qat", "--data", tmp_path, "--unet-gains", "1,1.6")
    assert r.returncode == 2 and "leave --unet-gains out with --qat" in r.stderr and "Traceback" not in r.stderr
    # the frames as they are (1, however written) is what QAT does anyway: not refused for that reason
    r = sonoscore("calibrate", "--bundle", tiny_bundle, "--qat", "--data", tmp_path / "nope", "--unet-gains", "1.0")
    assert r.returncode == 2 and "--unet-gains" not in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- frames: studies and labels from the source, the scanner's own DICOM --------------------------------------------

def test_a_labelled_folder_gives_each_frame_its_patient_and_grade(tiny_bundle, tiny_dataset):
    """The images folder of a labelled dataset (labels.csv beside it, as `sonoscore sim` writes it): each frame's
    study is its patient and its label the CSV's grade; a sim:// source is one study, labelled with its grade."""
    import csv
    from calibration.run import read_frames
    from runtime.pipeline import Pipeline
    pipe = Pipeline(Bundle.load(tiny_bundle))
    data = read_frames([str(tiny_dataset / "images")], pipe, max_frames=3000, quiet=True)
    rows = list(csv.DictReader(open(tiny_dataset / "labels.csv")))
    by_name = {Path(r["image"]).name: (r["patient"], int(r["grade"])) for r in rows}
    assert len(data.images) == len(rows) == 24
    names = sorted(by_name)   # the folder source reads its images in name order
    assert data.labels == [by_name[n][1] for n in names]
    patients = [by_name[n][0] for n in names]
    assert len(set(data.studies)) == len(set(patients)) == 8
    assert [data.studies.index(x) for x in data.studies] == [patients.index(x) for x in patients]  # same grouping
    sim = read_frames([SIM], pipe, max_frames=3000, quiet=True)
    assert len(set(sim.studies)) == 1 and len(set(sim.labels)) == 1 and sim.labels[0] in (1, 2, 3, 4)


def _us_dicoms(folder: Path, names) -> Path:
    from pydicom.data import get_testdata_file
    folder.mkdir(parents=True)
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.skip(f"pydicom's test file {name} is not installed here")
        shutil.copy(path, folder / name)
    return folder


def test_calibrate_on_the_scanners_own_dicom_frames_and_check_on_another_days(tiny_bundle, tmp_path):
    """`calibrate --frames` a folder of ultrasound DICOM files (pydicom's: single and multi-frame, uncompressed, RLE,
    JPEG), `--check` another folder; the frames go through the runtime's own preparation, each source is one study,
    and the INT8 set is installed (criteria open: the tiny model's agreement is not the point), then with
    --timing-only (no check) too."""
    site = _us_dicoms(tmp_path / "site", ["US1_UNCR.dcm", "OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm",
                                          "gdcm-US-ALOKA-16.dcm", "examples_ybr_color.dcm"])
    other_day = _us_dicoms(tmp_path / "day2", ["US1_UNCI.dcm", "OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"])
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    _open_gate(b)
    _drop_fp16(b)
    r = sonoscore("calibrate", "--bundle", b, "--frames", site, "--check", other_day, "--count", 8, "--holdout", 8,
                  *OPEN)
    assert r.returncode == 0, r.stderr
    report = json.loads((b / "calibration_report.json").read_text())
    assert report["sources"][0]["kind"] == "DicomFolderSource" and report["frames"]["read"] >= 16
    assert report["check_sources"][0]["frames"] == 3
    assert set(report["accuracy"]) == {"held-out", f"check {report['check_sources'][0]['source_id']}"}
    for per in report["accuracy"].values():
        assert per["int8"]["studies"] == 1 and per["int8"]["accuracy_reference"] is None   # no labels in DICOM
        assert per["int8"]["gate_agreement"] is not None
    assert Bundle.load(b).int8_networks == ["unet", "vgg"]
    t = tmp_path / "t"
    shutil.copytree(tiny_bundle, t)
    r = sonoscore("calibrate", "--bundle", t, "--frames", site, "--count", 8, "--holdout", 8, "--timing-only")
    assert r.returncode == 0, r.stderr
    assert Bundle.load(t).int8_networks == ["unet", "vgg"]
