"""INT8 fidelity (docs/design.md "INT8 fidelity: simulated and this CPU"): calibrate judges an INT8 set on simulated
quantization and reports this CPU's integer kernels beside it; the bundle carries reference frames with the simulated
outputs; `run --precision int8` checks this CPU's kernels on them once, caches the verdict and warns in one line.

Nothing here assumes a figure that depends on the CPU's integer kernels or on trained weights: the simulated runner
is checked against a numpy Q/DQ written here, a threshold that separates the simulated and the kernel figures is
derived from the run itself, and the run-time warning is provoked by a reference made from this CPU's own outputs
and then turned into their exact opposite (mask complement, negated features), which misses on every CPU."""
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.quantize import quantize_int8
from calibration.report import Criteria
from runtime.backends.ort import OrtRunner
from runtime.bundle import Bundle, write_manifest
from runtime.fidelity import (REFERENCE_FILE, cache_key, cache_path, check_here, cpu_summary, read_reference,
                              write_reference)
from tests.conftest import sonoscore

SIM = "sim://kidney?frames=16&fps=30&seed=4"
RUN_SOURCE = "sim://kidney?fps=0&frames=3&seed=2"
WARNING = "Warning: on this CPU"
RELAXED = Criteria.off()


# -- simulated quantization is Q/DQ in float ---------------------------------------------------------------------

def _tiny_net(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.4, (4, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.4, (3, 4, 3, 3)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.normal(0, 0.4, (1, 3, 1, 1)).astype(np.float32), "w3")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="head"),
             helper.make_node("Sigmoid", ["c3"], ["y"], name="sig")]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])], [w1, b1, w2, w3])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _numpy_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The graph evaluated in numpy, node by node: QuantizeLinear (x / scale, round half to even, saturate to the
    integer type), DequantizeLinear ((q - zero point) * scale, per tensor or per axis), Conv (float64 sums of the
    products), Relu, Sigmoid: what simulated quantization means, written out."""
    env = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    env[model.graph.input[0].name] = x

    def per_axis(v, like, axis):
        if v.size == 1:
            return v.reshape(())
        shape = [1] * like.ndim
        shape[axis] = v.size
        return v.reshape(shape)

    for n in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
        ins = [env[i] if i else None for i in n.input]
        if n.op_type == "QuantizeLinear":
            v, scale, zp = ins[0], ins[1], ins[2]
            axis = a.get("axis", 1)
            q = np.rint(v.astype(np.float32) / per_axis(scale, v, axis).astype(np.float32))
            q = q + per_axis(zp, v, axis).astype(np.float32)
            info = np.iinfo(zp.dtype)
            out = np.clip(q, info.min, info.max).astype(zp.dtype)
        elif n.op_type == "DequantizeLinear":
            v, scale = ins[0], ins[1]
            zp = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros_like(scale, dtype=v.dtype)
            axis = a.get("axis", 1)
            out = ((v.astype(np.int32) - per_axis(zp, v, axis).astype(np.int32)).astype(np.float32)
                   * per_axis(scale, v, axis).astype(np.float32))
        elif n.op_type == "Conv":
            v, w = ins[0].astype(np.float64), ins[1].astype(np.float64)
            pad = a.get("pads", [0, 0, 0, 0])
            v = np.pad(v, ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
            k = w.shape[2]
            h, wd = v.shape[2] - k + 1, v.shape[3] - k + 1
            out = np.zeros((v.shape[0], w.shape[0], h, wd))
            for dy in range(k):
                for dx in range(k):
                    out += np.einsum("nchw,oc->nohw", v[:, :, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
            if len(ins) > 2 and ins[2] is not None:
                out += ins[2].astype(np.float64)[None, :, None, None]
            out = out.astype(np.float32)
        elif n.op_type == "Relu":
            out = np.maximum(ins[0], 0)
        elif n.op_type == "Sigmoid":
            out = (1 / (1 + np.exp(-ins[0].astype(np.float64)))).astype(np.float32)
        else:
            raise AssertionError(f"the numpy evaluator has no {n.op_type}")
        env[n.output[0]] = out
    return env[model.graph.output[0].name]


def test_simulated_runner_computes_qdq_in_float_as_numpy_does(tmp_path):
    """OrtRunner(simulated_quantization=True) on calibration's own Q/DQ file computes what the Q/DQ nodes say in
    float, as a numpy evaluation of the same graph does: no integer kernels, so the same on every CPU. The bound is
    derived from the file: a small fraction of how far quantization moves the output from FP32."""
    fp32 = _tiny_net(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = [rng.random((1, 1, 8, 8), dtype=np.float32) for _ in range(8)]
    r = quantize_int8(fp32, tmp_path / "q.onnx", "x", calib)
    assert r.quantized_ops == {"Conv": 2} and r.float_ops == {"Conv": 1}     # the head stays float (output tail)
    qdq = onnx.load(str(r.path))
    x = rng.random((6, 1, 8, 8), dtype=np.float32)
    with OrtRunner(r.path, simulated_quantization=True, intra_op_threads=1) as sim, \
            OrtRunner(fp32, intra_op_threads=1) as flt:
        assert sim.simulated_quantization and not flt.simulated_quantization
        y_sim = sim.infer({"x": x}, ["y"])["y"]
        y_fp32 = flt.infer({"x": x}, ["y"])["y"]
    y_np = _numpy_run(qdq, x)
    np.testing.assert_allclose(_numpy_run(onnx.load(str(fp32)), x), y_fp32, atol=1e-6)   # the evaluator is right
    effect = np.abs(y_np - y_fp32).max()
    assert effect > 1e-3                                      # the premise: quantization moves the output
    # float32 sums in onnxruntime against float64 here may move a value across a rounding boundary of a later
    # QuantizeLinear; allow a rare element that does, never a systematic difference
    close = np.abs(y_sim - y_np) <= 1e-5
    assert close.mean() >= 0.99, (close.mean(), np.abs(y_sim - y_np).max())
    assert np.abs(y_sim - y_np).mean() <= 1e-3 * effect


# -- calibrate: both checks, the simulated one decides ------------------------------------------------------------

def _open_gate(b: Path) -> None:
    """Every frame passes the gate whatever the weights (as in test_calibration): features and grades exist."""
    m = json.loads((b / "manifest.json").read_text())
    m["gate"]["min_mask_fraction"] = 0.0
    write_manifest(b, m)


def _set_thresholds(b: Path, th: Criteria) -> None:
    """The thresholds the bundle records as calibrated with (what the run-time check judges by)."""
    from dataclasses import asdict
    m = json.loads((b / "manifest.json").read_text())
    m["calibration"]["criteria"] = asdict(th)
    write_manifest(b, m)


@pytest.fixture(scope="module")
def base(tiny_bundle, tmp_path_factory):
    b = tmp_path_factory.mktemp("fid") / "base"
    shutil.copytree(tiny_bundle, b)
    _open_gate(b)
    return b


@pytest.fixture(scope="module")
def calibrated(base, tmp_path_factory):
    from calibration.run import calibrate_bundle
    b = tmp_path_factory.mktemp("fid") / "calibrated"
    shutil.copytree(base, b)
    report = calibrate_bundle(b, [SIM], count=8, holdout=8, thresholds=RELAXED, quiet=True,
                              report=b / "calibration_report.json")
    return b, report


def test_calibrate_reports_simulated_and_this_cpu_and_stores_reference_frames(calibrated):
    b, report = calibrated
    bundle = Bundle.load(b)                          # every hash checked, the reference file's included
    held = report["accuracy"]["held-out"]
    cpu = report["accuracy_this_cpu"]["held-out"]
    assert set(held) == {"int8", "fp16"} and set(cpu) == {"int8"}          # FP16 has no integer kernels
    assert report["fidelity"]["decided_by"] == "simulated" and report["fidelity"]["this_cpu"] == cpu_summary()
    for key in ("mask_iou_mean", "gate_agreement", "feature_cosine_mean", "grade_agreement"):
        assert key in held["int8"] and key in cpu["int8"]
    m = bundle.manifest
    assert all(m["networks"][n]["int8"]["fidelity"] == "simulated" for n in ("unet", "vgg"))
    assert m["calibration"]["fidelity"]["decided_by"] == "simulated"
    assert "int8" in m["calibration"]["accuracy_this_cpu"]["held-out"]
    entry = m["int8_reference"]
    assert entry["file"] == REFERENCE_FILE and m["files"][REFERENCE_FILE] and entry["set"] == "held-out"
    ref = read_reference(b / REFERENCE_FILE)
    assert len(ref["images"]) == entry["frames"] == 8 and ref["images"].dtype == np.uint8
    assert ref["images"].shape[1:] == (bundle.graph().size,) * 2
    # what the file holds is the INT8 set's simulated output on those frames (same process, same file: exact)
    from calibration.report import run_precision
    from runtime.booster import Booster
    booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes)
    files = {n: bundle.network_file(n, "int8") for n in ("unet", "vgg")}
    sim = run_precision(bundle, files, booster, list(ref["images"]), quiet=True, simulated=True, keep_prob=True)
    np.testing.assert_array_equal(sim.prob, ref["prob"])
    np.testing.assert_array_equal(sim.features, ref["features"])


def test_the_report_labels_each_figure_with_what_computed_it(calibrated):
    """The held-out figures recomputed here, each way: `accuracy` is the simulated run's, `accuracy_this_cpu` the
    default session's (this CPU's kernels), whatever either comes to on this CPU."""
    from calibration.quantize import spread_indices
    from calibration.report import compare, run_precision
    from calibration.run import read_frames
    from runtime.booster import Booster
    from runtime.pipeline import Pipeline
    b, report = calibrated
    bundle = Bundle.load(b)
    images = read_frames([SIM], Pipeline(bundle), max_frames=3000, quiet=True).images
    calib = set(spread_indices(len(images), 8))
    held = [im for i, im in enumerate(images) if i not in calib]
    assert len(held) == report["frames"]["held_out"] == 8
    booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes)
    fp32 = run_precision(bundle, {n: bundle.network_file(n, "fp32") for n in ("unet", "vgg")}, booster, held)
    int8 = {n: bundle.network_file(n, "int8") for n in ("unet", "vgg")}
    for simulated, figures in ((True, report["accuracy"]), (False, report["accuracy_this_cpu"])):
        want = compare(fp32, run_precision(bundle, int8, booster, held, simulated=simulated))
        got = figures["held-out"]["int8"]
        assert {k: got[k] for k in want} == want, simulated


def test_the_printed_table_labels_both_checks(base, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(base, b)
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8, "--min-iou", 0,
                  "--min-gate", 0, "--min-grade", 0, "--min-study", 0, "--max-accuracy-drop", 1)
    assert r.returncode == 0, r.stderr
    assert "int8 (simulated)" in r.stderr and f"int8 (this CPU: {cpu_summary()})" in r.stderr
    assert "pass (information)" in r.stderr or "miss (information" in r.stderr


def test_installation_follows_the_simulated_figures(base, calibrated, tmp_path):
    """A threshold is put between the simulated figure of a metric and this CPU's figure for it, at the higher of
    the two (a figure meets a threshold it equals). Kernels below the simulated figure: the set is installed all
    the same and the report and manifest record that this CPU misses. Kernels above it: the simulated figure misses
    and nothing is installed, although this CPU's kernels would pass. Which metrics fall on which side depends on
    the CPU, so each direction this CPU gives is tested; the rule is the same. Where the kernels reproduce every
    simulated figure, a threshold at the simulated figure installs the set and nothing is said."""
    from calibration.run import CalibrationFailed, calibrate_bundle
    _, first = calibrated
    sim, cpu = first["accuracy"]["held-out"]["int8"], first["accuracy_this_cpu"]["held-out"]["int8"]
    fields = {"mask_iou_accepted_mean": "min_iou", "gate_agreement": "min_gate", "grade_agreement": "min_grade",
              "feature_cosine_mean": "min_cosine"}
    measured = [k for k in fields if sim[k] is not None and cpu[k] is not None]
    below = [k for k in measured if cpu[k] < sim[k]]
    above = [k for k in measured if cpu[k] > sim[k]]
    cases = [("below", below[0])] if below else []
    cases += [("above", above[0])] if above else []
    cases = cases or [("equal", "feature_cosine_mean")]
    for side, key in cases:
        th = Criteria.off()
        setattr(th, fields[key], max(sim[key], cpu[key]))
        b = tmp_path / side
        shutil.copytree(base, b)
        _drop_fp16(b)
        before = (b / "manifest.json").read_text()
        kwargs = dict(count=8, holdout=8, thresholds=th, quiet=True, report=b / "calibration_report.json")
        if side == "above":
            with pytest.raises(CalibrationFailed):
                calibrate_bundle(b, [SIM], **kwargs)
            report = json.loads((b / "calibration_report.json").read_text())
            assert report["accuracy_this_cpu"]["held-out"]["int8"]["passed"] is True
            assert report["accuracy"]["held-out"]["int8"]["passed"] is False and report["passed"] is False
            assert (b / "manifest.json").read_text() == before and not (b / REFERENCE_FILE).exists()
            continue
        report = calibrate_bundle(b, [SIM], **kwargs)
        assert report["accuracy"]["held-out"]["int8"][key] == sim[key]   # the same run again: the same figures
        assert report["passed"] is True and Bundle.load(b).int8_networks == ["unet", "vgg"]
        missed = report["fidelity"]["this_cpu_missed"]
        assert bool(missed) == (side == "below")
        assert report["accuracy_this_cpu"]["held-out"]["int8"]["passed"] is (side == "equal")
        assert Bundle.load(b).manifest["calibration"]["fidelity"]["this_cpu_missed"] == missed


def test_installation_follows_the_simulated_figures_says_it_in_one_line(base, calibrated, tmp_path):
    """The same rule through the command line, where a miss by this CPU's kernels alone is one line on stderr."""
    _, first = calibrated
    sim, cpu = first["accuracy"]["held-out"]["int8"], first["accuracy_this_cpu"]["held-out"]["int8"]
    flags = {"mask_iou_accepted_mean": "--min-iou", "gate_agreement": "--min-gate", "grade_agreement": "--min-grade",
             "feature_cosine_mean": "--min-cosine"}
    below = [k for k in flags if sim[k] is not None and cpu[k] is not None and cpu[k] < sim[k]]
    if not below:
        pytest.skip(f"this CPU's kernels ({cpu_summary()}) fall below no simulated figure on these frames; "
                    f"test_installation_follows_the_simulated_figures covers the rule here")
    b = tmp_path / "b"
    shutil.copytree(base, b)
    _drop_fp16(b)
    args = {f: 0 for f in flags.values()}
    args[flags[below[0]]] = sim[below[0]]
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8,
                  *[x for kv in args.items() for x in kv], "--min-study", 0, "--max-accuracy-drop", 1)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "onnxruntime's INT8 kernels miss" in x]
    assert len(lines) == 1 and "installed all the same" in lines[0] and "TensorRT" in lines[0]


def _drop_fp16(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    for net in m["networks"].values():
        net["files"].pop("fp16", None)
    write_manifest(b, m)


def test_a_timing_only_calibration_stores_no_reference(calibrated, tmp_path):
    from calibration.run import calibrate_bundle
    b = tmp_path / "b"
    shutil.copytree(calibrated[0], b)             # has a reference from the checked calibration
    calibrate_bundle(b, [SIM], count=4, holdout=4, timing_only=True, quiet=True)
    m = Bundle.load(b).manifest
    assert "int8_reference" not in m and not (b / REFERENCE_FILE).exists()
    assert m["networks"]["unet"]["int8"]["fidelity"].startswith("not checked")


# -- the run-time check -------------------------------------------------------------------------------------------

def _reference_from_this_cpu(b: Path, *, opposite: bool = False) -> None:
    """Replace the bundle's reference outputs with this CPU's own (integer kernels, as `run` computes them), or
    with their exact opposite: the complement of every mask and the negated features. The manifest is re-hashed
    (what a user cannot do to a signed bundle unnoticed) and records the default thresholds."""
    from calibration.report import run_precision
    from runtime.booster import Booster
    bundle = Bundle.load(b)
    ref = read_reference(b / REFERENCE_FILE)
    booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes)
    files = {n: bundle.network_file(n, "int8") for n in ("unet", "vgg")}
    here = run_precision(bundle, files, booster, list(ref["images"]), quiet=True, keep_prob=True)
    prob, feats = here.prob, here.features
    if opposite:
        t = bundle.graph().mask_threshold
        prob = np.where(prob > t, 0.0, 1.0).astype(np.float32)
        feats = -feats
    write_reference(b / REFERENCE_FILE, list(ref["images"]), prob, feats)
    m = json.loads((b / "manifest.json").read_text())
    from dataclasses import asdict
    m["calibration"]["criteria"] = asdict(Criteria())
    write_manifest(b, m)


@pytest.fixture(scope="module")
def matching(calibrated, tmp_path_factory):
    b = tmp_path_factory.mktemp("fid") / "matching"
    shutil.copytree(calibrated[0], b)
    _reference_from_this_cpu(b)
    return b


@pytest.fixture(scope="module")
def opposite(calibrated, tmp_path_factory):
    b = tmp_path_factory.mktemp("fid") / "opposite"
    shutil.copytree(calibrated[0], b)
    _reference_from_this_cpu(b, opposite=True)
    return b


def _run(b: Path, cache: Path, *extra):
    env = {**os.environ, "SONOSCORE_CACHE": str(cache)}
    return sonoscore("run", "--bundle", b, "--source", RUN_SOURCE, "--precision", "int8", "--quiet", *extra,
                     env=env)


def _entry(b: Path, cache: Path) -> Path:
    return cache_path(cache_key(Bundle.load(b)), cache)


def test_run_warns_once_when_this_cpu_misses_and_not_when_it_matches(matching, opposite, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["SONOSCORE_CACHE"], cache)        # the compiled booster, not built again
    r = _run(opposite, cache)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if WARNING in x]
    assert len(lines) == 1, r.stderr
    assert "mask IoU (accepted frames) 0.0000 < 0.9800" in lines[0] and "--precision fp32" in lines[0]
    assert cpu_summary() in lines[0]
    assert _entry(opposite, cache).is_file()
    r = _run(matching, cache)
    assert r.returncode == 0, r.stderr
    assert WARNING not in r.stderr
    verdict = json.loads(_entry(matching, cache).read_text())
    assert verdict["missed"] == [] and verdict["metrics"]["gate_agreement"] == 1.0
    assert verdict["metrics"]["feature_cosine_mean"] == pytest.approx(1.0, abs=1e-6)


def test_the_verdict_is_cached_and_a_bad_cache_only_means_checking_again(opposite, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["SONOSCORE_CACHE"], cache)
    r = _run(opposite, cache)
    assert r.returncode == 0 and r.stderr.count(WARNING) == 1, r.stderr
    entry = _entry(opposite, cache)
    verdict = json.loads(entry.read_text())
    os.utime(entry, ns=(1_000_000_000, 1_000_000_000))            # a stamp no write could leave
    r = _run(opposite, cache)
    assert r.returncode == 0 and r.stderr.count(WARNING) == 1, r.stderr    # read from the cache: said again, once
    assert entry.stat().st_mtime_ns == 1_000_000_000 and json.loads(entry.read_text()) == verdict
    # a corrupt entry: checked again, the same one line, the entry rewritten
    entry.write_text("{not json")
    r = _run(opposite, cache)
    assert r.returncode == 0 and r.stderr.count(WARNING) == 1, r.stderr
    assert json.loads(entry.read_text())["missed"] == verdict["missed"]
    # an entry that cannot be written (its folder is a file): checked every time, nothing more said
    shutil.rmtree(entry.parent)
    entry.parent.write_text("not a folder")
    r = _run(opposite, cache)
    assert r.returncode == 0 and r.stderr.count(WARNING) == 1, r.stderr
    assert "fidelity" not in r.stderr.replace(WARNING, "") and "Traceback" not in r.stderr


def test_check_here_reads_the_cache_on_the_second_call(opposite, tmp_path, caplog):
    """In one process: the first check computes and writes the entry, a later one (another process, modelled by
    forgetting this process's verdicts) reads it; either way the warning is said once per call."""
    from runtime import fidelity
    from runtime.pipeline import Pipeline
    said: list[str] = []
    bundle = Bundle.load(opposite)
    caplog.set_level(logging.DEBUG, logger="sonoscore.fidelity")
    fidelity._VERDICTS.clear()
    with Pipeline(bundle, precision="fp32", threads=1) as pipe:   # fp32 pipeline: no check of its own on enter
        unet = OrtRunner(bundle.network_file("unet", "int8"), intra_op_threads=1).__enter__()
        vgg = OrtRunner(bundle.network_file("vgg", "int8"), intra_op_threads=1).__enter__()
        try:
            v1 = check_here(bundle, unet, vgg, pipe.booster, cache_dir=tmp_path, say=said.append)
            assert any("checked 8 reference frames" in r.message for r in caplog.records)
            assert check_here(bundle, unet, vgg, pipe.booster, cache_dir=tmp_path, say=said.append) is v1
            assert len(said) == 1                       # the same process: said once
            caplog.clear()
            fidelity._VERDICTS.clear()
            v2 = check_here(bundle, unet, vgg, pipe.booster, cache_dir=tmp_path, say=said.append)
            assert any("read from" in r.message for r in caplog.records)
            assert not any("checked" in r.message for r in caplog.records)
            assert v2["missed"] == v1["missed"] and len(said) == 2
        finally:
            unet.__exit__(None, None, None)
            vgg.__exit__(None, None, None)
            fidelity._VERDICTS.clear()


def test_bench_says_it_once_and_a_bundle_without_reference_says_nothing(opposite, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["SONOSCORE_CACHE"], cache)
    env = {**os.environ, "SONOSCORE_CACHE": str(cache)}
    r = sonoscore("bench", "--bundle", opposite, "--precision", "fp32,int8", "--frames", 2, "--warmup", 1,
                  "--json", tmp_path / "bench.json", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(WARNING) == 1, r.stderr
    old = tmp_path / "old"                          # a bundle calibrated before there were reference frames
    shutil.copytree(opposite, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["int8_reference"]
    (old / REFERENCE_FILE).unlink()
    write_manifest(old, m)
    r = _run(old, cache)
    assert r.returncode == 0, r.stderr
    assert WARNING not in r.stderr and not (cache / "fidelity" / f"{cache_key(Bundle.load(old))}.json").exists()


def test_a_tampered_reference_without_a_new_manifest_is_refused(calibrated, tmp_path):
    """The reference file is one of the bundle's hashed files: edited behind the manifest's back, the bundle is
    refused at load, as for a network file."""
    b = tmp_path / "b"
    shutil.copytree(calibrated[0], b)
    ref = read_reference(b / REFERENCE_FILE)
    write_reference(b / REFERENCE_FILE, list(ref["images"]), ref["prob"], ref["features"] * 2)
    r = _run(b, tmp_path / "cache")
    assert r.returncode == 2 and REFERENCE_FILE in r.stderr and "sha256" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_run_time_check_stays_on_the_runtime_side(opposite, tmp_path):
    """The inference path imports neither `calibration` nor `export` (docs/design.md, "Layout and dependency rule"),
    the INT8 check included: a device installs the runtime alone."""
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["SONOSCORE_CACHE"], cache)
    code = ("import sys\nfrom runtime.bundle import Bundle\nfrom runtime.pipeline import Pipeline\n"
            f"with Pipeline(Bundle.load({str(opposite)!r}), precision='int8'):\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('calibration', 'export')))")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "SONOSCORE_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]" and r.stderr.count(WARNING) == 1, (r.stdout, r.stderr)


def test_the_manifest_names_the_reference_like_any_bundle_file(calibrated, tmp_path):
    from runtime.bundle import BundleError
    b = tmp_path / "b"
    shutil.copytree(calibrated[0], b)
    m = json.loads((b / "manifest.json").read_text())
    m["int8_reference"]["file"] = "../int8_reference.npz"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="int8_reference.file"):
        Bundle.load(b, verify=False)
    m["int8_reference"]["file"] = REFERENCE_FILE
    write_manifest(b, m)
    (b / REFERENCE_FILE).unlink()
    with pytest.raises(BundleError, match="missing from the bundle"):
        Bundle.load(b)
