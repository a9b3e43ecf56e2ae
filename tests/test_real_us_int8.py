"""scripts/real_us_int8.py (INT8 UNet masks against FP32 on the pydicom ultrasound DICOMs) on the tiny bundle: its
figures match ones computed here independently, the FP32 UNet given as the "INT8" one agrees with itself exactly
on this CPU's run, the exit status follows --min-iou, and bad input is one sentence with exit 2. No figure here
depends on trained weights or on INT8 kernels: the mask threshold is derived from the tiny UNet's own output."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "real_us_int8.py"
FRAMES = 4


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("real_us_int8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def expected(script, tiny_bundle):
    """What the script must report for the tiny bundle's FP32 UNet given as --unet-int8, computed here: the frames
    the script picks (its own reader, the same spread), the UNet's probabilities with and without graph
    optimisations, a threshold half-way between their lowest and highest (so some pixels are mask whatever the
    weights), and the IoUs by hand."""
    from calibration.quantize import spread_indices
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle
    bundle = Bundle.load(tiny_bundle)
    graph = bundle.graph()
    fp32 = bundle.network_file("unet", "fp32")
    real = script.read_real_frames(bundle)
    assert real.images, "no usable frame in the pydicom ultrasound files"
    images = [real.images[i] for i in spread_indices(len(real.images), FRAMES)]
    probs = {}
    for simulated in (False, True):
        with OrtRunner(fp32, intra_op_threads=2, simulated_quantization=simulated) as r:
            probs[simulated] = np.stack([graph.segment(r, img) for img in images])
    lo, hi = float(probs[False].min()), float(probs[False].max())
    assert hi > lo, "the tiny UNet's output is constant on real ultrasound; no threshold can split it"
    t = (lo + hi) / 2
    ref, sim = probs[False] > t, probs[True] > t
    inter = (ref & sim).reshape(FRAMES, -1).sum(1)
    union = (ref | sim).reshape(FRAMES, -1).sum(1)
    ious = inter[union > 0] / union[union > 0]
    return {"threshold": t, "fp32": str(fp32), "usable": len(real.images),
            "fp32_with_mask": int(ref.reshape(FRAMES, -1).any(1).sum()),
            "sim_counted": int((union > 0).sum()), "sim_iou": round(float(ious.mean()), 6),
            "sim_iou_min": round(float(ious.min()), 6), "fp16": "fp16" in bundle.manifest["networks"]["unet"]["files"]}


def _run(script, tiny_bundle, expected, tmp_path, *extra):
    out = tmp_path / "real_us.json"
    rc = script.main(["--bundle", str(tiny_bundle), "--unet-int8", expected["fp32"], "--frames", str(FRAMES),
                      "--mask-threshold", repr(expected["threshold"]), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_fp32_as_int8_agrees_with_itself_and_the_figures_are_the_ones_computed_here(script, tiny_bundle, expected,
                                                                                    tmp_path, capsys):
    rc, d = _run(script, tiny_bundle, expected, tmp_path)
    stdout = capsys.readouterr().out
    want = {"fp32", "int8_simulated", "int8_cpu"} | ({"fp16"} if expected["fp16"] else set())
    assert set(d["precisions"]) == want
    assert d["frames"]["picked"] == FRAMES and d["frames"]["usable"] == expected["usable"]
    assert d["frames"]["total"] >= d["frames"]["usable"] > 0 and d["files"]["used"] >= 1
    assert d["files"]["ultrasound"] == len(d["files"]["rows"]) > 0
    assert len(d["frames"]["picked_frames"]) == FRAMES
    for row in d["precisions"].values():
        assert row["frames"] == FRAMES
    assert d["precisions"]["fp32"]["frames_with_mask"] == expected["fp32_with_mask"] > 0
    # the same file with the same session options as the reference: every mask identical
    cpu = d["precisions"]["int8_cpu"]
    assert cpu["frames_counted"] == expected["fp32_with_mask"]
    assert cpu["mask_iou_mean"] == 1.0 and cpu["mask_iou_min"] == 1.0 and cpu["mask_fraction_error_mean"] == 0.0
    assert cpu["gate_agreement"] == 1.0
    # graph optimisations off: the IoU computed here (exactly 1 unless float rounding moved a pixel across)
    sim = d["precisions"]["int8_simulated"]
    assert sim["simulated_quantization"] is True and cpu["simulated_quantization"] is False
    assert sim["frames_counted"] == expected["sim_counted"]
    assert sim["mask_iou_mean"] == expected["sim_iou"] and sim["mask_iou_min"] == expected["sim_iou_min"]
    assert rc == (0 if expected["sim_iou"] >= 0.95 else 1) and d["passed"] is (rc == 0)
    assert d["mask_threshold"] == expected["threshold"]
    assert "command: .venv/bin/python scripts/real_us_int8.py --bundle" in stdout
    assert "| INT8 (simulated) |" in stdout and "| INT8 (this CPU) |" in stdout


def test_a_minimum_iou_above_one_fails_with_exit_1(script, tiny_bundle, expected, tmp_path, capsys):
    rc, d = _run(script, tiny_bundle, expected, tmp_path, "--min-iou", "1.5")
    assert rc == 1 and d["passed"] is False
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "not-onnx", "no-int8"])
def test_bad_input_is_one_sentence_and_exit_2(tiny_bundle, tmp_path, case):
    bundle, args = tiny_bundle, []
    if case == "missing":
        target = tmp_path / "no-such-unet.int8.onnx"
        args = ["--unet-int8", str(target)]
    elif case == "not-onnx":
        target = tmp_path / "unet.int8.onnx"
        target.write_text("not a model\n")
        args = ["--unet-int8", str(target)]
    else:
        bundle = tmp_path / "bundle"           # a copy: no INT8 UNet installed, none left by a failed calibration
        shutil.copytree(tiny_bundle, bundle)
        shutil.rmtree(bundle / "calibration-rejected", ignore_errors=True)
        target = bundle
    r = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(bundle), *args, "--frames", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    message = r.stderr.strip()
    assert message.startswith("real_us_int8: ") and str(target) in message, message
    assert "\n" not in message and "Traceback" not in message, message
    assert message.count(". ") == 0, f"more than one sentence: {message}"
    assert r.stdout == ""
