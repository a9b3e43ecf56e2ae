"""The baseline a research team would deploy: the paper's two networks in PyTorch eager FP32, frame to grade.

    with TorchBaseline(bundle, device="cuda") as team:
        rec = team.process(frame)          # a FrameRecord, like runtime.pipeline.Pipeline's

What it does per frame is what the team's own script would do: the CPU preprocessing (the project's one
`runtime.preprocess` chain, so both paths see the same pixels), the UNet on the device, the mask back to the host,
threshold and mask with numpy/OpenCV, the masked image up again, the VGG to its Fc2 features, the features back,
and the XGBoost booster on the CPU (the same `runtime.booster` as the runtime). No CUDA graphs, no FP16, no fused
stages: `torch.inference_mode()` and PyTorch's defaults (cuDNN's TF32 convolutions included, as a stock install
runs them).

Weights: a bundle keeps ONNX files, not checkpoints, so the torch modules of `export.models` are filled from the
fp32 ONNX initializers. The exporter folds each eval-mode BatchNorm into the convolution before it, so those
convolutions get the folded weights and their BatchNorm layers become identities (mean 0, variance 1 - eps,
scale 1, shift 0): the same function, and still the eager module graph (with its BatchNorm kernels) the team runs.
Initializers are matched to modules by name (the exporter keeps parameter names) and, failing that, by the order
in which the layers run, with every shape checked.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from runtime import preprocess as pp
from runtime.booster import Booster
from runtime.bundle import Bundle
from runtime.pipeline import apply_mask
from runtime.record import FrameRecord
from runtime.sources import Frame

NAME = "torch-eager-fp32"


class WeightsMismatch(ValueError):
    """The bundle's ONNX does not fit the torch module; the message names the layer."""


class TorchBaseline:
    """The team's deployment as a pipeline: `process(frame) -> FrameRecord`, a context manager like `Pipeline`.

    device: "cuda" (GPU stages timed with CUDA events) or "cpu" (host clocks)."""

    name = NAME

    def __init__(self, bundle: Bundle, *, device: str = "cuda", min_mask_fraction: float | None = None,
                 mask_threshold: float | None = None, booster_backend: str = "auto", cache_dir: Path | None = None,
                 threads: int | None = None):
        self.bundle = bundle
        self.device_name = device
        self.threshold = bundle.mask_threshold if mask_threshold is None else mask_threshold
        self.min_fraction = bundle.min_mask_fraction if min_mask_fraction is None else min_mask_fraction
        self.size = bundle.size
        self.iterations = bundle.crimmins_iterations
        self.channels = bundle.network("vgg").channels
        self.booster_backend = booster_backend
        self.cache_dir = cache_dir
        self.threads = threads
        self.unet = self.vgg = self.booster = None

    def __enter__(self) -> "TorchBaseline":
        import torch
        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            from runtime.backends import BackendUnavailable
            raise BackendUnavailable(f"PyTorch {torch.__version__} sees no CUDA GPU here (torch.version.cuda = "
                                     f"{torch.version.cuda}); run the baseline with device cpu")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        self.torch = torch
        self.device = torch.device(self.device_name)
        unet, vgg = torch_networks(self.bundle)
        self.unet = unet.to(self.device).eval()
        self.vgg = vgg.to(self.device).eval()
        self.cuda = self.device.type == "cuda"
        self.booster = Booster.load(self.bundle.booster_file, num_class=self.bundle.num_classes,
                                    cache_dir=self.cache_dir, backend=self.booster_backend)
        return self

    def __exit__(self, *exc) -> None:
        self.unet = self.vgg = None
        if getattr(self, "cuda", False):
            self.torch.cuda.empty_cache()

    # -- the team's per-frame code -------------------------------------------------------------------------------
    def process(self, frame: Frame, t_start: float | None = None) -> FrameRecord:
        t0 = time.perf_counter() if t_start is None else t_start
        rec = FrameRecord(frame.index, frame.source_id, frame.t_capture, meta=frame.meta)
        lat = rec.latency_ms
        lat["queue"] = max(0.0, (time.time() - frame.t_capture) * 1e3 - (time.perf_counter() - t0) * 1e3)
        if frame.error:
            rec.error = frame.error
            return _finish(rec, t0)
        try:
            t = time.perf_counter()
            gray = pp.to_gray(frame.pixels, frame.channel_order, frame.window)
            image, rec.region = pp.preprocess(gray, frame.region, size=self.size, crimmins_iterations=self.iterations)
            rec.image, rec.display = image, gray
            lat["preprocess"] = _ms(t)

            with self._timed(lat, "unet"):
                prob = self.unet_probabilities(image)

            t = time.perf_counter()
            mask = (prob > self.threshold).astype(np.uint8)
            rec.mask = mask
            rec.mask_fraction = float(mask.mean())
            rec.accepted = rec.mask_fraction >= self.min_fraction
            masked = apply_mask(image, mask) if rec.accepted else None
            lat["gate"] = _ms(t)
            if not rec.accepted:
                return _finish(rec, t0)

            with self._timed(lat, "vgg"):
                feats = self._features_of(masked)

            t = time.perf_counter()
            rec.probabilities, rec.grade = self.booster.predict_one(feats)
            lat["booster"] = _ms(t)
        except pp.FrameError as e:
            rec.error = f"frame {frame.index}: {e}"
            rec.accepted = False
        return _finish(rec, t0)

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Binary 0/1 mask of a preprocessed image (as `Pipeline.segment`)."""
        return (self.unet_probabilities(image) > self.threshold).astype(np.uint8)

    def features(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Fc2 features of a preprocessed image under a 0/1 mask (as `Pipeline.features`)."""
        return self._features_of(apply_mask(image, mask))[0]

    def unet_probabilities(self, image: np.ndarray) -> np.ndarray:
        """The UNet's sigmoid output (HxW float32) on a preprocessed image."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(pp.to_input(image, 1)).to(self.device)
            return self.unet(x)[0, 0].cpu().numpy()

    def _features_of(self, masked: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(pp.to_input(masked, self.channels)).to(self.device)
            return self.vgg.forward_features(x).cpu().numpy()

    def _timed(self, lat: dict, stage: str):
        return _CudaTimer(self.torch, lat, stage) if self.cuda else _HostTimer(lat, stage)


class _HostTimer:
    def __init__(self, lat, stage):
        self.lat, self.stage = lat, stage

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.lat[self.stage] = _ms(self.t)


class _CudaTimer:
    """A GPU stage timed with CUDA events on the current stream (the stage ends with a copy to the host, so the
    events bracket upload, network and download)."""

    def __init__(self, torch, lat, stage):
        self.torch, self.lat, self.stage = torch, lat, stage

    def __enter__(self):
        self.start = self.torch.cuda.Event(enable_timing=True)
        self.end = self.torch.cuda.Event(enable_timing=True)
        self.start.record()

    def __exit__(self, *exc):
        self.end.record()
        self.end.synchronize()
        self.lat[self.stage] = float(self.start.elapsed_time(self.end))


# -- weights -------------------------------------------------------------------------------------------------------

def torch_networks(bundle: Bundle):
    """(UNet, VGG19BN) of `export.models` with the bundle's fp32 ONNX weights, in eval mode on the CPU."""
    from export.models import UNet, VGG19BN, VGGFeaturesAndLogits
    unet_info = bundle.manifest["networks"]["unet"]
    vgg_info = bundle.manifest["networks"]["vgg"]
    unet_onnx = _read_onnx(bundle.network_file("unet", "fp32"))
    vgg_onnx = _read_onnx(bundle.network_file("vgg", "fp32"))
    unet = UNet(width=float(unet_info.get("width") or 1.0)).eval()
    load_onnx_weights(unet, unet_onnx, "unet", (1, 1, bundle.size, bundle.size))
    gemms = [w for op, w, _ in vgg_onnx["layers"] if op == "Gemm"]
    if len(gemms) != 3:
        raise WeightsMismatch(f"the bundle's VGG ONNX has {len(gemms)} fully connected layers; the paper's VGG has "
                              f"3 (Fc1, Fc2, head)")
    fc1, feat, classes = (vgg_onnx["arrays"][w].shape[0] for w in gemms)
    vgg = VGG19BN(width=float(vgg_info.get("width") or 1.0), in_channels=int(vgg_info.get("channels", 1)),
                  num_classes=classes, fc1=fc1, features_dim=feat).eval()
    load_onnx_weights(VGGFeaturesAndLogits(vgg), vgg_onnx, "vgg",
                      (1, int(vgg_info.get("channels", 1)), bundle.size, bundle.size))
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


def _finish(rec: FrameRecord, t0: float) -> FrameRecord:
    rec.latency_ms["total"] = rec.latency_ms.get("queue", 0.0) + _ms(t0)
    return rec


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1e3
