"""The device-resident pipeline (runtime.gpu.pipeline.DevicePipeline).

Without a GPU, its orchestration runs for real on host-memory stand-ins of the CUDA device and of the GPU kernels
(`HostDevice`, `HostKernels`: the GpuKernels API implemented with the CPU reference functions, "device" addresses
being host addresses) and the onnxruntime CPU runner's infer_device: the records must then be exactly those of the
CPU pipeline, with one host wait and one download per frame. On a GPU (onnxruntime-gpu, pycuda and
runtime.gpu.kernels; device/gpu_session.md), the real thing is checked against the CPU pipeline.
"""
import importlib.util
import json
import time

import numpy as np
import pytest

from runtime import preprocess as pp
from runtime.backends import BackendUnavailable
from runtime.bench import bench_frames
from runtime.bundle import Bundle
from runtime.gpu.pipeline import DevicePipeline, host_view
from runtime.phantom import KidneyPhantom
from runtime.pipeline import Pipeline
from runtime.sources import Frame

from tests.conftest import cuda_or_skip, sonoscore
from tests.gpu_harness.stand_ins import HostDevice, HostKernels


def host_pipeline(bundle, **kw):
    return DevicePipeline(bundle, _device=HostDevice, _kernels=HostKernels, **kw)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return Bundle.load(tiny_bundle)


@pytest.fixture(scope="module")
def frames():
    fs = bench_frames(3, seed=3)
    ph = KidneyPhantom(grade=None, seed=3)
    empty = next(ph.frame(i) for i in range(200) if not ph.frame(i).has_kidney)
    fs.append(Frame(len(fs), "test", time.time(), empty.image))
    return fs


def same_record(a, b):
    ja, jb = a.to_json(), b.to_json()
    assert set(ja) == set(jb)
    assert (ja["accepted"], ja["mask_fraction"], ja["grade"], ja["error"]) == \
           (jb["accepted"], jb["mask_fraction"], jb["grade"], jb["error"])
    if ja["probabilities"] is None:
        assert jb["probabilities"] is None
    else:
        assert np.abs(np.subtract(ja["probabilities"], jb["probabilities"])).max() < 1e-6
    assert a.region == b.region


@pytest.mark.parametrize("min_fraction", [0.0, 1.01], ids=["every-frame-accepted", "every-frame-rejected"])
def test_device_pipeline_records_equal_the_cpu_pipelines_frame_for_frame(bundle, frames, min_fraction):
    with Pipeline(bundle, threads=1, min_mask_fraction=min_fraction) as cpu, \
            host_pipeline(bundle, min_mask_fraction=min_fraction) as dev:
        for f in frames:
            a, b = dev.process(f), cpu.process(f)
            same_record(a, b)
            stages = {"wait", "preprocess", "unet", "gate", "vgg", "total"} | ({"booster"} if a.accepted else set())
            assert set(a.latency_ms) == stages and all(v >= 0 for v in a.latency_ms.values())
            assert a.accepted == (min_fraction == 0.0)
            assert a.mask is None and a.image is None and a.display is None   # nothing came back unasked
            feats = cpu.graph.features(cpu.vgg, b.image, b.mask)[0]
            assert np.array_equal(dev.features[0], feats)     # the VGG ran, rejected frames too (gated on GPU)


def test_one_host_wait_and_one_download_per_frame_the_mask_only_when_a_sink_wants_it(bundle, frames):
    with host_pipeline(bundle) as dev:
        for f in frames:
            dev.process(f)
        device = HostDevice.last
        assert (device.syncs, device.downloads, HostKernels.last.mask_downloads) == (len(frames), len(frames), 0)
    assert device.closed
    with Pipeline(bundle, threads=1) as cpu, host_pipeline(bundle, keep_mask=True, keep_image=True,
                                                           keep_display=True) as dev:
        for f in frames:
            a, b = dev.process(f), cpu.process(f)
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.image, b.image)
            assert np.array_equal(a.display, b.display)
        assert HostDevice.last.syncs == len(frames) and HostKernels.last.mask_downloads == len(frames)


def test_16_bit_windowed_frames_are_made_uint8_gray_on_the_cpu_before_the_upload(bundle, frames):
    px16 = frames[0].pixels.astype(np.uint16) * 200 + 1000
    f = Frame(0, "dicom", time.time(), px16, window=(26000.0, 52000.0))
    with Pipeline(bundle, threads=1, min_mask_fraction=0.0) as cpu, host_pipeline(bundle, min_mask_fraction=0.0) as dev:
        a, b = dev.process(f), cpu.process(f)
        dtype, shape, region, order = HostKernels.last.uploads[-1]
    same_record(a, b)
    assert (dtype, shape) == (np.uint8, px16.shape)
    assert region == pp.auto_region(pp.to_gray(px16, window=(26000.0, 52000.0)))


def test_colour_frames_with_a_known_region_go_up_as_they_are(bundle, frames):
    gray = frames[1].pixels
    rgb = np.ascontiguousarray(np.stack([gray, np.roll(gray, 1, axis=1), gray // 2], axis=2))
    region = pp.Region(12, 10, gray.shape[1] - 8, gray.shape[0] - 6)
    f = Frame(1, "hdmi", time.time(), rgb, channel_order="BGR", region=region)
    with Pipeline(bundle, threads=1, min_mask_fraction=0.0) as cpu, host_pipeline(bundle, min_mask_fraction=0.0) as dev:
        a, b = dev.process(f), cpu.process(f)
        dtype, shape, up_region, order = HostKernels.last.uploads[-1]
        g = Frame(1, "hdmi", time.time(), rgb, channel_order="BGR")          # no region: gray on the CPU first
        c, d = dev.process(g), cpu.process(g)
        no_region_upload = HostKernels.last.uploads[-1]
    same_record(a, b)
    same_record(c, d)
    assert (shape, order, up_region) == (rgb.shape, "BGR", region)
    assert no_region_upload[1] == gray.shape


def test_unreadable_frames_become_error_records_not_exceptions(bundle):
    with host_pipeline(bundle) as dev:
        a = dev.process(Frame(0, "s", time.time(), None, error="frame 0: unreadable file x.png"))
        b = dev.process(Frame(1, "s", time.time(), np.zeros((5, 5, 7), np.uint8)))
    assert a.error == "frame 0: unreadable file x.png" and a.grade is None
    assert b.error == "frame 1: frame has 7 channels; expected 1, 3 or 4" and not b.accepted
    assert "total" in a.latency_ms and "total" in b.latency_ms


def test_cuda_graphs_are_refused_with_the_trt_backend(bundle):
    with pytest.raises(BackendUnavailable, match="CUDA graphs are implemented for the ort backend"):
        DevicePipeline(bundle, backend="trt", cuda_graphs=True)


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is not None, reason="pycuda is installed here")
def test_without_pycuda_the_device_pipeline_says_so_in_one_sentence(bundle):
    with pytest.raises(BackendUnavailable, match=r"the device pipeline needs pycuda \(pip install 'sonoscore\[gpu\]'"):
        DevicePipeline(bundle, _kernels=HostKernels).__enter__()


# -- on a GPU ---------------------------------------------------------------------------------------------------

def _gpu_or_skip():
    cuda_or_skip()
    try:
        from runtime.gpu import kernels
    except ImportError as e:
        pytest.skip(f"GPU only: runtime.gpu.kernels is not importable ({e})")
    ok, why = kernels.available()
    if not ok:
        pytest.skip(f"GPU only: the GPU kernels cannot run here ({why})")


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def unet_prob(cpu: Pipeline, image: np.ndarray) -> np.ndarray:
    return cpu.graph.segment(cpu.unet, image)


def device_prob(dev: DevicePipeline) -> np.ndarray:
    """The UNet's probabilities on the device for the last frame's input (still in the kernels' buffer)."""
    import pycuda.driver as cuda
    with dev.device.current():
        out = dev.unet.infer_device({dev.unet_spec.input_name: dev.kernels.unet_input}, shapes=dev.unet_shape,
                                    stream=dev.device.stream)[dev.unet_spec.output_name]
        host = cuda.pagelocked_empty(out.shape, out.dtype)
        cuda.memcpy_dtoh_async(host, out.ptr, dev.device.stream)
        dev.device.synchronize()
    return np.array(host[0, 0])


@pytest.mark.parametrize("precision,graphs,tol,min_cos", [("fp32", False, 1e-3, 0.999), ("fp32", True, 1e-3, 0.999),
                                                          ("fp16", True, 2e-2, 0.99)])
def test_gpu_device_pipeline_agrees_with_the_cpu_pipeline(bundle, frames, precision, graphs, tol, min_cos):
    _gpu_or_skip()
    with Pipeline(bundle, threads=2, min_mask_fraction=0.0) as cpu, \
            DevicePipeline(bundle, precision=precision, cuda_graphs=graphs, min_mask_fraction=0.0, keep_mask=True,
                           keep_image=True) as dev:
        for f in frames * 2:                           # twice: with graphs the later runs are replays
            a, b = dev.process(f), cpu.process(f)
            assert a.error is None and a.accepted
            assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() <= 1.0  # resize within a grey level
            # The networks alone, on the GPU's own image: the CPU networks on the same pixels (TF32 / FP16
            # rounding apart); the gate thresholds exactly the probabilities the GPU computed.
            prob = device_prob(dev)
            assert np.abs(prob - unet_prob(cpu, a.image)).max() <= tol
            assert np.array_equal(a.mask, dev.graph.gate(prob).mask)
            assert a.mask_fraction == pytest.approx(float(a.mask.mean()), abs=1e-6)
            assert cosine(dev.features[0], cpu.graph.features(cpu.vgg, a.image, a.mask)[0]) >= min_cos
            assert set(a.to_json()) == set(b.to_json())
            assert all(a.latency_ms[s] > 0 for s in ("preprocess", "unet", "gate", "vgg", "booster", "total"))


def test_gpu_bench_runs_every_configuration_and_the_torch_baseline_in_one_run(tiny_bundle, tmp_path):
    _gpu_or_skip()
    pytest.importorskip("torch")
    j = tmp_path / "gpu_bench.json"
    r = sonoscore("bench", "--bundle", tiny_bundle, "--device", "cuda", "--frames", 6, "--warmup", 4, "--json", j)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(j.read_text())
    assert out["errors"] == {}
    assert set(out["configs"]) == {"fp32", "fp32+graphs", "fp16", "fp16+graphs", "torch-eager-fp32"}
    assert out["head"] == "fp16+graphs" and out["device"] == "cuda" and out["device_name"]
    for s in ("preprocess", "unet", "gate", "vgg", "booster", "total"):
        assert 0 < out["stages"][s]["p50_ms"] <= out["stages"][s]["p99_ms"]
    assert out["speedup"]["fp16+graphs"]["total_p50"] > 0
    assert out["agreement"]["fp32"]["frames"] == 6
    assert {"onnxruntime", "pycuda", "torch", "cuda_driver"} <= set(out["versions"])
    assert set(out["acceptance"]) >= {"met", "total_p50_ms", "speedup_vs_baseline", "kernels_p50_ms"}
    for name in ("fp32", "fp32+graphs", "fp16", "fp16+graphs"):
        c = out["configs"][name]
        # The kernel timer's figure: GPU time of the launches only, well under the pipeline's host-inclusive span
        assert c["kernel_timer"]["frames"] == 6 and 0 < c["kernels_p50_ms"] == c["kernel_timer"]["kernels"]["p50_ms"]
        assert c["kernels_p50_ms"] < c["host_copy_upload_preprocess"]["p50_ms"] + c["stages"]["gate"]["p50_ms"]
        assert c["kernel_timer"]["upload"]["p50_ms"] > 0
    assert out["acceptance"]["kernels_p50_ms"] == out["configs"]["fp16+graphs"]["kernels_p50_ms"]
    assert "torch-eager-fp32" in out["configs"] and "kernel_timer" not in out["configs"]["torch-eager-fp32"]


def test_device_bench_takes_its_kernel_figure_from_the_kernel_timer_on_the_pipelines_own_kernels(
        tiny_bundle, bundle, monkeypatch):
    """Without a GPU, on the host stand-ins: `kernels_p50_ms` comes from runtime.gpu.kernels.time_kernels, called
    once per timed frame with the pipeline's own kernels, what the pipeline uploads for that frame and the UNet's
    probabilities for it; the pipeline's own host-inclusive span keeps its own name."""
    from runtime import bench
    from runtime.gpu import kernels as gpu_kernels
    calls = []

    def time_kernels(kernels, pixels, region, prob, *, frames=200, prob_dtype=np.float32, channel_order="RGB",
                     threshold=0.5):
        size = kernels.size
        calls.append(dict(own=kernels is made[0].kernels, pixels=pixels.copy(), region=region, frames=frames,
                          order=channel_order, prob=host_view(prob, (size, size), prob_dtype).copy(),
                          unet_input=host_view(kernels.unet_input, (1, 1, size, size), np.float32).copy()))
        return {"upload": 0.5, "preprocess": 0.01 * len(calls), "gate": 0.01, "kernels": 0.01 * len(calls) + 0.01}

    made = []

    def make(bundle_, device, backend, precision, graphs, threads, cache_dir):
        made.append(host_pipeline(bundle_, precision=precision, min_mask_fraction=0.0))
        return made[-1]

    monkeypatch.setattr(gpu_kernels, "time_kernels", time_kernels)
    monkeypatch.setattr(bench, "_make_pipeline", make)
    out = bench.bench_device(tiny_bundle, device="cuda", precision="fp32", cuda_graphs="off", baseline=None,
                             frames=3, warmup=1)
    assert out["errors"] == {} and list(out["configs"]) == ["fp32"]
    c = out["configs"]["fp32"]
    assert c["kernel_timer"]["frames"] == 3 and c["kernels_p50_ms"] == pytest.approx(0.03)   # 0.02, 0.03, 0.04
    assert c["kernel_timer"]["upload"]["p50_ms"] == 0.5
    assert c["host_copy_upload_preprocess"]["p50_ms"] > 0 and "upload_preprocess" not in c
    timed = bench_frames(4)[1:]                                # the bench's frames after the warm-up
    with Pipeline(bundle, threads=1, min_mask_fraction=0.0) as cpu:
        for call, f in zip(calls, timed, strict=True):
            assert call["own"] and call["frames"] == 1 and call["order"] == "RGB"
            assert np.array_equal(call["pixels"], f.pixels) and call["region"] == pp.auto_region(f.pixels)
            image, _ = cpu.graph.preprocess(f.pixels, call["region"])
            assert np.array_equal(call["unet_input"], pp.to_input(image, 1))
            assert np.abs(call["prob"] - unet_prob(cpu, image)).max() < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is not None, reason="pycuda is installed here")
def test_gpu_bench_without_a_gpu_names_each_configuration_and_why_once(tiny_bundle):
    from runtime.errors import UserError
    from runtime.bench import bench_device
    with pytest.raises(UserError, match=r"^no configuration could start on cuda: fp32, fp32\+graphs, fp16, "
                                        r"fp16\+graphs: BackendUnavailable: the device pipeline needs pycuda [^;]*; use the CPU pipeline "
                                        r"\(no --device cuda\)$"):
        bench_device(tiny_bundle, device="cuda", baseline=None, frames=1, warmup=0)
