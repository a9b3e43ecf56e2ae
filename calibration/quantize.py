"""FP32 ONNX -> INT8 Q/DQ ONNX with onnxruntime's static quantizer, in the form TensorRT builds from.

What the file must look like (docs/design.md, "The model bundle"; TensorRT's "Working with Quantized Types"):
- QDQ format: QuantizeLinear/DequantizeLinear pairs around float operators, so the same file runs on onnxruntime
  (which fuses the pairs into integer kernels) and TensorRT (which builds what the Q/DQ nodes say).
- Symmetric signed INT8 for activations and weights: every zero point is 0 (TensorRT rejects others).
- Per-channel weights on the output-channel axis: axis 0 of a Conv weight [K, C, R, S].
- ConvTranspose weights: onnxruntime's default axis for them is 1 (the output channels of a [C, K, R, S] weight),
  which TensorRT does not take. They are quantized per tensor (default) or left in float; the manifest says which.
- Weights use the 7-bit range [-64, 63] by default (`reduce_range`), still symmetric INT8 in the file. x86 CPUs
  without VNNI multiply 8-bit pairs with VPMADDUBSW, whose 16-bit sums saturate with full-range weights: the
  demo UNet's mask IoU with FP32 fell to 0.09 on onnxruntime CPU here (2-core AMD EPYC, AVX2, no VNNI) while the
  same file simulated in float gave 0.998. With 7-bit weights the integer kernels match the simulation, so the
  file CI checks on such a CPU is the file the Jetson builds. `full_range_weights=True` keeps 8 bits for targets
  that are only ever checked on VNNI/ARM/GPU hardware.
- The layers that produce the network's outputs stay in float (`float_outputs`): the last weighted layer before
  each output and the activations after it. The booster's trees split on exact feature values, and one per-tensor
  INT8 scale over the 1024 features moved the demo's grade on 12% of frames; the UNet's last 1x1 convolution
  and sigmoid keep the mask's 0.5 crossing where FP32 has it. Those layers are a tiny share of the work.
- Biases stay float (`QuantizeBias` off): onnxruntime would otherwise store them as INT32 behind a DequantizeLinear,
  an INT32 Q/DQ that TensorRT's ONNX parser does not accept.

Calibration streams frames through the augmented model in chunks (onnxruntime's `CalibStridedMinMax` loop, which
works for every method), so a few hundred full-width frames do not hold every activation of every frame in memory.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

METHODS = ("minmax", "entropy", "percentile")
CONV_TRANSPOSE = ("per-tensor", "float")


@dataclass
class QuantizeResult:
    path: Path
    method: str
    frames: int
    conv_transpose: str
    weight_bits: int                  # 7 (reduce_range, the default) or 8
    quantized_ops: dict[str, int]     # op type -> how many nodes got Q/DQ on their weight
    float_ops: dict[str, int]         # op types with weights left in float
    opset: int


class _Reader:
    """onnxruntime CalibrationDataReader over a list of ready inputs, with the range interface its strided loop
    uses, reporting progress once per input."""

    def __init__(self, name: str, inputs: Sequence[np.ndarray], progress: Callable[[int], None] | None):
        self.name, self.inputs, self.progress = name, inputs, progress
        self.start, self.end, self.i, self.done = 0, len(inputs), 0, 0

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.i = start_index, end_index, start_index

    def get_next(self):
        if self.i >= self.end:
            return None
        x = self.inputs[self.i]
        self.i += 1
        self.done += 1
        if self.progress:
            self.progress(self.done)
        return {self.name: x}

    def rewind(self) -> None:
        self.i = self.start


def quantize_int8(model_in: Path, model_out: Path, input_name: str, inputs: Sequence[np.ndarray], *,
                  method: str = "minmax", conv_transpose: str = "per-tensor", percentile: float = 99.999,
                  chunk: int = 8, full_range_weights: bool = False, float_outputs: bool = True,
                  keep_float: Sequence[str] = (), keep_float_nodes: Sequence[str] = (),
                  progress: Callable[[int], None] | None = None) -> QuantizeResult:
    """Calibrate `model_in` on `inputs` (each a ready [1, C, H, W] float32 array) and write the Q/DQ model."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"calibration method '{method}' is not one of {', '.join(METHODS)}")
    if conv_transpose not in CONV_TRANSPOSE:
        raise ValueError(f"conv_transpose '{conv_transpose}' is not one of {', '.join(CONV_TRANSPOSE)}")
    if len(inputs) == 0:
        raise ValueError("no calibration inputs")
    model = onnx.load(str(model_in))
    inits = {i.name for i in model.graph.initializer}
    op_types = sorted({n.op_type for n in model.graph.node})
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]

    exclude_nodes = (output_tail(model) if float_outputs else []) + list(keep_float_nodes)
    exclude_types = set(keep_float)
    overrides: dict[str, list[dict]] = {}
    for n in weighted:
        if n.op_type == "ConvTranspose" and len(n.input) > 1 and n.input[1] in inits:
            if conv_transpose == "float":
                exclude_types.add("ConvTranspose")
            else:  # a per-tensor override wins over the global per_channel switch in onnxruntime's QDQ quantizer
                overrides[n.input[1]] = [{"symmetric": True}]
    to_quantize = [t for t in op_types if t not in exclude_types]

    # A chunk size that divides the input count (the strided loop requires it).
    n = len(inputs)
    chunk = max(1, min(chunk, n))
    while n % chunk:
        chunk -= 1
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "CalibStridedMinMax": chunk,
        "CalibTensorRangeSymmetric": True,
    }
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    reader = _Reader(input_name, inputs, progress)
    import logging
    logging.getLogger().addFilter(_quiet_preprocess_hint)
    model_out = Path(model_out)
    model_out.parent.mkdir(parents=True, exist_ok=True)
    # onnxruntime prints a line per histogram chunk; the caller shows its own progress instead.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(model_in), str(model_out), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=to_quantize, nodes_to_exclude=exclude_nodes, per_channel=True,
                        reduce_range=not full_range_weights,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calib, extra_options=extra)

    out = onnx.load(str(model_out))
    q_inits = {i.name for i in out.graph.initializer}
    producers = {o: node for node in out.graph.node for o in node.output}
    quantized: dict[str, int] = {}
    floats: dict[str, int] = {}
    for node in out.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            src = producers.get(node.input[1])
            is_q = src is not None and src.op_type == "DequantizeLinear" and src.input[0] in q_inits
            (quantized if is_q else floats)[node.op_type] = (quantized if is_q else floats).get(node.op_type, 0) + 1
    opset = max((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return QuantizeResult(model_out, method, n, conv_transpose, 8 if full_range_weights else 7, quantized, floats,
                          opset)


def output_tail(model) -> list[str]:
    """Names of the nodes from each graph output back to (and including) the first node with a weight."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    names: list[str] = []
    for out in g.output:
        node = producer.get(out.name)
        while node is not None:
            if node.name not in names:
                names.append(node.name)
            if any(i in inits for i in node.input[1:2]) and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                break
            node = producer.get(node.input[0]) if node.input else None
    return names


def _quiet_preprocess_hint(record) -> bool:
    """onnxruntime suggests its pre-processing script on every call; the bundle's ONNX is already exported with
    shapes and folded batch norms, so the hint is noise on the user's terminal."""
    return "pre-processing" not in str(record.msg) and "pre-processing" not in str(record.getMessage())


def spread_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({int(math.floor(i * n / k + n / (2 * k))) for i in range(k)})


def quantized_layers(model) -> list[str]:
    """Names of the weighted nodes (Conv, ConvTranspose, Gemm, MatMul) whose weight comes through a Q/DQ pair."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1:
            src = producer.get(n.input[1])
            if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
                out.append(n.name)
    return out


def float_layers(qdq_model, fp32_model, names) -> "onnx.ModelProto":
    """A copy of a Q/DQ model with the named nodes computed in float: each input that came through a
    DequantizeLinear takes the FP32 model's weight (the original, not the dequantized one) or the float tensor
    the QuantizeLinear read; Q/DQ nodes and initializers nothing reads any more are dropped. The other nodes keep
    their scales, so no calibration is repeated: this is how one layer at a time is tried in float. A named node's
    own output is still quantized where the node after it reads it through a Q/DQ pair."""
    import onnx

    names = set(names)
    m = onnx.ModelProto()
    m.CopyFrom(qdq_model)
    g = m.graph
    fp_nodes = {n.name: n for n in fp32_model.graph.node}
    fp_inits = {i.name: i for i in fp32_model.graph.initializer}
    unknown = names - {n.name for n in g.node}
    if unknown:
        raise ValueError(f"no node named {', '.join(sorted(unknown))} in the model")
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    for node in g.node:
        if node.name not in names:
            continue
        for i, x in enumerate(list(node.input)):
            dq = producer.get(x)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if dq.input[0] in inits:                    # a weight: the FP32 model's own
                w = fp_nodes[node.name].input[i]
                node.input[i] = w
                if w not in inits:
                    g.initializer.append(fp_inits[w])
                    inits.add(w)
            else:                                       # an activation: the float tensor before its Q
                q = producer.get(dq.input[0])
                if q is None or q.op_type != "QuantizeLinear":
                    raise ValueError(f"'{node.name}' input {i} is dequantized from something other than a "
                                     f"QuantizeLinear; cannot put it back in float")
                node.input[i] = q.input[0]
    while True:
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {x for n in g.node for x in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return m
