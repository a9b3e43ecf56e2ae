"""Where calibration/quantize.py's Q/DQ file quantizes a network, and the fake-quant model fine-tuned at exactly
those places: steps 1 and 2 of export/qat.py (its docstring has the whole picture, and export_qdq, step 3, writes
the Q/DQ file from the model made here).

- `qdq_placement` folds the BatchNorms (`fold_batch_norm`), exports the FP32 graph as the bundle does, quantizes it
  with `calibration.quantize.quantize_int8` and reads the placement (`Placement`: the quantized activations, their
  calibrated scales, the weights and how each is quantized) back from that file.
- `prepare_qat` traces the folded network with the same exporter and inserts torch.ao FakeQuantize modules at the
  placement (`QATModel`); `qat_finetune` fine-tunes it (labels, or distillation from the FP32 network:
  `distillation_loss`, `mask_distillation_loss`).
"""
from __future__ import annotations

import copy
import os
import tempfile
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
