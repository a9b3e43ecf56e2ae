"""The onnxruntime runner: CPU always; CUDA / TensorRT execution providers where the installed onnxruntime has them.

    with OrtRunner("vgg.onnx") as vgg:
        feats = vgg.infer({"image": x}, ["features"])["features"]

The session lives between __enter__ and __exit__ (as in Polygraphy's runners; the lifetime guard and the checks of
feed names, dtypes and ranks are `runtime.backends.base.BaseRunner`'s, done before onnxruntime sees anything), so a
mistake is one sentence naming the tensor.

On a GPU, `infer_device` keeps a frame on the device (the contract of TrtRunner.infer_device): device addresses
in through IO binding, outputs into runner-owned or caller device buffers, nothing synchronised.

    with OrtRunner("unet.onnx", providers=["cuda"], stream=s, dims={"N": 1}) as unet:
        prob = unet.infer_device({"image": d_input})["mask"]     # DeviceTensor, ready when stream s is

How it stays on one stream without host syncs (onnxruntime 1.17+, CUDA EP docs:
https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html; microsoft/onnxruntime#19229):
- `stream=` becomes the CUDA EP's `user_compute_stream` (the integer cudaStream_t as a string; Python sets
  `has_user_compute_stream` from it, and we pass it too). Every kernel and copy of the session runs on it, so
  kernels the caller enqueued before are ordered before the network and the caller's next ones after it.
- Runs on device buffers use the run option `disable_synchronize_execution_providers=1`: onnxruntime otherwise
  waits for the stream at the end of every run.
- The stream must outlive the session and must not be the legacy default stream (onnxruntime reads 0 as "none").
- `cuda_graphs=True` sets `enable_cuda_graph`: onnxruntime runs once normally, captures the second run and replays
  the graph afterwards, so every bound address and shape must stay those of the first call (checked here: a
  replay on other addresses would silently read stale memory). It needs every node on the CUDA EP; pinning the
  symbolic dims with `dims=` (free dimension overrides) lets shape arithmetic fold away so that holds.
On the CPU provider, infer_device takes host addresses through the same IO binding calls (that is how the path
is tested on machines without a GPU).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.backends.base import BackendUnavailable, BaseRunner, DeviceTensor, TensorMeta, stream_handle

ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
           "trt": "TensorrtExecutionProvider"}
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(bfloat16)": None, "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32,
          "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
          "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
          "tensor(string)": np.object_}

# onnx.helper-made model `y = Identity(x)`, x: float[1] (IR 7, opset 13): lets doctor start each provider for real,
# since onnxruntime-gpu lists CUDA even when the CUDA/cuDNN libraries it needs are missing.
_PROBE_MODEL = (b'\x08\x07:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04'
                b'\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r')


def resolve_providers(names: list[str] | None) -> list[str]:
    """["cuda"] -> ["CUDAExecutionProvider"]; raises BackendUnavailable for one this onnxruntime does not have."""
    resolved = [ALIASES.get(n.lower(), n) for n in (names or ["cpu"])]
    available = ort.get_available_providers()
    for asked, name in zip(names or ["cpu"], resolved):
        if name not in available:
            hint = (" (onnxruntime-gpu or the Jetson wheel has it)" if name in ALIASES.values()
                    else f"; use one of {', '.join(sorted(ALIASES))} or a provider onnxruntime lists")
            raise BackendUnavailable(f"execution provider '{asked}' is not available in the installed onnxruntime "
                                     f"{ort.__version__}, which has {', '.join(available)}{hint}")
    return resolved


def provider_status() -> dict[str, str]:
    """CPU, CUDA and TensorRT providers -> "ok" or why not; a listed GPU provider is started on a tiny model."""
    status = {}
    available = ort.get_available_providers()
    for name in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if name not in available:
            status[name] = f"not in this onnxruntime {ort.__version__} build (onnxruntime-gpu has it)"
            continue
        try:
            fallback = [] if name == "CPUExecutionProvider" else ["CPUExecutionProvider"]
            session = ort.InferenceSession(_PROBE_MODEL, providers=[name, *fallback])
            started = name in session.get_providers()
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
            started, why = False, " ".join(str(e).split())[:160]
        else:
            why = "see onnxruntime's log above; usually its CUDA, cuDNN or TensorRT libraries are missing"
        status[name] = "ok" if started else f"listed but failed to start ({why})"
    return status


def optimization_level(simulated_quantization: bool = False) -> ort.GraphOptimizationLevel:
    """The session's graph optimisation level. Default (ORT_ENABLE_ALL): onnxruntime fuses each Q/DQ pattern into
    this CPU's integer kernels (VNNI, AVX2, ...), whose rounding differs from CPU to CPU. `simulated_quantization`
    (ORT_DISABLE_ALL): QuantizeLinear and DequantizeLinear run as written, as float ops, and every other node in
    float: simulated quantization, the same on every x86 CPU and what TensorRT computes from the same Q/DQ file up
    to accumulation order (docs/design.md "INT8 fidelity: simulated and this CPU")."""
    return (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if simulated_quantization
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


class OrtRunner(BaseRunner):
    """An onnxruntime session as a runner: inputs/outputs metadata by tensor name, infer(feeds) -> outputs."""

    def __init__(self, model_path: Path, *, providers: list[str] | None = None, intra_op_threads: int | None = None,
                 cuda_graphs: bool = False, spin: bool = False, stream=None, dims: dict[str, int] | None = None,
                 device_id: int = 0, simulated_quantization: bool = False):
        """`stream`: the CUDA stream the CUDA EP computes on (a pycuda Stream or a raw cudaStream_t); `dims`:
        values for symbolic dims (e.g. {"N": 1}), fixed for the session's life; `device_id`: the CUDA device;
        `simulated_quantization`: graph optimisations off (`optimization_level`), for INT8 accuracy checks."""
        super().__init__(model_path)
        self.simulated_quantization = bool(simulated_quantization)
        # onnxruntime's worker threads busy-wait after each run by default, burning cores that the capture
        # thread and the steps between network calls need on a small device. Off unless asked for.
        self.spin = spin
        self.requested = resolve_providers(providers)
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self.cuda_graphs = cuda_graphs
        self.dims = {str(k): int(v) for k, v in (dims or {}).items()}
        self.device_id = int(device_id)
        self.stream = stream
        self.stream_handle = stream_handle(stream)
        cuda = "CUDAExecutionProvider" in self.requested
        if cuda_graphs and not cuda:
            raise BackendUnavailable(f"CUDA graphs for '{self.model_path.name}' need the CUDA execution provider; "
                                     f"pass providers=['cuda'] or leave cuda_graphs off")
        if stream is not None and not cuda:
            raise BackendUnavailable(f"a CUDA stream for '{self.model_path.name}' needs the CUDA execution "
                                     f"provider; pass providers=['cuda'] or no stream")
        if self.stream_handle == 0:
            raise ValueError("onnxruntime reads stream 0 as 'no stream' and would compute on its own; pass a "
                             "created stream (pycuda.driver.Stream())")
        self._session: ort.InferenceSession | None = None
        self._graph: _CudaGraph | None = None
        self._device: _DeviceBinding | None = None
        self._lock = threading.Lock()

    # -- lifetime --------------------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model '{self.model_path}' does not exist; check the bundle or the path")
        options = ort.SessionOptions()
        options.graph_optimization_level = optimization_level(self.simulated_quantization)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        for name, value in self.dims.items():
            options.add_free_dimension_override_by_name(name, value)
        providers: list = [(p, self._cuda_options()) if p == "CUDAExecutionProvider" else p for p in self.requested]
        if "CPUExecutionProvider" not in self.requested:
            providers.append("CPUExecutionProvider")  # for any node a GPU provider does not take
        if "CUDAExecutionProvider" in self.requested:
            _preload_cuda_libraries()
        session = ort.InferenceSession(str(self.model_path), options, providers=providers)
        failed = [p for p in self.requested if p not in session.get_providers()]
        if failed:
            raise BackendUnavailable(f"onnxruntime could not start {', '.join(failed)} for '{self.model_path.name}' "
                                     f"(see its log above; usually CUDA, cuDNN or TensorRT libraries are missing)")
        self._session = session
        self._inputs = {a.name: _meta(a) for a in session.get_inputs()}
        self._outputs = {a.name: _meta(a) for a in session.get_outputs()}
        self._graph = _CudaGraph(session, self._outputs) if self.cuda_graphs else None
        self._device = None

    def deactivate_impl(self) -> None:
        # Bindings and runner-owned device buffers before the session; the caller's stream outlives all three.
        self._device = self._graph = None
        self._session = None

    def _cuda_options(self) -> dict[str, str]:
        opts = {"device_id": str(self.device_id)}
        if self.cuda_graphs:
            opts["enable_cuda_graph"] = "1"
        if self.stream_handle is not None:
            opts["has_user_compute_stream"] = "1"
            opts["user_compute_stream"] = str(self.stream_handle)
        return opts

    # -- metadata (inputs and outputs: BaseRunner's) ---------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, in priority order."""
        self.check_active()
        return self._session.get_providers()

    # -- inference -------------------------------------------------------------------------------------------------
    def infer_impl(self, arrays: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """Run the model on the (checked) host arrays; return `wanted` by name."""
        if self._graph is not None:
            if self._device is not None:
                raise RuntimeError(_MIXED_GRAPHS.format(model=self.model_path.name, first="infer_device",
                                                        then="infer"))
            return self._graph.run(arrays, self._inputs, wanted)
        return dict(zip(wanted, self._session.run(wanted, arrays)))

    def infer_device_impl(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]],
                          buffers: dict[str, int], stream: int | None) -> dict[str, DeviceTensor]:
        """Run on device buffers: a frame stays on the GPU from preprocessing to features.

        `addresses`: tensor name -> device address (anything int() takes: a pycuda DeviceAllocation, cupy's
        `.data.ptr`, an OrtValue's `data_ptr()`) of contiguous data in the input's dtype. `shapes`: the input
        shapes, required where a dim is symbolic and not pinned by `dims`. `buffers`: optional caller buffers by
        name (large enough for the output shape); the other outputs land in the runner's own device buffers,
        allocated once per shape and valid until the next call. `stream`: None or the runner's own stream
        (onnxruntime computes on the stream the session was made with and cannot switch per call).

        Nothing is synchronised when the runner was made with a stream: the outputs are ready when that stream
        is, so the next kernel on it can consume them. Without one, onnxruntime computes on a stream of its own
        and waits for it before returning: the inputs must then be complete before the call."""
        model = self.model_path.name
        if stream is not None and stream != self.stream_handle:
            mine = "onnxruntime's own stream" if self.stream_handle is None else f"stream {self.stream_handle:#x}"
            raise ValueError(f"OrtRunner for '{model}' computes on {mine}, which is fixed when the session is made; "
                             f"make the runner with stream=<that stream> instead of passing stream {stream:#x}")
        if self._graph is not None and self._graph.shapes is not None:
            raise RuntimeError(_MIXED_GRAPHS.format(model=model, first="infer", then="infer_device"))
        with self._lock:
            if self._device is None:
                self._device = _DeviceBinding(self)
            return self._device.run(addresses, shapes, buffers)



class _CudaGraph:
    """CUDA graphs replay fixed device addresses, so inputs are copied into device buffers made on the first call
    and outputs land in buffers made then too; shapes must stay those of the first call."""

    def __init__(self, session: ort.InferenceSession, outputs: dict[str, TensorMeta]):
        self.session, self.output_meta = session, outputs
        self.binding = session.io_binding()
        self.inputs: dict[str, ort.OrtValue] = {}
        self.outputs: dict[str, ort.OrtValue] = {}
        self.shapes: dict[str, tuple] | None = None

    def run(self, arrays: dict[str, np.ndarray], input_meta: dict[str, TensorMeta], wanted: list[str]):
        shapes = {n: a.shape for n, a in arrays.items()}
        if self.shapes is None:
            symbols = {d: n for name, a in arrays.items() for d, n in zip(input_meta[name].shape, a.shape)
                       if isinstance(d, str)}
            for name, a in arrays.items():
                self.inputs[name] = ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0)
                self.binding.bind_ortvalue_input(name, self.inputs[name])
            for name, meta in self.output_meta.items():
                shape = [d if isinstance(d, int) else symbols.get(d) for d in meta.shape]
                if any(d is None for d in shape):
                    raise BackendUnavailable(f"CUDA graphs need every output shape to follow from the inputs, but "
                                             f"output '{name}' is {meta}; leave cuda_graphs off for this model")
                self.outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, meta.dtype.type, "cuda", 0)
                self.binding.bind_ortvalue_output(name, self.outputs[name])
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"with CUDA graphs the input shapes are fixed at {self.shapes}, got {shapes}; "
                             f"use a runner per shape or leave cuda_graphs off")
        else:
            for name, a in arrays.items():
                self.inputs[name].update_inplace(a)
        self.session.run_with_iobinding(self.binding)
        return {name: self.outputs[name].numpy() for name in wanted}


_PRELOADED = False


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu from PyPI finds CUDA and cuDNN in the nvidia-* wheels only when they are loaded first: by
    `import torch` (same CUDA major), or by onnxruntime.preload_dlls() (onnxruntime 1.21+), called here once when
    torch has not done it. Where the libraries are on the system's path instead, this changes nothing."""
    global _PRELOADED
    if _PRELOADED or "torch" in sys.modules or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED = True
    try:
        ort.preload_dlls()
    except Exception:  # best effort: the session's own start reports what is really missing
        pass


_MIXED_GRAPHS = ("OrtRunner for '{model}' captured its CUDA graph in {first}(); with CUDA graphs one runner serves "
                 "one of infer() and infer_device(), so use another runner for {then}()")


class _DeviceBinding:
    """The IO binding of infer_device: inputs bound at the caller's addresses, outputs at the caller's buffers or
    the runner's own (OrtValues on the session's device, made once per shape). Rebinds only what changed; with
    CUDA graphs nothing may change after the first call, because the captured graph replays those addresses."""

    def __init__(self, runner: "OrtRunner"):
        self.runner = runner
        self.session: ort.InferenceSession = runner._session
        cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self.device = "cuda" if cuda else "cpu"
        self.device_id = runner.device_id if cuda else 0
        self.binding = self.session.io_binding()
        self.bound: dict[tuple[str, str], tuple[int, tuple[int, ...]]] = {}
        self.owned: dict[str, ort.OrtValue] = {}
        self.first: dict | None = None
        self.run_options = ort.RunOptions()
        if runner.stream_handle is not None:  # ordered on the caller's stream: no wait at the end of the run
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def run(self, addresses: dict[str, int], shapes: dict, buffers: dict) -> dict[str, DeviceTensor]:
        r = self.runner
        model = r.model_path.name
        in_shapes = {name: self._input_shape(name, meta, shapes.get(name)) for name, meta in r._inputs.items()}
        symbols = dict(r.dims)
        for name, meta in r._inputs.items():
            symbols.update({d: n for d, n in zip(meta.shape, in_shapes[name]) if isinstance(d, str)})
        result: dict[str, DeviceTensor] = {}
        plan = {}
        for name, meta in r._inputs.items():
            plan[("in", name)] = (_address(model, "input", name, addresses[name]), in_shapes[name])
        for name, meta in r._outputs.items():
            shape = tuple(d if isinstance(d, int) else symbols.get(d) for d in meta.shape)
            if any(d is None for d in shape):
                raise BackendUnavailable(f"output '{name}' of '{model}' is {meta}, whose shape does not follow from "
                                         f"the inputs; infer_device needs outputs of known shape")
            if name in buffers:
                ptr = _address(model, "output", name, buffers[name])
            else:
                own = self.owned.get(name)
                if own is None or tuple(own.shape()) != shape:
                    own = self.owned[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                        list(shape), meta.dtype.type, self.device, self.device_id)
                ptr = int(own.data_ptr())
            plan[("out", name)] = (ptr, shape)
            result[name] = DeviceTensor(ptr, shape, meta.dtype)
        if r.cuda_graphs:
            if self.first is None:
                self.first = plan
            elif plan != self.first:
                changed = sorted(n for k, n in plan if plan[(k, n)] != self.first[(k, n)])
                raise ValueError(f"with CUDA graphs the device addresses and shapes of '{model}' are fixed by the "
                                 f"first call (the captured graph replays them), but {', '.join(changed)} changed; "
                                 f"keep the buffers, or make the runner with cuda_graphs off")
        for (kind, name), (ptr, shape) in plan.items():
            if self.bound.get((kind, name)) == (ptr, shape):
                continue
            meta = (r._inputs if kind == "in" else r._outputs)[name]
            bind = self.binding.bind_input if kind == "in" else self.binding.bind_output
            bind(name, self.device, self.device_id, meta.dtype.type, list(shape), ptr)
            self.bound[(kind, name)] = (ptr, shape)
        self.session.run_with_iobinding(self.binding, self.run_options)
        return result

    def _input_shape(self, name: str, meta: TensorMeta, given) -> tuple[int, ...]:
        model = self.runner.model_path.name
        if given is not None:   # checked against the input's rank and fixed dims by BaseRunner.infer_device
            return tuple(given)
        shape = tuple(d if isinstance(d, int) else self.runner.dims.get(d) if isinstance(d, str) else None
                      for d in meta.shape)
        if any(d is None for d in shape):
            raise ValueError(f"input '{name}' of '{model}' is {meta}: give its shape in shapes={{'{name}': (...)}} "
                             f"or pin its symbolic dims with dims=")
        return shape


def _address(model: str, kind: str, name: str, value) -> int:
    ptr = int(value)
    if ptr <= 0:
        raise ValueError(f"{kind} '{name}' of model '{model}' was given address {ptr}; pass the device buffer's "
                         f"address (int(allocation))")
    return ptr


def _meta(arg) -> TensorMeta:
    dtype = DTYPES.get(arg.type)
    return TensorMeta(tuple(d if isinstance(d, (int, str)) else None for d in arg.shape),
                      np.dtype(dtype) if dtype is not None else np.dtype(np.void))


