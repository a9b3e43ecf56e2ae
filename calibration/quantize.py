"""FP32 ONNX -> INT8 Q/DQ ONNX with onnxruntime's static quantizer, in the form TensorRT builds from.

What the file must look like (docs/design.md, "The model bundle"; TensorRT's "Working with Quantized Types"):
- QDQ format: QuantizeLinear/DequantizeLinear pairs around float operators, so the same file runs on onnxruntime
  (which fuses the pairs into integer kernels) and TensorRT (which builds what the Q/DQ nodes say).
- Symmetric signed INT8 for activations and weights: every zero point is 0 (TensorRT rejects others).
- Per-channel weights on the output-channel axis: axis 0 of a Conv weight [K, C, R, S].
- ConvTranspose (`conv_transpose`): onnxruntime's CPU provider has no integer ConvTranspose kernel, so a Q/DQ
  ConvTranspose runs in float between a DequantizeLinear and a QuantizeLinear; in the full-width UNet its four
  upsamplers were 30 of the INT8 file's 80 ms on a 2-core Xeon (`bench --profile`). "sub-pixel" (default)
  writes each 4x4 stride-2 pad-1 ConvTranspose (the UNet's upsamplers) as the same computation in operators with
  integer kernels: a 3x3 pad-1 Conv with 4K output channels (output channel (2a + b) * K + k holds the taps of
  output phase (a, b), the other taps zero), the ReLU that follows it when it has one, then DepthToSpace(2, DCR).
  Its weight is a Conv weight, per channel on axis 0 like every other; the result equals the ConvTranspose up to
  float summation order. The other modes keep the ConvTranspose node: its weight per tensor ("per-tensor";
  onnxruntime's default per-channel axis for it is 1, the output channels of a [C, K, R, S] weight, which TensorRT
  does not take) or in float ("float"). Any other ConvTranspose shape stays a per-tensor ConvTranspose under
  "sub-pixel". The manifest says which. QAT (export/qat.py) trains the ConvTranspose as it is: "per-tensor" or
  "float".
- Weights use the 7-bit range [-64, 64] by default (`reduce_range`), still symmetric INT8 in the file. x86 CPUs
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

METHODS = ("minmax", "entropy", "percentile")
CONV_TRANSPOSE = ("sub-pixel", "per-tensor", "float")


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
                  method: str = "minmax", conv_transpose: str = "sub-pixel", percentile: float = 99.999,
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
    sub_pixel: list[str] = []
    if conv_transpose == "sub-pixel":
        model, sub_pixel = sub_pixel_conv_transpose(model)
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
    with tempfile.TemporaryDirectory(prefix="sonoscore-quantize-") as tmp:
        src = Path(model_in)
        if sub_pixel:
            src = Path(tmp) / "sub_pixel.onnx"
            onnx.save(model, str(src))
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(src), str(model_out), reader, quant_format=QuantFormat.QDQ,
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
            op = "ConvTranspose" if node.name in sub_pixel else node.op_type   # counted as the layer it computes
            (quantized if is_q else floats)[op] = (quantized if is_q else floats).get(op, 0) + 1
    opset = max((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return QuantizeResult(model_out, method, n, conv_transpose, 8 if full_range_weights else 7, quantized, floats,
                          opset)


_TAPS = ((3, 1, None), (None, 2, 0))      # phase -> ConvTranspose kernel index at window offset -1, 0, +1


def sub_pixel_weight(w: np.ndarray) -> np.ndarray:
    """A 4x4 stride-2 pad-1 ConvTranspose weight [C, K, 4, 4] as the 3x3 Conv weight [4K, C, 3, 3] of its sub-pixel
    form (see sub_pixel_conv_transpose): each kernel tap once, the other taps zero, the dtype kept (float weights,
    or the integers of a quantized one)."""
    c, k = w.shape[:2]
    wc = np.zeros((4 * k, c, 3, 3), dtype=w.dtype)
    for pa in (0, 1):
        for pb in (0, 1):
            rows = slice((2 * pa + pb) * k, (2 * pa + pb + 1) * k)
            for r, kr in enumerate(_TAPS[pa]):
                for s, ks in enumerate(_TAPS[pb]):
                    if kr is not None and ks is not None:
                        wc[rows, :, r, s] = w[:, :, kr, ks].T
    return wc


def sub_pixel_conv_transpose(model) -> tuple["onnx.ModelProto", list[str]]:
    """A copy of `model` with each 2-D ConvTranspose of kernel 4, stride 2, pads 1 (group 1, no dilation or output
    padding, weight an initializer) written as a 3x3 pad-1 Conv with 4K output channels and DepthToSpace(2, DCR),
    with the node's single ReLU consumer (if any) moved between them; and the names of the rewritten nodes (the Conv
    keeps the ConvTranspose's name; its weight is `<weight>_sub_pixel`, its output `<output>_sub_pixel`).

    ConvTranspose [C, K, 4, 4], stride 2, pad 1: output row 2m + a takes input rows m - 1, m (a = 0; kernel rows 3,
    1) or m, m + 1 (a = 1; kernel rows 2, 0), and the same for columns; so phase (a, b) is a 3x3 window on the input
    with those taps, and DepthToSpace in DCR mode puts channel (2a + b) * K + k at [k, 2h + a, 2w + b]."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    outputs = {o.name for o in g.output}
    nodes, done, moved = [], [], set()
    for n in g.node:
        if n.op_type == "Relu" and n.output[0] in moved:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        w = numpy_helper.to_array(inits[n.input[1]]) if n.op_type == "ConvTranspose" and len(n.input) > 1 \
            and n.input[1] in inits else None
        if (w is None or w.ndim != 4 or tuple(w.shape[2:]) != (4, 4) or list(a.get("strides", [1, 1])) != [2, 2]
                or list(a.get("pads", [0, 0, 0, 0])) != [1, 1, 1, 1] or a.get("group", 1) != 1
                or any(d != 1 for d in a.get("dilations", [1, 1])) or any(a.get("output_padding", []))
                or a.get("output_shape") or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            nodes.append(n)
            continue
        wc = sub_pixel_weight(w)
        wname = f"{n.input[1]}_sub_pixel"
        g.initializer.append(numpy_helper.from_array(wc, wname))
        ins = [n.input[0], wname]
        if len(n.input) > 2 and n.input[2]:
            bname = f"{n.input[2]}_sub_pixel"
            g.initializer.append(numpy_helper.from_array(np.tile(numpy_helper.to_array(inits[n.input[2]]), 4), bname))
            ins.append(bname)
        mid = f"{n.output[0]}_sub_pixel"
        nodes.append(helper.make_node("Conv", ins, [mid], name=n.name, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                      strides=[1, 1], dilations=[1, 1], group=1))
        out, after = n.output[0], consumers.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type == "Relu" and out not in outputs:   # ReLU commutes with the shuffle
            relu = after[0]
            nodes.append(helper.make_node("Relu", [mid], [f"{mid}_relu"], name=relu.name))
            mid, out = f"{mid}_relu", relu.output[0]
            moved.add(relu.output[0])
        nodes.append(helper.make_node("DepthToSpace", [mid], [out], name=f"{n.name}_depth_to_space", blocksize=2,
                                      mode="DCR"))
        done.append(n.name)
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in g.node for x in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    keep = {x for n in g.node for x in list(n.input) + list(n.output)} | {o.name for o in g.output}
    for vi in [v for v in g.value_info if v.name not in keep]:
        g.value_info.remove(vi)
    return m, done


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
    if any(n.op_type == "Conv" and fp_nodes.get(n.name) is not None and fp_nodes[n.name].op_type == "ConvTranspose"
           for n in g.node):   # a sub-pixel file: its Convs take the FP32 ConvTranspose's weight, rewritten alike
        fp32_model = sub_pixel_conv_transpose(fp32_model)[0]
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
