"""Each network declares its input (runtime.normalize): parsing, the manifest's declaration and its schema, the one
CPU definition, the training code's torch transform, the GPU kernels (on the CPU side, through the g++-built
kernels_core.h and the pycuda stand-in), and the acceptance check of issue 13 item 3: a model trained with each
normalization, exported, scores real ultrasound frames exactly as the training code's own preprocessing would.

Real frames: the ultrasound files pydicom and pydicom-data ship (offline), preprocessed by the runtime's graph.
"""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime import normalize
from runtime import preprocess as pp
from runtime.bundle import BundleError, validate_manifest
from runtime.errors import UserError
from runtime.graph import Graph, masked
from tests.conftest import sonoscore

UNIT = {"kind": "unit"}
MINMAX = {"kind": "minmax"}
IMAGENET = {"kind": "meanstd", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
GRAY_MEANSTD = {"kind": "meanstd", "mean": [0.449], "std": [0.226]}
S = 224

# (unet normalization, vgg normalization): each kind on each network (the UNet has one channel: a one-value
# meanstd; the VGG three: ImageNet's).
CASES = {"unit": (UNIT, UNIT), "minmax": (MINMAX, MINMAX), "meanstd": (GRAY_MEANSTD, IMAGENET)}
CLI_TEXT = {"unit": ("unit", "unit"), "minmax": ("minmax", "minmax"), "meanstd": ("meanstd:0.449/0.226", "imagenet")}

# Real ultrasound frames: (pydicom test file, frames taken).
DICOM_FRAMES = (("US1_UNCR.dcm", 1), ("OBXXXX1A.dcm", 1), ("JPGLosslessP14SV1_1s_1f_8b.dcm", 1),
                ("examples_ybr_color.dcm", 3))


def real_images(graph: Graph | None = None) -> np.ndarray:
    """Preprocessed 224x224 uint8 images of the ultrasound frames pydicom ships (offline)."""
    from pydicom.data import get_testdata_file
    from runtime.sources.dicom import from_path
    graph = graph or Graph()
    images = []
    for name, count in DICOM_FRAMES:
        path = get_testdata_file(name, download=False)
        assert path is not None, f"{name} is not available offline: install pydicom-data==1.0.0"
        with from_path(path) as src:
            for frame, _ in zip(src, range(count)):
                gray = pp.to_gray(frame.pixels, frame.channel_order, frame.window)
                images.append(graph.preprocess(gray, frame.region)[0])
    return np.stack(images)


def blob_mask(shape=(S, S), cy=0.55, cx=0.5, ry=0.25, rx=0.3) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]] / np.array(shape).reshape(2, 1, 1)
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    return real_images()


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text,expected", [
    ("unit", UNIT), (" MinMax ", MINMAX), ("imagenet", IMAGENET),
    ("meanstd:0.5/0.25", {"kind": "meanstd", "mean": [0.5], "std": [0.25]}),
    ("meanstd:0.485,0.456,0.406/0.229,0.224,0.225", IMAGENET),
    ("meanstd:-1,0,1e-3/2,3,4", {"kind": "meanstd", "mean": [-1.0, 0.0, 0.001], "std": [2.0, 3.0, 4.0]}),
])
def test_parse_reads_every_documented_text_and_describe_writes_it_back(text, expected):
    n = normalize.parse(text)
    assert n == expected
    assert normalize.parse(normalize.describe(n)) == n


@pytest.mark.parametrize("text,words", [
    ("", "not an input normalization"), ("zscore", "not an input normalization"),
    ("meanstd", "not an input normalization"), ("meanstd:0.5", "no standard deviations"),
    ("meanstd:a/1", "not a number"), ("meanstd:0.5/0", "above 0"), ("meanstd:0.5/-1", "above 0"),
    ("meanstd:1,2/1", "as many"), ("meanstd:nan/1", "finite"), ("meanstd:1/inf", "finite"),
])
def test_parse_refuses_bad_text_in_one_sentence_naming_the_option(text, words):
    with pytest.raises(UserError) as e:
        normalize.parse(text, "--vgg-input")
    msg = str(e.value)
    assert msg.startswith("--vgg-input ") and words in msg and "\n" not in msg, msg


def test_parse_checks_the_channel_count_when_given():
    with pytest.raises(UserError, match=r"^--unet-input 'imagenet' gives 3 means .* 1-channel input"):
        normalize.parse("imagenet", "--unet-input", 1)
    with pytest.raises(UserError, match=r"^--unet-input 'meanstd:1,2,3/1,1,1': .*1-channel input; give 1 value$"):
        normalize.parse("meanstd:1,2,3/1,1,1", "--unet-input", 1)
    assert normalize.parse("meanstd:0.5/0.2", "--vgg-input", 3)["mean"] == [0.5]
    assert normalize.parse("imagenet", "--vgg-input", 3) == IMAGENET


def test_input_section_is_the_whole_declared_input_and_checks_the_channel_count():
    sec = normalize.input_section("image", 3, S, IMAGENET)
    assert sec == {"name": "image", "shape": ["N", 3, S, S], "dtype": "float32", "num_channels": 3,
                   "value_range": [round((0 - 0.485) / 0.229, 6), round((1 - 0.406) / 0.225, 6)],
                   "normalization": IMAGENET}
    assert normalize.input_section("image", 1, S, None)["normalization"] == UNIT
    assert normalize.input_section("image", 1, S, MINMAX)["value_range"] == [0.0, 1.0]
    with pytest.raises(UserError, match="3 values per list for a 1-channel input"):
        normalize.input_section("image", 1, S, IMAGENET)


def test_the_train_command_refuses_a_bad_normalization_in_one_sentence(tmp_path):
    r = sonoscore("train", "--data", tmp_path / "nothing", "--out", tmp_path / "b", "--vgg-input", "meanstd:0.5",
                  timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--vgg-input 'meanstd:0.5'" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()
    r = sonoscore("train", "--data", tmp_path / "nothing", "--out", tmp_path / "b", "--unet-input", "imagenet",
                  timeout=120)
    assert r.returncode == 2 and "--unet-input 'imagenet'" in r.stderr and "Traceback" not in r.stderr, r.stderr


# -------------------------------------------------------------------------------------- the one definition


def test_minmax_of_a_constant_image_is_all_zeros_and_of_two_levels_zero_and_one():
    import torch
    for value in (0, 7, 255):
        flat = np.full((5, 6), value, np.uint8)
        x = normalize.to_input(flat, 3, MINMAX)
        assert x.shape == (1, 3, 5, 6) and x.dtype == np.float32 and not x.any() and np.isfinite(x).all()
        t = normalize.torch_transform(MINMAX)(torch.from_numpy(pp.to_input(flat, 3)))
        assert not t.any() and torch.isfinite(t).all()
    two = np.array([[3, 200], [200, 3]], np.uint8)
    assert np.array_equal(normalize.to_input(two, 1, MINMAX)[0, 0], [[0, 1], [1, 0]])
    # per image, not per batch: the flat image of a batch stays zero beside a two-level one
    batch = np.stack([np.full((2, 2), 9, np.uint8), two])
    out = normalize.to_input(batch, 1, MINMAX)
    assert not out[0].any() and np.array_equal(out[1, 0], [[0, 1], [1, 0]])


def test_a_manifest_without_normalization_feeds_exactly_what_it_fed_before(images):
    """An old bundle (no `normalization`): unit, bit for bit today's runtime.preprocess.to_input, on every path."""
    manifest = {"networks": {"unet": {"input": {"name": "x"}, "output": {"name": "p"}},
                             "vgg": {"input": {"name": "y"}, "output": {"name": "f"}, "channels": 3}}}
    g = Graph.from_manifest(manifest)
    assert g.unet_normalization == UNIT and g.vgg_normalization == UNIT
    mask = blob_mask()
    for img in images:
        assert np.array_equal(g.unet_feeds(img)["x"], pp.to_input(img, 1))
        assert np.array_equal(g.vgg_feeds(img, mask)["y"], pp.to_input(masked(img, mask), 3))
    from runtime.gpu import kernels as K
    for dtype in (np.float32, np.float16):
        assert np.array_equal(K.input_table(dtype), pp.to_input(np.arange(256, dtype=np.uint8)[None], 1, dtype)
                              .reshape(256))


@pytest.mark.parametrize("case", list(CASES))
def test_training_transform_and_runtime_input_are_the_same_bits_on_real_frames(images, case):
    """export/train.py's batches (uint8 * 1/255, torch_transform) equal runtime.normalize.to_input bit for bit."""
    from export import train
    unet_norm, vgg_norm = CASES[case]
    mask = blob_mask()
    masked_images = np.stack([masked(i, mask) for i in images])
    idx = np.arange(len(images))
    x_unet = train._batch(images, idx, 1, normalization=unet_norm).numpy()
    x_vgg = train._batch(masked_images, idx, 3, normalization=vgg_norm).numpy()
    assert np.array_equal(x_unet, normalize.to_input(images, 1, unet_norm))
    assert np.array_equal(x_vgg, normalize.to_input(masked_images, 3, vgg_norm))
    g = Graph(vgg_channels=3, unet_normalization=unet_norm, vgg_normalization=vgg_norm)
    for k, img in enumerate(images):
        assert np.array_equal(g.unet_feeds(img)[g.unet_input], x_unet[k:k + 1])
        assert np.array_equal(g.vgg_feeds(img, mask)[g.vgg_input], x_vgg[k:k + 1])


def test_meanstd_is_per_channel_and_one_value_serves_every_channel():
    img = np.array([[0, 255]], np.uint8)
    x = normalize.to_input(img, 3, {"kind": "meanstd", "mean": [0, 0.5, 1], "std": [1, 0.5, 0.25]})
    assert np.allclose(x[0, :, 0], [[0, 1], [-1, 1], [-4, 0]])
    one = normalize.to_input(img, 3, {"kind": "meanstd", "mean": [0.5], "std": [0.5]})
    assert np.allclose(one[0, :, 0], [[-1, 1]] * 3)


# -------------------------------------------------------------------------------------------- the manifest


def _manifest(unet_input: dict, vgg_input: dict, vgg_channels: int = 3) -> dict:
    net = {"files": {"fp32": "n.onnx"}}
    return {"schema": 1, "classes": ["a", "b", "c", "d"], "preprocess": {}, "gate": {}, "files": {},
            "booster": {"file": "b.ubj", "num_class": 4},
            "networks": {"unet": dict(net, input=unet_input, output={"name": "mask"}, channels=1),
                         "vgg": dict(net, input=vgg_input, output={"name": "features"}, channels=vgg_channels)}}


def test_the_schema_takes_each_declared_normalization():
    for unet_norm, vgg_norm in CASES.values():
        validate_manifest(_manifest(normalize.input_section("image", 1, S, unet_norm),
                                    normalize.input_section("image", 3, S, vgg_norm)), Path("manifest.json"))
    validate_manifest(_manifest({"name": "image"}, {"name": "image"}), Path("manifest.json"))   # old: no field


@pytest.mark.parametrize("norm,words", [
    ({"kind": "zscore"}, "'networks.vgg.input.normalization.kind'"),
    ({"mean": [0.5], "std": [0.5]}, "'networks.vgg.input.normalization.kind' is missing"),
    ({"kind": "meanstd", "mean": [0.5]}, "'networks.vgg.input.normalization.std' is missing"),
    ({"kind": "meanstd", "mean": [0.5], "std": [0]}, "'networks.vgg.input.normalization.std.0'"),
    ({"kind": "meanstd", "mean": [0.5], "std": [-0.1]}, "'networks.vgg.input.normalization.std.0'"),
    ({"kind": "meanstd", "mean": ["a"], "std": [1]}, "'networks.vgg.input.normalization.mean.0'"),
    ({"kind": "meanstd", "mean": [], "std": [1]}, "'networks.vgg.input.normalization.mean' [] should be non-empty"),
    ({"kind": "meanstd", "mean": [0.1, 0.2], "std": [1, 1]}, "2 values per list for a 3-channel input"),
    ({"kind": "meanstd", "mean": [0.1, 0.2, 0.3], "std": [1]}, "3 mean value(s) but 1 std"),
    ("unit", "'networks.vgg.input.normalization'"),
])
def test_the_schema_refuses_a_bad_normalization_object_in_one_sentence(norm, words):
    with pytest.raises(BundleError) as e:
        validate_manifest(_manifest({"name": "image"}, {"name": "image", "normalization": norm}),
                          Path("b/manifest.json"))
    msg = str(e.value)
    assert words in msg and msg.startswith("b/manifest.json") and "\n" not in msg, msg


def test_a_three_value_meanstd_on_the_one_channel_unet_is_refused():
    with pytest.raises(BundleError, match="networks.unet.input.normalization.*1-channel"):
        validate_manifest(_manifest({"name": "image", "normalization": IMAGENET}, {"name": "image"}),
                          Path("manifest.json"))


# ----------------------------------------------------------------- the GPU kernels, on the CPU side (g++ harness)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from tests.gpu_harness import host
    if host.compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) to build the host harness")
    return host.build(tmp_path_factory.mktemp("harness"))


def test_float_to_half_is_numpys_round_to_nearest_even(harness):
    """sono_float_to_half (the minmax kernel's float16 store) against numpy's astype(float16): every float32 whose
    low 13 bits are a rounding-critical pattern, over all sign/exponent/high-mantissa combinations."""
    high = np.arange(1 << 19, dtype=np.uint32) << 13
    lows = np.array([0, 1, 0x7ff, 0x800, 0xfff, 0x1000, 0x1001, 0x17ff, 0x1800, 0x1fff], np.uint32)
    bits = (high[:, None] | lows[None, :]).ravel()
    values = bits.view(np.float32)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    out = harness.float_to_half(values)
    nan = np.isnan(values)
    assert np.array_equal(np.isnan(out.view(np.float16)), nan)
    bad = np.flatnonzero(out[~nan] != expected[~nan])
    assert bad.size == 0, f"{bad.size} values differ, e.g. {values[~nan][bad[:3]]}"


@pytest.mark.parametrize("channels,dtype", [(1, np.float32), (3, np.float32), (1, np.float16), (3, np.float16)])
def test_minmax_kernel_is_to_input_bit_for_bit_on_real_frames(harness, images, channels, dtype):
    """sono_minmax, its three phases run thread by thread as the barriers order them (the block of 256 threads the
    kernel launches, and odd counts), on images and on images under a mask (the VGG's)."""
    mask = blob_mask()
    for img in images[:4]:
        for m in (None, mask):
            src = img if m is None else masked(img, m)
            expected = normalize.to_input(src, channels, MINMAX).astype(dtype)
            for threads in (256, 1, 7, 1000):
                out = harness.minmax(img, m, channels, dtype, threads)
                assert np.array_equal(out, expected), (threads, m is None)
    flat = harness.minmax(np.full((S, S), 77, np.uint8), None, 3, np.float32)
    assert not flat.any() and np.isfinite(flat).all()


@pytest.mark.parametrize("norm", [UNIT, GRAY_MEANSTD, IMAGENET], ids=["unit", "meanstd1", "imagenet"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gate_writes_the_declared_meanstd_per_channel_through_its_tables(harness, images, norm, dtype):
    rng = np.random.default_rng(4)
    img = images[0]
    prob = rng.random((S, S)).astype(np.float32)
    _, _, vgg = harness.gate(prob, img, 0.5, 3, dtype, normalization=norm)
    expected = normalize.to_input(masked(img, (prob > 0.5).astype(np.uint8)), 3, norm).astype(dtype)
    assert np.array_equal(vgg, expected)


def test_input_tables_are_to_input_of_every_grey_level_per_channel():
    from runtime.gpu import kernels as K
    levels = np.arange(256, dtype=np.uint8)[None]
    t = K.input_table(np.float32, 3, IMAGENET)
    assert t.shape == (3, 256) and np.array_equal(t, normalize.to_input(levels, 3, IMAGENET)[0, :, 0])
    assert K.input_table(np.float16, 1, GRAY_MEANSTD).shape == (256,)
    with pytest.raises(ValueError, match="minmax"):
        K.input_table(np.float32, 1, MINMAX)


def _gpu_kernels(fake, module=None, **kw):
    from runtime.gpu import kernels as K
    return (module or K).GpuKernels(cuda=fake, max_frame=(768, 1024, 3), **kw)


def check_gpu_kernels(fake, images, unet_norm, vgg_norm, *, dtype=np.float32, module=None):
    """The real GpuKernels (its launches, buffers and tables) on the pycuda stand-in: the UNet input after
    preprocess and the VGG input after the gate are runtime.normalize.to_input of the image and masked image."""
    k = _gpu_kernels(fake, module, vgg_channels=3, input_dtype=dtype, vgg_dtype=dtype,
                     unet_normalization=unet_norm, vgg_normalization=vgg_norm)
    rng = np.random.default_rng(2)
    for img in images[:3]:
        k.preprocess(img, None)
        image = k.download_image()
        assert np.array_equal(k.download_unet_input(), normalize.to_input(image, 1, unet_norm).astype(dtype))
        prob = fake.device_array((rng.random((1, 1, S, S)) * 1.2).astype(np.float32))
        k.gate(int(prob))
        mask = k.download_mask()
        assert np.array_equal(k.download_vgg_input(),
                              normalize.to_input(masked(image, mask), 3, vgg_norm).astype(dtype))
    return k


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_kernels_feed_each_network_its_declared_input(harness, images, case, dtype):
    from tests.gpu_harness import fake_cuda
    fake = fake_cuda.FakeCuda(harness)
    check_gpu_kernels(fake, images, *CASES[case], dtype=dtype)
    minmax_launches = [a for name, _, _, _, a in fake.launches if name == "sono_minmax"]
    assert len(minmax_launches) == (6 if case == "minmax" else 0)   # 3 frames: UNet's after Crimmins, VGG's after gate
    crimmins = [a for name, _, _, _, a in fake.launches if name == "sono_crimmins"]
    assert all((a[5] == 0) == (case == "minmax") for a in crimmins), "the last Crimmins writes a table input only"


def test_gpu_kernels_refuse_a_normalization_that_does_not_fit_the_channels(harness):
    from tests.gpu_harness import fake_cuda
    with pytest.raises(ValueError, match="bad GpuKernels settings.*1-channel"):
        _gpu_kernels(fake_cuda.FakeCuda(harness), unet_normalization=IMAGENET)


MUTANTS = {  # the checks above fail on a GpuKernels that gets the normalization wrong
    "VGG minmax of the unmasked image": ("self._minmax_input(self.image, self.mask, self.vgg_input",
                                         "self._minmax_input(self.image, 0, self.vgg_input", (MINMAX, MINMAX)),
    "UNet minmax not launched": ("        if self._unet_minmax:\n            self._minmax_input",
                                 "        if False:\n            self._minmax_input", (MINMAX, UNIT)),
    "unit tables for the VGG's meanstd": ("else self.vgg_normalization))", "else None))", (UNIT, IMAGENET)),
    "unit tables for the UNet's meanstd": ("else self.unet_normalization))", "else None))", (GRAY_MEANSTD, UNIT)),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_the_kernel_checks_catch_a_broken_normalization(harness, images, monkeypatch, name):
    from runtime.gpu import kernels as K
    from tests.gpu_harness import fake_cuda
    old, new, (unet_norm, vgg_norm) = MUTANTS[name]
    source = Path(K.__file__).read_text()
    assert source.count(old) == 1, f"the mutation target is not unique in kernels.py: {old!r}"
    module = types.ModuleType("runtime.gpu._kernels_normalize_mutant")
    module.__file__ = K.__file__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source.replace(old, new), "<mutant>", "exec"), module.__dict__)
    check_gpu_kernels(fake_cuda.FakeCuda(harness), images, unet_norm, vgg_norm)      # the real code passes
    with pytest.raises((AssertionError, fake_cuda.FakeCudaError, ValueError)):
        check_gpu_kernels(fake_cuda.FakeCuda(harness), images, unet_norm, vgg_norm, module=module)


def test_the_minmax_kernel_compiles_for_the_gpus_without_spills(tmp_path):
    import subprocess
    from runtime.gpu import kernels as K
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    src = tmp_path / "k.cu"
    src.write_text(K.kernel_source())
    done = subprocess.run([nvcc, "-cubin", "-arch=sm_87", "-Xptxas", "-v", "-Werror", "all-warnings", "-o",
                           str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    part = log[log.index("entry function 'sono_minmax'"):]
    assert " 0 bytes spill stores, 0 bytes spill loads" in part.split("entry function", 2)[1]


# --------------------------------------- acceptance: trained with each normalization, exported, scored the same


def _train_and_export(tmp: Path, images: np.ndarray, case: str):
    """Tiny UNet and VGG trained by export/train.py with the case's normalizations on real frames, saved as
    checkpoints, exported by `sonoscore export --unet-input --vgg-input` with an XGBoost model."""
    import torch
    import xgboost as xgb
    from export import train
    unet_norm, vgg_norm = CASES[case]
    masks = np.stack([blob_mask(cy=0.45 + 0.02 * i) for i in range(len(images))])
    masked_images = np.stack([masked(i, m) for i, m in zip(images, masks)])
    grades = np.arange(len(images)) % 4
    unet, _ = train.train_unet(images, masks, width=1 / 16, epochs=1, batch_size=3, seed=1, progress=False,
                               normalization=unet_norm)
    vgg, _ = train.train_vgg(masked_images, grades, width=1 / 32, in_channels=3, epochs=1, batch_size=3, seed=1,
                             progress=False, normalization=vgg_norm)
    torch.save(unet.state_dict(), tmp / "unet.pt")
    torch.save(vgg.state_dict(), tmp / "vgg.pt")
    rng = np.random.default_rng(0)
    booster = xgb.train({"objective": "multi:softprob", "num_class": 4, "nthread": 1},
                        xgb.DMatrix(rng.random((16, vgg.features_dim)), label=np.arange(16) % 4), 2)
    booster.save_model(str(tmp / "booster.json"))
    unet_text, vgg_text = CLI_TEXT[case]
    r = sonoscore("export", "--unet", tmp / "unet.pt", "--vgg", tmp / "vgg.pt", "--booster", tmp / "booster.json",
                  "--unet-input", unet_text, "--vgg-input", vgg_text, "--out", tmp / "bundle")
    assert r.returncode == 0, r.stderr
    return unet, vgg, tmp / "bundle"


@pytest.mark.parametrize("case", list(CASES))
def test_a_model_trained_with_each_normalization_scores_real_frames_as_its_training_code(tmp_path, images, case):
    import torch
    from export import train
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle
    unet_norm, vgg_norm = CASES[case]
    unet, vgg, path = _train_and_export(tmp_path, images, case)
    bundle = Bundle.load(path)
    nets = bundle.manifest["networks"]
    assert nets["unet"]["input"]["normalization"] == unet_norm and nets["vgg"]["input"]["normalization"] == vgg_norm
    assert nets["vgg"]["input"]["num_channels"] == 3
    g = bundle.graph()
    assert (g.unet_normalization, g.vgg_normalization) == (unet_norm, vgg_norm)
    wrong = UNIT if case != "unit" else MINMAX
    worst, worst_wrong = {"unet": 0.0, "vgg": 0.0}, 0.0
    with OrtRunner(bundle.network_file("unet", "fp32")) as un, OrtRunner(bundle.network_file("vgg", "fp32")) as vg, \
            torch.inference_mode():
        for k, img in enumerate(images):
            # the runtime: the manifest's graph feeds the exported networks
            feeds = g.unet_feeds(img)
            prob = un.infer(feeds, [g.unet_output])[g.unet_output]
            mask = g.gate(prob[0, 0]).mask if g.gate(prob[0, 0]).accepted else blob_mask()
            vfeeds = g.vgg_feeds(img, mask)
            feats = g.infer_features(vg, vfeeds)
            # the training code: its own batches into the torch models it trained
            x = train._batch(img[None], np.array([0]), 1, normalization=unet_norm)
            mi = masked(img, mask)[None]
            xv = train._batch(mi, np.array([0]), 3, normalization=vgg_norm)
            assert np.array_equal(feeds[g.unet_input], x.numpy()) and np.array_equal(vfeeds[g.vgg_input], xv.numpy())
            worst["unet"] = max(worst["unet"], float(np.abs(prob - unet(x).numpy()).max()))
            torch_feats = vgg.forward_features(xv).numpy()
            worst["vgg"] = max(worst["vgg"], float(np.abs(feats - torch_feats).max() / (np.abs(torch_feats).max() + 1)))
            wrong_feats = g.infer_features(vg, {g.vgg_input: normalize.to_input(mi, 3, wrong)})
            worst_wrong = max(worst_wrong,
                              float(np.abs(wrong_feats - torch_feats).max() / (np.abs(torch_feats).max() + 1)))
    assert worst["unet"] <= 1e-4 and worst["vgg"] <= 1e-4, worst
    assert worst_wrong > 100 * max(worst["vgg"], 1e-6), "the check cannot tell a wrong normalization apart"
    # and the whole CPU pipeline scores the frames with no error
    from runtime.pipeline import Pipeline
    from runtime.sources import Frame
    with Pipeline(bundle) as pipe:
        recs = [pipe.process(Frame(i, "test", 0.0, img)) for i, img in enumerate(images)]
    assert all(r.error is None for r in recs)


# ----------------------------------- `sonoscore train --unet-input --vgg-input`: recorded; the baseline and INT8 follow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("norm") / "bundle"
    r = sonoscore("train", "--data", tiny_dataset, "--out", out, "--unet-width", 0.0625, "--vgg-width", 0.03125,
                  "--unet-epochs", 1, "--vgg-epochs", 1, "--unet-input", "minmax", "--vgg-input", "imagenet")
    assert r.returncode == 0, r.stderr
    return out


def test_train_records_each_networks_input_in_the_manifest(trained):
    manifest = json.loads((trained / "manifest.json").read_text())
    unet, vgg = manifest["networks"]["unet"]["input"], manifest["networks"]["vgg"]["input"]
    assert unet["normalization"] == MINMAX and unet["value_range"] == [0.0, 1.0] and unet["num_channels"] == 1
    assert vgg["normalization"] == IMAGENET and vgg["num_channels"] == 3 and vgg["value_range"][0] < -2


def test_the_torch_baseline_feeds_the_declared_inputs_like_the_runtime(trained, images):
    from export.baseline import TorchBaseline
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.sources import Frame
    bundle = Bundle.load(trained)
    frames = [Frame(i, "test", 0.0, img) for i, img in enumerate(images)]
    with Pipeline(bundle, min_mask_fraction=0.0) as cpu, TorchBaseline(bundle, device="cpu",
                                                                       min_mask_fraction=0.0) as team:
        for f in frames:
            a, b = cpu.process(f), team.process(f)
            assert a.error is None and b.error is None
            assert np.allclose(a.probabilities, b.probabilities, atol=1e-4), (a.probabilities, b.probabilities)


def test_calibration_quantizes_the_vgg_on_its_declared_input_range(trained, tmp_path):
    """INT8 calibration feeds the networks what the graph feeds them: the VGG's ImageNet mean/std input reaches
    about -2.1 (masked background) where a unit input stays in [0, 1], and the input's quantization scale says so.
    The gate is opened (min_mask_fraction 0, manifest rewritten by the bundle machinery) so that every calibration
    frame reaches the VGG whatever the tiny UNet learned."""
    import onnx
    from onnx import numpy_helper
    from runtime.bundle import write_manifest
    b = tmp_path / "b"
    shutil.copytree(trained, b)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["gate"]["min_mask_fraction"] = 0.0
    write_manifest(b, manifest)
    r = sonoscore("calibrate", "--bundle", b, "--frames", "sim://kidney?fps=0&frames=16&seed=3", "--count", 6,
                  "--holdout", 4, "--networks", "vgg", "--timing-only", "--method", "minmax")
    assert r.returncode == 0, r.stderr
    model = onnx.load(str(b / "vgg.int8.onnx"))
    graph_input = model.graph.input[0].name
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == graph_input)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scale = float(inits[q.input[1]]) if q.input[1] in inits else None
    assert scale is not None and scale * 127 > 1.5, scale   # a unit input: at most 1 / 127


def test_the_device_pipeline_hands_the_declared_inputs_to_its_kernels(trained, images):
    """DevicePipeline gives the kernels the manifest's normalizations (on the host stand-ins of
    tests/test_gpu_pipeline.py, whose kernels apply what they are given): the same features as the CPU pipeline."""
    from runtime.bundle import Bundle
    from runtime.gpu.pipeline import DevicePipeline
    from runtime.pipeline import Pipeline
    from runtime.sources import Frame
    from tests.test_gpu_pipeline import HostDevice, HostKernels
    bundle = Bundle.load(trained)
    with Pipeline(bundle, threads=1, min_mask_fraction=0.0) as cpu, \
            DevicePipeline(bundle, _device=HostDevice, _kernels=HostKernels, min_mask_fraction=0.0) as dev:
        assert (HostKernels.last.unet_normalization, HostKernels.last.vgg_normalization) == (MINMAX, IMAGENET)
        for i, img in enumerate(images):
            a, b = dev.process(Frame(i, "test", 0.0, img)), cpu.process(Frame(i, "test", 0.0, img))
            assert a.error is None and b.error is None
            assert np.array_equal(dev.features[0], cpu.graph.features(cpu.vgg, b.image, b.mask)[0])
            assert np.abs(np.subtract(a.probabilities, b.probabilities)).max() < 1e-6
