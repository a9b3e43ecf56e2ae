"""TensorRT-readiness of a Q/DQ ONNX file, checked here on the very file the Jetson will build its engine from.

TensorRT's explicit-quantization rules (developer guide, "Working with Quantized Types" / "Explicit Quantization";
the ONNX-TensorRT operator matrix for QuantizeLinear/DequantizeLinear):
- zero points must be 0 (TensorRT supports symmetric quantization only);
- scales must be positive and finite;
- Q/DQ carry INT8 data here (no INT32 bias DequantizeLinear: biases stay float);
- per-channel scales only on a weight's output-channel axis: axis 0 of a Conv weight, axis 0 of a Gemm weight
  stored [N, K] with transB=1 (axis 1 with transB=0, or of a MatMul weight [K, N]); ConvTranspose weights
  per tensor only (onnxruntime would pick axis 1, which TensorRT rejects);
- activations per tensor (a per-channel scale on an activation is not supported);
- only the default ONNX domain (no com.microsoft contrib ops) and an opset the Jetson's parser reads.

`MAX_OPSET` is 17: the bundle's networks are exported at opset 17 and the quantizer keeps it; every TensorRT from
8.6 on (JetPack 5.1.2 and later, so JetPack 6's TensorRT 10.3 too) parses opset 17.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_OPSET = 17


def trt_readiness(path: str | Path, *, max_opset: int = MAX_OPSET) -> list[str]:
    """Every way `path` breaks TensorRT's Q/DQ rules, one sentence each; [] when it is ready."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    problems: list[str] = []
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    values = {**consts, **inits}

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > max_opset:
        problems.append(f"{Path(path).name}: opset {opset} is newer than {max_opset}, the newest this check "
                        f"guarantees TensorRT 10.3 (JetPack 6) parses")
    foreign = sorted({n.domain for n in g.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        problems.append(f"{Path(path).name}: nodes from domain(s) {', '.join(foreign)}, which TensorRT does not know")

    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    n_qdq = 0
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        n_qdq += 1
        where = f"{Path(path).name}: {n.op_type} '{n.name or n.output[0]}'"
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        scale = values.get(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            problems.append(f"{where} has a scale that is not a constant")
            continue
        scale = np.asarray(scale)
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where} has a scale that is not positive and finite")
        if len(n.input) > 2 and n.input[2]:
            zp = values.get(n.input[2])
            if zp is None:
                problems.append(f"{where} has a zero point that is not a constant")
            else:
                if np.any(np.asarray(zp) != 0):
                    problems.append(f"{where} has a non-zero zero point (TensorRT takes symmetric INT8 only)")
                if np.asarray(zp).dtype != np.int8:
                    problems.append(f"{where} quantizes to {np.asarray(zp).dtype}, not int8")
        if n.op_type == "DequantizeLinear" and n.input[0] in values and values[n.input[0]].dtype != np.int8:
            problems.append(f"{where} dequantizes {values[n.input[0]].dtype} data (TensorRT takes int8 here; "
                            f"keep biases in float)")
        if scale.size > 1:  # per-channel: must be a weight, on its output-channel axis
            data = values.get(n.input[0])
            users = consumers.get(n.output[0], [])
            if data is None:
                problems.append(f"{where} is per-channel on an activation, which TensorRT does not support")
                continue
            rank = data.ndim
            ax = axis % rank if rank else axis
            for u in users:
                slot = list(u.input).index(n.output[0])
                if slot != 1:
                    problems.append(f"{where} is per-channel but feeds input {slot} of {u.op_type} '{u.name}'")
                    continue
                ok_axis = {"Conv": 0, "ConvTranspose": None, "MatMul": rank - 1}.get(u.op_type, "gemm")
                if ok_axis == "gemm":
                    trans_b = next((a.i for a in u.attribute if a.name == "transB"), 0)
                    ok_axis = 0 if trans_b else 1
                if ok_axis is None:
                    problems.append(f"{where} quantizes a ConvTranspose weight per channel (axis {ax}); TensorRT "
                                    f"takes ConvTranspose weights per tensor only")
                elif ax != ok_axis:
                    problems.append(f"{where} is per-channel on axis {ax} of a {u.op_type} weight; TensorRT "
                                    f"needs the output-channel axis {ok_axis}")
    if n_qdq == 0:
        problems.append(f"{Path(path).name} has no QuantizeLinear/DequantizeLinear nodes: it is not a Q/DQ INT8 model")
    return problems
