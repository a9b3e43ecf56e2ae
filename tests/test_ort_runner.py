"""The onnxruntime runner on a small real model: metadata by name, dynamic batch, numbers, and one-sentence errors
for every way a caller can get the feeds wrong. Also the backend registry that `sonoscore doctor` prints, and the
base runner (runtime.backends.base.BaseRunner) whose guard and checks every runner uses: on a tiny runner of its
own (`Toy`, which records what reaches the backend) and through OrtRunner on the real model."""
import importlib.util
import os

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from runtime.backends import BackendUnavailable, TensorMeta, available_backends, make_runner  # noqa: E402
from runtime.backends.base import BaseRunner  # noqa: E402
from runtime.backends.ort import OrtRunner  # noqa: E402
from tests.conftest import cuda_or_skip  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """mask = sigmoid(image * gain), mean = mean of image over C, H, W (per batch item); batch is dynamic."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "gain"], ["scaled"]),
         helper.make_node("Sigmoid", ["scaled"], ["mask"]),
         helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 8, 8]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(m, str(path))
    return path


def feeds(batch=1, dtype=np.float32, seed=0):
    x = np.random.default_rng(seed).normal(size=(batch, 1, 8, 8)).astype(dtype)
    return {"image": x, "gain": np.array([2.0], dtype)}


def expected(f):
    x, g = f["image"].astype(np.float32), f["gain"].astype(np.float32)
    return 1 / (1 + np.exp(-x * g)), x.mean(axis=(1, 2, 3))


def test_metadata_names_shapes_dtypes_and_providers(model):
    with OrtRunner(model) as r:
        assert r.inputs == {"image": TensorMeta(("batch", 1, 8, 8), np.dtype(np.float32)),
                            "gain": TensorMeta((1,), np.dtype(np.float32))}
        assert r.outputs == {"mask": TensorMeta(("batch", 1, 8, 8), np.dtype(np.float32)),
                             "mean": TensorMeta(("batch",), np.dtype(np.float32))}
        assert r.providers == ["CPUExecutionProvider"]
        assert r.intra_op_threads == os.cpu_count()
        assert str(r.inputs["image"]) == "float32[batch, 1, 8, 8]"


@pytest.mark.parametrize("batch", [1, 3])
def test_infer_matches_numpy_for_any_batch(model, batch):
    f = feeds(batch)
    mask, mean = expected(f)
    with OrtRunner(model, intra_op_threads=1) as r:
        out = r.infer(f)
    assert set(out) == {"mask", "mean"}
    assert out["mask"].shape == (batch, 1, 8, 8) and out["mean"].shape == (batch,)
    assert np.abs(out["mask"] - mask).max() < 1e-6
    assert np.abs(out["mean"] - mean).max() < 1e-6


def test_infer_returns_only_the_outputs_asked_for(model):
    with make_runner("ort", model, intra_op_threads=1) as r:
        out = r.infer(feeds(), ["mean"])
    assert list(out) == ["mean"]
    assert abs(out["mean"][0] - expected(feeds())[1][0]) < 1e-6


def test_float64_feeds_are_cast_to_the_float32_the_model_wants(model):
    with OrtRunner(model, intra_op_threads=1) as r:
        a = r.infer(feeds(2, np.float64))["mask"]
        b = r.infer(feeds(2, np.float32))["mask"]
    assert a.dtype == np.float32 and np.array_equal(a, b)


def test_feed_mistakes_are_one_sentence_errors_naming_the_tensor(model):
    with OrtRunner(model, intra_op_threads=1) as r:
        with pytest.raises(ValueError, match=r"model 'tiny.onnx' has no input 'imgae'; its inputs are 'image'"):
            r.infer({"imgae": feeds()["image"], "gain": feeds()["gain"]})
        with pytest.raises(ValueError, match=r"input 'gain' of model 'tiny.onnx' is missing from the feeds"):
            r.infer({"image": feeds()["image"]})
        with pytest.raises(ValueError, match=r"has no output 'logits'; its outputs are 'mask'"):
            r.infer(feeds(), ["logits"])
        with pytest.raises(TypeError, match=r"input 'image' of model 'tiny.onnx' must be float32, got uint8"):
            r.infer({"image": np.zeros((1, 1, 8, 8), np.uint8), "gain": feeds()["gain"]})
        with pytest.raises(ValueError, match=r"input 'image' .* has shape \(1, 8, 8\), but the model takes "
                                             r"float32\[batch, 1, 8, 8\]"):
            r.infer({"image": np.zeros((1, 8, 8), np.float32), "gain": feeds()["gain"]})
        with pytest.raises(ValueError, match=r"has shape \(1, 1, 16, 16\)"):
            r.infer({"image": np.zeros((1, 1, 16, 16), np.float32), "gain": feeds()["gain"]})


def test_the_session_lives_only_inside_the_context(model):
    r = OrtRunner(model)
    with pytest.raises(RuntimeError, match="not active; use it inside `with OrtRunner"):
        r.infer(feeds())
    with r:
        r.infer(feeds())
        with pytest.raises(RuntimeError, match="already active"):
            r.__enter__()
    with pytest.raises(RuntimeError, match="not active"):
        r.inputs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OrtRunner(model.parent / "missing.onnx").__enter__()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_on_a_cpu_only_onnxruntime_is_one_clear_sentence(model):
    with pytest.raises(BackendUnavailable, match=r"execution provider 'cuda' is not available in the installed "
                                                 r"onnxruntime .*onnxruntime-gpu"):
        OrtRunner(model, providers=["cuda"])
    with pytest.raises(BackendUnavailable, match="CUDA graphs .* need the CUDA execution provider"):
        OrtRunner(model, cuda_graphs=True)
    with pytest.raises(BackendUnavailable, match="'warp' is not available"):
        OrtRunner(model, providers=["warp"])


def test_make_runner_and_available_backends_say_what_runs_here(model):
    assert isinstance(make_runner("ort", model), OrtRunner)
    if importlib.util.find_spec("runtime.backends.trt") is None:
        with pytest.raises(BackendUnavailable, match=r"the TensorRT backend needs TensorRT's Python bindings "
                                                     r"\(from JetPack or NVIDIA's package index\) and is not "
                                                     r"available in this install"):
            make_runner("trt", model)
    with pytest.raises(BackendUnavailable, match="backend 'tvm' is unknown; use one of ort, trt"):
        make_runner("tvm", model)
    report = available_backends()
    assert report["ort"] == "ok" and report["ort:CPUExecutionProvider"] == "ok"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert report["ort:CUDAExecutionProvider"].startswith("not in this onnxruntime")
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT" in report["trt"] and report["trt"] != "ok"


# -- infer_device: device addresses in, outputs left where they were computed ------------------------------------
# On the CPU provider the "device" is the host: the same IO binding calls run on host addresses, so the bookkeeping
# (names, shapes, runner-owned and caller buffers, pinned dims) is tested here; what needs CUDA is further down.

def host_tensor(t) -> np.ndarray:
    from runtime.gpu.pipeline import host_view
    return host_view(t.ptr, t.shape, t.dtype).copy()


def test_infer_device_on_host_addresses_computes_what_infer_computes(model):
    f = feeds(2, seed=3)
    with OrtRunner(model, intra_op_threads=1) as r:
        out = r.infer_device({"image": f["image"].ctypes.data, "gain": f["gain"].ctypes.data},
                             shapes={"image": (2, 1, 8, 8)})
        got = {name: host_tensor(t) for name, t in out.items()}   # runner-owned: valid while the runner is
        ref = r.infer(f)
    assert set(out) == {"mask", "mean"}
    assert out["mask"].shape == (2, 1, 8, 8) and out["mask"].dtype == np.float32 and out["mean"].shape == (2,)
    assert out["mask"].nbytes == 2 * 64 * 4
    assert np.array_equal(got["mask"], ref["mask"])
    assert np.array_equal(got["mean"], ref["mean"])


def test_infer_device_writes_into_caller_buffers_and_reuses_its_own(model):
    f = feeds(1, seed=4)
    mine = np.full((1,), -7.0, np.float32)
    with OrtRunner(model, intra_op_threads=1, dims={"batch": 1}) as r:
        addr = {"image": f["image"].ctypes.data, "gain": f["gain"].ctypes.data}
        a = r.infer_device(addr, outputs={"mean": mine.ctypes.data})
        assert a["mean"].ptr == mine.ctypes.data
        assert mine[0] == pytest.approx(float(f["image"].mean()), abs=1e-6)
        f["image"][...] = 0.0            # new contents at the same address
        b = r.infer_device(addr)
        assert b["mask"].ptr == a["mask"].ptr   # the runner's buffer, made once
        assert np.allclose(host_tensor(b["mask"]), 0.5) and host_tensor(b["mean"])[0] == 0.0
        assert mine[0] != 0.0            # the caller's buffer is left alone when not passed again


def test_dims_pin_symbolic_dimensions_for_the_session(model):
    with OrtRunner(model, intra_op_threads=1, dims={"batch": 1}) as r:
        assert r.inputs["image"].shape == (1, 1, 8, 8)
        assert r.outputs["mean"].shape == (1,)
        with pytest.raises(ValueError, match=r"has shape \(2, 1, 8, 8\), but the model takes float32\[1, 1, 8, 8\]"):
            r.infer(feeds(2))


def test_infer_device_mistakes_are_one_sentence_errors(model):
    f = feeds(1)
    addr = {"image": f["image"].ctypes.data, "gain": f["gain"].ctypes.data}
    with OrtRunner(model, intra_op_threads=1) as r:
        with pytest.raises(ValueError, match=r"input 'image' of 'tiny.onnx' is float32\[batch, 1, 8, 8\]: give its "
                                             r"shape in shapes="):
            r.infer_device(addr)
        with pytest.raises(ValueError, match=r"input\(s\) gain of model 'tiny.onnx' are missing"):
            r.infer_device({"image": addr["image"]}, shapes={"image": (1, 1, 8, 8)})
        with pytest.raises(ValueError, match=r"model 'tiny.onnx' has no input 'imgae'"):
            r.infer_device({**addr, "imgae": 1}, shapes={"image": (1, 1, 8, 8)})
        with pytest.raises(ValueError, match=r"has no output 'logits'"):
            r.infer_device(addr, shapes={"image": (1, 1, 8, 8)}, outputs={"logits": 1})
        with pytest.raises(ValueError, match=r"input 'image' of model 'tiny.onnx' has shape \(1, 1, 9, 8\)"):
            r.infer_device(addr, shapes={"image": (1, 1, 9, 8)})
        with pytest.raises(ValueError, match=r"input 'gain' of model 'tiny.onnx' was given address 0"):
            r.infer_device({**addr, "gain": 0}, shapes={"image": (1, 1, 8, 8)})
        with pytest.raises(ValueError, match=r"computes on onnxruntime's own stream, which is fixed when the "
                                             r"session is made; make the runner with stream="):
            r.infer_device(addr, shapes={"image": (1, 1, 8, 8)}, stream=0x1234)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_a_cuda_stream_without_the_cuda_provider_is_refused(model):
    with pytest.raises(BackendUnavailable, match=r"a CUDA stream for 'tiny.onnx' needs the CUDA execution provider"):
        OrtRunner(model, stream=0x1234)


# -- BaseRunner: the guard and the checks, once for every backend ------------------------------------------------

class Toy(BaseRunner):
    """The smallest runner: y = x + 1 on a (n, 2) float32 input. Records every call reaching an *_impl method, so
    a test sees whether the shared checks stopped a bad call before the backend."""

    def __init__(self, fail_activate=False):
        super().__init__("toy.onnx")
        self.fail_activate = fail_activate
        self.calls: list[tuple] = []

    def activate_impl(self):
        self.calls.append(("activate",))
        self._inputs = {"x": TensorMeta(("n", 2), np.dtype(np.float32))}
        self._outputs = {"y": TensorMeta(("n", 2), np.dtype(np.float32)), "n": TensorMeta((), np.dtype(np.int64))}
        if self.fail_activate:
            raise OSError("the model would not load")

    def deactivate_impl(self):
        self.calls.append(("deactivate",))

    def infer_impl(self, arrays, wanted):
        self.calls.append(("infer", {k: (v.dtype, v.flags.c_contiguous) for k, v in arrays.items()}, wanted))
        out = {"y": arrays["x"] + 1, "n": np.int64(len(arrays["x"]))}
        return {k: out[k] for k in wanted}

    def infer_device_impl(self, addresses, shapes, buffers, stream):
        self.calls.append(("infer_device", addresses, shapes, buffers, stream))
        return {}


def test_base_runner_checks_then_calls_the_backend():
    r = Toy()
    with pytest.raises(RuntimeError, match=r"^Toy for 'toy.onnx' is not active; use it inside `with Toy\(...\) as "
                                           r"runner:`$"):
        r.infer({"x": np.zeros((1, 2), np.float32)})
    with pytest.raises(RuntimeError, match="Toy for 'toy.onnx' is not active"):
        r.outputs
    assert r.calls == []
    with r:
        assert r.is_active and r.calls == [("activate",)]
        with pytest.raises(RuntimeError, match=r"^Toy for 'toy.onnx' is already active; enter it once$"):
            r.activate()
        x = np.arange(8, dtype=np.float64).reshape(2, 4)[:, ::2]     # float64, not contiguous
        out = r.infer({"x": x})
        assert r.calls[-1] == ("infer", {"x": (np.dtype(np.float32), True)}, ["y", "n"])   # cast, made contiguous
        assert out["y"].dtype == np.float32 and np.array_equal(out["y"], x + 1) and out["n"] == 2
        assert list(r.infer({"x": x}, ["n"])) == ["n"]
        n_calls = len(r.calls)
        for bad, err in [({"x": x, "z": x}, r"model 'toy.onnx' has no input 'z'; its inputs are 'x' float32\[n, 2\]$"),
                         ({}, "input 'x' of model 'toy.onnx' is missing from the feeds"),
                         ({"x": np.zeros((2, 3), np.float32)}, r"has shape \(2, 3\), but the model takes"),
                         ({"x": np.zeros((2, 2), np.uint8)}, "must be float32, got uint8")]:
            with pytest.raises((ValueError, TypeError), match=err):
                r.infer(bad)
        with pytest.raises(ValueError, match="has no output 'logits'; its outputs are 'y' float32"):
            r.infer({"x": x}, ["logits"])
        assert len(r.calls) == n_calls, "a call the checks refuse must not reach infer_impl"
    assert not r.is_active and r.calls[-1] == ("deactivate",)
    r.deactivate()                                        # nothing to release on an inactive runner
    assert r.calls[-1] == ("deactivate",) and r.calls.count(("deactivate",)) == 1
    with r:                                               # and it may be entered again
        assert r.infer({"x": np.ones((1, 2), np.float32)})["y"][0, 0] == 2


def test_base_runner_infer_device_checks_names_and_shapes_and_passes_the_stream_handle():
    class PycudaLikeStream:
        handle = 0xBEEF

    with Toy() as r:
        r.infer_device({"x": 0x1000}, shapes={"x": (3, 2)}, outputs={"y": 0x2000}, stream=PycudaLikeStream())
        assert r.calls[-1] == ("infer_device", {"x": 0x1000}, {"x": (3, 2)}, {"y": 0x2000}, 0xBEEF)
        r.infer_device({"x": 0x1000}, shapes={"x": None})   # None: as if not given
        assert r.calls[-1] == ("infer_device", {"x": 0x1000}, {}, {}, None)
        n_calls = len(r.calls)
        for kwargs, err in [(dict(inputs={}), r"input\(s\) x of model 'toy.onnx' are missing"),
                            (dict(inputs={"x": 1, "w": 2}), "has no input 'w'"),
                            (dict(inputs={"x": 1}, outputs={"z": 3}), "has no output 'z'"),
                            (dict(inputs={"x": 1}, shapes={"w": (1, 2)}), r"has no input 'w' \(given in shapes=\)"),
                            (dict(inputs={"x": 1}, shapes={"x": (1, 3)}), r"has shape \(1, 3\), but the model "
                                                                          r"takes float32\[n, 2\]")]:
            with pytest.raises(ValueError, match=err):
                r.infer_device(**kwargs)
        assert len(r.calls) == n_calls
    with pytest.raises(RuntimeError, match="not active"):
        r.infer_device({"x": 1})


def test_a_failed_activation_is_undone_and_leaves_the_runner_inactive():
    r = Toy(fail_activate=True)
    with pytest.raises(OSError, match="would not load"):
        r.__enter__()
    assert r.calls == [("activate",), ("deactivate",)] and not r.is_active
    with pytest.raises(RuntimeError, match="not active"):
        r.inputs                                          # the half-filled metadata is gone too
    r.fail_activate = False
    with r:
        assert list(r.inputs) == ["x"]


def test_a_runner_without_a_device_path_says_so():
    class HostOnly(Toy):
        infer_device_impl = BaseRunner.infer_device_impl

    with HostOnly() as r:
        with pytest.raises(BackendUnavailable, match="^HostOnly has no device path; use infer"):
            r.infer_device({"x": 1})


def test_ort_runner_takes_the_guard_and_checks_from_the_base_runner(model):
    assert issubclass(OrtRunner, BaseRunner)
    for name in ("infer", "infer_device", "inputs", "outputs", "__enter__", "__exit__", "activate"):
        assert name not in vars(OrtRunner), f"OrtRunner re-implements {name}; the base runner's is the one"

    class Counting(OrtRunner):
        def infer_impl(self, arrays, wanted):
            self.reached = getattr(self, "reached", 0) + 1
            return super().infer_impl(arrays, wanted)

    r = Counting(model, intra_op_threads=1)
    with pytest.raises(FileNotFoundError):
        Counting(model.parent / "missing.onnx").__enter__()
    with r:
        with pytest.raises(TypeError, match="must be float32, got int32"):
            r.infer({"image": np.zeros((1, 1, 8, 8), np.int32), "gain": feeds()["gain"]})
        assert getattr(r, "reached", 0) == 0              # refused before onnxruntime saw it
        ref = r.infer(feeds(2, seed=1))
        assert r.reached == 1
    with pytest.raises(RuntimeError, match=r"^Counting for 'tiny.onnx' is not active"):
        r.infer(feeds())
    with r:                                               # a new session, the same numbers
        again = r.infer(feeds(2, seed=1))
    assert np.array_equal(ref["mask"], again["mask"]) and np.array_equal(ref["mean"], again["mean"])


def test_ort_infer_device_refuses_shapes_for_unknown_inputs(model):
    f = feeds(1)
    addr = {"image": f["image"].ctypes.data, "gain": f["gain"].ctypes.data}
    with OrtRunner(model, intra_op_threads=1) as r:
        with pytest.raises(ValueError, match=r"model 'tiny.onnx' has no input 'img' \(given in shapes=\); its "
                                             r"inputs are 'image'"):
            r.infer_device(addr, shapes={"image": (1, 1, 8, 8), "img": (1, 1, 8, 8)})
        out = r.infer_device(addr, shapes={"image": (1, 1, 8, 8)})
        assert host_tensor(out["mean"])[0] == pytest.approx(float(f["image"].mean()), abs=1e-6)


# -- on a GPU (onnxruntime-gpu + pycuda; ../shared/device/README.md; device/gpu_session.md) ------------------------

@pytest.fixture()
def cuda_stream():
    """pycuda.driver and a stream of our own on the primary context, made current for the test (the device
    pipeline's CudaDevice, runtime.backends.cuda)."""
    from runtime.backends.cuda import CudaDevice
    cuda = cuda_or_skip()
    dev = CudaDevice(0)
    try:
        with dev.current():
            try:
                yield cuda, dev.stream
            finally:
                dev.synchronize()
    finally:
        dev.close()


def _upload(cuda, stream, a):
    """Device copy of `a`, enqueued on `stream` (from page-locked memory, as async copies need)."""
    host = cuda.pagelocked_empty(a.shape, a.dtype)
    np.copyto(host, a)
    d = cuda.mem_alloc(a.nbytes)
    cuda.memcpy_htod_async(d, host, stream)
    _upload.keep.append(host)   # the copy reads it later; keep it alive until the test ends
    return d


_upload.keep = []


def _download(cuda, stream, t):
    host = cuda.pagelocked_empty(t.shape, t.dtype)
    cuda.memcpy_dtoh_async(host, t.ptr, stream)
    return host


def test_cuda_infer_device_runs_on_our_stream_and_matches_the_cpu(model, cuda_stream):
    cuda, stream = cuda_stream
    f = feeds(1, seed=5)
    with OrtRunner(model, intra_op_threads=1) as cpu:
        ref = cpu.infer(feeds(1, seed=5))
    with OrtRunner(model, providers=["cuda"], stream=stream, dims={"batch": 1}) as r:
        d = {k: _upload(cuda, stream, v) for k, v in f.items()}       # enqueued before, on the same stream
        out = r.infer_device({k: int(v) for k, v in d.items()}, stream=stream)
        got = {k: _download(cuda, stream, t) for k, t in out.items()}   # enqueued after, no host wait between
        stream.synchronize()
    assert np.abs(got["mask"] - ref["mask"]).max() < 1e-5
    assert np.abs(got["mean"] - ref["mean"]).max() < 1e-5


def test_cuda_infer_device_returns_while_the_stream_is_still_busy(model, cuda_stream):
    cuda, stream = cuda_stream
    f = feeds(1, seed=6)
    with OrtRunner(model, providers=["cuda"], stream=stream, dims={"batch": 1}) as r:
        d = {k: _upload(cuda, stream, v) for k, v in f.items()}
        addr = {k: int(v) for k, v in d.items()}
        r.infer_device(addr)
        stream.synchronize()                                  # warm: allocations and algorithm search done
        big = cuda.mem_alloc(256 << 20)
        for _ in range(200):                                  # ~50 GiB of writes: tens of ms of queued work
            cuda.memset_d32_async(big, 0, (256 << 20) // 4, stream)
        r.infer_device(addr)
        busy = not stream.is_done()
        stream.synchronize()
    assert busy, "infer_device waited for the stream: onnxruntime synchronised at the end of the run"


def test_cuda_graphs_replay_new_contents_at_the_first_addresses_and_refuse_others(model, cuda_stream):
    cuda, stream = cuda_stream
    with OrtRunner(model, providers=["cuda"], stream=stream, cuda_graphs=True, dims={"batch": 1}) as r:
        means = []
        host = {k: cuda.pagelocked_empty(v.shape, v.dtype) for k, v in feeds(1).items()}
        d = {k: cuda.mem_alloc(v.nbytes) for k, v in host.items()}
        addr = {k: int(v) for k, v in d.items()}
        for seed in range(4):                                 # run 1 plain, run 2 captured, then replays
            for k, v in feeds(1, seed=seed).items():
                np.copyto(host[k], v)
                cuda.memcpy_htod_async(d[k], host[k], stream)
            out = r.infer_device(addr, stream=stream)
            mean = _download(cuda, stream, out["mean"])
            stream.synchronize()
            means.append(float(mean[0]))
        assert means == pytest.approx([float(feeds(1, seed=s)["image"].mean()) for s in range(4)], abs=1e-5)
        other = cuda.mem_alloc(host["image"].nbytes)
        with pytest.raises(ValueError, match=r"with CUDA graphs the device addresses and shapes of 'tiny.onnx' are "
                                             r"fixed by the first call .* but image changed"):
            r.infer_device({**addr, "image": int(other)})
        with pytest.raises(RuntimeError, match="captured its CUDA graph in infer_device"):
            r.infer(feeds(1))
