"""A bundle's files from its two networks: each network's FP32 and FP16 ONNX (a torch module of export.models
exported and checked against torch, or a user's ONNX file copied as it is: `export_networks`), the FP16 files
checked against FP32 on synthetic kidney frames through the graph (`check_fp16`), and manifest.json
(`write_bundle_manifest`). Used by `sonoscore train` (export/recipe.py) and `sonoscore export`
(export/bundle_export.py).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from runtime import logs
from runtime.bundle import CLASS_NAMES, DEMO_DISCLAIMER, write_manifest
from runtime.graph import Graph
from export.card import default_card

log = logs.get("export")


def export_networks(unet, vgg, out: Path, unet_width: float | None, vgg_width: float | None, graph: Graph) -> dict:
    """ONNX fp32 + fp16 of both networks into `out`, with the graph's tensor names and input normalizations;
    returns the manifest's `networks` section. Each network is a torch module of export.models (exported, parity
    checked against torch) or an `export.checkpoints.OnnxNetwork` (a user's file, copied as it is)."""
    from export.checkpoints import OnnxNetwork
    nets = {}
    for name, model, width in (("unet", unet, unet_width), ("vgg", vgg, vgg_width)):
        if isinstance(model, OnnxNetwork):
            nets[name] = _import_onnx(name, model, out, graph)
        else:
            nets[name] = _export_torch(name, model, out, width, graph)
    check_fp16(out, nets, graph)
    return nets


# FP16 files are checked against FP32 on frames (check_fp16): the largest difference allowed, per network. The
# UNet's is of its kidney probability; the VGG's of its Fc2 features, relative to the largest FP32 feature on the
# same frames (features have no fixed scale). FP16 rounding gives about 1e-3 on both; a network whose activations
# leave FP16's range or lose its precision gives far more.
FP16_TOLERANCE = {"unet": 0.02, "vgg": 0.02}


FP16_FRAMES = 6


def _phantom_images(graph: Graph, count: int = FP16_FRAMES) -> list[np.ndarray]:
    """`count` synthetic kidney frames (one per grade in turn), prepared as the runtime prepares a frame."""
    from runtime.phantom import KidneyPhantom
    from runtime.sources import Frame
    images = []
    for i in range(count):
        pixels = KidneyPhantom(grade=1 + i % 4, seed=100 + i).frame(i * 5).image
        images.append(graph.prepare_source(Frame(i, "fp16-check", 0.0, pixels))[1])
    return images


def _unet_fp16_difference(graph: Graph, images, fp32, fp16) -> tuple[float, list[np.ndarray]]:
    """(max |p16 - p32| of the UNet's probability over the images, the FP32 masks)."""
    worst, masks = 0.0, []
    for image in images:
        a = graph.run(image, fp32, until="gate")
        b = graph.run(image, fp16, until="gate")
        worst = max(worst, float(np.max(np.abs(a.prob.astype(np.float64) - b.prob))))
        masks.append(a.gate.mask)
    return worst, masks


def _vgg_fp16_difference(graph: Graph, images, masks, fp32, fp16) -> tuple[float, float]:
    """(max |f16 - f32| of the VGG's features, that relative to the largest |f32|) on the images under the masks
    (the whole image where a mask is empty: the gate is opened, this measures the network alone)."""
    from dataclasses import replace
    open_gate = replace(graph, min_mask_fraction=0.0)
    worst, scale = 0.0, 0.0
    for image, mask in zip(images, masks):
        mask = mask if mask.any() else np.ones_like(mask)
        a = open_gate.run(image, vgg=fp32, mask=mask, until="vgg").features.astype(np.float64)
        b = open_gate.run(image, vgg=fp16, mask=mask, until="vgg").features
        worst, scale = max(worst, float(np.max(np.abs(a - b)))), max(scale, float(np.max(np.abs(a))))
    return worst, worst / scale if scale > 0 else worst


def check_fp16(out: Path, nets: dict, graph: Graph) -> None:
    """Each network's FP16 file against its FP32 file on FP16_FRAMES synthetic kidney frames, prepared and run
    through the graph as the runtime runs them. The difference is recorded in its manifest entry
    (`parity.fp16_vs_fp32_frames`); a network whose difference exceeds FP16_TOLERANCE loses its FP16 file (the
    bundle then has no FP16 precision) with one warning line naming the network and the figures."""
    from runtime.backends.ort import OrtRunner
    images = _phantom_images(graph)
    with OrtRunner(out / nets["unet"]["files"]["fp32"]) as u32, OrtRunner(out / nets["unet"]["files"]["fp16"]) as u16:
        unet_diff, masks = _unet_fp16_difference(graph, images, u32, u16)
    with OrtRunner(out / nets["vgg"]["files"]["fp32"]) as v32, OrtRunner(out / nets["vgg"]["files"]["fp16"]) as v16:
        vgg_abs, vgg_rel = _vgg_fp16_difference(graph, images, masks, v32, v16)
    measured = {"unet": ("max_abs_probability", unet_diff, {"max_abs_probability": unet_diff}),
                "vgg": ("max_abs_relative", vgg_rel, {"max_abs": vgg_abs, "max_abs_relative": vgg_rel})}
    for name, (measure, value, figures) in measured.items():
        tol = FP16_TOLERANCE[name]
        passed = bool(value <= tol)
        nets[name].setdefault("parity", {})["fp16_vs_fp32_frames"] = _jsonable({
            "frames": len(images), "source": "synthetic kidney phantom", **figures, "measure": measure,
            "tolerance": tol, "passed": passed})
        if not passed:
            fp16 = nets[name]["files"].pop("fp16")
            (out / fp16).unlink(missing_ok=True)
            what = "probability" if name == "unet" else "Fc2 features, relative to their largest value"
            log.info(f"export: warning: the {name}'s FP16 file differs from its FP32 file by {value:.3g} ({what}) on "
                 f"{len(images)} frames, beyond the tolerance {tol:g}; it is left out, so the bundle has no FP16 "
                 f"precision (FP32 and INT8 are unaffected)")


def _normalization(graph: Graph, name: str) -> dict | None:
    return getattr(graph, f"{name}_normalization", None)


def _network_entry(name: str, graph: Graph, channels: int, features: int | None) -> dict:
    from runtime.normalize import input_section
    s = graph.size
    in_name, out_name = ((graph.unet_input, graph.unet_output) if name == "unet" else
                         (graph.vgg_input, graph.vgg_output))
    return {
        "files": {"fp32": f"{name}.onnx", "fp16": f"{name}.fp16.onnx"},
        "input": input_section(in_name, channels, s, _normalization(graph, name)),
        "output": {"name": out_name, "shape": ["N", 1, s, s] if name == "unet" else ["N", int(features)],
                   "dtype": "float32"},
        "channels": channels,
    }


def _export_torch(name: str, model, out: Path, width: float | None, graph: Graph) -> dict:
    from export.onnx_export import export_unet, export_vgg, to_fp16
    t = time.time()
    exporter = export_unet if name == "unet" else export_vgg
    channels = 1 if name == "unet" else int(model.in_channels)
    info = exporter(model, out / f"{name}.onnx", graph)   # the graph's tensor names, size and normalization
    half = to_fp16(out / f"{name}.onnx", out / f"{name}.fp16.onnx", _normalization(graph, name), channels)
    log.info(f"export: {name} -> {name}.onnx, {name}.fp16.onnx in {time.time() - t:.1f} s "
         f"(parity vs torch {info.get('parity_max_abs', float('nan')):.2e})")
    entry = _network_entry(name, graph, channels, None if name == "unet" else model.features_dim)
    entry.update({
        "architecture": (getattr(model, "architecture", "unet-jakeoung-bn-leakyrelu") if name == "unet"
                         else f"vgg19_bn-fc2-{model.features_dim}"),
        "width": float(width if width is not None else getattr(model, "width", 1.0)),
        "opset": info.get("opset"),
        "parity": {"fp32_vs_torch_max_abs": info.get("parity_max_abs"), "fp16_vs_fp32": _jsonable(half)},
    })
    return entry


def _import_onnx(name: str, net, out: Path, graph: Graph) -> dict:
    from export.checkpoints import copy_onnx
    from export.onnx_export import to_fp16
    t = time.time()
    copy_onnx(net, out / f"{name}.onnx")
    half = to_fp16(out / f"{name}.onnx", out / f"{name}.fp16.onnx", _normalization(graph, name), net.channels)
    log.info(f"export: {name} <- {net.path.name} (ONNX as given), {name}.fp16.onnx made in {time.time() - t:.1f} s")
    entry = _network_entry(name, graph, net.channels, net.features)
    if net.static_batch:   # the file's batch is a fixed 1: the pipelines feed one frame at a time
        entry["input"]["shape"][0] = entry["output"]["shape"][0] = 1
    entry.update({"architecture": "onnx", "source_file": net.path.name, "opset": net.opset,
                  "static_batch": net.static_batch, "parity": {"fp16_vs_fp32": _jsonable(half)}})
    return entry


def _booster_section(booster) -> dict:
    """The manifest's `booster` section for an xgboost.Booster saved as booster.ubj."""
    config = json.loads(booster.save_config())["learner"]
    return {"file": "booster.ubj", "format": "xgboost-ubj",
            "num_class": int(config["learner_model_param"].get("num_class", 0)),
            "num_features": int(config["learner_model_param"]["num_feature"]),
            "objective": str(config["objective"]["name"])}


def write_bundle_manifest(directory: Path, networks: dict, provenance: dict, graph: Graph, *, demo: bool,
                          card: dict | None = None, booster: dict | None = None, classes=None) -> Path:
    """manifest.json for the files in `directory`. `demo`: trained on the synthetic phantom (or random weights):
    the synthetic-data disclaimer. Otherwise the card's own `disclaimer`, if any. `card`: the model card (a
    default one from the name when None); `booster`: the booster section (the paper's when None); `classes`: the
    class names (the paper's four when None); the gate is the graph's."""
    import onnx
    import onnxruntime
    import torch
    import xgboost
    provenance = dict(provenance)
    provenance["libraries"] = {"torch": torch.__version__, "onnx": onnx.__version__,
                               "onnxruntime": onnxruntime.__version__, "xgboost": xgboost.__version__,
                               "numpy": np.__version__, "python": platform.python_version()}
    card = dict(card) if card else default_card("sonoscore-ifta" + ("-synthetic-demo" if demo else ""), demo=demo)
    classes = list(classes) if classes is not None else list(CLASS_NAMES)
    own_disclaimer = card.pop("disclaimer", None)
    manifest = {
        "name": card["name"],
        "disclaimer": DEMO_DISCLAIMER if demo else own_disclaimer,
        "card": card,
        "classes": classes,
        **graph.manifest_sections(),   # preprocess, gate
        "networks": networks,
        "booster": booster or {"file": "booster.ubj", "format": "xgboost-ubj", "num_class": len(classes),
                               "num_features": 1024, "objective": "multi:softprob"},
        "provenance": provenance,
    }
    return write_manifest(directory, manifest)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
