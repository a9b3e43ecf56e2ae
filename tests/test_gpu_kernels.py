"""GPU pre/post-processing kernels (runtime/gpu) against the CPU reference (runtime/preprocess.py, cv2).

Three layers:
1. Host harness (needs only a C++ compiler): the kernels' own arithmetic from kernels_core.h, compiled with g++
   and driven pixel by pixel and tile by tile the way the CUDA grid drives it: Crimmins bit-exact with the golden
   file, gray bit-exact with cv2 for every RGB value, resize within one grey level of cv2 (and nearly always
   exact), gate and network inputs exact.
2. nvcc (when installed): the kernel source compiles to cubins for H100 (sm_90) and Jetson Orin (sm_87).
3. pycuda + a GPU (skipped here with the reason): the real GpuKernels against the CPU reference, and its time.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import preprocess as pp
from runtime.gpu import kernels as K
from runtime.preprocess import Region
from tests.gpu_harness import host

GOLDEN = np.load(Path(__file__).parent / "data" / "crimmins.npz")
CASES = sorted({k.split("__")[0] for k in GOLDEN.files})
S = 224


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if host.compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) to build the host harness")
    return host.build(tmp_path_factory.mktemp("harness"))


@pytest.fixture(autouse=True)
def _no_stale_violations(request):
    if "harness" in request.fixturenames:
        request.getfixturevalue("harness").reset()


def cpu_resized(frame, region, order="RGB", size=S):
    gray = pp.to_gray(frame, order)
    r = K.clip_region(region, gray.shape)
    return pp.resize(pp.crop(gray, r), size)


def assert_within_one_level(out, ref):
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    assert out.shape == ref.shape
    assert d.max() <= 1, f"{int((d > 1).sum())} pixels differ by more than 1 (max {int(d.max())})"
    # The kernels reproduce cv2's own arithmetic, so a difference is a platform quirk, never a pattern.
    assert np.mean(d == 0) >= 0.99, f"only {np.mean(d == 0):.2%} of pixels equal cv2's"


# ------------------------------------------------------------------------------------------------ Crimmins


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_crimmins_kernel_matches_golden_bit_for_bit(harness, case, iterations):
    out, _ = harness.crimmins(GOLDEN[f"{case}__input"], iterations, tile=32, poison=True)
    expected = GOLDEN[f"{case}__iter{iterations}"]
    assert np.array_equal(out, expected), f"{int((out != expected).sum())} pixels differ"
    assert harness.violations() == 0, "a tile read outside its shared memory"


@pytest.mark.parametrize("tile", [8, 17, 56, 224, 4096])
def test_crimmins_kernel_is_exact_for_any_tile_size_including_one_block(harness, tile):
    for case in ("random_224", "random_small_odd", "extremes_edges_50"):
        out, _ = harness.crimmins(GOLDEN[f"{case}__input"], 2, tile=tile, poison=True)
        assert np.array_equal(out, GOLDEN[f"{case}__iter2"]), f"{case}: {int((out != GOLDEN[f'{case}__iter2']).sum())}"
    assert harness.violations() == 0


def test_crimmins_halo_is_one_iterations_reach_on_both_axes(harness):
    assert [harness.crimmins_reach(-1, axis) for axis in (0, 1)] == [24, 24] == [K.CRIMMINS_HALO] * 2
    assert [harness.crimmins_reach(31, axis) for axis in (0, 1)] == [0, 0]
    # N-S passes move nothing sideways: after the 4 N-S rules of the dark half, horizontal reach is unchanged.
    assert harness.crimmins_reach(3, 1) == 24 and harness.crimmins_reach(3, 0) == 20


def test_crimmins_with_a_halo_one_short_reads_outside_its_tile(tmp_path):
    if host.compiler() is None:
        pytest.skip("no C++ compiler")
    short = host.build(tmp_path, {"SONO_CRIMMINS_HALO": 23})
    out, _ = short.crimmins(GOLDEN["random_224__input"], 1, tile=32)
    assert short.violations() > 0 or not np.array_equal(out, GOLDEN["random_224__iter1"])


def test_crimmins_with_pass_regions_one_pixel_short_is_caught_by_poisoning(tmp_path):
    if host.compiler() is None:
        pytest.skip("no C++ compiler")
    short = host.build(tmp_path, {"SONO_REGION_SLACK": 1})
    out, _ = short.crimmins(GOLDEN["random_224__input"], 1, tile=32, poison=True)
    assert (out != GOLDEN["random_224__iter1"]).sum() > 100


@pytest.mark.parametrize("shape_tile", [((224, 224), 32), ((224, 224), 224), ((37, 53), 32), ((64, 64), 16),
                                        ((500, 20), 32)])
def test_crimmins_shared_memory_size_agrees_between_python_and_kernel(harness, shape_tile):
    (h, w), tile = shape_tile
    assert K.crimmins_smem_bytes(h, w, tile) == harness.crimmins_smem_bytes(h, w, tile)
    assert K.crimmins_smem_bytes(224, 224, 32) == 2 * 80 * 80
    assert K.crimmins_smem_bytes(224, 224, 224) == 2 * 224 * 224  # > 48 KB: the opt-in path


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_crimmins_last_iteration_writes_the_unet_input_exactly_as_to_input(harness, dtype):
    out, net = harness.crimmins(GOLDEN["random_224__input"], 1, net_dtype=dtype)
    expected = pp.to_input(GOLDEN["random_224__iter1"], 1, dtype)
    assert net.dtype == expected.dtype and np.array_equal(net, expected)


# ---------------------------------------------------------------------------------------------- grayscale


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_gray_matches_cv2_for_all_16_million_colours(harness, order):
    v = np.arange(1 << 24, dtype=np.uint32)
    frame = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    out = harness.gray(frame, order)
    assert np.array_equal(out, pp.to_gray(frame, order))


def test_gray_of_a_four_channel_frame_ignores_alpha_like_to_gray(harness):
    frame = np.random.default_rng(0).integers(0, 256, (31, 47, 4), dtype=np.uint8)
    assert np.array_equal(harness.gray(frame, "BGR"), pp.to_gray(frame, "BGR"))


# ------------------------------------------------------------------------------------------------- resize

RESIZE_CASES = [  # (frame shape, region, channel order): shrink, enlarge, odd, 1-row/1-col, crops, big frames
    ((1080, 1920, 3), Region(320, 60, 1600, 1020), "RGB"),
    ((1080, 1920, 3), None, "BGR"),
    ((2160, 3840, 3), Region(700, 100, 3100, 2100), "RGB"),
    ((448, 448), None, "RGB"),
    ((672, 896, 3), None, "BGR"),
    ((720, 1280, 3), Region(13, 7, 1000, 700), "RGB"),
    ((300, 400, 3), None, "RGB"),
    ((225, 225), None, "RGB"),
    ((224, 224, 3), None, "RGB"),
    ((223, 223), None, "RGB"),
    ((100, 100, 3), None, "BGR"),
    ((37, 53), None, "RGB"),
    ((1, 1), None, "RGB"),
    ((1, 500), None, "RGB"),
    ((500, 1, 3), None, "RGB"),
    ((100, 1000), None, "RGB"),
    ((1000, 100, 3), None, "RGB"),
    ((150, 448, 4), None, "RGB"),
    ((400, 600, 3), Region(10, 5, 11, 300), "RGB"),
    ((400, 600), Region(-50, -20, 250, 9999), "RGB"),
]


def _frame(shape, seed):
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    smooth = ((np.sin(xx / 7.0) + np.cos(yy / 5.0)) * 60 + 128).astype(np.uint8)
    if len(shape) == 3:
        smooth = np.repeat(smooth[..., None], shape[2], axis=2)
    return np.where(rng.random(shape) < 0.5, noise, smooth).astype(np.uint8)


def _case_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("shape,region,order", RESIZE_CASES, ids=_case_id)
def test_resize_kernel_is_within_one_grey_level_of_cv2(harness, shape, region, order):
    frame = _frame(shape, sum(shape))
    ref = cpu_resized(frame, region, order)
    staged, _ = harness.preprocess_resize(frame, region, S, order, staged=True)
    in_place, _ = harness.preprocess_resize(frame, region, S, order, staged=False)
    assert_within_one_level(staged, ref)
    assert np.array_equal(staged, in_place), "the zero-copy (pitch + offset) path differs from the staged crop"
    assert harness.violations() == 0, "a resize tap fell outside the crop"


def test_resize_kernel_matches_cv2_on_a_sweep_of_random_crop_sizes(harness):
    rng = np.random.default_rng(7)
    worst = 0
    for _ in range(120):
        h, w = int(rng.integers(1, 900)), int(rng.integers(1, 1400))
        gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
        out, _ = harness.preprocess_resize(gray, None, S)
        assert_within_one_level(out, pp.resize(gray, S))
        worst = max(worst, int(np.abs(out.astype(int) - pp.resize(gray, S).astype(int)).max()))
    assert worst <= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_resize_without_crimmins_writes_the_unet_input_as_to_input(harness, dtype):
    frame = _frame((300, 500, 3), 3)
    img, net = harness.preprocess_resize(frame, None, S, net_dtype=dtype)
    assert np.array_equal(net, pp.to_input(img, 1, dtype))


@pytest.mark.parametrize("shape,mode", [((224, 224), K.COPY), ((448, 448), K.AREA_FAST), ((672, 896), K.AREA_FAST),
                                        ((300, 400), K.AREA), ((1080, 1920), K.AREA), ((223, 223), K.LINEAR),
                                        ((1, 1), K.LINEAR), ((100, 1000), K.LINEAR_AREA),
                                        ((1000, 100), K.LINEAR_AREA), ((112, 112), K.LINEAR)])
def test_resize_plan_takes_cv2s_interpolation_path(shape, mode):
    plan = K.resize_plan(*shape, S)
    assert plan.mode == mode
    assert plan.inv_scale_x == S / shape[1] and plan.scale_x == 1.0 / (S / shape[1])


def test_resize_plan_rejects_an_empty_crop():
    with pytest.raises(ValueError, match="empty"):
        K.resize_plan(0, 10, S)


# --------------------------------------------------------------------------------------------------- gate


@pytest.mark.parametrize("prob_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("channels,vgg_dtype", [(1, np.float32), (3, np.float32), (3, np.float16)])
def test_gate_mask_fraction_and_vgg_input_match_the_cpu_pipeline(harness, prob_dtype, channels, vgg_dtype):
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (S, S), dtype=np.uint8)
    prob = rng.random((S, S)).astype(prob_dtype)
    prob[:3, :3] = [[0.5, np.nextafter(np.float32(0.5), 1), np.nan], [0, 1, -0.0], [np.inf, -np.inf, 0.4999]]
    mask, count, vgg = harness.gate(prob, image, 0.5, channels, vgg_dtype)
    expected_mask = (prob > 0.5).astype(np.uint8)  # the CPU pipeline's threshold
    assert np.array_equal(mask, expected_mask)
    assert count / mask.size == float(expected_mask.mean())
    expected_vgg = pp.to_input(cv2.multiply(image, expected_mask), channels, vgg_dtype)
    assert vgg.dtype == expected_vgg.dtype and np.array_equal(vgg, expected_vgg)


def test_gate_rounds_the_threshold_to_the_probability_dtype_like_numpy(harness):
    prob = np.linspace(0.29, 0.31, S * S).astype(np.float16).reshape(S, S)
    mask, _, _ = harness.gate(prob, np.full((S, S), 9, np.uint8), 0.3)
    assert np.array_equal(mask, (prob > 0.3).astype(np.uint8))
    assert K.threshold_for(np.float16, 0.3) == float(np.float16(0.3)) != 0.3


def test_half_to_float_is_exact_for_all_65536_bit_patterns(harness):
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = harness.half_to_float(bits)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # signed zeros too


# ----------------------------------------------------------------------------------- Python-side contract


def test_input_table_is_to_input_of_every_grey_level():
    for dtype in (np.float32, np.float16):
        t = K.input_table(dtype)
        assert t.dtype == dtype and t.shape == (256,)
        assert t[0] == 0 and t[255] == 1 and t[128] == pp.to_input(np.array([[128]], np.uint8), 1, dtype)[0, 0, 0, 0]


def test_frame_checks_name_the_problem():
    mf = (1080, 1920, 3)
    assert K.check_frame(np.zeros((10, 10), np.uint8), mf) == (1, 0)
    assert K.check_frame(np.zeros((10, 10, 3), np.uint8), mf, "bgr") == (3, 2)
    with pytest.raises(ValueError, match="larger than max_frame"):
        K.check_frame(np.zeros((1081, 10, 3), np.uint8), mf)
    with pytest.raises(ValueError, match="larger than max_frame"):
        K.check_frame(np.zeros((10, 10, 4), np.uint8), mf)
    with pytest.raises(ValueError, match="uint8"):
        K.check_frame(np.zeros((10, 10), np.uint16), mf)
    with pytest.raises(ValueError, match="not HxW"):
        K.check_frame(np.zeros((10, 10, 2), np.uint8), mf)
    with pytest.raises(ValueError, match="channel_order"):
        K.check_frame(np.zeros((10, 10, 3), np.uint8), mf, "YUV")


def test_regions_are_clipped_like_the_cpu_crop_and_an_empty_one_is_refused():
    assert K.clip_region(None, (480, 640, 3)) == Region(0, 0, 640, 480)
    assert K.clip_region(Region(-5, -5, 10_000, 100), (480, 640)) == Region(0, 0, 640, 100)
    # Region.clip keeps the last column of a region right of the frame, exactly as runtime.preprocess crops it.
    assert K.clip_region(Region(700, 10, 800, 20), (480, 640)) == Region(639, 10, 640, 20)
    with pytest.raises(ValueError, match="leaves nothing"):
        K.clip_region(Region(300, 10, 200, 20), (480, 640))


def test_kernel_source_is_self_contained_with_the_header_inlined():
    src = K.kernel_source()
    assert '#include "kernels_core.h"' not in src and "sono_crimmins_block" in src
    for name in ("sono_resize", "sono_crimmins", "sono_gate", "sono_spin"):
        assert f"{name}(" in src


def test_importing_the_kernels_module_does_not_import_pycuda():
    code = "import sys, runtime.gpu.kernels; print('pycuda' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_available_says_in_one_sentence_that_pycuda_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    ok, why = K.available()
    assert ok is False and "pycuda is not installed" in why and why.count(". ") == 0


def test_gpu_kernels_refuse_to_start_without_a_gpu_with_the_reason():
    ok, why = K.available()
    if ok:
        pytest.skip("a GPU is usable here")
    with pytest.raises(RuntimeError, match="GPU kernels unavailable"):
        K.GpuKernels()


# ------------------------------------------------------------------------------------------------- nvcc


@pytest.mark.parametrize("arch", ["sm_90", "sm_87"])
def test_kernel_source_compiles_to_a_cubin_without_spills(tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    src = tmp_path / "sono_kernels.cu"
    src.write_text(K.kernel_source())
    done = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-Werror", "all-warnings",
                           "-o", str(tmp_path / f"k_{arch}.cubin"), str(src)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    for name in ("sono_resize", "sono_crimmins", "sono_gate"):
        assert f"entry function '{name}'" in log
    assert "bytes spill" in log and all(" 0 bytes spill stores, 0 bytes spill loads" in line
                                        for line in log.splitlines() if "spill" in line)


# -------------------------------------------------------------------------------- pycuda + a GPU (H100)

GPU_OK, GPU_WHY = K.available()
needs_gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)


@pytest.fixture(scope="module")
def gpu():
    ctx = K.primary_context()
    yield ctx
    ctx.pop()


def _device_array(array: np.ndarray):
    import pycuda.driver as cuda
    buf = cuda.mem_alloc(array.nbytes)
    cuda.memcpy_htod(buf, np.ascontiguousarray(array))
    return buf


GPU_FRAMES = [((1080, 1920, 3), Region(320, 60, 1600, 1020), "RGB"), ((720, 1280, 3), None, "BGR"),
              ((600, 800), Region(40, 30, 760, 570), "RGB"), ((150, 200, 3), None, "RGB"),
              ((224, 224), None, "RGB"), ((100, 1000, 4), None, "RGB")]


@needs_gpu
@pytest.mark.parametrize("shape,region,order", GPU_FRAMES, ids=_case_id)
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_preprocess_matches_the_cpu_reference(gpu, shape, region, order, iterations, dtype):
    frame = _frame(shape, 5)
    resize_only = K.GpuKernels(iterations=0, input_dtype=dtype)
    resize_only.preprocess(frame, region, order)
    resized = resize_only.download_image()
    assert_within_one_level(resized, cpu_resized(frame, region, order))
    assert np.array_equal(resize_only.download_unet_input(), pp.to_input(resized, 1, dtype))
    k = K.GpuKernels(iterations=iterations, input_dtype=dtype)
    k.preprocess(frame, region, order)
    image = k.download_image()
    assert np.array_equal(image, pp.crimmins(resized, iterations))
    assert np.array_equal(k.download_unet_input(), pp.to_input(image, 1, dtype))


@needs_gpu
@pytest.mark.parametrize("case", [c for c in CASES if GOLDEN[f"{c}__input"].shape[0] == GOLDEN[f"{c}__input"].shape[1]])
@pytest.mark.parametrize("tile", [32, 4096])
def test_gpu_crimmins_matches_golden_bit_for_bit(gpu, case, tile):
    img = GOLDEN[f"{case}__input"]
    for iterations in (1, 2, 3):
        k = K.GpuKernels(size=img.shape[0], iterations=iterations, crimmins_tile=tile)
        k.preprocess(img, None)  # an S x S gray frame: the resize is a copy
        assert np.array_equal(k.download_image(), GOLDEN[f"{case}__iter{iterations}"]), (case, iterations)


@needs_gpu
@pytest.mark.parametrize("prob_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("channels,vgg_dtype", [(1, np.float32), (3, np.float16)])
def test_gpu_gate_matches_the_cpu_pipeline_frame_after_frame(gpu, prob_dtype, channels, vgg_dtype):
    k = K.GpuKernels(vgg_channels=channels, vgg_dtype=vgg_dtype)
    rng = np.random.default_rng(3)
    k.preprocess(_frame((480, 640, 3), 9), None)
    image = k.download_image()
    for cut in (0.5, 0.9, 0.1):  # the count must reset between frames
        prob = (rng.random((1, 1, S, S)) * cut * 2).astype(prob_dtype)
        buf = _device_array(prob)
        k.gate(int(buf), prob_dtype, 0.5)
        mask = (prob[0, 0] > 0.5).astype(np.uint8)
        assert k.fraction() == float(mask.mean())
        assert np.array_equal(k.download_mask(), mask)
        assert np.array_equal(k.download_vgg_input(), pp.to_input(cv2.multiply(image, mask), channels, vgg_dtype))


@needs_gpu
def test_gpu_frame_buffer_upload_without_host_copy_gives_the_same_image(gpu):
    frame, region = _frame((1080, 1920, 3), 2), Region(301, 41, 1577, 1003)
    k = K.GpuKernels()
    k.preprocess(frame, region)
    copied = k.download_image()
    staged = k.frame_buffer(frame.shape)
    staged[...] = frame
    k.preprocess(staged, region)
    assert np.array_equal(k.download_image(), copied)


@needs_gpu
def test_gpu_preprocess_refuses_a_frame_larger_than_max_frame(gpu):
    k = K.GpuKernels(max_frame=(480, 640, 3))
    with pytest.raises(ValueError, match="larger than max_frame"):
        k.preprocess(np.zeros((481, 640, 3), np.uint8), None)
