"""Quantization-aware fine-tuning (QAT) with fake-quant exactly where the INT8 Q/DQ file has its Q/DQ pairs.

The INT8 file a bundle ships is calibration/quantize.py's: onnxruntime's static QDQ quantizer run on the bundle's
FP32 ONNX (symmetric INT8, 7-bit per-channel weights by default, each 4x4 stride-2 ConvTranspose in its sub-pixel
form by default (a Conv and DepthToSpace) or per tensor or float, biases float, the output tail float). QAT here
trains against that same file, not against an approximation of it:

1. `qdq_placement(model, inputs, graph, ...)` folds the BatchNorms into their convolutions (what the ONNX exporter
   does), exports the FP32 graph with the bundle's exporter settings (export.onnx_export) and quantizes it with
   `calibration.quantize.quantize_int8` on `inputs`. Reading that file gives the placement: every activation tensor
   with a QuantizeLinear/DequantizeLinear pair (and which of them share one scale: onnxruntime gives a MaxPool's or
   a Reshape's output its input's scale), every weight behind a DequantizeLinear (per-channel axis or per tensor,
   7 or 8 bits) and the weighted layers left in float. Its calibrated scales start the fine-tuning. For the
   sub-pixel form the placement is read from the per-tensor layout: the ConvTranspose trains with its weight on one
   per-tensor grid, which the sub-pixel Conv holds exactly (the same integers rearranged, that scale on every
   channel; its activations are the same values shuffled, with the same scales).
2. `qat_finetune(model, batches, epochs=, lr=, placement=)` traces the folded model with the same exporter
   (`torch.onnx.export(dynamo=True)`; its ExportedProgram names every value as the ONNX file does), inserts
   `torch.ao.quantization.FakeQuantize` modules after exactly those values and weights, and fine-tunes it.
   Activations: moving-average min/max observers, symmetric, zero point 0, the [-128, 127] range QuantizeLinear
   saturates to; tensors that share a scale in the file share it here. Weights: per-channel (or per-tensor)
   symmetric fake-quant on the [-64, 64] range of the 7-bit file (or [-127, 127]), scale = |w|max / 64 (or 127)
   taken from the current weights at every step, which is how onnxruntime quantizes them. Any tensor of the file
   that cannot be found in the traced graph is an error: the two never drift apart silently.
3. `export_qdq(model, path, graph)` exports the fine-tuned float weights through the bundle's exporter, has
   `quantize_int8` lay out the Q/DQ file again (same options: the same nodes, names and form, TensorRT-ready as
   calibration's output is), then writes the fake-quant modules' scales and the integer weights they produce into
   it. Under onnxruntime with graph optimisations off (simulated quantization: QuantizeLinear, DequantizeLinear and
   float kernels, no integer kernels) the file computes what the QAT model's forward computes, up to float
   accumulation order.

Library choice. NVIDIA's `nvidia-modelopt` (0.47.0) installs beside torch 2.13.0 (its base requirements carry no
torch of their own; `requests` and `huggingface_hub`, which it imports unconditionally, are not declared) and its
INT8 QAT runs on the CPU, but it does not fit this file: its ONNX export works only through the deprecated
TorchScript exporter (the torch.export-based one the bundle uses fails on a data-dependent branch in its quantizer),
it exports only 8-bit INT8 (not the 7-bit weights CPUs without VNNI need), it quantizes weights before the
BatchNorm is folded (the file would keep BatchNormalization behind quantized weights), it places quantizers per
module (inputs of Conv/Linear/pooling; a concatenation or an activation output cannot be given one), its
ConvTranspose weights go per input channel (axis 0), and its ONNX side pins onnx 1.21 and onnxruntime-gpu 1.24.
`torch.ao.quantization`'s FakeQuantize and observers do fit, placed on the exported graph as above.

Not covered: Dropout is off during QAT (the traced graph is the inference graph); the BatchNorms are frozen,
folded into the convolutions.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

ACT_QMIN, ACT_QMAX = -128, 127          # what QuantizeLinear to INT8 saturates to (TensorRT's range too)
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class WeightSpec:
    """How one weight is quantized in the Q/DQ file."""
    op_type: str                 # Conv, ConvTranspose, Gemm
    axis: int | None             # per-channel axis, None for per tensor
    qmax: int                    # 64 (7-bit, the default) or 127 (8-bit); the range is [-qmax, qmax]


@dataclass
class Placement:
    """Where calibration/quantize.py's Q/DQ file quantizes a network (names are the ONNX file's value names)."""
    network: str                                  # "unet" or "vgg"
    input_name: str
    output_names: list[str]
    channels: int
    size: int
    activations: dict[str, str]                   # quantized tensor -> its scale's initializer (shared = same name)
    scales: dict[str, float]                      # scale initializer -> calibrated value (QAT starts there)
    weights: dict[str, WeightSpec]                # weight initializer (the parameter's name) -> how it is quantized
    float_weights: list[str]                      # weights of weighted layers left in float
    options: dict = field(default_factory=dict)   # the quantize_int8 options that made it

    def to_dict(self) -> dict:
        return asdict(self)


# -- model preparation ------------------------------------------------------------------------------------------

def fold_batch_norm(model):
    """A copy of `model` in eval mode with every BatchNorm2d folded into the Conv2d before it (in the same
    nn.Sequential) and replaced by nn.Identity: the graph the ONNX exporter writes, with the weights it writes."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                              bn.running_var, bn.eps, bn.weight, bn.bias)
                seq._modules[b] = nn.Identity()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()):
        raise ValueError("the model has a BatchNorm that does not follow a Conv2d in an nn.Sequential; QAT cannot "
                         "fold it the way the ONNX exporter does")
    return folded


def _network(model) -> str:
    from export.models import UNet, VGG19BN
    if isinstance(model, UNet):
        return "unet"
    if isinstance(model, VGG19BN):
        return "vgg"
    raise TypeError(f"QAT takes export.models.UNet or VGG19BN, not {type(model).__name__}")


def _network_of(model) -> str:
    """The network of an FP32 model or of a QAT model (prepare_qat / qat_finetune's)."""
    return model.placement.network if hasattr(model, "gm") and hasattr(model, "placement") else _network(model)


def _io(network: str, model, graph) -> tuple[str, list[str], int]:
    if network == "unet":
        return graph.unet_input, [graph.unet_output], 1
    return graph.vgg_input, [graph.vgg_output] + (["logits"] if model.head is not None else []), model.in_channels


def _traced(folded, network: str, path: Path, graph):
    """Export the folded model as export.onnx_export does (same exporter, opset, names, dynamic batch) and return
    the exporter's ExportedProgram as a trainable GraphModule; its node names are the ONNX file's value names."""
    from export.models import VGGFeaturesAndLogits
    from export.onnx_export import OPSET, _quiet_exporter

    module = folded if network == "unet" else VGGFeaturesAndLogits(folded)
    module.eval()
    input_name, output_names, channels = _io(network, folded, graph)
    example = torch.rand(2, channels, graph.size, graph.size)
    with _quiet_exporter():
        program = torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                                    opset_version=OPSET, input_names=[input_name], output_names=output_names,
                                    dynamic_shapes=({0: torch.export.Dim("N", min=1, max=4096)},), optimize=True,
                                    verbose=False)
    return program.exported_program.module()


# -- placement ---------------------------------------------------------------------------------------------------

def _graph_or_default(graph):
    from runtime.graph import Graph
    return graph or Graph()


def _placement_graph(pl: Placement):
    """A runtime.graph.Graph with the placement's names, channels and size (and the default normalization)."""
    from runtime.graph import Graph
    if pl.network == "unet":
        return Graph(size=pl.size, unet_input=pl.input_name, unet_output=pl.output_names[0])
    return Graph(size=pl.size, vgg_input=pl.input_name, vgg_output=pl.output_names[0], vgg_channels=pl.channels)


def _read_placement(qdq_path: Path, network: str, input_name: str, output_names: list[str], channels: int,
                    size: int, options: dict) -> Placement:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(qdq_path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    activations: dict[str, str] = {}
    scales: dict[str, float] = {}
    weights: dict[str, WeightSpec] = {}
    floats: list[str] = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            activations[n.input[0]] = n.input[1]
            scales[n.input[1]] = float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0])
    for n in g.node:
        if n.op_type not in WEIGHTED or len(n.input) < 2:
            continue
        src = producer.get(n.input[1])
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            name = src.input[0][: -len("_quantized")] if src.input[0].endswith("_quantized") else src.input[0]
            axis = next((a.i for a in src.attribute if a.name == "axis"), 1)
            per_channel = numpy_helper.to_array(inits[src.input[1]]).size > 1
            weights[name] = WeightSpec(n.op_type, axis if per_channel else None,
                                       127 if options.get("full_range_weights") else 64)
        elif n.input[1] in inits:
            floats.append(n.input[1])
    return Placement(network, input_name, list(output_names), channels, size, activations, scales, weights, floats,
                     dict(options))


def qdq_placement(model, inputs: Sequence[np.ndarray], graph=None, *, method: str = "minmax",
                  conv_transpose: str = "sub-pixel", full_range_weights: bool = False,
                  float_outputs: bool = True, keep_float_nodes: Sequence[str] = ()) -> Placement:
    """The Q/DQ placement (and calibrated scales) calibration/quantize.py gives `model` (a UNet or VGG19BN, FP32)
    when calibrated on `inputs` (ready [1, C, H, W] float32 arrays, as `quantize_int8` takes them) with these
    options. `keep_float_nodes` names nodes of the folded model's export: the names of `export_qdq`'s file and of
    an FP32 file exported from `QATModel.float_model()` (an export of the unfolded model names its nodes
    differently).

    `conv_transpose="sub-pixel"` (calibrate's default): the placement is read from the per-tensor layout, so QAT
    trains each ConvTranspose as it is, its weight on one per-tensor grid, and `export_qdq` writes the sub-pixel
    form (calibration.quantize.sub_pixel_conv_transpose: a 3x3 Conv with 4K channels and DepthToSpace, which
    onnxruntime's CPU runs on integer kernels). That form is exact: the sub-pixel weight holds the same integers,
    rearranged, with the per-tensor scale on every channel, and its activations are the ConvTranspose's (and the
    ReLU's) values shuffled, quantized with the same scales."""
    from calibration.quantize import quantize_int8

    graph = _graph_or_default(graph)
    network = _network(model)
    folded = fold_batch_norm(model)
    input_name, output_names, channels = _io(network, folded, graph)
    options = {"method": method, "conv_transpose": conv_transpose, "full_range_weights": bool(full_range_weights),
               "float_outputs": bool(float_outputs), "keep_float_nodes": list(keep_float_nodes)}
    with tempfile.TemporaryDirectory(prefix="sonoscore-qat-") as tmp:
        fp32 = Path(tmp) / f"{network}.onnx"
        _traced(folded, network, fp32, graph)
        qdq = Path(tmp) / f"{network}.int8.onnx"
        layout = {**options, "conv_transpose": "per-tensor"} if conv_transpose == "sub-pixel" else options
        quantize_int8(fp32, qdq, input_name, list(inputs), **layout)
        return _read_placement(qdq, network, input_name, output_names, channels, graph.size, options)


# -- the QAT model -----------------------------------------------------------------------------------------------

def _act_fake_quant(scale: float):
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, averaging_constant=0.01, quant_min=ACT_QMIN,
                      quant_max=ACT_QMAX, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    # Start from the calibrated range: |x|max = scale * 127 (onnxruntime's symmetric scale is |x|max / 127).
    amax = torch.tensor(float(scale) * 127.0)
    fq.activation_post_process.min_val.resize_(()).fill_(-amax)
    fq.activation_post_process.max_val.resize_(()).fill_(amax)
    s, z = fq.activation_post_process.calculate_qparams()
    fq.scale.resize_(s.shape).copy_(s)
    fq.zero_point.resize_(z.shape).copy_(z)
    return fq


def _weight_fake_quant(spec: WeightSpec):
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    # averaging_constant=1: the range is the current weights' at every step, as onnxruntime takes it at export.
    if spec.axis is None:
        return FakeQuantize(observer=MovingAverageMinMaxObserver, averaging_constant=1.0, quant_min=-spec.qmax,
                            quant_max=spec.qmax, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                        quant_min=-spec.qmax, quant_max=spec.qmax, dtype=torch.qint8,
                        qscheme=torch.per_channel_symmetric, ch_axis=spec.axis)


def _module_name(prefix: str, name: str) -> str:
    return prefix + "".join(c if c.isalnum() else "_" for c in name)


class QATModel(nn.Module):
    """A folded UNet/VGG traced as the exporter traces it, with fake-quant where the Q/DQ file quantizes.

    `forward` returns what the exported file returns (UNet: the mask; VGG: (features, logits), or (features,) for
    a VGG cut at Fc2). `float_model()` is the folded network (BatchNorms folded, nn.Identity in their place) with
    the current weights: what the bundle's exporter takes."""

    def __init__(self, gm, folded, placement: Placement, graph):
        super().__init__()
        self.gm = gm
        self.placement = placement
        self.graph = graph
        self._folded = [folded]           # not a submodule: float_model() copies the trained weights into it

    def train(self, mode: bool = True):
        """Only this module's flag: the traced graph is the inference graph either way (no Dropout, BatchNorm
        folded), and torch's exported modules refuse train()/eval(). The observers follow `observe`."""
        self.training = bool(mode)
        return self

    def forward(self, x):
        out = self.gm(x)
        if self.placement.network == "unet":
            return out[0] if isinstance(out, (tuple, list)) else out
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def activation_quantizers(self) -> dict[str, nn.Module]:
        """quantized tensor (the ONNX name) -> the FakeQuantize that owns its scale"""
        mods = dict(self.gm.named_children())
        return {t: mods[_module_name("aq_", owner)] for t, owner in _scale_owners(self.placement).items()}

    def weight_quantizers(self) -> dict[str, nn.Module]:
        """weight (the ONNX initializer's name) -> its FakeQuantize"""
        mods = dict(self.gm.named_children())
        return {w: mods[_module_name("wq_", w)] for w in self.placement.weights}

    def observe(self, enabled: bool) -> None:
        """Let the activation observers follow the data (True) or freeze the scales (False)."""
        from torch.ao.quantization import disable_observer, enable_observer
        for name, m in self.gm.named_children():
            if name.startswith("aq_"):
                m.apply(enable_observer if enabled else disable_observer)

    def float_model(self):
        from export.models import VGGFeaturesAndLogits
        folded = copy.deepcopy(self._folded[0])
        target = folded if self.placement.network == "unet" else VGGFeaturesAndLogits(folded)
        own = target.state_dict()
        target.load_state_dict({k: v.detach().clone() for k, v in self.gm.state_dict().items() if k in own})
        return folded.eval()


def _scale_owners(pl: Placement) -> dict[str, str]:
    """quantized tensor -> the tensor that owns its scale: the one the scale initializer is named after
    (onnxruntime names it `<tensor>_scale`), else the first with that scale."""
    by_scale = {s: t for t, s in pl.activations.items() if s == f"{t}_scale"}
    for tensor, scale_name in pl.activations.items():
        by_scale.setdefault(scale_name, tensor)
    return {t: by_scale[s] for t, s in pl.activations.items()}


def prepare_qat(model, placement: Placement, graph=None):
    """The QAT model for `model` (FP32 UNet/VGG19BN): fake-quant inserted at `placement` (see `qdq_placement`)."""

    network = _network(model)
    graph = graph or _placement_graph(placement)
    if network != placement.network:
        raise ValueError(f"the placement is for a {placement.network}, the model is a {network}")
    input_name, output_names, channels = _io(network, model, graph)
    if (input_name, output_names, channels, graph.size) != (placement.input_name, placement.output_names,
                                                             placement.channels, placement.size):
        raise ValueError("the placement was made for other input/output names, channels or size than this graph's")
    folded = fold_batch_norm(model)
    with tempfile.TemporaryDirectory(prefix="sonoscore-qat-") as tmp:
        gm = _traced(folded, network, Path(tmp) / f"{network}.onnx", graph)
    g = gm.graph
    nodes = {n.name: n for n in g.nodes}
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    out_node = next(n for n in g.nodes if n.op == "output")
    outs = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    by_onnx_name = {placement.input_name: inputs[0], **dict(zip(placement.output_names, outs))}

    def fx_node(name: str):
        node = by_onnx_name.get(name) or nodes.get(name)
        if node is None:
            raise RuntimeError(f"the Q/DQ file quantizes '{name}' but the traced {network} has no such value; the "
                               f"QAT graph would not match the exported file")
        return node

    def insert_after(node, make):
        with g.inserting_after(node):
            new = make()
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

    # Activations: the tensor a scale is named after owns the FakeQuantize; the others with that scale follow it.
    owners = _scale_owners(placement)
    for tensor in sorted(set(owners.values())):
        mod = _module_name("aq_", tensor)
        gm.add_submodule(mod, _act_fake_quant(placement.scales[placement.activations[tensor]]))
        node = fx_node(tensor)
        insert_after(node, lambda node=node, mod=mod: g.call_module(mod, (node,)))
    for tensor, owner in owners.items():
        if owner == tensor:
            continue
        mod = _module_name("aq_", owner)
        node = fx_node(tensor)

        with g.inserting_before(node):
            scale, zero = g.get_attr(f"{mod}.scale"), g.get_attr(f"{mod}.zero_point")
        insert_after(node, lambda node=node, scale=scale, zero=zero: g.call_function(
            torch.fake_quantize_per_tensor_affine, (node, scale, zero, ACT_QMIN, ACT_QMAX)))

    # Weights: a FakeQuantize between the parameter and the layer that reads it.
    params = {n.target: n for n in g.nodes if n.op == "get_attr"}
    for weight, spec in placement.weights.items():
        node = params.get(weight)
        if node is None:
            raise RuntimeError(f"the Q/DQ file quantizes weight '{weight}' but the traced {network} has no such "
                               f"parameter")
        mod = _module_name("wq_", weight)
        gm.add_submodule(mod, _weight_fake_quant(spec))
        insert_after(node, lambda node=node, mod=mod: g.call_module(mod, (node,)))
    g.lint()
    gm.recompile()
    return QATModel(gm, folded, placement, graph)


# -- fine-tuning -------------------------------------------------------------------------------------------------

VGG_LOSSES = ("ce", "distill", "distill+ce")
ACTIVATION_SCALES = ("calibration", "observed")   # qat_networks: fixed at the placement's calibration, or observed


def _observe_epochs(scales: str, epochs: int) -> int:
    """The epochs whose activation observers follow the data: none for the calibration's fixed scales, else all but
    the last (or the only one)."""
    return 0 if scales == "calibration" else max(1, epochs - 1)
UNET_LOSSES = ("mse", "distill")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cosine(student row, teacher row): the VGG's Fc2 features under fake-quant against
    the FP32 network's on the same inputs. 0 when the rows point the same way; the teacher gets no gradient."""
    import torch.nn.functional as F
    s, t = student.flatten(1), teacher.detach().flatten(1)
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def mask_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the fake-quant UNet's probability map and the FP32 UNet's on the same inputs
    (the recipe's MSE on the sigmoid, with the FP32 mask in place of the label). 0 when the maps agree; the teacher
    gets no gradient."""
    import torch.nn.functional as F
    return F.mse_loss(student, teacher.detach())


def _default_loss(network: str, vgg_loss: str = "ce", unet_loss: str = "mse"):
    import torch.nn.functional as F
    if network == "unet":
        if unet_loss == "distill":              # toward the FP32 UNet's probability map
            return lambda out, y, teacher: mask_distillation_loss(out, teacher)
        return lambda out, y: F.mse_loss(out, y)   # the paper's (export.train): MSE on the sigmoid against the labels
    if vgg_loss == "ce":
        return lambda out, y: F.cross_entropy(out[-1], y)     # cross-entropy on the logits against the grades
    if vgg_loss == "distill":
        return lambda out, y, teacher: distillation_loss(out[0], teacher[0])
    return lambda out, y, teacher: distillation_loss(out[0], teacher[0]) + F.cross_entropy(out[-1], y)


class _Teacher:
    """The frozen FP32 network whose outputs the fake-quant model learns to reproduce: the VGG's Fc2 features
    (`vgg_loss="distill"`) or the UNet's probability map (`unet_loss="distill"`). Folded as the exporter folds it,
    eval mode, no gradients; called on the same inputs as the student."""

    def __init__(self, model, network: str):
        from export.models import VGGFeaturesAndLogits
        if hasattr(model, "gm") and hasattr(model, "placement"):
            model = model.float_model()
        if _network(model) != network:
            label, kind = ("VGG", "VGG19BN") if network == "vgg" else ("UNet", "UNet")
            raise ValueError(f"distillation of the {label} takes a {kind} teacher, not a {type(model).__name__}")
        folded = fold_batch_norm(model)
        self.module = (VGGFeaturesAndLogits(folded) if network == "vgg" else folded).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor):
        with torch.no_grad():
            return self.module(x)


def qat_finetune(model, batches: Iterable, *, epochs: int, lr: float, placement: Placement, graph=None,
                 loss_fn: Callable | None = None, observe_epochs: int | None = None,
                 log: Callable[[str], None] | None = None, vgg_loss: str = "ce", teacher=None,
                 unet_loss: str = "mse"):
    """Quantization-aware fine-tuning of `model` (an FP32 UNet or VGG19BN, or a model this function returned) on
    `batches` (re-iterable (inputs [B,C,H,W] float, targets) pairs, fed as the network is fed: UNet targets are
    0/1 masks [B,1,H,W] float, VGG targets class indices [B] long) for `epochs` epochs of Adam at `lr`.

    Fake-quant sits where `placement` (from `qdq_placement`) says the Q/DQ file quantizes. The activation
    observers follow the data for the first `observe_epochs` epochs and are frozen after, so at least the last
    epoch trains against the scales the file will carry. Default: 0 with distillation (the scales stay the
    placement's min-max calibration and the weights learn to them: docs/benchmarks.md, "INT8 research behind the
    defaults", measured steadier and closer to FP32 than scales that follow the data), else all epochs but the last
    (or the only one). Returns the QAT model in eval mode (observers frozen); `export_qdq` writes its Q/DQ file.

    `vgg_loss` (VGG only): "ce", cross-entropy of the logits against the grades; "distill", `distillation_loss`
    between the fake-quant Fc2 features and `teacher`'s on the same inputs (what the booster reads, so what INT8
    must keep); "distill+ce", their sum. `unet_loss` (UNet only): "mse", the recipe's MSE of the probability map
    against the label masks; "distill", `mask_distillation_loss` between the fake-quant probability map and
    `teacher`'s on the same inputs (the mask the booster was trained on; the label masks play no part).
    `teacher`: the FP32 network distilled from, frozen (default: `model` as given, before any step). A `loss_fn`
    replaces the loss; with distillation it is called as loss_fn(out, targets, teacher_out)."""

    if epochs < 1:
        raise ValueError(f"QAT epochs must be at least 1 (got {epochs})")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if vgg_loss not in VGG_LOSSES:
        raise ValueError(f"vgg_loss must be one of {', '.join(VGG_LOSSES)} (got {vgg_loss!r})")
    if unet_loss not in UNET_LOSSES:
        raise ValueError(f"unet_loss must be one of {', '.join(UNET_LOSSES)} (got {unet_loss!r})")
    network = _network_of(model)
    if vgg_loss != "ce" and network != "vgg":
        raise ValueError(f"vgg_loss={vgg_loss!r} distills the VGG's features; for the UNet give unet_loss")
    if unet_loss != "mse" and network != "unet":
        raise ValueError(f"unet_loss={unet_loss!r} distills the UNet's mask; for the VGG give vgg_loss")
    distill = vgg_loss != "ce" or unet_loss != "mse"
    teach = _Teacher(teacher if teacher is not None else model, network) if distill else None
    qat = model if hasattr(model, "gm") and hasattr(model, "placement") else prepare_qat(model, placement, graph)
    loss_fn = loss_fn or _default_loss(qat.placement.network, vgg_loss, unet_loss)
    if observe_epochs is None:
        observe_epochs = _observe_epochs("calibration" if distill else "observed", epochs)
    params = [p for p in qat.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the traced model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    qat.train()
    for epoch in range(epochs):
        qat.observe(epoch < observe_epochs)
        total, seen = 0.0, 0
        for x, y in batches:
            x = torch.as_tensor(x, dtype=torch.float32)
            y = torch.as_tensor(y)
            y = y.float() if qat.placement.network == "unet" else y.long()
            loss = loss_fn(qat(x), y, teach(x)) if teach is not None else loss_fn(qat(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            seen += len(x)
        if not seen:
            raise ValueError(f"QAT got no batches in epoch {epoch + 1}; pass a list (or another re-iterable) of "
                             f"(inputs, targets) batches")
        if log:
            log(f"  QAT {qat.placement.network} epoch {epoch + 1}/{epochs}: loss {total / seen:.4f}")
    qat.observe(False)
    return qat.eval()


# -- export ------------------------------------------------------------------------------------------------------

def _sub_pixel_names(fp32: Path) -> tuple[dict[str, str], dict[str, str]]:
    """For the sub-pixel form calibration.quantize.sub_pixel_conv_transpose makes of the FP32 file `fp32`: ({tensor
    of the sub-pixel form: the traced tensor holding the same values, shuffled}, {sub-pixel Conv weight: the
    ConvTranspose weight it is made from})."""
    import onnx

    from calibration.quantize import sub_pixel_conv_transpose

    m, done = sub_pixel_conv_transpose(onnx.load(str(fp32)))
    producer = {o: n for n in m.graph.node for o in n.output}
    acts: dict[str, str] = {}
    weights: dict[str, str] = {}
    for n in m.graph.node:
        if n.op_type != "DepthToSpace" or n.name[: -len("_depth_to_space")] not in done:
            continue
        mid, out = n.input[0], n.output[0]
        acts[mid] = out                       # before the shuffle: the ConvTranspose's (or its ReLU's) output
        conv = producer[mid]
        if conv.op_type == "Relu":
            acts[conv.input[0]] = conv.input[0][: -len("_sub_pixel")]   # the Conv's: the ConvTranspose's output
            conv = producer[conv.input[0]]
        weights[conv.input[1]] = conv.input[1][: -len("_sub_pixel")]
    return acts, weights


def _write_qat_parameters(model, work: Path, fp32: Path) -> None:
    """Check the Q/DQ file at `work` (laid out from the FP32 file `fp32`) has the model's placement, then write the
    model's scales and integer weights into it. A sub-pixel file (placement option conv_transpose "sub-pixel") is
    checked and written through the names of its sub-pixel form (`_sub_pixel_names`)."""
    import onnx
    from onnx import numpy_helper

    from calibration.quantize import sub_pixel_weight

    pl: Placement = model.placement
    m = onnx.load(str(work))
    placed = _read_placement(work, pl.network, pl.input_name, pl.output_names, pl.channels, pl.size, pl.options)
    sub_acts, sub_weights = _sub_pixel_names(fp32) if pl.options.get("conv_transpose") == "sub-pixel" else ({}, {})
    file_scales: dict[str, list[str]] = {}            # traced tensor -> the file's scale initializers for it
    for tensor, scale_name in placed.activations.items():
        file_scales.setdefault(sub_acts.get(tensor, tensor), []).append(scale_name)
    weights = {sub_weights.get(w, w): spec for w, spec in placed.weights.items()}
    same = (set(file_scales) == set(pl.activations) and weights.keys() == pl.weights.keys()
            and all(weights[w] == spec for w, spec in pl.weights.items() if w not in sub_weights.values())
            and placed.float_weights == pl.float_weights)
    if not sub_weights:
        same = same and placed.activations == pl.activations
    if not same:
        raise RuntimeError(f"the Q/DQ layout of {work.name} differs from the placement the model was trained with")
    inits = {i.name: i for i in m.graph.initializer}

    def put(name: str, array: np.ndarray) -> None:
        old = inits[name]
        new = numpy_helper.from_array(array.astype(numpy_helper.to_array(old).dtype).reshape(tuple(old.dims)), name)
        old.CopyFrom(new)

    act = model.activation_quantizers()
    written: dict[str, np.ndarray] = {}
    for tensor, scale_names in file_scales.items():
        fq = act[tensor]
        if int(fq.zero_point.detach().abs().max()) != 0:
            raise RuntimeError(f"activation '{tensor}' has a non-zero zero point; TensorRT needs symmetric INT8")
        scale = fq.scale.detach().numpy().astype(np.float32)
        for name in scale_names:
            if name in written and not np.array_equal(written[name], scale):
                raise RuntimeError(f"the scale '{name}' of {work.name} is shared by tensors the model quantizes "
                                   f"with different scales")
            written[name] = scale
            put(name, scale)

    wq = model.weight_quantizers()
    state = model.gm.state_dict()
    with torch.no_grad():
        for weight, spec in pl.weights.items():
            fq = wq[weight]
            w = state[weight].detach()
            fq.eval()
            w_hat = fq(w)                                  # also refreshes the scale from these weights
            scale = fq.scale.detach()
            shape = [1] * w.dim()
            if spec.axis is not None:
                shape[spec.axis] = -1
            q = torch.round(w_hat / scale.reshape(shape))
            if q.abs().max() > spec.qmax:
                raise RuntimeError(f"weight '{weight}' quantized outside [-{spec.qmax}, {spec.qmax}]")
            q = q.numpy().astype(np.int8)
            scale = scale.numpy().astype(np.float32)
            if weight in sub_weights.values():
                if spec.axis is not None:
                    raise RuntimeError(f"ConvTranspose weight '{weight}' is per channel; its sub-pixel form is "
                                       f"written from one per-tensor grid")
                # The same integers in the sub-pixel Conv's layout, the per-tensor scale on each of its channels.
                q = sub_pixel_weight(q)
                scale = np.full(len(q), float(scale.reshape(-1)[0]), np.float32)
                weight = f"{weight}_sub_pixel"
            put(f"{weight}_quantized", q)
            put(f"{weight}_scale", scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(m, str(work))
    onnx.checker.check_model(str(work))


def export_qdq(model, path: Path | str, graph=None) -> dict:
    """Write the QAT model's Q/DQ ONNX to `path`: the bundle's FP32 export of its weights, laid out by
    calibration/quantize.py's quantizer with the placement's options, carrying the QAT scales and the integer
    weights its fake-quant computes. Returns {"file", "bytes", "opset", "activations", "weight_bits",
    "quantized_ops", "float_ops"}."""
    from calibration.quantize import quantize_int8
    from export.onnx_export import export_unet, export_vgg, parity_inputs

    if not (hasattr(model, "gm") and hasattr(model, "placement")):
        raise TypeError("export_qdq takes the model qat_finetune (or prepare_qat) returned")
    pl: Placement = model.placement
    graph = graph or model.graph
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.observe(False)
    # Everything is written in a scratch folder and moved to `path` whole: a failure leaves `path` as it was.
    with tempfile.TemporaryDirectory(prefix="sonoscore-qat-", dir=path.parent) as tmp:
        fp32, work = Path(tmp) / f"{pl.network}.onnx", Path(tmp) / path.name
        (export_unet if pl.network == "unet" else export_vgg)(model.float_model(), fp32, graph)
        # The layout only: every scale and quantized weight is overwritten below.
        sample = parity_inputs(pl.channels, size=graph.size)[1][:1]
        result = quantize_int8(fp32, work, pl.input_name, [sample], **pl.options)
        _write_qat_parameters(model, work, fp32)
        os.replace(work, path)
    return {"file": path.name, "bytes": path.stat().st_size, "opset": result.opset,
            "activations": len(pl.activations), "weight_bits": result.weight_bits,
            "quantized_ops": result.quantized_ops, "float_ops": result.float_ops}


# -- the training recipe's QAT phase (sonoscore train --qat) -----------------------------------------------------

class _Batches:
    """Re-iterable shuffled batches with the training recipe's augmentation (export.train._fit: random horizontal
    flips, and for the VGG a random translation), fed as the network is fed (export.train._batch); a new draw each
    pass."""

    def __init__(self, images, targets, *, channels: int, batch_size: int, seed: int, normalization, shift: int = 0,
                 mask_targets: bool):
        self.images, self.targets, self.channels = images, targets, channels
        self.batch_size, self.normalization, self.shift, self.mask_targets = batch_size, normalization, shift, mask_targets
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        from export.train import _batch, _rows
        n = len(self.images)
        order = self.rng.permutation(n)
        flips = self.rng.random(n) < 0.5
        for s in range(0, n, self.batch_size):
            idx = order[s:s + self.batch_size]
            x = _batch(self.images, idx, self.channels, flips[idx], self.normalization)
            if self.shift:
                for k, (dy, dx) in enumerate(self.rng.integers(-self.shift, self.shift + 1, (len(idx), 2))):
                    x[k] = torch.roll(x[k], (int(dy), int(dx)), (1, 2))
            y = (_rows(self.targets, idx, flips[idx]).float() if self.mask_targets
                 else torch.from_numpy(np.asarray(self.targets)[idx].astype(np.int64)))
            yield x, y


def _spread(n: int, k: int) -> list[int]:
    from calibration.quantize import spread_indices
    return spread_indices(n, min(k, n))


def qat_networks(unet, vgg, *, unet_images, unet_masks, vgg_images, vgg_labels, graph, out_dir: Path,
                 unet_epochs: int = 2, vgg_epochs: int = 3, lr: float = 1e-4, seed: int = 0, vgg_shift: int = 0,
                 calibration_frames: int = 64, log: Callable[[str], None] = print,
                 networks: Sequence[str] = ("unet", "vgg"), placement_options: dict | None = None,
                 log_prefix: str = "train", vgg_loss: str = "distill", unet_loss: str = "distill",
                 activation_scales: str | None = None) -> dict:
    """The QAT phase of the training recipe (`sonoscore train --qat`), for both networks after FP32 training:
    `qdq_placement` on up to `calibration_frames` training frames, `qat_finetune` on the training frames (UNet:
    uint8 images [N,S,S] and 0/1 masks; VGG: masked uint8 images and grade indices 0..3) with the recipe's
    augmentation, `export_qdq` into `out_dir` as unet.int8.onnx / vgg.int8.onnx. `networks`: the ones to fine-tune
    (the other's model and data may be None; it gets no entry); `placement_options`: qdq_placement's keyword options
    (method, conv_transpose, full_range_weights, ...; default: calibrate's defaults); `log_prefix`: the command
    named at the start of the log lines; `vgg_loss`: the VGG's QAT loss (qat_finetune's). With "distill" (the
    default) the fake-quant VGG learns to reproduce the Fc2 features of `vgg` as given (frozen), and that FP32 VGG
    is the one that ships beside the INT8 file; with "ce" or "distill+ce", the fine-tuned float weights ship.
    `unet_loss`: the UNet's (qat_finetune's): with "distill" (the default) the fake-quant UNet learns to reproduce
    the probability map of `unet` as given (frozen), and that FP32 UNet ships beside the INT8 file, as the distilled
    VGG does; with "mse" it fine-tunes on the label masks and its fine-tuned float weights ship.
    `activation_scales`: "calibration", the placement's min-max scales stay fixed and the weights learn to them;
    "observed", the observers follow the batches for all epochs but the last; None, qat_finetune's default
    (calibration when distilling, else observed).

    Returns {"unet": float model, "vgg": float model (the folded networks the bundle's FP32 and FP16 files are
    exported from, so the INT8 check compares the INT8 file with what ships: each network as given when distilled,
    else with its QAT weights), "finetuned": {name: the folded network with its QAT float
    weights}, "qat": {"files", "info", "settings"} (what calibration.run.calibrate_bundle's `qat` takes),
    "seconds": {phase: s}}."""
    import time

    if vgg_loss not in VGG_LOSSES:
        raise ValueError(f"vgg_loss must be one of {', '.join(VGG_LOSSES)} (got {vgg_loss!r})")
    if unet_loss not in UNET_LOSSES:
        raise ValueError(f"unet_loss must be one of {', '.join(UNET_LOSSES)} (got {unet_loss!r})")
    if activation_scales not in (None,) + ACTIVATION_SCALES:
        raise ValueError(f"activation_scales must be one of {', '.join(ACTIVATION_SCALES)} "
                         f"(got {activation_scales!r})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"qat": {"files": {}, "info": {}, "settings": {}}, "finetuned": {}, "seconds": {}}
    from export.train import _batch
    for name, model, images, targets, epochs, bs in (
            ("unet", unet, unet_images, unet_masks, unet_epochs, 8),
            ("vgg", vgg, vgg_images, vgg_labels, vgg_epochs, 16)):
        if name not in networks:
            continue
        channels = 1 if name == "unet" else int(model.in_channels)
        norm = graph.unet_normalization if name == "unet" else graph.vgg_normalization
        t = time.perf_counter()
        calib = [_batch(images, np.array([i]), channels, None, norm).numpy()
                 for i in _spread(len(images), calibration_frames)]
        placement = qdq_placement(model, calib, graph, **(placement_options or {}))
        t_place = time.perf_counter() - t
        log(f"{log_prefix}: QAT {name}: {len(placement.activations)} activations and {len(placement.weights)} weights "
            f"fake-quantized where the Q/DQ file has them ({len(calib)} frames set the initial scales, "
            f"{t_place:.0f} s); {epochs} epochs at lr {lr:g} on {len(images)} frames")
        t = time.perf_counter()
        batches = _Batches(images, targets if name == "unet" else np.asarray(targets), channels=channels,
                           batch_size=bs, seed=seed, normalization=norm,
                           shift=0 if name == "unet" else vgg_shift, mask_targets=name == "unet")
        distilling = vgg_loss != "ce" if name == "vgg" else unet_loss != "mse"   # qat_finetune's own test
        scales = activation_scales or ("calibration" if distilling else "observed")
        qat = qat_finetune(model, batches, epochs=epochs, lr=lr, placement=placement, graph=graph, log=log,
                           vgg_loss=vgg_loss if name == "vgg" else "ce",
                           unet_loss=unet_loss if name == "unet" else "mse",
                           observe_epochs=_observe_epochs(scales, epochs))
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        path = out_dir / f"{name}.int8.onnx"
        info = export_qdq(qat, path, graph)
        # Distilled: the INT8 file was trained to reproduce the FP32 network's outputs, so that network ships
        # (folded, as the exporter folds it); otherwise the fine-tuned float weights do.
        result["finetuned"][name] = qat.float_model()
        distilled = vgg_loss == "distill" if name == "vgg" else unet_loss == "distill"
        result[name] = fold_batch_norm(model) if distilled else result["finetuned"][name]
        result["qat"]["files"][name] = path
        result["qat"]["info"][name] = info
        result["qat"]["settings"][name] = {"epochs": int(epochs), "lr": float(lr), "batch_size": bs,
                                           "frames": int(len(images)), "calibration_frames": len(calib),
                                           "library": f"torch.ao.quantization (torch {torch.__version__})",
                                           "placement": placement.options,
                                           "loss": vgg_loss if name == "vgg" else unet_loss,
                                           "activation_scales": scales}
        result["seconds"][name] = {"placement": round(t_place, 1), "finetune": round(t_train, 1),
                                   "export": round(time.perf_counter() - t, 1)}
    return result
