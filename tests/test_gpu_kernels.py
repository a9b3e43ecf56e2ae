"""GPU pre/post-processing kernels (runtime/gpu) against the CPU reference (runtime/preprocess.py, cv2).

Three layers:
1. Host harness (needs only a C++ compiler): the kernels' own arithmetic from kernels_core.h, compiled with g++
   and driven pixel by pixel and tile by tile the way the CUDA grid drives it: Crimmins bit-exact with the golden
   file, gray bit-exact with cv2 for every RGB value, resize within one grey level of cv2 (and nearly always
   exact), gate and network inputs exact.
2. nvcc (when installed): the kernel source compiles to cubins for H100 (sm_90) and Jetson Orin (sm_87).
3. The real GpuKernels (its Python launch layer: staging, crop offsets and pitch, grids, shared memory, the
   Crimmins ping-pong, the gate and its fraction download, time_kernels) against the CPU reference, on two
   backends: the CPU stand-in for pycuda (tests/gpu_harness/fake_cuda.py, kernel bodies from the same g++-built
   kernels_core.h; runs wherever layer 1 runs) and pycuda + a GPU (skipped here with the reason). Mutants of
   kernels.py (an off-by-one offset, a wrong scratch buffer, a missing wait...) show that those tests can fail.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import preprocess as pp
from runtime.gpu import kernels as K
from runtime.preprocess import Region
from tests.gpu_harness import fake_cuda, host

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


# ------------------------------------------------------------- GpuKernels itself: CPU stand-in, and pycuda + a GPU
#
# The same tests drive the real GpuKernels (its staging, offsets, launches, Crimmins ping-pong, gate and downloads)
# on two backends: "stand-in" (tests/gpu_harness/fake_cuda.py: pycuda's API on host memory, kernel bodies = the
# g++-built kernels_core.h; runs wherever the host harness builds) and "cuda" (pycuda and a GPU; skipped here).

GPU_OK, GPU_WHY = K.available()


class Backend:
    """Where GpuKernels runs: `cuda` is a FakeCuda (the CPU stand-in) or None (pycuda and the GPU). `module` is
    the kernels module whose GpuKernels is built (runtime.gpu.kernels, or a mutant of it)."""

    def __init__(self, name: str, cuda, module=K):
        self.name, self.cuda, self.module = name, cuda, module

    def kernels(self, **kw):
        return self.module.GpuKernels(cuda=self.cuda, **kw)

    def device_array(self, array: np.ndarray):
        """A device buffer holding `array`; keep it alive until the work that reads it has run."""
        if self.cuda is not None:
            return self.cuda.device_array(array)
        import pycuda.driver as cuda
        buf = cuda.mem_alloc(array.nbytes)
        cuda.memcpy_htod(buf, np.ascontiguousarray(array))
        return buf


@pytest.fixture(scope="module", params=["stand-in", "cuda"])
def backend(request):
    if request.param == "cuda":
        if not GPU_OK:
            pytest.skip(f"GPU only: {GPU_WHY}")
        ctx = K.primary_context()
        yield Backend("cuda", None)
        ctx.pop()
    else:
        yield Backend("stand-in", fake_cuda.FakeCuda(request.getfixturevalue("harness")))


@pytest.fixture
def fake(harness):
    """A fresh CPU stand-in (its own counters) for the tests about what GpuKernels asks of the device."""
    return fake_cuda.FakeCuda(harness)


def fit(shape) -> tuple[int, int, int]:
    """The smallest max_frame that takes a frame of `shape`."""
    return (shape[0], shape[1], 1 if len(shape) == 2 else shape[2])


# (frame shape, region, channel order, the resize path its crop takes): every cv2 path, gray/RGB/BGR/RGBA, crops.
KERNEL_FRAMES = [((1080, 1920, 3), Region(320, 60, 1600, 1020), "RGB", K.AREA),
                 ((720, 1280, 3), None, "BGR", K.AREA),
                 ((600, 800), Region(40, 30, 760, 570), "RGB", K.AREA),
                 ((448, 448, 3), None, "BGR", K.AREA_FAST),
                 ((672, 896), None, "RGB", K.AREA_FAST),
                 ((224, 224), None, "RGB", K.COPY),
                 ((260, 300, 3), Region(10, 20, 234, 244), "BGR", K.COPY),
                 ((150, 200, 3), None, "RGB", K.LINEAR),
                 ((112, 112), None, "RGB", K.LINEAR),
                 ((100, 1000, 4), None, "RGB", K.LINEAR_AREA),
                 ((1000, 100, 3), Region(5, 10, 95, 990), "BGR", K.LINEAR_AREA)]


def check_preprocess(be, shape, region, order, iterations, dtype, size=S):
    """resize within one grey level of cv2 (exact for a copy: the gray itself), Crimmins and the UNet input bit
    for bit, through the real GpuKernels."""
    frame = _frame(shape, 5)
    ref = cpu_resized(frame, region, order, size)
    resize_only = be.kernels(size=size, iterations=0, input_dtype=dtype, max_frame=fit(shape))
    resize_only.preprocess(frame, region, order)
    resized = resize_only.download_image()
    assert_within_one_level(resized, ref)
    r = K.clip_region(region, shape)
    if K.resize_plan(r.y1 - r.y0, r.x1 - r.x0, size).mode == K.COPY:
        assert np.array_equal(resized, ref), "a copy-mode crop must be the CPU's gray crop exactly"
    assert np.array_equal(resize_only.download_unet_input(), pp.to_input(resized, 1, dtype))
    k = be.kernels(size=size, iterations=iterations, input_dtype=dtype, max_frame=fit(shape))
    k.preprocess(frame, region, order)
    image = k.download_image()
    expected = pp.crimmins(resized, iterations) if iterations else resized
    assert np.array_equal(image, expected), f"{int((image != expected).sum())} pixels differ from Crimmins"
    assert np.array_equal(k.download_unet_input(), pp.to_input(image, 1, dtype))
    if np.array_equal(resized, ref):  # then the whole chain is runtime.preprocess.preprocess's, bit for bit
        cpu, _ = pp.preprocess(pp.to_gray(frame, order), region or Region(0, 0, shape[1], shape[0]), size=size,
                               crimmins_iterations=iterations)
        assert np.array_equal(image, cpu)


def check_zero_copy(be, region, order="BGR", shape=(600, 800, 3)):
    """A frame decoded straight into frame_buffer() (uploaded in place, the crop addressed by row range, column
    offset and pitch) gives what the staged copy of the crop gives, and what the CPU gives."""
    frame = _frame(shape, 2)
    k = be.kernels(iterations=0, max_frame=(1080, 1920, 3))
    k.preprocess(frame, region, order)
    copied = k.download_image()
    staged = k.frame_buffer(frame.shape)
    staged[...] = frame
    k.preprocess(staged, region, order)
    in_place = k.download_image()
    assert np.array_equal(in_place, copied), f"{int((in_place != copied).sum())} pixels differ between the paths"
    assert_within_one_level(copied, cpu_resized(frame, region, order))


def check_gate(be, prob_dtype, channels, vgg_dtype, size=S, threshold=0.5):
    """mask = prob > threshold as numpy compares it, the fraction, the masked VGG input; frame after frame (the
    count resets itself)."""
    k = be.kernels(size=size, vgg_channels=channels, vgg_dtype=vgg_dtype, max_frame=(480, 640, 3))
    rng = np.random.default_rng(3)
    k.preprocess(_frame((480, 640, 3), 9), None)
    image = k.download_image()
    for cut in (0.5, 0.9, 0.1, 0.0):
        prob = (rng.random((1, 1, size, size)) * cut * 2).astype(prob_dtype)
        prob.flat[:6] = [threshold, np.nextafter(np.float32(threshold), 1), np.nan, np.inf, -np.inf, -0.0]
        buf = be.device_array(prob)
        k.gate(int(buf), prob_dtype, threshold)
        mask = (prob[0, 0] > threshold).astype(np.uint8)
        assert k.fraction() == float(mask.mean())
        assert np.array_equal(k.download_mask(), mask)
        assert np.array_equal(k.download_vgg_input(), pp.to_input(cv2.multiply(image, mask), channels, vgg_dtype))


def check_crimmins_golden(be, case, tile):
    img = GOLDEN[f"{case}__input"]
    for iterations in (1, 2, 3):
        k = be.kernels(size=img.shape[0], iterations=iterations, crimmins_tile=tile, max_frame=fit(img.shape))
        k.preprocess(img, None)  # an S x S gray frame: the resize is a copy
        assert np.array_equal(k.download_image(), GOLDEN[f"{case}__iter{iterations}"]), (case, iterations)


def check_back_to_back_frames(be):
    """Two frames queued without a host wait between them (the second copied into staging while the first's
    upload may still be pending): each gets its own result."""
    f1, f2 = _frame((480, 640, 3), 1), _frame((480, 640, 3), 2)
    r1, r2 = Region(10, 20, 600, 400), Region(0, 0, 640, 480)
    ref = be.kernels(max_frame=(480, 640, 3))
    ref.preprocess(f1, r1)
    img1 = ref.download_image()
    ref.preprocess(f2, r2)
    img2 = ref.download_image()
    k = be.kernels(max_frame=(480, 640, 3))
    keep = be.device_array(np.ones((1, 1, S, S), np.float32))  # mask of ones: the VGG input is the image
    k.preprocess(f1, r1)
    k.gate(int(keep))
    k.preprocess(f2, r2)
    assert np.array_equal(k.download_vgg_input(), pp.to_input(img1, 1)), "frame 1 was preprocessed from other pixels"
    assert np.array_equal(k.download_image(), img2)


def _kernel_frame_id(v):
    return _case_id(v) if not isinstance(v, int) else {K.COPY: "copy", K.AREA_FAST: "area_fast", K.AREA: "area",
                                                        K.LINEAR: "linear", K.LINEAR_AREA: "linear_area"}[v]


@pytest.mark.parametrize("shape,region,order,mode", KERNEL_FRAMES, ids=_kernel_frame_id)
@pytest.mark.parametrize("iterations", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_kernels_preprocess_matches_the_cpu_reference(backend, shape, region, order, mode, iterations, dtype):
    r = K.clip_region(region, shape)
    assert K.resize_plan(r.y1 - r.y0, r.x1 - r.x0, S).mode == mode  # the cases cover every path
    check_preprocess(backend, shape, region, order, iterations, dtype)


@pytest.mark.parametrize("size", [100, 37])
def test_gpu_kernels_preprocess_at_network_sizes_that_do_not_fill_whole_blocks(backend, size):
    check_preprocess(backend, (300, 500, 3), Region(20, 10, 480, 290), "RGB", 2, np.float32, size)
    check_preprocess(backend, (30, 50), None, "RGB", 1, np.float16, size)


@pytest.mark.parametrize("case", [c for c in CASES if GOLDEN[f"{c}__input"].shape[0] == GOLDEN[f"{c}__input"].shape[1]])
@pytest.mark.parametrize("tile", [32, 4096])
def test_gpu_kernels_crimmins_matches_golden_bit_for_bit(backend, case, tile):
    check_crimmins_golden(backend, case, tile)


@pytest.mark.parametrize("region", [Region(301, 41, 1577, 1003), Region(301, 41, 525, 265)], ids=["area", "copy"])
def test_gpu_kernels_frame_buffer_upload_without_host_copy_gives_the_same_image(backend, region):
    check_zero_copy(backend, region, shape=(1080, 1920, 3) if region.x1 > 800 else (600, 800, 3))


@pytest.mark.parametrize("prob_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("channels,vgg_dtype", [(1, np.float32), (3, np.float16)])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_gpu_kernels_gate_matches_a_numpy_gate_frame_after_frame(backend, prob_dtype, channels, vgg_dtype,
                                                                  threshold):
    check_gate(backend, prob_dtype, channels, vgg_dtype, threshold=threshold)


def test_gpu_kernels_gate_at_a_size_that_does_not_fill_the_last_block(backend):
    check_gate(backend, np.float16, 3, np.float32, size=100)


def test_gpu_kernels_keep_back_to_back_frames_apart(backend):
    check_back_to_back_frames(backend)


def test_gpu_kernels_refuse_frames_beyond_max_frame(backend):
    k = backend.kernels(max_frame=(480, 640, 3))
    with pytest.raises(ValueError, match="larger than max_frame"):
        k.preprocess(np.zeros((481, 640, 3), np.uint8), None)
    with pytest.raises(ValueError, match="larger than max_frame"):
        k.frame_buffer((480, 641))
    # A 4-channel frame needs max_frame channels 4 (the staging buffer holds H x W x channels bytes); the default
    # (2160, 3840, 3) refuses it, as check_frame does, and a (.., .., 4) one takes it (KERNEL_FRAMES' RGBA case).
    with pytest.raises(ValueError, match="larger than max_frame"):
        backend.kernels().preprocess(np.zeros((100, 1000, 4), np.uint8), None)
    k4 = backend.kernels(max_frame=(480, 640, 4))
    k4.preprocess(np.zeros((100, 600, 4), np.uint8), None)
    assert not k4.download_image().any()


def test_time_kernels_gives_positive_per_stage_milliseconds(backend):
    k = backend.kernels(profile=True, max_frame=(1080, 1920, 3))
    prob = backend.device_array(np.random.default_rng(1).random((1, 1, S, S)).astype(np.float32))
    t = K.time_kernels(k, _frame((1080, 1920, 3), 4), Region(320, 60, 1600, 1020), int(prob), frames=3)
    assert set(t) == {"upload", "preprocess", "gate", "kernels"}
    assert all(np.isfinite(v) and v > 0 for v in t.values()), t
    with pytest.raises(RuntimeError, match="profile=True"):
        backend.kernels(max_frame=(8, 8, 1)).timings()


# --------------------------------------------------------------------- what GpuKernels asks of the device (stand-in)


def test_gpu_kernels_queue_one_upload_and_the_documented_launches_per_frame(fake):
    k = K.GpuKernels(cuda=fake, iterations=3, max_frame=(480, 640, 3))
    prob = fake.device_array(np.full((1, 1, S, S), 0.7, np.float16))
    fake.stats.clear()
    fake.launches.clear()
    k.preprocess(_frame((480, 640, 3), 1), Region(5, 5, 600, 470))
    k.gate(int(prob), np.float16)
    assert fake.pending() > 0 and fake.stats["stream_synchronize"] == 0, "preprocess/gate waited for the device"
    assert [name for name, *_ in fake.launches] == ["sono_resize"] + ["sono_crimmins"] * 3 + ["sono_gate"]
    # The ping-pong: resized -> scratch 0 -> scratch 1 -> image, the last one also writing the UNet input.
    crim = [args for name, _, _, _, args in fake.launches if name == "sono_crimmins"]
    assert [(a[0], a[1]) for a in crim] == [(k._resized, k._scratch[0]), (k._scratch[0], k._scratch[1]),
                                            (k._scratch[1], k.image)]
    assert [a[5] for a in crim] == [0, 0, k.unet_input]
    assert fake.stats["htod_async"] == 1 and fake.stats["htod_bytes"] == 0  # queued, not yet run
    assert k.fraction() == 1.0
    assert fake.stats["htod_bytes"] == 595 * 465 * 3 and fake.stats["dtoh_bytes"] == 4
    assert fake.stats["pageable_async"] == 0, "an async copy from pageable host memory"
    assert not fake.peek(k._counter, 2, np.uint32).any(), "the gate's counters must be back at zero"


def test_gpu_kernels_zero_copy_uploads_only_the_crop_rows(fake):
    k = K.GpuKernels(cuda=fake, max_frame=(480, 640, 3))
    staged = k.frame_buffer((480, 640, 3))
    staged[...] = _frame((480, 640, 3), 3)
    fake.stats.clear()
    k.preprocess(staged, Region(7, 30, 600, 300))
    k.download_image()
    assert fake.stats["htod_bytes"] == (300 - 30) * 640 * 3


def test_gpu_kernels_need_a_current_context(fake):
    fake.context_current = False
    with pytest.raises(RuntimeError, match="current CUDA context"):
        K.GpuKernels(cuda=fake)


def test_stand_in_refuses_what_a_gpu_would_refuse(fake):
    module = fake.SourceModule(K.kernel_source(), no_extern_c=True)
    with pytest.raises(fake_cuda.FakeCudaError, match="does not match"):
        module.get_function("sono_crimmins").prepare("PPiiiPP")
    with pytest.raises(fake_cuda.FakeCudaError, match="named symbol"):
        module.get_function("sono_nothing")
    crimmins = module.get_function("sono_crimmins").prepare("PPiiiPPi")
    a, b = fake.mem_alloc(S * S), fake.mem_alloc(S * S)
    with pytest.raises(fake_cuda.FakeCudaError, match="shared memory"):
        crimmins.prepared_async_call((1, 1), (32, 32, 1), None, int(a), int(b), S, S, 4096, 0, 0, 4,
                                     shared_size=2 * S * S)
    with pytest.raises(fake_cuda.FakeCudaError, match="launch bound"):
        crimmins.prepared_async_call((1, 1), (32, 64, 1), None, int(a), int(b), S, S, 32, 0, 0, 4, shared_size=0)
    crimmins.prepared_async_call((7, 7), (32, 8, 1), None, int(a), int(a) + 1, S, S, 32, 0, 0, 4,
                                 shared_size=K.crimmins_smem_bytes(S, S, 32))
    with pytest.raises(fake_cuda.FakeCudaError, match="overlap|past the end"):
        fake.synchronize()
    with pytest.raises(fake_cuda.FakeCudaError, match="past the end"):
        fake.memcpy_htod(int(a) + 1, np.zeros(S * S, np.uint8))
    b.free()
    with pytest.raises(fake_cuda.FakeCudaError, match="not in any live"):
        fake.memcpy_dtoh(np.zeros(4, np.uint8), b.ptr)
    stream = fake.Stream()
    start, untimed = fake.Event().record(stream), fake.Event(fake.event_flags.DISABLE_TIMING).record(stream)
    end = fake.Event().record(stream)
    with pytest.raises(fake_cuda.FakeCudaError, match="not reached"):
        end.time_since(start)
    end.synchronize()
    assert end.time_since(start) >= 0 and stream.is_done()
    with pytest.raises(fake_cuda.FakeCudaError, match="DISABLE_TIMING"):
        untimed.time_since(start)


# ------------------------------------------------------------------- the tests above can fail: mutants of GpuKernels


def _mutant(monkeypatch, old: str, new: str):
    """runtime.gpu.kernels with `old` replaced by `new` in its source (exactly one occurrence)."""
    source = Path(K.__file__).read_text()
    assert source.count(old) == 1, f"the mutation target is not unique in kernels.py: {old!r}"
    name = "runtime.gpu._kernels_mutant"
    module = types.ModuleType(name)
    module.__file__ = K.__file__
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(source.replace(old, new), f"<mutant of {K.__file__}>", "exec"), module.__dict__)
    return module


def _all_iterations(be):
    for iterations in (1, 2, 3):
        check_preprocess(be, (260, 300, 3), Region(10, 20, 234, 244), "BGR", iterations, np.float32)

MUTANTS = {  # name: (original text in kernels.py, mutation, the check that must catch it)
    "zero-copy column offset": ("src = self._frame + r.x0 * channels", "src = self._frame + (r.x0 + 1) * channels",
                                lambda be: check_zero_copy(be, Region(301, 41, 525, 265))),
    "zero-copy first row": ("self._staging[r.y0 * pitch:r.y1 * pitch]",
                            "self._staging[(r.y0 + 1) * pitch:(r.y1 + 1) * pitch]",
                            lambda be: check_zero_copy(be, Region(301, 41, 525, 265))),
    "zero-copy pitch": ("pitch = pixels.shape[1] * channels", "pitch = (pixels.shape[1] - 1) * channels",
                        lambda be: check_zero_copy(be, Region(301, 41, 525, 265))),
    "staged crop rows": ("np.copyto(view, pixels[r.y0:r.y1, r.x0:r.x1])",
                         "np.copyto(view, pixels[r.y0 + 1:r.y1 + 1, r.x0:r.x1])",
                         lambda be: check_preprocess(be, (260, 300, 3), Region(10, 20, 234, 244), "BGR", 0,
                                                     np.float32)),
    "red index ignored": ("src, pitch, channels, r_index, cw", "src, pitch, channels, 0, cw",
                          lambda be: check_preprocess(be, (260, 300, 3), Region(10, 20, 234, 244), "BGR", 0,
                                                      np.float32)),
    "resize grid rounds down": ("grid = (math.ceil(self.size / _RESIZE_BLOCK[0]), math.ceil(self.size / "
                                "_RESIZE_BLOCK[1]))", "grid = (self.size // _RESIZE_BLOCK[0], self.size // "
                                "_RESIZE_BLOCK[1])",
                                lambda be: check_preprocess(be, (300, 500, 3), None, "RGB", 0, np.float32, 100)),
    "Crimmins ping-pong on one scratch": ("dst = self.image if last else self._scratch[it % 2]",
                                          "dst = self.image if last else self._scratch[0]", _all_iterations),
    "Crimmins restarts from the resize": ("            src_img = dst\n", "            src_img = self._resized\n",
                                          _all_iterations),
    "UNet input not written by the last Crimmins": (
        "unet_out if last else 0, self._unet_lut, self.input_dtype.itemsize, shared_size=smem",
        "0, self._unet_lut, self.input_dtype.itemsize, shared_size=smem", _all_iterations),
    "Crimmins grid rounds down": ("(math.ceil(s / tile), math.ceil(s / tile))", "(s // tile, s // tile)",
                                  lambda be: check_preprocess(be, (300, 500, 3), None, "RGB", 1, np.float32, 100)),
    "shared memory not opted in": (
        "            self._crimmins.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)\n", "",
        lambda be: check_crimmins_golden(be, "random_224", 4096)),
    "staging overwritten before the upload ran": (
        "            self._uploaded.synchronize()\n            pitch = cw * channels\n",
        "            pitch = cw * channels\n", check_back_to_back_frames),
    "half probabilities read as float": ("int(dt == np.float16)", "int(dt == np.float32)",
                                         lambda be: check_gate(be, np.float16, 1, np.float32)),
    "threshold not rounded to the dtype": ("threshold_for(dt, threshold)", "threshold",
                                           lambda be: check_gate(be, np.float16, 1, np.float32, threshold=0.3)),
    "gate grid rounds down": ("(math.ceil(n / _GATE_BLOCK), 1)", "(n // _GATE_BLOCK, 1)",
                              lambda be: check_gate(be, np.float32, 1, np.float32, size=100)),
    "fraction downloaded from the counter": ("memcpy_dtoh_async(self._count_host, self._result, stream)",
                                             "memcpy_dtoh_async(self._count_host, self._counter, stream)",
                                             lambda be: check_gate(be, np.float32, 1, np.float32)),
    "fraction read before the stream finished": (
        "        self.stream.synchronize()\n        return int(self._count_host[0])",
        "        return int(self._count_host[0])", lambda be: check_gate(be, np.float32, 1, np.float32)),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_the_stand_in_tests_catch_a_broken_gpu_kernels(harness, monkeypatch, name):
    old, new, check = MUTANTS[name]
    check(Backend("stand-in", fake_cuda.FakeCuda(harness)))  # the check passes on the real code ...
    mutant = Backend("mutant", fake_cuda.FakeCuda(harness), _mutant(monkeypatch, old, new))
    with pytest.raises((AssertionError, fake_cuda.FakeCudaError)):  # ... and fails on the mutant
        check(mutant)
