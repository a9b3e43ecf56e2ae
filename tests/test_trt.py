"""The trt backend on a machine without TensorRT: what can be run here is run for real.

- importing the backend needs neither TensorRT nor pycuda, and a runner made without them says one sentence;
- the engine cache (runtime.backends.engine_cache): the key changes with every component, stale or damaged entries
  are rejected and rebuilt, concurrent builders in separate processes serialise on the lock and build once
  (the build step is a plain function writing bytes: that is the only stand-in, since building needs TensorRT);
- profile shapes and the TensorRT -> numpy dtype names;
- device/: the self-test end to end on the ort backend, setup.sh (syntax and its dry run), the systemd unit.

What needs TensorRT and a GPU is at the end, skipped here with the reason.
"""
from __future__ import annotations

import ast
import ctypes
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendUnavailable, TensorMeta, make_runner
from runtime.backends import engine_cache as ec
from runtime.backends import trt as trtmod
from runtime.backends import trt_build

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "device"
SHA = "ab" * 32
GPU = ec.GpuInfo("Orin", (8, 7))


def base_key(**change):
    args = dict(onnx_sha256=SHA, trt_version="10.3.0", gpu=GPU, precision="fp16", batch=(1, 1, 1), dims=None,
                dla_core=None, machine="aarch64")
    args.update(change)
    return ec.engine_key(**args)


# -- import behaviour and the one sentence -------------------------------------------------------------------------
def test_import_needs_neither_tensorrt_nor_pycuda():
    code = ("import sys, runtime.backends.trt, runtime.backends.trt_build, runtime.backends.engine_cache; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_runner_without_tensorrt_says_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    model = tmp_path / "unet.onnx"
    model.write_bytes(b"not used")
    for make in (lambda: trtmod.TrtRunner(model), lambda: make_runner("trt", model)):
        with pytest.raises(BackendUnavailable) as e:
            make()
        msg = str(e.value)
        assert msg == ("TensorRT is not installed here: the trt backend runs on a Jetson (JetPack 6.1 or newer) or "
                       "an x86 host with NVIDIA's tensorrt wheel; use --backend ort")
        assert "\n" not in msg


def test_runner_without_pycuda_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # present (never called here)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailable, match=r"^pycuda is not installed here: .*use --backend ort$"):
        trtmod.TrtRunner(tmp_path / "unet.onnx")


def test_broken_tensorrt_install_is_not_called_missing(monkeypatch):
    """A tensorrt that is there but whose libnvinfer does not load gets its own sentence."""
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorrt":
                raise ImportError("libnvinfer.so.10: cannot open shared object file: No such file or directory")
            return None

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    broken = r"^TensorRT's Python bindings are installed but fail to import \(libnvinfer.*use --backend ort$"
    with pytest.raises(BackendUnavailable, match=broken):
        trt_build.import_tensorrt()
    status = trtmod.trt_status()
    assert status["available"] is False and status["tensorrt"] == "installed but fails to import"


def test_trt_status_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    status = trtmod.trt_status()
    assert status["available"] is False
    assert status["tensorrt"] == "not installed"
    assert status["reason"] == trtmod.UNAVAILABLE
    assert "pycuda" in status
    json.dumps(status)  # doctor prints it; it must be plain data


def _fake_tensorrt(monkeypatch, version: str):
    """A tensorrt module that has only a version (nothing else is reached before the checks tested here)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.mark.parametrize("version, too_old", [
    ("8.6.2.3", True), ("8.6.2", True), ("10.2.0.19", True), ("10.3.0.30", False), ("10.3.0", False),
    ("10.16.2", False), ("10.13.0.35", False), ("11.1.0", False), ("11.4.1", False), ("", False), ("unknown", False),
])
def test_tensorrt_older_than_10_3_is_refused(version, too_old):
    msg = trtmod.tensorrt_too_old(version)
    assert (msg is not None) == too_old
    if too_old:
        assert msg.startswith(f"TensorRT {version} is too old for the trt backend, which needs TensorRT 10.3 or newer")
        assert "JetPack 6.1 or newer" in msg and msg.endswith("use --backend ort") and "\n" not in msg


def test_runner_refuses_old_tensorrt_before_anything_else(monkeypatch, tmp_path):
    """JetPack 6.0's TensorRT 8.6: one sentence naming it, before pycuda, the model file or a build is touched."""
    _fake_tensorrt(monkeypatch, "8.6.2.3")
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailable, match=r"^TensorRT 8\.6\.2\.3 is too old .*JetPack 6\.1 or newer"):
        trtmod.TrtRunner(tmp_path / "missing.onnx")


def test_trt_status_says_tensorrt_is_too_old(monkeypatch):
    _fake_tensorrt(monkeypatch, "8.6.2.3")
    status = trtmod.trt_status()
    assert status["available"] is False
    assert status["tensorrt"] == "8.6.2.3 (too old: the trt backend needs 10.3 or newer)"
    assert status["reason"] == trtmod.tensorrt_too_old("8.6.2.3")
    assert "dla_cores" not in status  # no builder is started on a refused TensorRT
    json.dumps(status)


def test_dla_runner_builds_for_its_opt_batch_only(monkeypatch, tmp_path):
    _fake_tensorrt(monkeypatch, "10.3.0.30")
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", types.ModuleType("pycuda.driver"))
    assert trtmod.TrtRunner(tmp_path / "unet.onnx", batch=(1, 2, 8)).batch == (1, 2, 8)
    assert trtmod.TrtRunner(tmp_path / "unet.onnx", batch=(1, 2, 8), dla_core=0).batch == (2, 2, 2)


# -- the backends' layout: base runner, build module apart from the runner, one CUDA helper, no import cycle --------
BACKENDS_DIR = ROOT / "runtime" / "backends"


def test_no_backend_module_imports_its_package():
    """The modules of runtime/backends import each other's modules (base above all), never the package, whose
    __init__ is the registry that imports them lazily: so there is no import cycle between them."""
    bad = []
    for path in sorted(BACKENDS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        nodes = tree.body if path.name == "__init__.py" else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else [f"<relative {node.module}>"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if path.name == "__init__.py":   # at module level, the registry imports base and nothing else of ours
                    if name.startswith("runtime.backends.") and name != "runtime.backends.base":
                        bad.append(f"{path.name}: {name}")
                elif name == "runtime.backends" or name.startswith("<relative"):
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad
    code = ("import sys, runtime.backends; "
            "print(sorted(m for m in sys.modules if m.startswith('runtime.backends.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["['runtime.backends.base']"]


def test_trt_runner_takes_the_guard_and_checks_from_the_base_runner(monkeypatch, tmp_path):
    from runtime.backends.base import BaseRunner
    assert issubclass(trtmod.TrtRunner, BaseRunner)
    for name in ("infer", "infer_device", "inputs", "outputs", "__enter__", "__exit__", "activate"):
        assert name not in vars(trtmod.TrtRunner), f"TrtRunner re-implements {name}; the base runner's is the one"
    source = Path(trtmod.__file__).read_text()
    for building in ("build_serialized_network", "create_builder_config", "OnnxParser", "set_timing_cache"):
        assert building not in source, f"trt.py builds engines ({building}); runtime.backends.trt_build does that"
    assert "retain_primary_context" not in source and ".push()" not in source   # the CUDA helper's job
    _fake_tensorrt(monkeypatch, "10.3.0.30")
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", FakeDriver())
    r = trtmod.TrtRunner(tmp_path / "unet.onnx")
    with pytest.raises(RuntimeError, match=r"^TrtRunner for 'unet.onnx' is not active; use it inside "
                                           r"`with TrtRunner\(...\) as runner:`$"):
        r.infer({"image": np.zeros((1, 1, 4, 4), np.float32)})
    with pytest.raises(RuntimeError, match="TrtRunner for 'unet.onnx' is not active"):
        r.stream
    with pytest.raises(FileNotFoundError, match="ONNX model .*unet.onnx' does not exist"):
        r.__enter__()
    assert not r.is_active


class _HostAlloc:
    """A 'device' allocation in host memory: int() is its address, as with pycuda's DeviceAllocation."""

    def __init__(self, nbytes: int):
        self.buf = np.zeros(max(int(nbytes), 1), np.uint8)

    def __int__(self) -> int:
        return self.buf.ctypes.data


class FakeDriver(types.ModuleType):
    """pycuda.driver on the host, as much of it as CudaDevice and TrtRunner call: contexts on a stack (retain, push,
    pop and detach logged), streams and memory that may only be made or used while a context is current, host memory
    standing in for device memory. A call outside a current context fails the test."""

    def __init__(self, usable: bool = True):
        super().__init__("pycuda.driver")
        self.stack: list = []
        self.log: list[str] = []
        driver = self

        class Context:
            def push(self):
                driver.stack.append(self)
                driver.log.append("push")

            @staticmethod
            def pop():
                driver.stack.pop()
                driver.log.append("pop")

            def detach(self):
                driver.log.append("detach")

        class Device:
            def __init__(self, ordinal):
                if not usable:
                    raise RuntimeError("cuInit failed: no CUDA-capable device is detected")

            def name(self):
                return "Stand-in GPU"

            def compute_capability(self):
                return (9, 0)

            def retain_primary_context(self):
                driver.log.append("retain")
                return Context()

        class Stream:
            def __init__(self):
                driver.in_context("Stream()")
                self.handle = 0x5000 + len(driver.log)

            def synchronize(self):
                driver.in_context("synchronize")

        self.Context, self.Device, self.Stream = Context, Device, Stream

    def in_context(self, what: str) -> None:
        assert self.stack, f"{what} with no current CUDA context"

    def init(self):
        pass

    def pagelocked_empty(self, shape, dtype):
        self.in_context("pagelocked_empty")
        return np.zeros(shape, dtype)

    def mem_alloc(self, nbytes):
        self.in_context("mem_alloc")
        return _HostAlloc(nbytes)

    def memcpy_htod_async(self, dest, src, stream=None):
        self.in_context("memcpy_htod_async")
        ctypes.memmove(int(dest), src.ctypes.data, src.nbytes)

    def memcpy_dtoh_async(self, dest, src, stream=None):
        self.in_context("memcpy_dtoh_async")
        ctypes.memmove(dest.ctypes.data, int(src), dest.nbytes)


def test_cuda_device_pushes_and_pops_the_primary_context_around_every_use(monkeypatch):
    from runtime.backends.cuda import CudaDevice
    from runtime.gpu import kernels
    driver = FakeDriver()
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    dev = CudaDevice(0)
    assert driver.log == ["retain", "push", "pop"] and driver.stack == []   # its stream made in the context
    assert dev.name == "Stand-in GPU" and dev.compute_capability == (9, 0) and dev.stream.handle
    assert dev.ort_options() == {"providers": ["cuda"], "stream": dev.stream, "device_id": 0}
    with dev.current():
        assert driver.stack == [dev.ctx]
        with pytest.raises(KeyError):
            with dev.current():
                raise KeyError("popped even when the block raises")
        assert driver.stack == [dev.ctx]
    assert driver.stack == []
    dev.close()
    dev.close()
    assert driver.log.count("detach") == 1 and driver.stack == [] and dev.stream is None
    with pytest.raises(RuntimeError, match="CUDA device 0 was closed"):
        with dev.current():
            pass
    ctx = kernels.primary_context(0)          # the GPU kernels' tests take the same helper's context
    assert driver.stack == [ctx]
    ctx.pop()
    assert driver.stack == []


def test_cuda_device_says_what_is_missing_in_the_callers_words(monkeypatch):
    from runtime.backends.cuda import NO_PYCUDA, CudaDevice
    from runtime.gpu import pipeline
    assert pipeline.CudaDevice is CudaDevice   # the device pipeline's CudaDevice is the shared one
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailable) as e:
        CudaDevice(0)
    assert str(e.value) == NO_PYCUDA and str(e.value).startswith("the device pipeline needs pycuda")
    with pytest.raises(BackendUnavailable, match=r"^pycuda is not installed here: the trt backend"):
        CudaDevice(0, missing=trtmod.NO_PYCUDA, or_else=trtmod.OR_ELSE)
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", FakeDriver(usable=False))
    with pytest.raises(BackendUnavailable, match=r"^CUDA device 0 is not usable \(cuInit failed: no CUDA-capable "
                                                 r"device is detected\); check the driver and that this user is in "
                                                 r"the video group$"):
        CudaDevice(0)
    with pytest.raises(BackendUnavailable, match=r"in the video group, or use --backend ort$"):
        CudaDevice(0, or_else="use --backend ort")


# A TensorRT stand-in with one engine, y = 2 * x for x of shape (batch, 4), batch 1..3: enough for TrtRunner to
# deserialise it from the cache, read its metadata, allocate, run on host and "device" buffers and release it.
PLAN = b"stand-in serialized engine"


def _fake_engine_tensorrt(monkeypatch, driver: FakeDriver, *, y_dtype="FLOAT"):
    trt = _fake_tensorrt(monkeypatch, "10.3.0.30")
    monkeypatch.setattr(trt_build, "_LOGGER", None)
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.handles = []
    profile = [(1, 4), (2, 4), (3, 4)]

    class ExecutionContext:
        def __init__(self):
            self.shape, self.addresses = None, {}

        def set_input_shape(self, name, shape):
            ok = len(shape) == 2 and profile[0][0] <= shape[0] <= profile[2][0] and shape[1] == 4
            self.shape = tuple(shape) if ok else self.shape
            return ok

        def get_tensor_shape(self, name):
            return self.shape or (-1, 4)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)

        def execute_async_v3(self, handle):
            driver.in_context("execute_async_v3")
            trt.handles.append(handle)
            n = int(np.prod(self.shape))
            x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["x"]))
            y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["y"]))
            y[:] = 2 * x
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("x", "y")[i]

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name="FLOAT" if name == "x" else y_dtype)

        def get_tensor_shape(self, name):
            return (-1, 4)

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "x" else trt.TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, index):
            return profile

        def create_execution_context(self):
            driver.in_context("create_execution_context")
            return ExecutionContext()

    class Runtime:
        def __init__(self, logger):
            self.DLA_core = None

        def deserialize_cuda_engine(self, blob):
            driver.in_context("deserialize_cuda_engine")
            return Engine() if blob == PLAN else None

    trt.Runtime = Runtime
    return trt


def _cached_runner(monkeypatch, tmp_path, **kw):
    """A TrtRunner over the stand-ins whose engine is already in the cache (as a first run would leave it)."""
    driver = FakeDriver()
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    trt = _fake_engine_tensorrt(monkeypatch, driver, **kw)
    model = tmp_path / "double.onnx"
    model.write_bytes(b"the ONNX file's bytes (only hashed here)")
    runner = trtmod.TrtRunner(model, cache_dir=tmp_path, precision="fp32", batch=(1, 2, 3), progress=False)
    key = trt_build.engine_key(trt.__version__, ec.GpuInfo("Stand-in GPU", (9, 0)), runner.spec)
    ec.write_entry(ec.entry_dir(ec.engines_root(tmp_path), key), key, PLAN)
    return runner, driver, trt


def test_trt_runner_runs_a_cached_engine_inside_its_cuda_context(monkeypatch, tmp_path):
    runner, driver, trt = _cached_runner(monkeypatch, tmp_path)
    x = np.arange(8, dtype=np.float64).reshape(2, 4)
    with runner as r:
        assert not r.built and r.engine_path.read_bytes() == PLAN       # from the cache: nothing was built
        assert r.inputs == {"x": TensorMeta((None, 4), np.dtype(np.float32))}
        assert driver.stack == []                                       # the context is current only inside calls
        out = r.infer({"x": x})
        assert out["y"].dtype == np.float32 and np.array_equal(out["y"], 2 * x) and driver.stack == []
        assert trt.handles[-1] == r.stream.handle                       # on the runner's own stream
        with pytest.raises(ValueError, match=r"has shape \(4, 4\), outside the engine's profile \(1, 4\)\.\.\(3, 4\)"):
            r.infer({"x": np.zeros((4, 4), np.float32)})
        with pytest.raises(ValueError, match=r"has no input 'image'"):
            r.infer({"image": x})
        xd, yd = np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32)
        dev = r.infer_device({"x": xd.ctypes.data}, shapes={"x": (3, 4)}, outputs={"y": yd.ctypes.data},
                             stream=types.SimpleNamespace(handle=0x77))
        assert dev["y"].ptr == yd.ctypes.data and dev["y"].shape == (3, 4) and np.all(yd == 2)
        assert trt.handles[-1] == 0x77 and driver.stack == []
        with pytest.raises(ValueError, match=r"input 'x' of 'double.onnx' is float32\[\?, 4\]: give its shape"):
            r.infer_device({"x": xd.ctypes.data})
    assert driver.stack == [] and driver.log.count("retain") == driver.log.count("detach") == 1
    assert driver.log.count("push") == driver.log.count("pop")
    with pytest.raises(RuntimeError, match="TrtRunner for 'double.onnx' is not active"):
        runner.infer({"x": x})
    with runner as again:                                               # entered again: a new context retain
        assert np.array_equal(again.infer({"x": x[:1]})["y"], 2 * x[:1])
    assert driver.log.count("retain") == driver.log.count("detach") == 2


def test_a_trt_runner_that_fails_to_start_releases_its_context(monkeypatch, tmp_path):
    runner, driver, _ = _cached_runner(monkeypatch, tmp_path, y_dtype="BF16")
    with pytest.raises(BackendUnavailable, match="tensor 'y' of 'double.onnx' is BF16, which numpy cannot hold"):
        runner.__enter__()
    assert not runner.is_active and driver.stack == []
    assert driver.log.count("retain") == driver.log.count("detach") == 1


def test_engine_key_and_spec_come_from_the_runner_options(tmp_path):
    model = tmp_path / "vgg.int8.onnx"
    model.write_bytes(b"x")
    spec = trt_build.EngineSpec(model, precision="int8", batch=(1, 2, 4), dims={"H": 224}, dla_core=None)
    gpu = ec.GpuInfo("Orin", (8, 7))
    assert spec.label == "vgg.int8.onnx (int8)"
    assert trt_build.engine_key("10.3.0", gpu, spec) == ec.engine_key(
        onnx_sha256=ec.sha256_file(model), trt_version="10.3.0", gpu=gpu, precision="int8", batch=(1, 2, 4),
        dims={"H": 224}, dla_core=None)
    assert trt_build.engine_key("10.3.0", gpu, spec) != trt_build.engine_key(
        "10.3.0", gpu, trt_build.EngineSpec(model, precision="int8", batch=(1, 2, 4), dims={"H": 224}, dla_core=0))


# -- cache key -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32}, {"trt_version": "10.3.0.1"}, {"trt_version": "11.4.1"},
    {"gpu": ec.GpuInfo("Orin (nvgpu)", (8, 7))}, {"gpu": ec.GpuInfo("Orin", (8, 6))},
    {"gpu": ec.GpuInfo("Orin", (11, 0))}, {"precision": "int8"}, {"batch": (1, 1, 4)}, {"batch": (1, 2, 4)},
    {"dims": {"H": 224}}, {"dla_core": 0}, {"dla_core": 1}, {"machine": "x86_64"},
], ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))}")
def test_key_changes_with_each_component(change):
    a, b = base_key(), base_key(**change)
    assert a != b
    assert ec.key_digest(a) != ec.key_digest(b)


def test_key_is_stable_and_plain():
    assert base_key() == base_key()
    assert ec.key_digest(base_key()) == ec.key_digest(json.loads(json.dumps(base_key())))
    assert len(ec.key_digest(base_key())) == 32
    assert base_key(batch=4)["profile"]["batch"] == [4, 4, 4]
    assert base_key()["format"] == ec.FORMAT
    with pytest.raises(ValueError, match="64 lowercase hex"):
        base_key(onnx_sha256="not-a-hash")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        base_key(batch=(4, 2, 8))


# -- entries: written atomically, verified on every load, stale ones rejected --------------------------------------
def test_entry_roundtrip_and_every_stale_form_is_rejected(tmp_path):
    key = base_key()
    entry = ec.entry_dir(tmp_path, key)
    engine = os.urandom(4096)
    path = ec.write_entry(entry, key, engine, {"onnx": "unet.onnx"})
    hit = ec.open_entry(entry, key)
    assert hit is not None and hit[0] == path and path.read_bytes() == engine
    assert hit[1]["onnx"] == "unet.onnx" and hit[1]["engine_bytes"] == 4096
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind

    # another TensorRT / GPU: the metadata does not match the key asked for
    assert ec.open_entry(entry, base_key(trt_version="10.4.0")) is None
    assert ec.open_entry(entry, base_key(gpu=ec.GpuInfo("Thor", (11, 0)))) is None
    # truncated engine (a crash mid-copy, a full disk)
    path.write_bytes(engine[:1000])
    assert ec.open_entry(entry, key) is None
    # same size, different bytes: only the hash can tell
    damaged = bytearray(engine)
    damaged[123] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert ec.open_entry(entry, key) is None
    path.write_bytes(engine)
    assert ec.open_entry(entry, key) is not None
    # metadata pointing outside the entry, missing engine, garbage metadata, old format
    meta = json.loads((entry / "meta.json").read_text())
    for bad in ({**meta, "engine": "../../etc/passwd"}, {**meta, "engine": "engine-missing.plan"},
                {**meta, "key": {**key, "format": ec.FORMAT - 1}}, {k: v for k, v in meta.items() if k != "engine"}):
        (entry / "meta.json").write_text(json.dumps(bad))
        assert ec.open_entry(entry, key) is None
    (entry / "meta.json").write_text("{not json")
    assert ec.open_entry(entry, key) is None
    (entry / "meta.json").unlink()
    assert ec.open_entry(entry, key) is None


def test_get_or_build_builds_once_then_hits_and_rebuilds_stale(tmp_path, capsys):
    key = base_key()
    calls = []

    def build():
        calls.append(1)
        return b"engine-v%d" % len(calls), {"profile_shapes": {"image": [[1, 1, 224, 224]] * 3}}

    first = ec.get_or_build(tmp_path, key, build, label="unet.fp16.onnx (fp16)")
    assert first.built and calls == [1] and first.path.read_bytes() == b"engine-v1"
    assert first.meta["profile_shapes"]["image"][0] == [1, 1, 224, 224] and "build_s" in first.meta
    err = capsys.readouterr().err
    assert "building the unet.fp16.onnx (fp16) engine (TensorRT 10.3.0, Orin sm87, fp16, batch 1/1/1)" in err
    assert "built the unet.fp16.onnx (fp16) engine in" in err

    again = ec.get_or_build(tmp_path, key, build)
    assert not again.built and calls == [1] and again.path == first.path

    first.path.write_bytes(b"engine-v1"[:4])  # damaged on disk: rebuilt, never loaded
    rebuilt = ec.get_or_build(tmp_path, key, build)
    assert rebuilt.built and calls == [1, 1] and rebuilt.path.read_bytes() == b"engine-v2"
    assert sorted(p.name for p in rebuilt.directory.glob("engine-*.plan")) == [rebuilt.path.name]

    ec.invalidate(rebuilt.directory)  # what the runner does when TensorRT refuses a verified file
    assert ec.get_or_build(tmp_path, key, build, progress=False).built and len(calls) == 3

    other = ec.get_or_build(tmp_path, base_key(trt_version="10.13.0"), build, progress=False)
    assert other.built and other.directory != rebuilt.directory  # a foreign version gets its own entry


def test_failed_build_leaves_no_entry(tmp_path):
    key = base_key()

    def build():
        raise BackendUnavailable("TensorRT could not build an engine for 'unet.onnx'")

    with pytest.raises(BackendUnavailable):
        ec.get_or_build(tmp_path, key, build, progress=False)
    assert ec.open_entry(ec.entry_dir(tmp_path, key), key) is None
    with pytest.raises(ValueError, match="empty engine"):
        ec.get_or_build(tmp_path, key, lambda: b"", progress=False)


def _build_in_process(root: str, log: str, start_at: float) -> tuple[str, bool, str, float]:
    """One process asking for the same engine as the others at the same moment (spawned: module level)."""
    while time.time() < start_at:
        time.sleep(0.001)

    def slow_build() -> bytes:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a build takes a while: the others must wait, not build too
        return b"engine built by %d" % os.getpid()

    entry = ec.get_or_build(Path(root), base_key(), slow_build, progress=False)
    return str(entry.path), entry.built, ec.sha256_file(entry.path), entry.seconds


def test_concurrent_builders_serialise_on_the_lock(tmp_path):
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 4.0  # after every child has started its interpreter
    with ctx.Pool(4) as pool:
        results = pool.starmap(_build_in_process, [(str(tmp_path / "engines"), str(log), start_at)] * 4)
    assert len(log.read_text().split()) == 1, "the engine was built more than once"
    assert len({(path, digest) for path, _, digest, _ in results}) == 1
    assert sum(built for _, built, _, _ in results) == 1
    # the others really asked while it was building, and waited for it rather than finding it later
    assert any(not built and seconds > 0.5 for _, built, _, seconds in results)


def test_file_lock_reports_waiting(tmp_path):
    lock = tmp_path / ".lock"
    waited = []
    code = ("import sys, time; from runtime.backends.engine_cache import file_lock\n"
            f"with file_lock({str(lock)!r}):\n    print('locked', flush=True); time.sleep(1.5)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.perf_counter()
        with ec.file_lock(lock, on_wait=lambda: waited.append(1)):
            assert time.perf_counter() - t > 0.5
        assert waited == [1]
    finally:
        holder.wait(timeout=30)


# -- timing cache --------------------------------------------------------------------------------------------------
def test_timing_cache_is_per_gpu_and_version(tmp_path):
    a = ec.timing_cache_path(tmp_path, GPU, "10.3.0")
    assert a.parent == tmp_path and a.name == "timing-orin-sm87-trt10.3.0.cache"
    assert a != ec.timing_cache_path(tmp_path, ec.GpuInfo("Orin", (8, 6)), "10.3.0")
    assert a != ec.timing_cache_path(tmp_path, GPU, "10.13.0")
    assert ec.read_timing_cache(a) == b""
    ec.write_timing_cache(a, b"timings")
    assert ec.read_timing_cache(a) == b"timings"
    ec.write_timing_cache(a, b"")  # an empty serialisation never replaces a real one
    assert ec.read_timing_cache(a) == b"timings"


def test_engines_root_follows_sonoscore_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SONOSCORE_CACHE", str(tmp_path))
    assert ec.engines_root() == tmp_path / "engines"
    assert ec.engines_root(tmp_path / "x") == tmp_path / "x" / "engines"


# -- profile shapes, dtypes ----------------------------------------------------------------------------------------
def test_profile_shapes_take_the_batch_range_on_the_leading_free_dim():
    f32 = np.dtype(np.float32)
    inputs = {"image": TensorMeta(("N", 3, 224, 224), f32), "other": TensorMeta((None, 8), f32),
              "dynamic": TensorMeta((-1, 4), f32), "fixed": TensorMeta((1, 1, 224, 224), f32)}
    shapes = ec.profile_shapes(inputs, batch=(1, 2, 8))
    assert shapes["image"] == ((1, 3, 224, 224), (2, 3, 224, 224), (8, 3, 224, 224))
    assert shapes["other"] == ((1, 8), (2, 8), (8, 8))
    assert shapes["dynamic"] == ((1, 4), (2, 4), (8, 4))
    assert shapes["fixed"] == ((1, 1, 224, 224),) * 3
    assert ec.profile_shapes(inputs)["image"] == ((1, 3, 224, 224),) * 3  # default: one frame


def test_dla_profile_has_one_batch_size():
    """DLA: "the profile's min, max, and opt values must be equal for wildcard dimensions" (DLA layer restrictions)."""
    assert ec.profile_batch((1, 2, 8)) == (1, 2, 8)
    assert ec.profile_batch((1, 2, 8), dla_core=0) == (2, 2, 2)
    assert ec.profile_batch((4, 4, 4), dla_core=1) == (4, 4, 4)
    assert ec.profile_batch(3, dla_core=0) == (3, 3, 3)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ec.profile_batch((4, 2, 8), dla_core=0)
    inputs = {"image": TensorMeta(("N", 1, 224, 224), np.dtype(np.float16))}
    lo, opt, hi = ec.profile_shapes(inputs, ec.profile_batch((1, 2, 8), dla_core=0))["image"]
    assert lo == opt == hi == (2, 1, 224, 224)
    assert base_key(batch=ec.profile_batch((1, 2, 8), 0), dla_core=0)["profile"]["batch"] == [2, 2, 2]


def test_profile_shapes_refuse_unpinned_spatial_dims():
    meta = {"image": TensorMeta(("N", 1, "H", "W"), np.dtype(np.float32))}
    with pytest.raises(ValueError, match=r"input 'image' .* free dim \('H', axis 2\)"):
        ec.profile_shapes(meta)
    assert ec.profile_shapes(meta, batch=2, dims={"H": 224, "W": 160})["image"] == ((2, 1, 224, 160),) * 3
    with pytest.raises(ValueError):
        ec.profile_shapes(meta, batch=(0, 1, 1), dims={"H": 1, "W": 1})


def test_trt_dtype_names_map_to_numpy():
    # every DataType member of the TensorRT 11.1 bindings (10.3 has the same minus FP4 and E8M0)
    members = ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8", "INT4", "FP4", "E8M0"]
    assert sorted(ec.TRT_DTYPES) == sorted(members)
    assert ec.trt_dtype_to_numpy("FLOAT") == np.float32
    assert ec.trt_dtype_to_numpy("DataType.HALF") == np.float16
    assert ec.trt_dtype_to_numpy("int8") == np.int8
    assert ec.trt_dtype_to_numpy("INT64") == np.int64
    assert ec.trt_dtype_to_numpy("BOOL") == np.bool_
    assert ec.trt_dtype_to_numpy("UINT8") == np.uint8
    for name in ("BF16", "FP8", "INT4", "FP4", "E8M0"):
        assert ec.trt_dtype_to_numpy(name) is None
    with pytest.raises(ValueError, match="unknown"):
        ec.trt_dtype_to_numpy("COMPLEX64")


def test_dims_and_precision_labels():
    assert ec.dims_to_shape((-1, 3, 224, 224)) == (None, 3, 224, 224)
    assert ec.guess_precision(Path("unet.onnx")) == "fp32"
    assert ec.guess_precision(Path("unet.fp16.onnx")) == "fp16"
    assert ec.guess_precision(Path("vgg.int8.onnx")) == "int8"
    assert ec.guess_precision(Path("vgg_qdq.onnx")) == "int8"
    assert ec.GpuInfo("NVIDIA Jetson AGX Orin (nvgpu)", (8, 7)).slug == "nvidia-jetson-agx-orin-nvgpu-sm87"


def test_network_flags_set_strongly_typed_when_the_enum_has_it():
    # The flag is 1 << int(member) (Builder docs); 11.x keeps STRONGLY_TYPED as a deprecated always-on member.
    with_flag = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    assert trt_build.network_flags(with_flag) == 2
    assert trt_build.network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())) == 0


def test_tf32_is_cleared_when_the_flag_exists():
    class Config:
        def __init__(self):
            self.flags = {"TF32"}  # on by default in TensorRT 10.x and 11.x

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

    config = Config()
    trt = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(TF32="TF32", GPU_FALLBACK="GPU_FALLBACK"))
    assert trt_build.clear_tf32(trt, config) is False and config.flags == set()
    untouched = types.SimpleNamespace()  # a TensorRT without the member: nothing to clear, nothing called
    assert trt_build.clear_tf32(types.SimpleNamespace(BuilderFlag=types.SimpleNamespace()), untouched) is False
    assert trt_build.clear_tf32(types.SimpleNamespace(), untouched) is False


# -- device/ -------------------------------------------------------------------------------------------------------
def test_selftest_runs_on_the_ort_backend(tiny_bundle, tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(DEVICE / "selftest"), "--bundle", str(tiny_bundle), "--backend", "ort",
                        "--frames", "5", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode in (0, 1), r.stderr
    report = json.loads((out / "selftest.json").read_text())
    text = (out / "selftest.txt").read_text()
    assert report["backend"] == "ort" and report["frames"] == 5 and report["reference"] == "ort cpu fp32"
    assert set(report["results"]) == {"fp32", "fp16"}
    fp32 = report["results"]["fp32"]
    assert fp32["frames_compared"] == 5 + report["warmup"]
    assert {k: c["threshold"] for k, c in fp32["checks"].items()} == {
        "mask_iou": 0.97, "gate_agreement": 0.97, "grade_agreement": 0.97, "feature_cosine": 0.99}
    # the same backend, precision and frames as the reference: it must agree exactly
    assert all(c["pass"] and c["value"] == pytest.approx(1.0) for c in fp32["checks"].values()), fp32["checks"]
    assert fp32["pass"] and fp32["max_abs_probability_diff"] == 0.0
    for lat in (fp32["latency_ms"], report["reference_latency_ms"]):
        assert set(lat) == {"preprocess", "unet", "gate", "vgg", "booster", "total"}
        assert all(0 <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"] for s in lat.values())
    assert report["pass"] == all(res["pass"] for res in report["results"].values())
    assert r.returncode == (0 if report["pass"] else 1)
    assert {"l4t", "power_mode", "gpus", "platform"} <= set(report["machine"])
    assert {"python", "numpy", "onnxruntime", "tensorrt"} <= set(report["versions"])
    assert text.startswith("sonoscore self-test: PASS" if report["pass"] else "sonoscore self-test: FAIL")
    assert "fp32: pass" in text and "latency ms p50/p95/p99" in text


def test_selftest_refuses_trt_where_there_is_none(tiny_bundle, tmp_path):
    if trtmod.trt_status()["available"]:
        pytest.skip("TensorRT is usable here")
    r = subprocess.run([sys.executable, str(DEVICE / "selftest"), "--bundle", str(tiny_bundle), "--backend", "trt",
                        "--frames", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("selftest: ")
    assert "use --backend ort" in r.stderr


def test_selftest_is_an_executable_python_script():
    path = DEVICE / "selftest"
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env python3\n")


def test_setup_script_syntax():
    r = subprocess.run(["bash", "-n", str(DEVICE / "setup.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(DEVICE / "setup.sh", os.X_OK)
    assert "set -euo pipefail" in (DEVICE / "setup.sh").read_text()


def _dry_run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_INDEX_URL", "NUMPY_SPEC", "VENV", "PREFIX")}
    return subprocess.run(["bash", str(DEVICE / "setup.sh"), "--dry-run", "--prefix", str(tmp_path / "opt"), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_setup_dry_run_jetpack6(tmp_path):
    r = _dry_run(tmp_path, "--l4t", "36.4.3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "L4T R36.4.3 -> JetPack 6" in out
    assert "-m venv --system-site-packages" in out
    assert "--index-url https://pypi.jetson-ai-lab.io/jp6/cu126" in out and "onnxruntime-gpu" in out
    assert "numpy<2" in out and "pycuda" in out and "--no-deps" in out
    assert not (tmp_path / "opt").exists(), "a dry run changed the system"
    assert re.search(r"pycuda\\?>=2024\.1\b", out) and "python3-libnvinfer" in out
    assert "JetPack 6.0" not in out


def test_setup_dry_run_jetpack60_sets_up_ort_only(tmp_path):
    r = _dry_run(tmp_path, "--l4t", "36.3.0")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "jp6/cu122" in out and "onnxruntime-gpu" in out and re.search(r"pycuda\\?>=2024\.1\b", out)
    notes = [ln for ln in out.splitlines() if "JetPack 6.0" in ln]
    assert notes == ["setup: JetPack 6.0 ships TensorRT 8.6 and the trt backend needs JetPack 6.1+ (TensorRT 10.3): "
                     "setting up the ort backend only"]
    assert "python3-libnvinfer" not in out and "TensorRT's Python bindings do not import" not in r.stderr


def test_setup_dry_run_jetpack7_and_service(tmp_path):
    r = _dry_run(tmp_path, "--l4t", "38.2.0", "--service")
    assert r.returncode == 0, r.stderr
    assert "JetPack 7" in r.stdout and "https://pypi.jetson-ai-lab.io/sbsa/cu130" in r.stdout
    assert "numpy<2" not in r.stdout
    assert re.search(r"pycuda\\?>=2025\.1\.2", r.stdout)  # older pycuda does not build on CUDA 13
    assert "/etc/systemd/system/sonoscore.service" in r.stdout and "systemctl enable sonoscore.service" in r.stdout
    assert "99-sonoscore-video.rules" in r.stdout


def test_setup_dry_run_jetpack72(tmp_path):
    """L4T R39 is JetPack 7.2.x (Orin and Thor, CUDA 13.2): set up as JetPack 7."""
    r = _dry_run(tmp_path, "--l4t", "39.2.1")
    assert r.returncode == 0, r.stderr
    assert "L4T R39.2.1 -> JetPack 7" in r.stdout and "sbsa/cu130" in r.stdout and "python3-libnvinfer" in r.stdout
    assert re.search(r"pycuda\\?>=2025\.1\.2", r.stdout) and "numpy<2" not in r.stdout


def test_setup_says_when_no_onnxruntime_gpu_wheel_is_found():
    text = (DEVICE / "setup.sh").read_text()
    assert 'if ! run "${PIP[@]}" -c "$constraints" --index-url "$ORT_INDEX_URL"' in text
    assert "pip found no onnxruntime-gpu" in text


def test_setup_refuses_unsupported_releases(tmp_path):
    for release in ("35.4.1", "37.1.0", "40.0.0"):
        r = _dry_run(tmp_path, "--l4t", release)
        assert r.returncode == 1 and "JetPack 6 (L4T R36) and JetPack 7 (L4T R38, R39)" in r.stderr
    on_jetson = Path("/etc/nv_tegra_release").exists() or (
        shutil.which("dpkg-query") is not None
        and subprocess.run(["dpkg-query", "-W", "nvidia-l4t-core"], capture_output=True).returncode == 0)
    if not on_jetson:
        r = _dry_run(tmp_path)
        assert r.returncode == 1 and "this is not a Jetson" in r.stderr


def test_systemd_unit_verifies(tmp_path):
    unit = (DEVICE / "sonoscore.service").read_text()
    for needed in ("Restart=on-failure", "RestartSec=", "StandardOutput=journal", "User=sonoscore",
                   "SupplementaryGroups=video", "EnvironmentFile=/etc/sonoscore/sonoscore.env",
                   "BindsTo=dev-video0.device", "After=dev-video0.device"):
        assert needed in unit
    env = (DEVICE / "sonoscore.env").read_text()
    assert all(f"\n{v}=" in env for v in ("BUNDLE", "SOURCE", "BACKEND", "PRECISION", "RESULTS", "EXTRA_ARGS"))
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not available here")
    # as setup.sh installs it: ExecStart points at the venv it made (here: an executable that exists)
    (tmp_path / "sonoscore.service").write_text(unit.replace("/opt/sonoscore/venv/bin/sonoscore", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "sonoscore.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_dockerfile_copies_what_exists():
    text = (DEVICE / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/l4t-jetpack:r${L4T_VERSION}" in text
    assert "--runtime nvidia" in text and "--device /dev/video0" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


# -- needs TensorRT and a GPU ---------------------------------------------------------------------------------------
needs_trt = pytest.mark.skipif(not trtmod.trt_status()["available"],
                               reason="needs TensorRT, pycuda and a CUDA GPU (a Jetson or an x86 GPU host with "
                                      "NVIDIA's tensorrt wheel); none here")


@needs_trt
def test_trt_runner_matches_onnxruntime_and_caches(tiny_bundle, tmp_path):
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle
    bundle = Bundle.load(tiny_bundle)
    onnx = bundle.network_file("unet", "fp32")
    x = np.random.default_rng(0).random((1, 1, 224, 224), dtype=np.float32)
    with OrtRunner(onnx) as ort_runner:
        want = ort_runner.infer({"image": x})["mask"]
    with trtmod.TrtRunner(onnx, cache_dir=tmp_path, precision="fp32") as runner:
        assert runner.built and runner.engine_path.is_file()
        assert list(runner.inputs) == ["image"] and list(runner.outputs) == ["mask"]
        got = runner.infer({"image": x})["mask"]
        np.testing.assert_allclose(got, want, atol=2e-3)
        import pycuda.driver as cuda
        with runner.cuda_device.current():
            d_in = cuda.mem_alloc(x.nbytes)
            d_out = cuda.mem_alloc(got.nbytes)
            cuda.memcpy_htod(d_in, x)
        out = runner.infer_device({"image": d_in}, shapes={"image": x.shape}, outputs={"mask": d_out})
        runner.stream.synchronize()
        with runner.cuda_device.current():
            host = np.empty_like(got)
            cuda.memcpy_dtoh(host, d_out)
        assert out["mask"].shape == got.shape
        np.testing.assert_array_equal(host, got)
    with trtmod.TrtRunner(onnx, cache_dir=tmp_path, precision="fp32", progress=False) as again:
        assert not again.built  # from the cache
