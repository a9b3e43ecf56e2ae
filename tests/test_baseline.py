"""The PyTorch eager FP32 baseline (export.baseline): the research team's deployment of the same two networks, which
`sonoscore bench` times against the deployed path in the same run. Here it runs on the CPU and must reproduce the
onnxruntime CPU pipeline on the same frames; on a GPU it must agree with it too."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from export.baseline import TorchBaseline, WeightsMismatch, _read_onnx, load_onnx_weights, torch_networks  # noqa: E402
from export.models import UNet  # noqa: E402
from runtime import preprocess as pp  # noqa: E402
from runtime.bench import bench_frames  # noqa: E402
from runtime.bundle import Bundle, write_manifest  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402

from tests.conftest import sonoscore  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return Bundle.load(tiny_bundle)


@pytest.fixture(scope="module")
def frames():
    return bench_frames(4, seed=11)


def unet_prob(cpu: Pipeline, image: np.ndarray) -> np.ndarray:
    return cpu.graph.segment(cpu.unet, image)


def same_mask_away_from_the_threshold(mask, ref_mask, ref_prob, margin, threshold=0.5):
    """Masks agree on every pixel whose probability is more than `margin` from the threshold (one that sits on
    it may fall either way with another library's rounding), and those are all but a few."""
    sure = np.abs(ref_prob - threshold) > margin
    assert np.array_equal(mask[sure], ref_mask[sure])
    assert sure.mean() > 0.9


def test_torch_baseline_on_cpu_reproduces_the_onnx_pipeline_masks_features_and_grades(bundle, frames):
    with Pipeline(bundle, threads=1, min_mask_fraction=0.0) as cpu, \
            TorchBaseline(bundle, device="cpu", min_mask_fraction=0.0, threads=1) as team:
        for f in frames:
            a, b = team.process(f), cpu.process(f)
            assert a.error is None and a.accepted
            assert np.array_equal(a.image, b.image) and a.region == b.region      # the same CPU preprocessing
            same_mask_away_from_the_threshold(a.mask, b.mask, unet_prob(cpu, b.image), 1e-4)
            fa, fb = team.graph.features(team.vgg, b.image, b.mask)[0], cpu.graph.features(cpu.vgg, b.image, b.mask)[0]
            assert fa.shape == fb.shape == (1024,)
            assert np.abs(fa - fb).max() <= 1e-4 * max(1.0, float(np.abs(fb).max()))
            assert a.grade == b.grade
            assert np.abs(np.subtract(a.probabilities, b.probabilities)).max() < 1e-3
            assert set(a.latency_ms) == {"wait", "preprocess", "unet", "gate", "vgg", "booster", "total"}


def test_the_folded_onnx_weights_fill_the_torch_modules_even_when_the_names_are_lost(bundle):
    unet, _ = torch_networks(bundle)
    info = _read_onnx(bundle.network_file("unet", "fp32"))
    renamed = dict(info, layers=[(op, w, b) for op, w, b in info["layers"]],
                   arrays=dict(info["arrays"]))
    for i, (op, w, b) in enumerate(info["layers"]):           # names an exporter pass might have chosen
        renamed["arrays"][f"val_{i}"] = renamed["arrays"].pop(w)
        renamed["layers"][i] = (op, f"val_{i}", b)
    by_order = UNet(width=float(bundle.manifest["networks"]["unet"]["width"])).eval()
    load_onnx_weights(by_order, renamed, "unet", (1, 1, 224, 224))
    x = torch.rand(1, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_order(x), unet(x))


def test_a_manifest_width_that_does_not_fit_the_onnx_is_refused_naming_the_layer(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["networks"]["unet"]["width"] *= 2
    write_manifest(copy, manifest)          # manifest.sha256 follows the edit
    with pytest.raises(WeightsMismatch, match=r"unet layer 'conv1.0': the ONNX weight 'conv1.0.weight' is "
                                              r"\(2, 1, 3, 3\), the module wants \(4, 1, 3, 3\)"):
        torch_networks(Bundle.load(copy))


def test_cpu_bench_times_the_baseline_in_the_same_run_and_reports_speedup_and_agreement(tiny_bundle, tmp_path):
    j = tmp_path / "bench.json"
    r = sonoscore("bench", "--bundle", tiny_bundle, "--device", "cpu", "--baseline", "torch", "--frames", 3,
                  "--warmup", 1, "--threads", 1, "--precision", "fp32,fp16", "--json", j)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(j.read_text())
    assert out["errors"] == {} and out["device"] == "cpu" and out["baseline"] == "torch-eager-fp32"
    assert set(out["configs"]) == {"fp32", "fp16", "torch-eager-fp32"} and out["head"] == "fp32"
    fp16 = out["speedup_vs_fp32"]["fp16"]                 # each other precision against FP32, same run
    assert set(out["speedup_vs_fp32"]) == {"fp16"} and fp16["total_p50"] == pytest.approx(
        out["configs"]["fp32"]["stages"]["total"]["p50_ms"] / out["configs"]["fp16"]["stages"]["total"]["p50_ms"])
    assert "fp16 vs fp32: frame to grade" in r.stderr
    for s in ("preprocess", "unet", "gate", "vgg", "booster", "total"):   # the bench --json contract
        assert 0 < out["stages"][s]["p50_ms"] <= out["stages"][s]["max_ms"]
        assert out["configs"]["torch-eager-fp32"]["stages"][s]["p50_ms"] > 0
    sp = out["speedup"]["fp32"]
    base, mine = (out["configs"][n]["stages"]["total"]["p50_ms"] for n in ("torch-eager-fp32", "fp32"))
    assert sp["total_p50"] == pytest.approx(base / mine)
    ag = out["agreement"]["fp32"]
    assert ag["frames"] == 3 and ag["grade"] == 1.0 and ag["max_abs_probability"] < 1e-3
    assert out["versions"]["torch"] == torch.__version__ and "acceptance" not in out
    assert "speed-up" not in r.stderr and "fp32 vs torch-eager-fp32: frame to grade" in r.stderr


def test_gpu_torch_baseline_agrees_with_the_onnx_cpu_pipeline(bundle, frames):
    if not torch.cuda.is_available():
        pytest.skip(f"GPU only: torch {torch.__version__} sees no CUDA device (device/gpu_session.md runs this on the "
                    f"lent GPU)")
    with Pipeline(bundle, threads=2, min_mask_fraction=0.0) as cpu, \
            TorchBaseline(bundle, device="cuda", min_mask_fraction=0.0) as team:
        for f in frames:
            a, b = team.process(f), cpu.process(f)
            # cuDNN's TF32 convolutions round differently from the CPU: compare probabilities, not 0/1 masks
            assert np.abs(team.graph.segment(team.unet, b.image) - unet_prob(cpu, b.image)).max() <= 1e-3
            fa, fb = team.graph.features(team.vgg, b.image, b.mask)[0], cpu.graph.features(cpu.vgg, b.image, b.mask)[0]
            cos = float(fa @ fb / max(np.linalg.norm(fa) * np.linalg.norm(fb), 1e-30))
            assert cos >= 0.999
            assert a.latency_ms["unet"] > 0 and a.latency_ms["vgg"] > 0
