"""What `sonoscore export` takes, as its owners have it: checkpoints, ONNX files and the booster, each recognised and
checked before anything is written.

Checkpoints (`read_checkpoint`): `torch.load(weights_only=True)` (no code in the file runs), the zip format and the
legacy (pre-1.6) one alike, tensors mapped to the CPU. The state dict is the file itself or the first of its
`state_dict`, `model_state_dict`, `model`, `net`, `network` or `weights` entries that holds tensors (jakeoung's
`main.py` saves `{'epoch', 'state_dict', 'loss'}`; PyTorch's ImageNet example adds `optimizer`, `arch`, ...).
Every `module` component is dropped from the keys (`module.` of DataParallel / DistributedDataParallel, anywhere:
`features.module.0.weight` of the ImageNet example becomes `features.0.weight`).

The architecture is recognised from the key names (export/checkpoint_families.py), then the sizes are read from
the tensors:

    jakeoung UNet, BatchNorm   conv1.0 conv, conv1.1 BN, conv1.3 conv, conv1.4 BN ... (`Net(useBN=True)`)
    jakeoung UNet, no BN       conv1.0 conv, conv1.2 conv ... (`Net()`, its default), ReLU instead of LeakyReLU
    VGG-19-BN, project keys    features.N, fc1, fc2[, head]
    VGG-19-BN, torchvision     features.N, classifier.0 (= fc1), classifier.3 (= fc2)[, classifier.6 (= head)]

A VGG without its last layer is cut at Fc2 (the runtime reads only Fc2). A BatchNorm without `num_batches_tracked`
(checkpoints from before PyTorch 0.4.1) gets 0, as torch itself fills it. When no family fits, the message names
the one closest (by shared key names) and its first missing and unexpected keys, in full.

ONNX files (`onnx_problems`, `inspect_onnx`): one float32 input [N, C, S, S] with a free batch dimension or a
static batch of 1, the output the runtime reads (its only one, the one named `mask` / `features`, or the one
`--unet-output` / `--vgg-output` names), run at batch 1 and 2 (1 alone for a static batch) to prove it. Every
problem of a file is reported at once, one sentence each.

The booster (`check_booster`): loads with XGBoost, multi:softprob or multi:softmax, one class per grade, and as many
features as the VGG gives. Every refusal is a UserError, one sentence.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.checkpoint_families import Family, recognise
from runtime.errors import UserError

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
OBJECTIVES = ("multi:softprob", "multi:softmax")


# -- reading a checkpoint -------------------------------------------------------------------------------------------

def _tensor_dict(obj) -> bool:
    import torch
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and any(
        isinstance(v, torch.Tensor) for v in obj.values())


def drop_module(key: str) -> str:
    """A key without its `module` components (DataParallel and DistributedDataParallel wrappers, anywhere)."""
    return ".".join(part for part in key.split(".") if part != "module")


def _safe_globals() -> list:
    """Plain values training scripts keep beside the weights (numpy scalars such as a best accuracy, the
    argparse.Namespace of the run's options): rebuilt from data, no code of the file runs."""
    import argparse
    allowed: list = [argparse.Namespace, np.dtype]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:   # numpy < 2
        from numpy.core.multiarray import scalar
    allowed.append(scalar)
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def read_checkpoint(path: Path | str, option: str) -> tuple[dict, dict[str, Any]]:
    """The state dict in a checkpoint file (keys without `module`, floating tensors as float32) and what was found
    about it: {"file", "container" (the entry it came from, or None), "module_prefix" (True when `module` was
    dropped), "serialization" ("zip" or "legacy")}. `option` names the CLI option in messages."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} '{path}' does not exist; give the checkpoint file saved with torch.save")
    serialization = "zip" if zipfile.is_zipfile(path) else "legacy"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise UserError(f"{option} '{path}' holds a Python object of {found.group(1)} besides tensors (a whole "
                            f"model saved with torch.save(model), or a custom class), which sonoscore does not "
                            f"unpickle because unpickling can run code; save model.state_dict() with torch.save and "
                            f"give that file") from None
        raise UserError(f"{option} '{path}' is not a checkpoint torch.load can read (not a torch.save file, or a "
                        f"damaged one); give a file saved with torch.save") from None
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError, EOFError, OSError... for files it cannot read)
        raise UserError(f"{option} '{path}' is not a checkpoint torch.load can read ({type(e).__name__}); give a "
                        f"state dict saved with torch.save") from None
    container = None
    if not _tensor_dict(obj) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = None
        if isinstance(obj, dict):
            for key in CONTAINER_KEYS:
                inner = obj.get(key)
                if _tensor_dict(inner):
                    found, container = inner, key
                    break
                if isinstance(inner, dict):   # e.g. {'model': {'state_dict': ...}}
                    for key2 in CONTAINER_KEYS:
                        if _tensor_dict(inner.get(key2)):
                            found, container = inner[key2], f"{key}.{key2}"
                            break
                if found is not None:
                    break
            if found is None and _tensor_dict(obj):
                found = obj
        if found is None:
            what = (f"a dict with entries {', '.join(repr(k) for k in list(obj)[:6])}" if isinstance(obj, dict)
                    else f"a {type(obj).__name__}")
            raise UserError(f"{option} '{path}' holds {what} but no state dict of tensors (looked for the file "
                            f"itself and its {', '.join(repr(k) for k in CONTAINER_KEYS)} entries); save "
                            f"model.state_dict() with torch.save")
        obj = found
    sd, had_module = {}, False
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue   # e.g. a stray '_metadata'-like entry: not a weight
        name = drop_module(key)
        had_module |= name != key
        if name in sd:
            raise UserError(f"{option} '{path}' has both '{key}' and another key that is '{name}' without its "
                            f"'module' part; give the state dict of one network")
        sd[name] = value.float() if value.is_floating_point() else value
    return sd, {"file": path.name, "container": container, "module_prefix": had_module,
                "serialization": serialization}


# -- building the network -------------------------------------------------------------------------------------------

@dataclass
class Network:
    """A network read from a checkpoint, ready to export."""
    model: Any                    # export.models.UNet or VGG19BN, eval mode, CPU
    kind: str
    architecture: str             # the manifest's networks.<kind>.architecture
    width: float
    channels: int
    features: int | None          # VGG: Fc2's width (the booster's feature count)
    source: dict[str, Any]        # for the manifest's provenance


def _shape(t) -> str:
    return "[" + ", ".join(str(int(d)) for d in t.shape) + "]"


def _load_into(build, sd: dict, label: str, path, option: str):
    """Build the module on the meta device (no init, no memory), check every tensor's shape, then take the
    checkpoint's tensors as its parameters."""
    import torch
    with torch.device("meta"):
        model = build()
    want = model.state_dict()
    for key, ref in want.items():
        if key not in sd:
            if key.endswith(".num_batches_tracked"):
                sd[key] = torch.tensor(0, dtype=torch.long)
                continue
            raise UserError(f"checkpoint '{path}' given as {option} lacks '{key}' for {label}")  # cannot happen
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise UserError(f"checkpoint '{path}' given as {option} has the key names of {label} but '{key}' is "
                            f"{_shape(sd[key])} where its other tensors make it {_shape(ref)}; the layers' sizes do "
                            f"not fit one another (a changed architecture?)")
    model.load_state_dict({k: sd[k].contiguous() for k in want}, strict=True, assign=True)
    return model.eval()


def _first(sd: dict, key: str, ndim: int, path, option: str, label: str):
    t = sd.get(key)
    if t is None or t.ndim != ndim:
        raise UserError(f"checkpoint '{path}' given as {option} has the key names of {label} but '{key}' is "
                        f"{'absent' if t is None else _shape(t)}, not a {ndim}-D weight")
    return t


@dataclass
class Recognised:
    """A checkpoint read and recognised, its sizes read off the tensors; `build()` makes the network."""
    path: Path
    kind: str
    option: str
    family: Family
    sd: dict
    source: dict[str, Any]
    width: float
    channels: int
    features: int | None = None     # VGG: Fc2's width (the booster's feature count)
    fc1: int | None = None
    num_classes: int = 0

    def build(self) -> Network:
        from export.models import UNET_ARCHITECTURES, UNet, VGG19BN
        label, path, option = self.family.label, self.path, self.option
        if self.kind == "unet":
            batch_norm = self.family.key == "unet-bn"
            model = _load_into(lambda: UNet(self.width, batch_norm=batch_norm), self.sd, label, path, option)
            return Network(model, "unet", UNET_ARCHITECTURES[batch_norm], self.width, 1, None, self.source)
        model = _load_into(lambda: VGG19BN(self.width, in_channels=self.channels, num_classes=self.num_classes,
                                           fc1=self.fc1, features_dim=self.features), self.sd, label, path, option)
        return Network(model, "vgg", f"vgg19_bn-fc2-{self.features}", self.width, self.channels, self.features,
                       self.source)


def recognise_checkpoint(path: Path | str, kind: str, option: str) -> Recognised:
    """A checkpoint file -> what it holds, recognised from its keys, sizes read from the tensors; no network is
    built yet (so the booster can be checked against the VGG's Fc2 width first, in a second)."""
    from export.models import scaled
    sd, source = read_checkpoint(path, option)
    fit = recognise(sd, kind, option, path)
    fam = fit.family
    sd = {fam.rename(fit.keys[k]): v for k, v in sd.items()}
    source.update({"layout": fam.key, "prefix_removed": fit.prefix or None})
    if kind == "unet":
        w0 = _first(sd, "conv1.0.weight", 4, path, option, fam.label)
        if w0.shape[1] != 1:
            raise UserError(f"checkpoint '{path}' given as {option} is a UNet taking {w0.shape[1]} channels; the "
                            f"runtime feeds the UNet one gray channel")
        return Recognised(Path(path), kind, option, fam, sd, source, int(w0.shape[0]) / 32, 1)
    w0 = _first(sd, "features.0.weight", 4, path, option, fam.label)
    channels = int(w0.shape[1])
    if channels not in (1, 3):
        raise UserError(f"checkpoint '{path}' given as {option} is a VGG taking {channels} channels; the runtime "
                        f"feeds the VGG 1 or 3 (the gray image repeated)")
    width = int(w0.shape[0]) / 64
    fc1 = _first(sd, "fc1.weight", 2, path, option, fam.label)
    fc2 = _first(sd, "fc2.weight", 2, path, option, fam.label)
    head = sd.get("head.weight")
    last = scaled(512, width)
    if fc1.shape[1] != last * 7 * 7:
        first = "classifier.0" if fam.key == "vgg-torchvision" else "fc1"
        raise UserError(f"checkpoint '{path}' given as {option} has a first fully connected layer ({first}) "
                        f"taking {int(fc1.shape[1])} values, but its feature stack ends in {last} channels of 7x7 "
                        f"= {last * 49}; it is not a VGG-19-BN whose classifier follows its features")
    num_classes = int(head.shape[0]) if head is not None else 0
    features = int(fc2.shape[0])
    source.update({"fc1": int(fc1.shape[0]), "fc2": features, "head": num_classes or None})
    return Recognised(Path(path), kind, option, fam, sd, source, width, channels, features, int(fc1.shape[0]),
                      num_classes)


def load_network(path: Path | str, kind: str, option: str) -> Network:
    """A checkpoint file -> the network it holds, recognised from its keys (`kind`: "unet" or "vgg")."""
    return recognise_checkpoint(path, kind, option).build()


# -- ONNX files -----------------------------------------------------------------------------------------------------

@dataclass
class OnnxNetwork:
    """An ONNX file a user exported, checked and ready to copy into a bundle."""
    path: Path
    kind: str
    input_name: str
    output_name: str
    channels: int
    features: int | None
    opset: int | None
    external_data: bool
    outputs: dict[str, list]
    static_batch: bool = False      # its input's batch dimension is a fixed 1 (run one frame at a time)


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def inspect_onnx(path: Path | str, kind: str, option: str, size: int, normalization: dict | None = None,
                 channels_hint: int | None = None, output: str | None = None) -> OnnxNetwork:
    """Check a user's ONNX network against what the runtime feeds and reads, and run it (batch 1 and 2, or 1 for a
    static batch of 1). Every problem found is reported: one UserError, one sentence per problem."""
    net, problems = onnx_problems(path, kind, option, size, normalization, channels_hint, output)
    if problems:
        raise UserError(join_problems(problems))
    return net


def join_problems(problems: list[str]) -> str:
    """Several refusals as one message: the first sentence, then one indented line per further problem."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def onnx_problems(path: Path | str, kind: str, option: str, size: int, normalization: dict | None = None,
                  channels_hint: int | None = None, output: str | None = None) -> tuple[OnnxNetwork | None, list[str]]:
    """(the network, []) when the file fits, else (None or the network, every problem found: one sentence each).
    The input may have a free batch dimension or a static batch of 1 (the pipelines feed one frame); `output`
    (`--unet-output` / `--vgg-output`) names the output to read when the file has several. The file is run only
    when nothing about its input or output is wrong."""
    import onnx
    from onnx import TensorProto
    path = Path(path)
    if not path.is_file():
        return None, [f"{option} '{path}' does not exist; give the ONNX file of the {kind}"]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 (protobuf DecodeError and friends)
        return None, [f"{option} '{path}' is not an ONNX model onnx can read ({type(e).__name__}); give the "
                      f".onnx file torch.onnx.export wrote"]
    external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    outputs = {o.name: _dims(o) for o in model.graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    del model
    what = f"{option} '{path}'"
    problems: list[str] = []
    want_c = (1,) if kind == "unet" else (1, 3)
    channels, static = None, False
    inp = inputs[0] if len(inputs) == 1 else None
    if inp is None:
        problems.append(f"{what} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); the "
                        f"runtime feeds the {kind} one image tensor")
    else:
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"{what}'s input '{inp.name}' is not float32; the runtime feeds float32 (FP16 files keep "
                            f"float32 inputs and outputs)")
        shape = _dims(inp)
        if len(shape) != 4:
            problems.append(f"{what}'s input '{inp.name}' has shape {shape}; the runtime feeds [N, C, {size}, {size}]")
        else:
            if isinstance(shape[0], int):
                if shape[0] == 1:
                    static = True
                else:
                    problems.append(f"{what}'s input '{inp.name}' has a fixed batch of {shape[0]}; the runtime feeds "
                                    f"one frame at a time: export it with a batch of 1 or a dynamic batch dimension "
                                    f"(torch.onnx.export dynamic_shapes or dynamic_axes on dimension 0)")
            channels = shape[1] if isinstance(shape[1], int) else channels_hint
            if channels is None:
                problems.append(f"{what}'s input '{inp.name}' leaves its channel count open ({shape[1]!r}); export "
                                f"it with a fixed channel dimension ({' or '.join(map(str, want_c))})")
            elif channels not in want_c:
                problems.append(f"{what}'s input '{inp.name}' has {shape[1]} channels; the runtime feeds the {kind} "
                                f"{' or '.join(map(str, want_c))}")
            if any(isinstance(d, int) and d != size for d in shape[2:]):
                problems.append(f"{what}'s input '{inp.name}' is {shape[2]}x{shape[3]}; the runtime feeds "
                                f"{size}x{size}")
    default = "mask" if kind == "unet" else "features"
    flag = f"--{kind}-output"
    out_name = None
    if output is not None:
        if output in outputs:
            out_name = output
        else:
            problems.append(f"{what} has no output '{output}' ({flag}); its outputs are {', '.join(outputs)}")
    elif len(outputs) == 1:
        out_name = next(iter(outputs))
    elif default in outputs:
        out_name = default
    else:
        problems.append(f"{what} has outputs {', '.join(outputs)}; the runtime reads one: name the "
                        f"{'kidney probability' if kind == 'unet' else 'Fc2 features'} output with {flag}")
    if out_name is not None:
        out_shape = outputs[out_name]
        if kind == "unet":
            ok = len(out_shape) == 4 and all(not isinstance(d, int) or d == w
                                             for d, w in zip(out_shape[1:], (1, size, size)))
            if not ok and out_shape:
                problems.append(f"{what}'s output '{out_name}' has shape {out_shape}; the runtime reads the kidney "
                                f"probability as [N, 1, {size}, {size}]")
        elif out_shape and len(out_shape) != 2:
            problems.append(f"{what}'s output '{out_name}' has shape {out_shape}; the runtime reads the features as "
                            f"[N, F]")
    if channels is not None and channels in want_c:
        from runtime.normalize import check
        try:
            normalization = check(normalization, int(channels),
                                  f"--{kind}-input for the {channels}-channel {kind} of {what}: ")
        except UserError as e:
            problems.append(str(e))
    if problems:
        return None, problems
    net = OnnxNetwork(path, kind, inp.name, out_name, int(channels), None, opset, external, outputs, static)
    return net, _probe(net, what, size, normalization)


def _probe(net: OnnxNetwork, what: str, size: int, normalization: dict | None) -> list[str]:
    """Run the file on the parity inputs at batch 1 and 2 (batch 1 alone for a static batch): it loads, takes
    the batch, gives what it declares. Returns the problems found (one sentence each)."""
    from export.onnx_export import ort_session, parity_inputs
    try:
        session = ort_session(net.path)
    except Exception as e:  # noqa: BLE001 (onnxruntime's Fail / InvalidGraph / NotImplemented)
        first = " ".join(str(e).split())[:200]
        return [f"{what} does not load in onnxruntime ({first}); export it again with an opset onnxruntime supports"]
    batches = parity_inputs(net.channels, size=size, normalization=normalization)
    problems: list[str] = []
    for x in (batches[1],) + (() if net.static_batch else (batches[0][:2],)):    # batch 1, then batch 2
        try:
            y = session.run([net.output_name], {net.input_name: x})[0]
        except Exception as e:  # noqa: BLE001
            first = " ".join(str(e).split())[:200]
            problems.append(f"{what} fails on a batch of {len(x)} images of [{net.channels}, {size}, {size}] "
                            f"({first}); export it with a dynamic batch (or a batch of 1) and this input size")
            break
        n = len(x)
        if net.kind == "unet":
            if y.shape != (n, 1, size, size):
                problems.append(f"{what} returns '{net.output_name}' of shape {list(y.shape)} for {n} image(s); "
                                f"the runtime reads [N, 1, {size}, {size}]")
            elif not np.all(np.isfinite(y)) or y.min() < 0 or y.max() > 1:
                problems.append(f"{what} returns values from {float(np.nanmin(y)):.3g} to {float(np.nanmax(y)):.3g}, "
                                f"not probabilities in [0, 1]; the runtime thresholds the UNet's output at the "
                                f"manifest's mask threshold: export the network with its sigmoid")
        else:
            if y.ndim != 2 or y.shape[0] != n:
                problems.append(f"{what} returns '{net.output_name}' of shape {list(y.shape)} for {n} image(s); the "
                                f"runtime reads the features as [N, F]")
            elif not np.all(np.isfinite(y)):
                problems.append(f"{what} returns non-finite features on plain test images; check the file")
            else:
                net.features = int(y.shape[1])
        if problems:
            break
    return problems


def copy_onnx(net: OnnxNetwork, dst: Path) -> None:
    """The file into the bundle, as one file (weights kept in external data are taken in)."""
    if not net.external_data:
        shutil.copyfile(net.path, dst)
        return
    import onnx
    model = onnx.load(str(net.path))   # reads the external data beside it
    onnx.save(model, str(dst), save_as_external_data=False)


# -- the booster ----------------------------------------------------------------------------------------------------

def check_booster(path: Path | str, num_class: int, option: str = "--booster"):
    """Load an XGBoost model and check its objective and class count; returns (xgboost.Booster, info) with info
    {"objective", "num_class", "num_features", "trees"}. The feature count is checked by `check_features`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} '{path}' does not exist; give an XGBoost model saved with save_model (.json or "
                        f".ubj)")
    if path.suffix.lower() not in (".json", ".ubj"):
        raise UserError(f"{option} '{path}' is neither .json nor .ubj; save the XGBoost model with "
                        f"booster.save_model('model.json') or 'model.ubj'")
    import xgboost as xgb
    booster = xgb.Booster()
    try:
        booster.load_model(str(path))
        config = json.loads(booster.save_config())
        learner = config["learner"]
        objective = str(learner["objective"]["name"])
        params = learner["learner_model_param"]
        classes = int(params.get("num_class", 0))
        features = int(params["num_feature"])
    except (xgb.core.XGBoostError, ValueError, KeyError, TypeError) as e:
        first = " ".join(str(e).split()).split(" Stack trace:")[0]
        first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first).split(" around character")[0].rstrip(", ")[:160]
        raise UserError(f"{option} '{path}' is not an XGBoost model XGBoost can load ({first}); give a model "
                        f"saved with save_model as .json or .ubj") from None
    if objective not in OBJECTIVES:
        raise UserError(f"{option} '{path}' has objective {objective}; the runtime grades with class probabilities "
                        f"from multi:softprob (or multi:softmax), so train the booster with one of those")
    if classes != num_class:
        raise UserError(f"{option} '{path}' predicts {classes} classes but the bundle grades {num_class} "
                        f"(--num-class, or --classes' names); give --num-class {classes} (or {classes} --classes "
                        f"names), or train the booster with num_class={num_class}")
    return booster, {"objective": objective, "num_class": classes, "num_features": features,
                     "trees": int(booster.num_boosted_rounds()) * classes}


def check_features(booster_info: dict, features: int, booster_path, vgg_what: str, option: str = "--booster") -> None:
    if booster_info["num_features"] != features:
        raise UserError(f"{option} '{booster_path}' takes {booster_info['num_features']} features but {vgg_what} "
                        f"gives {features} (its Fc2 width); give the booster trained on this VGG's features")
