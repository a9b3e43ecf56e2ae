"""The baseline a research team would deploy: the paper's two networks in PyTorch eager FP32, frame to grade.

    with TorchBaseline(bundle, device="cuda") as team:
        rec = team.process(frame)          # a FrameRecord, like runtime.pipeline.Pipeline's

What it does per frame is what the team's own script would do, and it is the runtime's own per-frame graph
(`runtime.pipeline.Pipeline.process`) with torch modules as the networks: the CPU preprocessing (each network's input
normalized as the manifest declares it, `Graph.unet_feeds` / `vgg_feeds`), the UNet on the
device, the mask back to the host, threshold and mask with numpy/OpenCV, the masked image up again, the VGG to its
Fc2 features, the features back, and the XGBoost booster on the CPU. Stages are host-timed; each network stage
ends with its copy back to the host, which waits for the GPU. No CUDA graphs, no FP16, no fused stages:
`torch.inference_mode()` and PyTorch's defaults (cuDNN's TF32 convolutions included, as a stock install runs them).

Weights: a bundle keeps ONNX files, not checkpoints, so the torch modules of `export.models` are filled from the
fp32 ONNX initializers. The exporter folds each eval-mode BatchNorm into the convolution before it, so those
convolutions get the folded weights and their BatchNorm layers become identities (mean 0, variance 1 - eps,
scale 1, shift 0): the same function, and still the eager module graph (with its BatchNorm kernels) the team runs.
Initializers are matched to modules by name (the exporter keeps parameter names) and, failing that, by the order
in which the layers run, with every shape checked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.bundle import Bundle
from runtime.pipeline import Pipeline

NAME = "torch-eager-fp32"


class WeightsMismatch(ValueError):
    """The bundle's ONNX does not fit the torch module; the message names the layer."""


class TorchRunner:
    """A torch module as a runner (docs/design.md, "Backends"): `infer(feeds) -> outputs` by tensor name. The input goes
    up to the device, the module runs eagerly, the output comes back (the copy to the host waits for the GPU, so a
    host clock around infer() covers upload, network and download)."""

    def __init__(self, torch, forward, device, input_name: str, output_name: str):
        self.torch, self.forward, self.device = torch, forward, device
        self.input_name, self.output_name = input_name, output_name

    def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(np.ascontiguousarray(feeds[self.input_name])).to(self.device)
            return {self.output_name: self.forward(x).cpu().numpy()}

    def __exit__(self, *exc) -> None:
        pass


class TorchBaseline(Pipeline):
    """The team's deployment: the runtime's own per-frame graph (`Pipeline.process`: the same preprocessing, gate,
    mask and booster) with the two networks as eager torch modules instead of onnxruntime sessions.

    device: "cuda" or "cpu"."""

    name = NAME

    def __init__(self, bundle: Bundle, *, device: str = "cuda", **options):
        super().__init__(bundle, **options)
        self.device_name = device

    def __enter__(self) -> "TorchBaseline":
        import torch
        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            from runtime.backends import BackendUnavailable
            raise BackendUnavailable(f"PyTorch {torch.__version__} sees no CUDA GPU here (torch.version.cuda = "
                                     f"{torch.version.cuda}); run the baseline with device cpu")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        self.torch = torch
        device = torch.device(self.device_name)
        unet, vgg = torch_networks(self.bundle)
        unet, vgg = unet.to(device).eval(), vgg.to(device).eval()
        g = self.graph
        self.unet = TorchRunner(torch, unet, device, g.unet_input, g.unet_output)
        self.vgg = TorchRunner(torch, vgg.forward_features, device, g.vgg_input, g.vgg_output)
        self.booster = self.load_booster()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.device_name.startswith("cuda") and getattr(self, "torch", None) is not None:
            self.torch.cuda.empty_cache()


# -- weights -------------------------------------------------------------------------------------------------------

def torch_networks(bundle: Bundle):
    """(UNet, VGG19BN) of `export.models` with the bundle's fp32 ONNX weights, in eval mode on the CPU."""
    from export.models import UNet, VGG19BN, VGGFeaturesAndLogits
    unet_info = bundle.manifest["networks"]["unet"]
    vgg_info = bundle.manifest["networks"]["vgg"]
    unet_onnx = _read_onnx(bundle.network_file("unet", "fp32"))
    vgg_onnx = _read_onnx(bundle.network_file("vgg", "fp32"))
    for name, info in (("UNet", unet_info), ("VGG", vgg_info)):
        if info.get("architecture") == "onnx":
            raise WeightsMismatch(f"the bundle's {name} was exported from an ONNX file, not a checkpoint; the PyTorch "
                                  f"baseline rebuilds only the paper's networks from their weights")
    try:
        unet = UNet.for_architecture(unet_info.get("architecture"), float(unet_info.get("width") or 1.0)).eval()
    except ValueError as e:
        raise WeightsMismatch(f"the bundle's UNet: {e}") from None
    size = bundle.graph().size
    load_onnx_weights(unet, unet_onnx, "unet", (1, 1, size, size))
    gemms = [w for op, w, _ in vgg_onnx["layers"] if op == "Gemm"]
    if len(gemms) not in (2, 3):
        raise WeightsMismatch(f"the bundle's VGG ONNX has {len(gemms)} fully connected layers; the paper's VGG has "
                              f"3 (Fc1, Fc2, head), or 2 when cut at Fc2")
    fc1, feat, classes = (*(vgg_onnx["arrays"][w].shape[0] for w in gemms), 0)[:3]
    vgg = VGG19BN(width=float(vgg_info.get("width") or 1.0), in_channels=int(vgg_info.get("channels", 1)),
                  num_classes=classes, fc1=fc1, features_dim=feat).eval()
    load_onnx_weights(VGGFeaturesAndLogits(vgg), vgg_onnx, "vgg",
                      (1, int(vgg_info.get("channels", 1)), size, size))
    return unet, vgg


def _read_onnx(path: Path) -> dict:
    """The weighted layers of an ONNX graph in graph order: (op, weight name, bias name or None), the BatchNorm
    nodes, and every initializer as an array."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers, norms = [], []
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                           or attrs.get("beta", 1.0) != 1.0):
                raise WeightsMismatch(f"{path.name}: Gemm node '{node.name}' is not a plain Linear layer")
            weight = node.input[1]
            if node.op_type == "Gemm" and not attrs.get("transB", 0) and weight in arrays:
                arrays[weight] = np.ascontiguousarray(arrays[weight].T)   # [in, out] -> torch's [out, in]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            layers.append((node.op_type, weight, bias))
        elif node.op_type == "BatchNormalization":
            norms.append(tuple(node.input[1:5]))
    missing = [w for _, w, _ in layers if w not in arrays]
    if missing:
        raise WeightsMismatch(f"{path.name}: weights {', '.join(missing[:3])} are computed in the graph, not stored; "
                              f"the baseline reads stored (initializer) weights only")
    return {"name": path.name, "layers": layers, "norms": norms, "arrays": arrays}


def load_onnx_weights(module, onnx_info: dict, what: str, example_shape) -> None:
    """Copy an exported network's ONNX weights into `module` (the torch module it was exported from)."""
    import torch
    from torch import nn
    weighted = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    by_name = {name: m for name, m in module.named_modules() if isinstance(m, weighted)}
    layers = onnx_info["layers"]
    if len(layers) != len(by_name):
        raise WeightsMismatch(f"the bundle's {what} ONNX ({onnx_info['name']}) has {len(layers)} weighted layers but "
                              f"the torch {what} has {len(by_name)}; the manifest's width or channels do not match it")
    names = [w[:-len(".weight")] if w.endswith(".weight") else None for _, w, _ in layers]
    if all(n in by_name for n in names) and len(set(names)) == len(names):
        targets = [(n, by_name[n]) for n in names]
    else:  # renamed by some exporter pass: the order in which the layers run, as the graph lists them
        targets = _call_order(module, weighted, example_shape)
    arrays = onnx_info["arrays"]
    with torch.no_grad():
        for (op, w, b), (name, m) in zip(layers, targets):
            weight = torch.from_numpy(np.array(arrays[w], dtype=np.float32))
            if tuple(weight.shape) != tuple(m.weight.shape):
                raise WeightsMismatch(f"{what} layer '{name}': the ONNX weight '{w}' is {tuple(weight.shape)}, the "
                                      f"module wants {tuple(m.weight.shape)}")
            m.weight.copy_(weight)
            if m.bias is not None:
                m.bias.copy_(torch.from_numpy(np.array(arrays[b], dtype=np.float32)) if b else
                             torch.zeros_like(m.bias))
            elif b is not None and np.any(arrays[b]):
                raise WeightsMismatch(f"{what} layer '{name}' has no bias in torch but a non-zero one in the ONNX")
        norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        if onnx_info["norms"]:
            if len(onnx_info["norms"]) != len(norms):
                raise WeightsMismatch(f"the {what} ONNX keeps {len(onnx_info['norms'])} BatchNorm layers of "
                                      f"{len(norms)}; export it with BatchNorm folded (the project's exporter does)")
            for bn, (scale, shift, mean, var) in zip(norms, onnx_info["norms"]):
                for p, key in ((bn.weight, scale), (bn.bias, shift), (bn.running_mean, mean), (bn.running_var, var)):
                    p.copy_(torch.from_numpy(np.array(arrays[key], dtype=np.float32)))
        else:  # folded into the convolutions: identities
            for bn in norms:
                bn.weight.fill_(1.0)
                bn.bias.zero_()
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)


def _call_order(module, types, example_shape) -> list:
    """(name, module) of the weighted layers in the order a forward pass calls them."""
    import torch
    names = {m: n for n, m in module.named_modules()}
    called, hooks = [], []
    for m in module.modules():
        if isinstance(m, types):
            hooks.append(m.register_forward_hook(lambda mod, i, o: called.append((names[mod], mod))))
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(example_shape))
    finally:
        for h in hooks:
            h.remove()
    return called
