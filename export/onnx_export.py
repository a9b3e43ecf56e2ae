"""torch -> ONNX (opset 17, one self-contained file, dynamic batch) and FP32 -> FP16 ONNX, each with parity.

Exporter facts this module relies on (torch 2.13):
- `torch.onnx.export` defaults to the torch.export-based ("dynamo") exporter; the TorchScript one still exists
  behind `dynamo=False` but is deprecated. We use the default one.
- Its `external_data` defaults to True (weights in a `<file>.data` beside the model); we pass False so the bundle
  gets one file per network. Models under 2 GB only, which both networks are (VGG-19-BN at width 1.0: ~0.5 GB).
- It implements opset 18 and reaches 17 through the onnx C version converter (initializers are not copied for it);
  if that conversion ever fails the exporter silently keeps 18, so the opset is checked here.
- Its graph optimizer folds eval-mode BatchNorm into the preceding Conv: the ONNX graphs have no BatchNormalization.

Parity is measured right after writing: the same inputs through torch and through onnxruntime CPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

OPSET = 17
SIZE = 224
# Loggers that report exporter internals a user cannot act on (torchvision ops not registered, 18 -> 17 fallback).
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._compat",
                  "onnxscript.version_converter")


def parity_inputs(channels: int, seed: int = 0, size: int = SIZE, normalization: dict | None = None
                  ) -> list[np.ndarray]:
    """Batches that exercise the dynamic batch: random, structured (ramp, disc, edges, black, white). With a
    normalization other than unit (runtime.normalize), each image is made uint8 and normalized as the runtime
    feeds it (`runtime.normalize.to_input`): the network is checked on the tensors it will receive."""
    if normalization is not None and normalization.get("kind", "unit") != "unit":
        from runtime.normalize import to_input
        return [np.ascontiguousarray(np.concatenate([
            to_input(np.clip(np.round(x[0] * 255), 0, 255).astype(np.uint8), channels, normalization) for x in b]))
            for b in parity_inputs(1, seed, size)]
    SIZE = size  # noqa: N806 (the planes below are size x size)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32) / (SIZE - 1)
    disc = (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.5) / 0.4) ** 2 < 1).astype(np.float32)
    speckle = np.clip(disc * 0.7 + rng.normal(0, 0.1, (SIZE, SIZE)), 0, 1).astype(np.float32)
    stripes = ((np.arange(SIZE) // 8) % 2).astype(np.float32)[None, :].repeat(SIZE, 0)
    quant = np.round(rng.random((SIZE, SIZE)) * 255) / 255  # what the runtime feeds: uint8 / 255

    def batch(*planes):
        return np.ascontiguousarray(np.stack([np.repeat(p[None], channels, 0) for p in planes]).astype(np.float32))
    return [batch(quant.astype(np.float32), xx, speckle), batch(disc), batch(stripes, np.zeros_like(xx)),
            batch(np.ones_like(xx))]


@contextlib.contextmanager
def _quiet_exporter():
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def ort_session(path: Path | str):
    """An onnxruntime CPU session on at most two threads (the build machines are shared)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_ort(session, batches: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each batch through the session; a network with a static batch of 1 takes the batch's images one by one."""
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0]
    if feed.shape and feed.shape[0] == 1:
        return [{n: np.concatenate(parts) for n, parts in zip(names, zip(*(
            session.run(names, {feed.name: x[i:i + 1]}) for i in range(len(x)))))} for x in batches]
    return [dict(zip(names, session.run(names, {feed.name: x}))) for x in batches]


def _max_abs(a: list[dict], b: list[dict]) -> dict[str, float]:
    return {k: max(float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)))) for x, y in zip(a, b))
            for k in a[0]}


def _shape(value) -> list:
    """An onnx_ir value's shape as the manifest writes it: ints, and the name of a symbolic dimension."""
    return [d if isinstance(d, int) else d.value for d in value.shape]


def _export(module, path: Path, channels: int, input_name: str, output_names: list[str], size: int,
            normalization: dict | None = None) -> dict:
    import onnx
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    was_training = module.training
    module.eval()
    t0 = time.perf_counter()
    try:
        example = torch.rand(2, channels, size, size)  # batch 2: a batch of 1 would be specialised away
        batch = torch.export.Dim("N", min=1, max=4096)
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                                        opset_version=OPSET, input_names=[input_name], output_names=output_names,
                                        dynamic_shapes=({0: batch},), optimize=True, verbose=False)
        export_s = time.perf_counter() - t0
        if path.with_name(path.name + ".data").exists():
            raise RuntimeError(f"the exporter wrote external data beside {path}; the bundle needs one file")
        onnx.checker.check_model(str(path))
        graph = program.model.graph  # what was just written, read off the exporter's IR (no reload of the file)
        opset = program.model.opset_imports.get("", None)
        if opset != OPSET:
            raise RuntimeError(f"{path.name} came out at opset {opset}, not {OPSET} (the version conversion failed)")
        info = {
            "file": path.name, "bytes": path.stat().st_size, "opset": opset,
            "inputs": {v.name: _shape(v) for v in graph.inputs},
            "outputs": {v.name: _shape(v) for v in graph.outputs},
            "ops": sorted({n.op_type for n in graph}),
            "export_seconds": round(export_s, 2),
        }
        del program, graph
        batches = parity_inputs(channels, size=size, normalization=normalization)
        with torch.no_grad():
            ref = []
            for x in batches:
                out = module(torch.from_numpy(x))
                out = out if isinstance(out, tuple) else (out,)
                ref.append({k: v.numpy() for k, v in zip(output_names, out)})
        got = _run_ort(ort_session(path), batches)
        info["parity"] = _max_abs(ref, got)
        info["parity_max_abs"] = max(info["parity"].values())
        info["parity_inputs"] = [list(x.shape) for x in batches]
        info["seconds"] = round(time.perf_counter() - t0, 2)
        return info
    finally:
        module.train(was_training)


def export_unet(model, path: Path | str, graph=None) -> dict:
    """UNet -> ONNX with the graph's names and size (runtime.graph.Graph; its defaults when None): "image"
    [N,1,224,224] float32 (uint8/255, then the graph's UNet normalization) -> "mask" [N,1,224,224] sigmoid
    probabilities. Parity is measured on inputs normalized that way."""
    from runtime.graph import Graph
    g = graph or Graph()
    return _export(model, Path(path), 1, g.unet_input, [g.unet_output], g.size,
                   getattr(g, "unet_normalization", None))


def export_vgg(model, path: Path | str, graph=None) -> dict:
    """VGG19BN -> ONNX with the graph's names and size: "image" [N,C,224,224] -> "features" [N,F] (ReLU'd Fc2)
    and "logits" [N,classes] (no logits for a VGG cut at Fc2)."""
    from export.models import VGGFeaturesAndLogits
    from runtime.graph import Graph
    g = graph or Graph()
    outputs = [g.vgg_output] + (["logits"] if model.head is not None else [])
    return _export(VGGFeaturesAndLogits(model), Path(path), model.in_channels, g.vgg_input, outputs, g.size,
                   getattr(g, "vgg_normalization", None))


def _sort_topologically(graph) -> None:
    """Reorder a graph's nodes so each comes after the producers of its inputs (stable; ONNX requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}  # "" = omitted input
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input at node {waiting[0].name!r}")
        pending = waiting
    graph.ClearField("node")
    graph.node.extend(ordered)


def to_fp16(src_path: Path | str, dst_path: Path | str, normalization: dict | None = None,
            channels: int | None = None) -> dict:
    """FP32 ONNX -> FP16 ONNX whose inputs and outputs stay float32 (Cast nodes at the edges).

    Returns {"file", "bytes", "seconds", "parity_max_abs": {output: max |fp16 - fp32|}} on the parity inputs
    (normalized as the runtime feeds the network when `normalization` is given).
    onnxruntime's CPU provider lacks some fp16 kernels and runs those nodes in fp32 behind inserted Casts; the
    file is still what a GPU (TensorRT strongly typed, CUDA EP) runs in half precision.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    src_path, dst_path = Path(src_path), Path(dst_path)
    t0 = time.perf_counter()
    model = onnx.load(str(src_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "values truncated to fp16 range" notes
        half = convert_float_to_float16(model, keep_io_types=True)
    del model
    _sort_topologically(half.graph)  # the converter appends its input Casts at the end of the node list
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(half, str(dst_path))
    del half
    onnx.checker.check_model(str(dst_path))
    seconds = time.perf_counter() - t0
    src = ort_session(src_path)
    shape = src.get_inputs()[0].shape
    batches = parity_inputs(channels or int(shape[1]), size=shape[2] if isinstance(shape[2], int) else SIZE,
                            normalization=normalization)
    ref = _run_ort(src, batches)
    del src  # one session (one copy of the weights) at a time
    got = _run_ort(ort_session(dst_path), batches)
    for name, arrays in ((n, [g[n] for g in got]) for n in got[0]):
        if any(a.dtype != np.float32 for a in arrays):
            raise RuntimeError(f"{dst_path.name} output {name} is not float32")
    return {"file": dst_path.name, "bytes": dst_path.stat().st_size, "seconds": round(seconds, 2),
            "parity_max_abs": _max_abs(ref, got)}
