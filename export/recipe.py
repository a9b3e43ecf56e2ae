"""From a labelled dataset (or checkpoints) to a model bundle.

Every image goes through `runtime.preprocess.preprocess`, the function the device runs, and the booster is
trained on features computed by the exported ONNX networks through `runtime.graph`, so what the booster
learns from is what it will see in deployment (predicted masks, not hand-drawn ones).
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime import preprocess as pp
from runtime.bundle import CLASS_NAMES, DEMO_DISCLAIMER, Bundle, write_manifest
from runtime.graph import Graph, masked


@dataclass
class TrainConfig:
    unet_width: float = 0.25
    vgg_width: float = 0.0625
    vgg_channels: int = 3
    unet_epochs: int = 4
    vgg_epochs: int = 24
    vgg_lr: float = 5e-4
    vgg_shift: int = 16       # random translation (pixels) of the masked training images
    seed: int = 0
    val_fraction: float = 0.25
    grid_search: bool = False
    crimmins_iterations: int = 1
    demo: bool = True  # synthetic data: every output carries the disclaimer


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_preprocessed(data_dir: Path, graph: Graph, progress: bool = True):
    """Dataset -> (images [N,S,S] uint8, masks [N,S,S] 0/1, grades [N] (0 = unknown), patients [N]), every image
    preprocessed by the graph the bundle will pin."""
    from runtime.dataset import read_dataset
    samples = read_dataset(Path(data_dir))
    if not samples:
        raise ValueError(f"dataset {data_dir} has no labelled images")
    images, masks, grades, patients = [], [], [], []
    for i, s in enumerate(samples):
        img, region = graph.preprocess(s.load_gray())
        images.append(img)
        masks.append(pp.crop_mask(s.load_mask(), region, graph.size))
        grades.append(s.grade or 0)
        patients.append(s.patient)
        if progress and ((i + 1) % 100 == 0 or i + 1 == len(samples)):
            _say(f"  preprocessed {i + 1}/{len(samples)} images")
    return np.stack(images), np.stack(masks), np.array(grades), np.array(patients)


def train_bundle(data_dir: Path, out: Path, cfg: TrainConfig, progress: bool = True) -> Path:
    """The paper's recipes end to end: UNet (MSE), VGG-19-BN (cross-entropy), XGBoost on VGG Fc2 features."""
    from export.train import split_by_patient, train_booster, train_unet, train_vgg
    t_start = time.time()
    graph = Graph(crimmins_iterations=cfg.crimmins_iterations, vgg_channels=cfg.vgg_channels)
    _say(f"train: reading and preprocessing {data_dir}")
    try:
        images, masks, grades, patients = load_preprocessed(data_dir, graph, progress)
    except ValueError as e:
        from runtime.errors import UserError
        raise UserError(str(e)) from None
    if not (grades > 0).any():
        from runtime.errors import UserError
        raise UserError(f"dataset {data_dir} has no grades (labels.csv with image,patient,grade is needed to train)")
    # Whole patients, spread over grades: the same split the booster validates on.
    is_val = split_by_patient(np.maximum(grades - 1, 0), patients, cfg.val_fraction, cfg.seed)
    tr, va = ~is_val, is_val
    _say(f"train: {len(images)} images of {len(set(patients))} patients; "
         f"{len(set(patients[va]))} patients held for validation")

    _say(f"train: UNet width {cfg.unet_width}, {cfg.unet_epochs} epochs (MSE loss)")
    unet, unet_hist = train_unet(images[tr], masks[tr], width=cfg.unet_width, epochs=cfg.unet_epochs,
                                 seed=cfg.seed, val=(images[va], masks[va]) if va.any() else None,
                                 progress=progress, graph=graph)
    # The VGG learns from labelled kidneys the gate would pass, under their labelled masks.
    kidney = np.array([graph.gate_mask(m).accepted for m in masks]) & (grades > 0)
    masked_images = np.stack([masked(i, m) for i, m in zip(images, masks)])
    _say(f"train: VGG-19-BN width {cfg.vgg_width}, {cfg.vgg_epochs} epochs (cross-entropy) on "
         f"{int((kidney & tr).sum())} masked kidney images")
    vgg, vgg_hist = train_vgg(masked_images[kidney & tr], grades[kidney & tr] - 1, width=cfg.vgg_width,
                              in_channels=cfg.vgg_channels, epochs=cfg.vgg_epochs, seed=cfg.seed,
                              lr=cfg.vgg_lr, shift=cfg.vgg_shift,
                              val=(masked_images[kidney & va], grades[kidney & va] - 1) if (kidney & va).any() else None,
                              progress=progress)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    nets = export_networks(unet, vgg, tmp, cfg.unet_width, cfg.vgg_width, graph)

    # Booster features from the exported networks, the deployed way: predicted mask, gate, masked image.
    from runtime.backends.ort import OrtRunner
    _say("train: VGG features of every gated kidney image through the exported ONNX networks")
    booster_masks = "predicted"
    with OrtRunner(tmp / nets["unet"]["files"]["fp32"]) as un, OrtRunner(tmp / nets["vgg"]["files"]["fp32"]) as vg:
        chosen, feats = [], []
        for i in np.flatnonzero(kidney):
            result = graph.run(images[i], un, vg)
            if result.gate.accepted:  # the gate would reject it otherwise: deployment never scores it
                chosen.append(i)
                feats.append(result.features[0])
        if len(set(grades[chosen])) < 2 or len(chosen) < 8:
            # An undertrained UNet (a few epochs on a few images) may pass no frame through the gate. The booster
            # still needs examples: use the labelled masks, and say so in the manifest.
            _say("train: warning: the UNet passed too few frames through the gate; the booster is trained on "
                 "features of the labelled masks instead")
            chosen = list(np.flatnonzero(kidney))
            feats = [graph.features(vg, images[i], masks[i])[0] for i in chosen]
            booster_masks = "labelled"
    labels, pats = grades[chosen] - 1, patients[chosen]
    _say(f"train: XGBoost (multi:softprob, eta 0.01, max_depth 16, subsample 0.5, lambda 10) on {len(feats)} frames")
    val_patients = sorted(set(patients[va].tolist())) or None
    booster, booster_info = train_booster(np.stack(feats), labels, pats, seed=cfg.seed, val_patients=val_patients,
                                          grid_search=cfg.grid_search, progress=progress)
    booster.save_model(str(tmp / "booster.ubj"))
    provenance = {
        "made_by": "sonoscore train", "data": str(data_dir), "images": int(len(images)),
        "patients": int(len(set(patients))), "validation_patients": sorted(set(patients[va].tolist())),
        "config": asdict(cfg), "unet_history": unet_hist, "vgg_history": vgg_hist,
        "booster": _jsonable(booster_info), "booster_trained_on_masks": booster_masks, "seconds": round(time.time() - t_start, 1),
    }
    write_bundle_manifest(tmp, nets, provenance, graph, demo=cfg.demo)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    Bundle.load(out)  # verify what was written
    _say(f"train: bundle written to {out} in {time.time() - t_start:.0f} s")
    return out


def export_networks(unet, vgg, out: Path, unet_width: float, vgg_width: float, graph: Graph) -> dict:
    """ONNX fp32 + fp16 of both networks into `out`, with the graph's tensor names; returns the manifest's
    `networks` section."""
    from export.onnx_export import export_unet, export_vgg, to_fp16
    nets = {}
    s = graph.size
    for name, model, exporter, width, channels, in_name, out_name in (
            ("unet", unet, export_unet, unet_width, 1, graph.unet_input, graph.unet_output),
            ("vgg", vgg, export_vgg, vgg_width, graph.vgg_channels, graph.vgg_input, graph.vgg_output)):
        t = time.time()
        info = exporter(model, out / f"{name}.onnx", graph)   # the graph's tensor names and size
        half = to_fp16(out / f"{name}.onnx", out / f"{name}.fp16.onnx")
        _say(f"export: {name} -> {name}.onnx, {name}.fp16.onnx in {time.time() - t:.1f} s "
             f"(parity vs torch {info.get('parity_max_abs', float('nan')):.2e})")
        nets[name] = {
            "files": {"fp32": f"{name}.onnx", "fp16": f"{name}.fp16.onnx"},
            "input": {"name": in_name, "shape": ["N", channels, s, s], "dtype": "float32"},
            "output": {"name": out_name, "shape": ["N", 1, s, s] if name == "unet" else ["N", 1024],
                       "dtype": "float32"},
            "channels": channels,
            "architecture": "unet-jakeoung-bn-leakyrelu" if name == "unet" else "vgg19_bn-fc2-1024",
            "width": width,
            "opset": info.get("opset"),
            "parity": {"fp32_vs_torch_max_abs": info.get("parity_max_abs"), "fp16_vs_fp32": _jsonable(half)},
        }
    return nets


def write_bundle_manifest(directory: Path, networks: dict, provenance: dict, graph: Graph, *, demo: bool) -> Path:
    import onnx
    import onnxruntime
    import torch
    import xgboost
    provenance = dict(provenance)
    provenance["libraries"] = {"torch": torch.__version__, "onnx": onnx.__version__,
                               "onnxruntime": onnxruntime.__version__, "xgboost": xgboost.__version__,
                               "numpy": np.__version__, "python": platform.python_version()}
    manifest = {
        "name": "sonoscore-ifta" + ("-synthetic-demo" if demo else ""),
        "disclaimer": DEMO_DISCLAIMER if demo else None,
        "classes": CLASS_NAMES,
        **graph.manifest_sections(),   # preprocess, gate
        "networks": networks,
        "booster": {"file": "booster.ubj", "format": "xgboost-ubj", "num_class": 4, "num_features": 1024,
                    "objective": "multi:softprob"},
        "provenance": provenance,
    }
    return write_manifest(directory, manifest)


def export_from_checkpoints(unet_ckpt, vgg_ckpt, booster_path, out: Path, *, random_weights=False,
                            unet_width=None, vgg_width=None) -> Path:
    """`sonoscore export`: checkpoints (or random weights, for timing) + an XGBoost model -> bundle."""
    import torch
    from export.models import UNet, VGG19BN
    from runtime.errors import UserError
    if random_weights:
        if unet_ckpt or vgg_ckpt:
            raise UserError("give either checkpoints or --random-weights, not both")
        torch.manual_seed(0)
        unet = UNet(width=unet_width or 1.0).eval()
        vgg = VGG19BN(width=vgg_width or 1.0, in_channels=3).eval()
        uw, vw, ch = unet_width or 1.0, vgg_width or 1.0, 3
    else:
        if not (unet_ckpt and vgg_ckpt):
            raise UserError("export needs --unet and --vgg checkpoints (or --random-weights for a timing bundle)")
        unet, uw = load_checkpoint(Path(unet_ckpt), "unet")
        vgg, vw = load_checkpoint(Path(vgg_ckpt), "vgg")
        ch = vgg.in_channels
    booster_path = Path(booster_path)
    if not booster_path.is_file():
        raise UserError(f"booster '{booster_path}' does not exist; give an XGBoost .ubj or .json model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    graph = Graph(vgg_channels=ch)
    nets = export_networks(unet, vgg, out, uw, vw, graph)
    shutil.copyfile(booster_path, out / "booster.ubj") if booster_path.suffix == ".ubj" else _to_ubj(booster_path,
                                                                                                     out / "booster.ubj")
    prov = {"made_by": "sonoscore export", "random_weights": bool(random_weights),
            "unet_checkpoint": None if random_weights else Path(unet_ckpt).name,
            "vgg_checkpoint": None if random_weights else Path(vgg_ckpt).name, "booster": booster_path.name}
    if random_weights:
        prov["note"] = "random network weights: for timing only, its grades mean nothing"
    path = write_bundle_manifest(out, nets, prov, graph, demo=True)
    _say(f"export: bundle written to {out}")
    return path.parent


def _to_ubj(src: Path, dst: Path) -> None:
    import xgboost as xgb
    b = xgb.Booster()
    b.load_model(str(src))
    b.save_model(str(dst))


def load_checkpoint(path: Path, kind: str):
    """A state_dict (bare, or {'state_dict': ..., 'width': ...}) -> model; the width is read off the weights."""
    import torch
    from export.models import UNet, VGG19BN
    from runtime.errors import UserError
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' cannot be read by torch.load ({type(e).__name__}); "
                        f"give a state_dict saved with torch.save") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint '{path}' is not a state_dict")
    try:
        if kind == "unet":
            first = next(v for k, v in sd.items() if k.endswith("weight") and v.ndim == 4)
            width = first.shape[0] / 32
            model = UNet(width=width)
        else:
            w0 = sd["features.0.weight"]
            width = w0.shape[0] / 64
            fc1 = next((v.shape[0] for k, v in sd.items() if k.startswith("fc1") and k.endswith("weight")), None)
            model = VGG19BN(width=width, in_channels=int(w0.shape[1]), fc1=fc1)
        model.load_state_dict(sd, strict=True)
    except (KeyError, RuntimeError, StopIteration) as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"checkpoint '{path}' does not fit the {kind} architecture: {detail}") from None
    return model.eval(), width


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
