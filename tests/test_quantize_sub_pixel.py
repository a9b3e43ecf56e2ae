"""calibration.quantize's sub-pixel ConvTranspose: the same computation as Conv + DepthToSpace, quantized per channel
on axis 0 like every Conv, TensorRT-ready, and float_layers still puts it back in float."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.checks import trt_readiness
from calibration.quantize import float_layers, quantize_int8, quantized_layers, sub_pixel_conv_transpose
from tests.test_calibration import _inputs   # the same random 1x1x8x8 calibration inputs


def _model(path: Path, *, bias: bool = False, relu: bool = True, kernel: int = 4, stride: int = 2,
           pad: int = 1) -> Path:
    """conv1 -> relu1 -> ConvTranspose 'up1' (-> ReLU 'upr') -> 1x1 head -> sigmoid, on an 8x8 input."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, kernel, kernel)).astype(np.float32), "wt"),
             numpy_helper.from_array(rng.normal(0, 0.3, (1, 3, 1, 1)).astype(np.float32), "w2")]
    up_in = ["r1", "wt"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (3,)).astype(np.float32), "bt"))
        up_in.append("bt")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", up_in, ["t1"], strides=[stride, stride], pads=[pad] * 4,
                              output_padding=[0, 0], name="up1")]
    last = "t1"
    if relu:
        nodes.append(helper.make_node("Relu", ["t1"], ["u1"], name="upr"))
        last = "u1"
    nodes += [helper.make_node("Conv", [last, "w2"], ["c2"], name="head"),
              helper.make_node("Sigmoid", ["c2"], ["y"], name="sig")]
    side = (8 - 1) * stride - 2 * pad + kernel
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, side, side])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path




def _run(model, x, simulated=True):
    so = ort.SessionOptions()
    if simulated:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bias,relu", [(False, True), (True, False)])
def test_rewrite_computes_the_conv_transpose(tmp_path, bias, relu):
    src = _model(tmp_path / "m.onnx", bias=bias, relu=relu)
    fp32 = onnx.load(str(src))
    rewritten, names = sub_pixel_conv_transpose(fp32)
    assert names == ["up1"]
    ops = [n.op_type for n in rewritten.graph.node]
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == 1
    # the ReLU sits between the Conv and the shuffle when the ConvTranspose had one
    assert ops[2:5] == (["Conv", "Relu", "DepthToSpace"] if relu else ["Conv", "DepthToSpace", "Conv"])
    assert {n.op_type for n in fp32.graph.node} >= {"ConvTranspose"}          # the input model is untouched
    onnx.checker.check_model(rewritten)
    x = np.random.default_rng(2).normal(0, 1, (2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), _run(fp32, x), atol=1e-6)


def test_other_conv_transpose_shapes_are_left_alone(tmp_path):
    fp32 = onnx.load(str(_model(tmp_path / "m.onnx", kernel=3, stride=2, pad=1)))
    rewritten, names = sub_pixel_conv_transpose(fp32)
    assert names == [] and "ConvTranspose" in [n.op_type for n in rewritten.graph.node]


def test_sub_pixel_file_is_per_channel_trt_ready_and_close_to_fp32(tmp_path):
    src = _model(tmp_path / "m.onnx")
    r = quantize_int8(src, tmp_path / "q.onnx", "x", _inputs())                 # sub-pixel is the default
    assert r.conv_transpose == "sub-pixel"
    assert r.quantized_ops == {"Conv": 1, "ConvTranspose": 1} and r.float_ops == {"Conv": 1}
    assert trt_readiness(r.path) == []
    q = onnx.load(str(r.path))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    conv = {n.name: n for n in q.graph.node}["up1"]
    assert conv.op_type == "Conv"
    dq = {o: n for n in q.graph.node for o in n.output}[conv.input[1]]
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[1]].shape == (4 * 3,)   # one scale per channel
    assert next((a.i for a in dq.attribute if a.name == "axis"), 1) == 0
    assert all(not np.any(inits[n.input[2]]) for n in q.graph.node
               if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2)
    x = _inputs(1)[0]
    ref = _run(src, x)
    # simulated INT8 against FP32, and the per-tensor ConvTranspose file's error for scale
    per_tensor = quantize_int8(src, tmp_path / "pt.onnx", "x", _inputs(), conv_transpose="per-tensor").path
    err_sub, err_pt = np.abs(_run(r.path, x) - ref).max(), np.abs(_run(per_tensor, x) - ref).max()
    assert 0 < err_sub < 0.05 and err_sub <= 2 * err_pt
    # onnxruntime's optimised session runs it with integer kernels and gives the same mask region
    assert np.abs(_run(r.path, x, simulated=False) - ref).max() < 0.05


def test_float_layers_puts_the_sub_pixel_conv_back_in_float(tmp_path):
    src = _model(tmp_path / "m.onnx")
    quantize_int8(src, tmp_path / "q.onnx", "x", _inputs())
    fp32, qdq = onnx.load(str(src)), onnx.load(str(tmp_path / "q.onnx"))
    assert quantized_layers(qdq) == ["conv1", "up1"]
    one = float_layers(qdq, fp32, ["up1"])
    assert quantized_layers(one) == ["conv1"]
    inits = {i.name: numpy_helper.to_array(i) for i in one.graph.initializer}
    want = {i.name: numpy_helper.to_array(i) for i in sub_pixel_conv_transpose(fp32)[0].graph.initializer}
    assert np.array_equal(inits["wt_sub_pixel"], want["wt_sub_pixel"])          # the FP32 weight, rewritten
    onnx.checker.check_model(one)
    everything = [n.name for n in qdq.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    none_left = float_layers(qdq, fp32, everything)
    assert not {n.op_type for n in none_left.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    x = _inputs(1)[0]
    np.testing.assert_allclose(_run(none_left, x), _run(fp32, x), atol=1e-6)
