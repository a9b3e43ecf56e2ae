"""`sonoscore train --qat` through the real command line on the tiny phantom dataset: FP32 training, the QAT phase
(export.qat), the bundle's FP32/FP16 files from the UNet and the VGG the INT8 files were distilled from, and the INT8 Q/DQ
set installed by calibrate's own check and installation. Tiny widths and one epoch each: the grades mean nothing and
no figure here depends on trained weights or on the CPU's INT8 kernels. One run forces the check open (thresholds 0)
to see what an installed QAT set looks like; one keeps calibrate's thresholds and holds whatever the check decides
to be reported and carried out consistently."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibration.checks import trt_readiness
from calibration.quantize import sub_pixel_weight
from runtime.bundle import Bundle
from tests.conftest import sonoscore

TINY = ["--unet-width", "0.0625", "--vgg-width", "0.03125", "--unet-epochs", "1", "--vgg-epochs", "1",
        "--qat", "--qat-unet-epochs", "1", "--qat-vgg-epochs", "1"]
OPEN = ["--min-study", "0", "--min-grade", "0", "--min-gate", "0", "--min-iou", "0", "--max-accuracy-drop", "1"]


def _qat_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("train: QAT INT8 check on ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def opened(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-qat") / "bundle"
    # lr 1e-2: one Adam step moves a weight by about 1e-2, more than half a 7-bit quantization step of these weights
    r = sonoscore("train", "--data", tiny_dataset, "--out", out, *TINY, *OPEN, "--qat-lr", "1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="module")
def judged(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-qat-judged")
    out, report = tmp / "bundle", tmp / "check.json"
    r = sonoscore("train", "--data", tiny_dataset, "--out", out, *TINY, "--report", report)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, report, r


def _ort(path):
    so = ort.SessionOptions()
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_installed_qat_set_is_qdq_loads_and_is_recorded(opened):
    out, r = opened
    assert "both networks in INT8" in _qat_line(r.stderr)
    bundle = Bundle.load(out)
    assert bundle.int8_networks == ["unet", "vgg"]
    m = bundle.manifest
    assert m["calibration"]["method"] == "qat" and set(m["calibration"]["qat"]) == {"unet", "vgg"}
    assert m["provenance"]["config"]["qat"] is True and set(m["provenance"]["qat"]["settings"]) == {"unet", "vgg"}
    for name, channels in (("unet", 1), ("vgg", bundle.manifest["networks"]["vgg"]["channels"])):
        net = m["networks"][name]
        assert net["files"]["int8"] == f"{name}.int8.onnx"
        assert net["int8"]["format"] == "onnx-qdq"
        assert net["int8"]["qat"]["epochs"] == 1 and net["int8"]["qat"]["library"].startswith("torch.ao")
        path = bundle.network_file(name, "int8")
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
        assert trt_readiness(path) == []
        sess = _ort(path)
        x = np.random.default_rng(0).random((2, channels, 224, 224), dtype=np.float32)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert y.shape[0] == 2 and np.isfinite(y).all()


def test_fp32_files_are_the_networks_distilled_from(opened):
    """Each network's QAT distils the FP32 network's output (the UNet's probability map, the VGG's Fc2 features),
    and that FP32 network ships: the INT8 weights moved off the FP32 file's by more than half a quantization step
    (QAT runs at a learning rate that moves the weights by more), so the FP32 file is not the fine-tuned network's
    (tests/test_qat_unet_distill.py: with the labels' MSE the fine-tuned UNet ships instead)."""
    out, _ = opened
    bundle = Bundle.load(out)
    assert bundle.manifest["provenance"]["qat"]["settings"]["vgg"]["loss"] == "distill"
    assert bundle.manifest["provenance"]["qat"]["settings"]["unet"]["loss"] == "distill"
    for name in ("unet", "vgg"):
        fp32 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(bundle.network_file(name, "fp32"))).graph.initializer}
        q = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(bundle.network_file(name, "int8"))).graph.initializer}
        checked = moved = 0
        for key, wq in q.items():
            if not key.endswith("_quantized") or wq.dtype != np.int8:
                continue
            base = key[: -len("_quantized")]
            # the same parameter name in both files; a ConvTranspose weight in its sub-pixel Conv form
            w = sub_pixel_weight(fp32[base[: -len("_sub_pixel")]]) if base.endswith("_sub_pixel") else fp32[base]
            scale = q[base + "_scale"]
            s = scale.reshape([-1] + [1] * (w.ndim - 1)) if scale.size > 1 else scale   # per channel: axis 0
            off = int(np.sum(np.abs(wq.astype(np.float32) * s - w) > s / 2 * (1 + 1e-5) + 1e-12))
            moved += off
            checked += 1
        assert checked >= 5, name
        assert moved > 0, name


def test_check_result_is_reported_and_carried_out(judged):
    """calibrate's thresholds unchanged: whatever the check decides on this CPU and these weights, the one line,
    the report and the bundle agree."""
    out, report, r = judged
    line = _qat_line(r.stderr)
    rep = json.loads(report.read_text())
    assert rep["method"] == "qat" and rep["networks_choice"] == "auto"
    assert "validation patients" in rep["accuracy"]
    assert set(rep["accuracy"]["validation patients"]) >= {"int8", "int8-vgg", "fp16"}
    bundle = Bundle.load(out)
    nets = bundle.int8_networks
    if nets == ["unet", "vgg"]:
        assert "both networks in INT8" in line and rep["passed"]
    elif nets == ["vgg"]:
        assert "the VGG alone in INT8" in line and rep["int8_both_missed"]
    else:
        assert nets == [] and "no INT8 set installed" in line
        rejected = out / "calibration-rejected"
        for name in ("unet", "vgg"):
            _ort(rejected / f"{name}.int8.onnx")   # kept for inspection, and loadable
    assert not (out.parent / (out.name + ".qat-work")).exists()


def test_check_options_without_qat_are_one_sentence(tiny_dataset, tmp_path):
    r = sonoscore("train", "--data", tiny_dataset, "--out", tmp_path / "b", "--min-iou", "0")
    assert r.returncode == 2
    assert "--min-iou belongs to --qat" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()
