"""Quantization-aware fine-tuning (export.qat) on tiny-width UNet and VGG and synthetic phantom frames: QAT runs, the
Q/DQ file it exports has its Q/DQ pairs where calibration/quantize.py puts them for the same FP32 model, and that
file under onnxruntime with graph optimisations off (simulated quantization: no integer kernels, so the outcome is
the same on every CPU) computes what the QAT model's fake-quant forward computes. No figure here depends on trained
weights: the networks are untrained, and every bound is derived from the model under test."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from calibration.checks import trt_readiness
from calibration.quantize import quantize_int8, sub_pixel_weight
from export.fake_quant import fold_batch_norm, prepare_qat, qat_finetune, qdq_placement
from export.models import UNet, VGG19BN
from export.onnx_export import export_unet, export_vgg
from export.qat import export_qdq
from runtime.graph import Graph
from runtime.phantom import KidneyPhantom

UNET_SIZE = 64          # a UNet side must be a multiple of 16
VGG_SIZE = 224          # the VGG's feature stack ends at 7x7 here, as in the bundle (no average pool in the graph)


def _frames(size: int, count: int, seed: int):
    """Phantom frames at `size` (image float [N,1,S,S] as the runtime feeds it: uint8 / 255; mask 0/1; grade)."""
    images, masks, grades = [], [], []
    for i in range(count):
        ph = KidneyPhantom(grade=1 + (seed + i) % 4, seed=seed + i, height=size, width=size)
        f = ph.frame(i)
        images.append(f.image.astype(np.float32) * np.float32(1 / 255))
        masks.append(f.mask.astype(np.float32))
        grades.append(f.grade - 1)
    return (np.stack(images)[:, None], np.stack(masks)[:, None], np.array(grades, dtype=np.int64))


def _settle_batch_norm(model, x: np.ndarray):
    """Give every BatchNorm the statistics of the frames (its initial (0, 1) would leave the folded weights as they
    were, and the untrained network's activations, and so its outputs, nearly constant)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                           # a cumulative average: the frames' own statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(x))
    return model.eval()


def _case(network: str, tmp_path_factory, **options):
    torch.manual_seed(0)
    if network == "unet":
        graph, size = Graph(size=UNET_SIZE), UNET_SIZE
        model = UNet(width=1 / 16)
    else:
        graph, size = Graph(size=VGG_SIZE), VGG_SIZE
        model = VGG19BN(width=1 / 32, in_channels=1)
    images, masks, grades = _frames(size, 12, seed=3)
    model = _settle_batch_norm(model, images[:4])
    calib = [images[i:i + 1] for i in range(4)]                  # what `calibrate` would take
    train = images[4:8], (masks[4:8] if network == "unet" else grades[4:8])
    held = images[8:]
    placement = qdq_placement(model, calib, graph, **options)
    batches = [(torch.from_numpy(train[0][i:i + 2]), torch.from_numpy(train[1][i:i + 2])) for i in (0, 2)]
    qat = qat_finetune(model, batches, epochs=2, lr=1e-3, placement=placement, graph=graph)
    out = tmp_path_factory.mktemp(f"qat-{network}") / f"{network}.int8.onnx"
    info = export_qdq(qat, out, graph)
    return {"model": model, "graph": graph, "calib": calib, "placement": placement, "qat": qat, "path": out,
            "info": info, "held": held, "options": options}


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    return _case("unet", tmp_path_factory)


@pytest.fixture(scope="module")
def vgg_case(tmp_path_factory):
    return _case("vgg", tmp_path_factory)


@pytest.fixture(params=["unet", "vgg"])
def case(request):
    return request.getfixturevalue(f"{request.param}_case")


# -- placement ---------------------------------------------------------------------------------------------------

def _layout(path) -> dict:
    """A Q/DQ file's quantization layout, independent of tensor names: for each float node in order, its op, how
    each input arrives (a weight through DequantizeLinear with its axis, scale count and integer range, a float
    weight, a dequantized activation, a float activation; a bias by how it arrives) and whether its output is
    quantized; then which quantized
    activations share one scale (by position), and the Q/DQ counts."""
    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qdq = ("QuantizeLinear", "DequantizeLinear")
    rows, quantized = [], []
    for n in g.node:
        if n.op_type in qdq:
            continue
        ins = []
        for x in n.input:
            src = producer.get(x)
            if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
                q = numpy_helper.to_array(inits[src.input[0]])
                scale = numpy_helper.to_array(inits[src.input[1]])
                axis = next((a.i for a in src.attribute if a.name == "axis"), None) if scale.size > 1 else None
                ins.append(("int8-weight", axis, scale.size, int(np.abs(q).max()) <= 64))
            elif x in inits:
                ins.append(("float-init",))
            elif src is not None and src.op_type == "DequantizeLinear":
                ins.append(("dq-activation",))
            else:
                ins.append(("float-activation",))
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            # A zero bias is dropped by the exporter, so an untrained last layer has none while a trained one has
            # one: only how a bias arrives counts (float, or behind a DequantizeLinear).
            ins = ins[:2] + [("bias", ins[2][0] if len(ins) > 2 else "float-init")]
        outs = []
        for y in n.output:
            qs = [c for c in consumers.get(y, []) if c.op_type == "QuantizeLinear"]
            outs.append(qs[0].input[1] if qs else None)
            if qs:
                quantized.append(qs[0].input[1])
        rows.append((n.op_type, tuple(ins), tuple(o is not None for o in outs)))
    input_q = [c.input[1] for c in consumers.get(g.input[0].name, []) if c.op_type == "QuantizeLinear"]
    order = input_q + quantized
    sharing = [order.index(s) for s in order]          # the first activation with the same scale initializer
    counts = {op: sum(n.op_type == op for n in g.node) for op in qdq}
    return {"nodes": rows, "input_quantized": bool(input_q), "sharing": sharing, "counts": counts}


def _calibration_file(c, tmp_path):
    """calibration/quantize.py's Q/DQ file for the same FP32 model (BatchNorm unfolded, the bundle's exporter)."""
    fp32 = tmp_path / "fp32.onnx"
    net = c["placement"].network
    (export_unet if net == "unet" else export_vgg)(c["model"], fp32, c["graph"])
    ref = tmp_path / "ref.int8.onnx"
    # qdq_placement's options (ConvTranspose: calibrate's default, sub-pixel, unless the case gives another)
    quantize_int8(fp32, ref, c["placement"].input_name, c["calib"], **c["placement"].options)
    return ref


def test_qdq_placement_is_calibrations(case, tmp_path):
    ref = _layout(_calibration_file(case, tmp_path))
    got = _layout(case["path"])
    assert got["counts"] == ref["counts"] and got["counts"]["QuantizeLinear"] > 10
    assert got["input_quantized"] and ref["input_quantized"]
    assert got["nodes"] == ref["nodes"]
    assert got["sharing"] == ref["sharing"]
    assert trt_readiness(case["path"]) == []


def test_placement_keeps_calibrations_rules(unet_case, vgg_case):
    """The rules calibration/quantize.py states, seen in the QAT files: 7-bit per-channel Conv/Gemm weights on axis
    0, the output tail (the UNet's last conv, the VGG's Fc2 and head) float. ConvTranspose (calibrate's default,
    sub-pixel): QAT trains each one's weight per tensor and the file holds its sub-pixel form, a 3x3 Conv with 4K
    channels whose weights are those integers rearranged, the per-tensor scale on every channel, and DepthToSpace."""
    u, v = unet_case["placement"], vgg_case["placement"]
    assert {w.qmax for w in {**u.weights, **v.weights}.values()} == {64}
    assert all(w.axis == 0 for w in {**u.weights, **v.weights}.values() if w.op_type in ("Conv", "Gemm"))
    transposed = [w for w, spec in u.weights.items() if spec.op_type == "ConvTranspose"]
    assert [u.weights[w].axis for w in transposed] == [None] * 4
    assert u.float_weights == ["conv0.0.weight"]
    assert sorted(v.float_weights) == ["vgg.fc2.weight", "vgg.head.weight"]
    assert unet_case["info"]["quantized_ops"] == {"Conv": 18, "ConvTranspose": 4}
    m = onnx.load(str(unet_case["path"]))
    ops = [n.op_type for n in m.graph.node]
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == 4
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    qat = unet_case["qat"]
    with torch.no_grad():
        for w in transposed:
            fq = qat.weight_quantizers()[w]
            w_hat = fq(qat.gm.state_dict()[w]).numpy()                     # [C, K, 4, 4] on one grid
            q, scale = inits[f"{w}_sub_pixel_quantized"], inits[f"{w}_sub_pixel_scale"]
            c, k = w_hat.shape[:2]
            assert q.shape == (4 * k, c, 3, 3) and scale.shape == (4 * k,) and np.all(scale == scale[0])
            assert np.array_equal(q, sub_pixel_weight(np.round(w_hat / scale[0]).astype(np.int8)))
            assert np.count_nonzero(q) == np.count_nonzero(np.round(w_hat / scale[0]))   # every tap once
    assert vgg_case["info"]["float_ops"] == {"Gemm": 2}
    for c in (unet_case, vgg_case):
        m = onnx.load(str(c["path"]))
        ints = [numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith("_quantized")]
        assert ints and all(a.dtype == np.int8 and np.abs(a).max() <= 64 for a in ints)


# -- QAT ---------------------------------------------------------------------------------------------------------

def test_qat_trains_the_folded_weights(case):
    qat, model = case["qat"], case["model"]
    folded = fold_batch_norm(model).state_dict()
    trained = qat.float_model().state_dict()
    assert trained.keys() == folded.keys()
    moved = [k for k in folded if not torch.equal(folded[k], trained[k])]
    assert len(moved) == len(folded)                 # Adam moves every parameter on its first step
    # The exported file carries the trained weights (through their fake-quant), not the original ones.
    m = onnx.load(str(case["path"]))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    name = next(iter(case["placement"].weights))
    fq = qat.weight_quantizers()[name]
    with torch.no_grad():
        expected = fq(qat.gm.state_dict()[name]).numpy()
    shape = [1] * expected.ndim
    if case["placement"].weights[name].axis is not None:
        shape[0] = -1
    assert np.array_equal(inits[f"{name}_quantized"].astype(np.float32) * inits[f"{name}_scale"].reshape(shape),
                          expected)


def test_scales_are_frozen_after_qat(case):
    qat = case["qat"]
    before = {k: m.scale.clone() for k, m in qat.activation_quantizers().items()}
    with torch.no_grad():
        qat(torch.from_numpy(case["held"]) * 3)       # data far outside the observed range
    assert all(torch.equal(before[k], m.scale) for k, m in qat.activation_quantizers().items())


# -- fidelity: the file under simulated quantization vs the fake-quant forward -------------------------------------

def _simulated(path, x: np.ndarray) -> list[np.ndarray]:
    from runtime.backends.ort import optimization_level
    opts = ort.SessionOptions()
    opts.graph_optimization_level = optimization_level(simulated_quantization=True)   # no QDQ fusion: Q, DQ, float
    opts.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


def _torch(module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _float_outputs(qat, x):
    from export.models import VGGFeaturesAndLogits
    f = qat.float_model()
    return _torch(f if qat.placement.network == "unet" else VGGFeaturesAndLogits(f), x)


# The tolerance: torch's and onnxruntime's float kernels sum in different orders, so a value on a rounding boundary
# can land one step apart. The file must match the fake-quant forward within 0.1% of the fake-quant forward's own
# distance from float (max |difference| over the outputs); the negative control below shows that every fake-quant
# that changes the numbers at all is needed to stay within it.
SIM_TOLERANCE = 1e-3


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


def test_simulated_file_matches_fake_quant_forward(case):
    x = case["held"]
    fq = _torch(case["qat"], x)
    sim = _simulated(case["path"], x)
    quant_noise = _distance(fq, _float_outputs(case["qat"], x))
    assert quant_noise > 0
    assert [a.shape for a in sim] == [a.shape for a in fq]
    assert _distance(sim, fq) <= SIM_TOLERANCE * quant_noise, (_distance(sim, fq), quant_noise)


def test_every_fake_quant_is_needed_for_the_match(case):
    """Negative control: with any one fake-quant turned off, the model no longer matches the file within the
    tolerance, unless that fake-quant changes nothing at all (a re-quantization at the scale its input already has:
    a MaxPool's or Reshape's output, a ReLU's after a tensor with the same scale)."""
    qat, x = case["qat"], case["held"][:2]
    sim = _simulated(case["path"], x)
    fq_out = _torch(qat, x)
    tolerance = SIM_TOLERANCE * _distance(fq_out, _float_outputs(qat, x))
    quantizers = [*qat.activation_quantizers().items(), *qat.weight_quantizers().items()]
    needed, no_ops = [], []
    for name, fq in {id(m): (n, m) for n, m in quantizers}.values():
        fq.disable_fake_quant()
        try:
            broken = _torch(qat, x)
        finally:
            fq.enable_fake_quant()
        if _distance(broken, fq_out) == 0:
            no_ops.append(name)
        else:
            needed.append(name)
            assert _distance(sim, broken) > tolerance, name
    assert len(needed) > len(no_ops)
    assert not set(no_ops) & set(qat.weight_quantizers())       # every weight's quantization shows


def test_full_range_and_float_conv_transpose_options(tmp_path_factory):
    """The other options calibration offers give the same match: 8-bit weights ([-127, 127]), ConvTranspose in
    float."""
    c = _case("unet", tmp_path_factory, full_range_weights=True, conv_transpose="float")
    assert {w.qmax for w in c["placement"].weights.values()} == {127}
    assert "upsample54.0.weight" in c["placement"].float_weights
    assert c["info"]["float_ops"] == {"Conv": 1, "ConvTranspose": 4} and c["info"]["weight_bits"] == 8
    ref = _layout(_calibration_file(c, tmp_path_factory.mktemp("ref")))
    assert _layout(c["path"])["nodes"] == ref["nodes"]
    x = c["held"]
    fq = _torch(c["qat"], x)
    assert _distance(_simulated(c["path"], x), fq) <= SIM_TOLERANCE * _distance(fq, _float_outputs(c["qat"], x))


def test_per_tensor_conv_transpose_option(tmp_path_factory):
    """`conv_transpose="per-tensor"` keeps each ConvTranspose in the file (its weight per tensor: TensorRT's form
    for it), with the same match; the file and the sub-pixel one written from the same QAT model compute the same
    outputs under simulated quantization, up to float summation order."""
    c = _case("unet", tmp_path_factory, conv_transpose="per-tensor")
    ops = [n.op_type for n in onnx.load(str(c["path"])).graph.node]
    assert ops.count("ConvTranspose") == 4 and "DepthToSpace" not in ops
    ref = _layout(_calibration_file(c, tmp_path_factory.mktemp("ref")))
    assert _layout(c["path"])["nodes"] == ref["nodes"]
    x = c["held"]
    fq = _torch(c["qat"], x)
    noise = _distance(fq, _float_outputs(c["qat"], x))
    per_tensor = _simulated(c["path"], x)
    assert _distance(per_tensor, fq) <= SIM_TOLERANCE * noise
    # The same trained model written in the sub-pixel form.
    qat = c["qat"]
    qat.placement.options["conv_transpose"] = "sub-pixel"
    try:
        sub = tmp_path_factory.mktemp("sub") / "unet.int8.onnx"
        export_qdq(qat, sub, c["graph"])
    finally:
        qat.placement.options["conv_transpose"] = "per-tensor"
    assert "DepthToSpace" in [n.op_type for n in onnx.load(str(sub)).graph.node]
    assert _distance(_simulated(sub, x), per_tensor) <= SIM_TOLERANCE * noise


# -- misuse ------------------------------------------------------------------------------------------------------

def test_misuse_is_refused(unet_case):
    with pytest.raises(ValueError, match="placement is for a unet"):
        prepare_qat(VGG19BN(width=1 / 32, in_channels=1), unet_case["placement"], Graph(size=VGG_SIZE))
    with pytest.raises(TypeError, match="export_qdq takes the model"):
        export_qdq(unet_case["model"], "/nonexistent/x.onnx")
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        qat_finetune(unet_case["model"], [], epochs=0, lr=1e-3, placement=unet_case["placement"])
