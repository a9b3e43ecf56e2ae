"""`sonoscore calibrate --qat` through the real command line: a bundle exported from real (tiny, untrained)
checkpoints saved with torch.save, a tiny labelled phantom dataset, quantization-aware training of both networks
from those checkpoints (export.qat) and calibrate's own accuracy check and installation. Criteria are opened (off):
no figure here depends on trained weights or on the CPU's INT8 kernels; the assertions are on what is installed,
recorded and left alone. A checkpoint that is not the bundle's, and other bad input, are refused in one sentence
(exit 2) with the bundle's bytes unchanged."""
import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from calibration.checks import trt_readiness  # noqa: E402
from calibration.quantize import sub_pixel_weight  # noqa: E402
from calibration.run import CONV_TRANSPOSE_WEIGHTS  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from tests.conftest import sonoscore  # noqa: E402
from tests.test_checkpoints import RefNet, RefVGG, main_py_save, make_booster, randomize_bn  # noqa: E402

OPEN = ["--min-study", "0", "--min-grade", "0", "--min-gate", "0", "--min-iou", "0", "--max-accuracy-drop", "1"]
# lr 1e-2: one Adam step moves a weight by about 1e-2, more than half a 7-bit quantization step of these weights
QAT = ["--qat-unet-epochs", "1", "--qat-vgg-epochs", "1", "--qat-lr", "1e-2", "--count", "4"]
FC2 = 40


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root):
    """Every file under `root` with its bytes' hash: a bundle left alone has the same tree."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Checkpoints as their owners save them (jakeoung's main.py UNet with BatchNorm; a torchvision-keyed VGG-19-BN
    with its head), a booster for the VGG's Fc2, a labelled dataset, and the bundle `sonoscore export` makes of
    them; plus checkpoints of the same architectures with other weights."""
    from export.bundle_export import export_from_checkpoints
    from runtime.dataset import write_dataset
    d = tmp_path_factory.mktemp("calibrate-qat")
    torch.manual_seed(11)
    main_py_save(randomize_bn(RefNet(True, c=1), seed=1), d / "unet.tar")
    torch.save(randomize_bn(RefVGG(width=1 / 32, fc1=24, fc2=FC2), seed=2).state_dict(), d / "vgg.pth")
    torch.manual_seed(12)
    main_py_save(randomize_bn(RefNet(True, c=1), seed=3), d / "unet_other.tar")
    torch.save(randomize_bn(RefVGG(width=1 / 32, fc1=24, fc2=FC2), seed=4).state_dict(), d / "vgg_other.pth")
    make_booster(d / "booster.json", FC2)
    data = write_dataset(d / "data", patients=4, seed=5, frames_per_patient=2, progress=False, workers=1)
    bundle = export_from_checkpoints(d / "unet.tar", d / "vgg.pth", d / "booster.json", d / "bundle")
    return {"dir": d, "data": data, "bundle": bundle}


@pytest.fixture(scope="module")
def qat_run(made, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("qat-run") / "bundle"
    shutil.copytree(made["bundle"], bundle)
    before = _tree(bundle)
    d = made["dir"]
    r = sonoscore("calibrate", "--bundle", bundle, "--qat", "--unet", d / "unet.tar", "--vgg", d / "vgg.pth",
                  "--data", made["data"], *QAT, *OPEN)
    assert r.returncode == 0, r.stderr[-3000:]
    return bundle, before, r


def test_qat_set_is_installed_recorded_and_the_rest_of_the_bundle_is_unchanged(made, qat_run):
    bundle_dir, before, r = qat_run
    bundle = Bundle.load(bundle_dir)
    assert bundle.int8_networks == ["unet", "vgg"]
    after = _tree(bundle_dir)
    for name in ("unet.onnx", "unet.fp16.onnx", "vgg.onnx", "vgg.fp16.onnx", "booster.ubj"):
        assert after[name] == before[name], name          # INT8 is judged against these, unchanged
    assert {"unet.int8.onnx", "vgg.int8.onnx", "int8_reference.npz"} <= set(after) - set(before)
    m = bundle.manifest
    cal = m["calibration"]
    assert cal["method"] == "qat" and set(cal["qat"]) == {"unet", "vgg"}
    for name, ckpt in (("unet", "unet.tar"), ("vgg", "vgg.pth")):
        s = cal["qat"][name]
        assert s["checkpoint"] == {"file": ckpt, "sha256": _sha(made["dir"] / ckpt),
                                   "layout": "unet-bn" if name == "unet" else "vgg-torchvision"}
        assert s["epochs"] == 1 and s["lr"] == 1e-2 and s["frames"] > 0 and s["calibration_frames"] == 4
        assert s["made_by"] == "sonoscore calibrate --qat" and s["library"].startswith("torch.ao")
        assert s["checked_against"]["file"] == f"{name}.onnx"
        assert s["checked_against"]["max_abs"] <= s["checked_against"]["tolerance"]
        assert s["patients"]["held_out"] >= 1 and s["patients"]["trained_on"] >= 1
        net = m["networks"][name]
        assert net["files"]["int8"] == f"{name}.int8.onnx" and net["int8"]["format"] == "onnx-qdq"
        assert net["int8"]["qat"]["checkpoint"]["sha256"] == s["checkpoint"]["sha256"]
        assert trt_readiness(bundle.network_file(name, "int8")) == []
    # the UNet's upsamplers: trained on one per-tensor grid, written in the sub-pixel form (calibrate's default)
    assert m["networks"]["unet"]["int8"]["conv_transpose_weights"] == CONV_TRANSPOSE_WEIGHTS["qat-sub-pixel"]
    assert "DepthToSpace" in {n.op_type for n in onnx.load(str(bundle.network_file("unet", "int8"))).graph.node}
    rep = json.loads((bundle_dir / "calibration_report.json").read_text())
    assert rep["method"] == "qat" and rep["qat"] == cal["qat"] and rep["passed"]
    assert rep["frames"]["calibration"] == 0          # no frame calibrates: the scales are QAT's
    assert "held-out patients (--data)" in rep["accuracy"]
    # the held-out frames are judged patient by patient (each patient one study), against their grades
    held = rep["accuracy"]["held-out patients (--data)"]["int8"]
    assert held["studies"] == cal["qat"]["vgg"]["patients"]["held_out"] >= 1
    assert "is the bundle's unet" in r.stderr and "is the bundle's vgg" in r.stderr


def test_int8_files_carry_weights_qat_moved_off_the_bundles_fp32(qat_run):
    """Post-training calibration quantizes the FP32 file's own weights: each dequantized INT8 weight is within half
    a quantization step of it. The QAT files carry fine-tuned weights (lr 1e-2 moves them by more than that), so
    some are further off: these are not calibrate's post-training files."""
    bundle = Bundle.load(qat_run[0])

    def weights(name, precision):
        model = onnx.load(str(bundle.network_file(name, precision)))
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    for name in ("unet", "vgg"):
        fp32, q = weights(name, "fp32"), weights(name, "int8")
        moved = checked = 0
        for key, wq in q.items():
            if not key.endswith("_quantized") or wq.dtype != np.int8:
                continue
            name_ = key[: -len("_quantized")]
            # the same parameter name in both files; a ConvTranspose weight in its sub-pixel Conv form
            w = (sub_pixel_weight(fp32[name_[: -len("_sub_pixel")]]) if name_.endswith("_sub_pixel")
                 else fp32[name_])
            scale = q[key[: -len("_quantized")] + "_scale"]
            s = scale.reshape([-1] + [1] * (w.ndim - 1)) if scale.size > 1 else scale
            moved += int(np.sum(np.abs(wq.astype(np.float32) * s - w) > s / 2 * 1.01))
            checked += 1
        assert checked >= 5 and moved > 0, (name, checked, moved)


def test_a_checkpoint_that_is_not_the_bundles_is_refused_and_the_bundle_untouched(made, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(made["bundle"], bundle)
    before = _tree(bundle)
    d = made["dir"]
    for unet, vgg, named in (("unet.tar", "vgg_other.pth", "--vgg"), ("unet_other.tar", "vgg.pth", "--unet")):
        r = sonoscore("calibrate", "--bundle", bundle, "--qat", "--unet", d / unet, "--vgg", d / vgg,
                      "--data", made["data"], *QAT, *OPEN)
        assert r.returncode == 2, r.stderr[-2000:]
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith(f"sonoscore: {named} '") and "is not the" in err and "was exported from" in err, err
        assert "Traceback" not in r.stderr and "QAT" not in r.stderr
        assert _tree(bundle) == before


def test_bad_input_is_one_sentence_and_the_bundle_untouched(made, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(made["bundle"], bundle)
    before = _tree(bundle)
    d = made["dir"]
    unmasked = tmp_path / "unmasked"                       # images and grades, no labelme outlines
    shutil.copytree(made["data"], unmasked, ignore=shutil.ignore_patterns("*.json"))
    ungraded = tmp_path / "ungraded"                       # outlines, but no grade in labels.csv
    shutil.copytree(made["data"], ungraded)
    rows = (ungraded / "labels.csv").read_text().splitlines()
    (ungraded / "labels.csv").write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + "," for r in rows[1:]]) + "\n")
    ckpts = ["--unet", d / "unet.tar", "--vgg", d / "vgg.pth"]
    cases = [
        (["--qat", "--unet", d / "nope.tar", "--vgg", d / "vgg.pth", "--data", made["data"]], "does not exist"),
        (["--qat", *ckpts, "--data", unmasked], "no image whose kidney is annotated"),
        (["--qat", *ckpts, "--data", ungraded], "no graded image"),
        (["--qat", "--vgg", d / "vgg.pth", "--data", made["data"]], "needs --unet"),
        (["--qat", *ckpts], "needs --data"),
        (["--frames", made["data"], *ckpts], "--unet belongs to --qat"),
    ]
    for args, words in cases:
        r = sonoscore("calibrate", "--bundle", bundle, *args, *OPEN)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert _tree(bundle) == before, args
