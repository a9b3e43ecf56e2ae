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

Steps 1 and 2 (the placement, the fake-quant model, the fine-tuning) are export/fake_quant.py; this module writes
the Q/DQ file (step 3) and runs the training recipe's QAT phase for both networks (`qat_networks`).

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

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from export.fake_quant import (ACTIVATION_SCALES, UNET_LOSSES, VGG_LOSSES, Placement, _observe_epochs, _read_placement,
                               fold_batch_norm, qat_finetune, qdq_placement)


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
