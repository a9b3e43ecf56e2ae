"""The onnxruntime runner: CPU always; CUDA / TensorRT execution providers where the installed onnxruntime has them.

    with OrtRunner("vgg.onnx") as vgg:
        feats = vgg.infer({"image": x}, ["features"])["features"]

The session lives between __enter__ and __exit__ (as in Polygraphy's runners). infer() checks feed names, dtypes
and ranks against the model before onnxruntime sees them, so a mistake is one sentence naming the tensor.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.backends import BackendUnavailable, TensorMeta, check_input, check_names

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


class OrtRunner:
    """An onnxruntime session as a runner: inputs/outputs metadata by tensor name, infer(feeds) -> outputs."""

    def __init__(self, model_path: Path, *, providers: list[str] | None = None, intra_op_threads: int | None = None,
                 cuda_graphs: bool = False, spin: bool = False):
        self.model_path = Path(model_path)
        # onnxruntime's worker threads busy-wait after each run by default, burning cores that the capture
        # thread and the steps between network calls need on a small device. Off unless asked for.
        self.spin = spin
        self.requested = resolve_providers(providers)
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self.cuda_graphs = cuda_graphs
        if cuda_graphs and "CUDAExecutionProvider" not in self.requested:
            raise BackendUnavailable(f"CUDA graphs for '{self.model_path.name}' need the CUDA execution provider; "
                                     f"pass providers=['cuda'] or leave cuda_graphs off")
        self._session: ort.InferenceSession | None = None
        self._graph: _CudaGraph | None = None

    # -- lifetime --------------------------------------------------------------------------------------------------
    def __enter__(self) -> "OrtRunner":
        if self._session is not None:
            raise RuntimeError(f"OrtRunner for '{self.model_path.name}' is already active; enter it once")
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model '{self.model_path}' does not exist; check the bundle or the path")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        providers: list = [(p, {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider" and self.cuda_graphs
                           else p for p in self.requested]
        if "CPUExecutionProvider" not in self.requested:
            providers.append("CPUExecutionProvider")  # for any node a GPU provider does not take
        session = ort.InferenceSession(str(self.model_path), options, providers=providers)
        failed = [p for p in self.requested if p not in session.get_providers()]
        if failed:
            raise BackendUnavailable(f"onnxruntime could not start {', '.join(failed)} for '{self.model_path.name}' "
                                     f"(see its log above; usually CUDA, cuDNN or TensorRT libraries are missing)")
        self._session = session
        self._inputs = {a.name: _meta(a) for a in session.get_inputs()}
        self._outputs = {a.name: _meta(a) for a in session.get_outputs()}
        self._graph = _CudaGraph(session, self._outputs) if self.cuda_graphs else None
        return self

    def __exit__(self, *exc) -> None:
        self._session = self._graph = None

    def _active(self) -> ort.InferenceSession:
        if self._session is None:
            raise RuntimeError(f"OrtRunner for '{self.model_path.name}' is not active; use it inside "
                               f"`with OrtRunner(...) as runner:`")
        return self._session

    # -- metadata --------------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> dict[str, TensorMeta]:
        self._active()
        return dict(self._inputs)

    @property
    def outputs(self) -> dict[str, TensorMeta]:
        self._active()
        return dict(self._outputs)

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, in priority order."""
        return self._active().get_providers()

    # -- inference -------------------------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model on `feeds` (every input, by name); return `outputs` (default: all) by name."""
        session = self._active()
        model = self.model_path.name
        wanted = check_names(model, self._inputs, self._outputs, feeds, outputs)
        arrays = {name: check_input(model, name, self._inputs[name], value) for name, value in feeds.items()}
        if self._graph is not None:
            return self._graph.run(arrays, self._inputs, wanted)
        return dict(zip(wanted, session.run(wanted, arrays)))



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


def _meta(arg) -> TensorMeta:
    dtype = DTYPES.get(arg.type)
    return TensorMeta(tuple(d if isinstance(d, (int, str)) else None for d in arg.shape),
                      np.dtype(dtype) if dtype is not None else np.dtype(np.void))


