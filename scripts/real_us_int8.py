#!/usr/bin/env python3
"""INT8 UNet masks against FP32 on real ultrasound the project never trained on: the pydicom test DICOMs.

    .venv/bin/python scripts/real_us_int8.py --bundle out/demo/bundle [--unet-int8 FILE] [--frames 40]
        [--threads 2] [--min-iou 0.95] [--mask-threshold T] [--json out.json]
        [--activation-scale K] [--weights {file,fp32-7bit,fp32-8bit}] [--float-activations] [--phantom DIR]
        [--input-noise S1,S2,...] [--ranges]

What it measures (issue 14: "on real ultrasound the project has never trained on, INT8 mask IoU against FP32
>= 0.95"):

1. Frames: every ultrasound DICOM that pydicom ships and that the installed pydicom-data package holds, found by
   scripts/dicom_sweep.py (`known_files` / `ultrasound_files`: Modality US or an ultrasound SOP class). Each file is
   read by the runtime's own DICOM source (runtime.sources.dicom.DicomSource: the same decoding, colour and palette
   handling as `sonoscore run`) and each frame is prepared as the CPU pipeline prepares it (Pipeline.prepare: gray
   BT.601, the burned-in-text rule, crop, resize, Crimmins; the bundle's graph). A frame the source cannot decode,
   or that the runtime refuses (possible burned-in text and no scan sector), is skipped and counted. `--frames` N
   frames are picked spread evenly over all the usable frames of all files, in file order (deterministic).
2. The bundle's UNet at each precision on those frames, `Graph.segment` then mask = prob > the gate's threshold:
   FP32 (onnxruntime, default optimisations: the reference), the bundle's FP16 UNet when it has one, the INT8 UNet
   simulated (onnxruntime with graph optimisations off: Q/DQ as float ops, the same on every x86 CPU, what
   `calibrate` decides on) and the INT8 UNet on this CPU's integer kernels (default optimisations).
3. Against FP32: mean mask IoU over the frames where either mask has a pixel (runtime.agreement.compare: frames
   where both are empty are not counted), the lowest IoU, how many frames counted, the mean |mask fraction
   difference| and the gate agreement; and per precision how many frames have any mask pixel and how many the
   gate accepts (mask fraction >= the manifest's minimum). Two more means of the same per-frame IoUs: per picture
   (frames whose prepared pixels are identical are one picture, `picture_ids`: pydicom and pydicom-data ship some
   pictures in several encodings, and a picture shipped five times would otherwise count five times), and over
   the frames whose mask either precision's gate accepts (the only masks that reach the VGG and the grade; a
   speck of a few pixels the gate rejects in both changes no output).

4. `--phantom DIR`: also the mask IoU against FP32 on a labelled dataset folder (e.g. out/demo/data/heldout): every
   labelled image, preprocessed by export.recipe.load_preprocessed with the bundle's graph, FP32 against the INT8
   UNet simulated; a separate set of rows in the table and the JSON.

5. `--input-noise S1,S2,...`: how much the FP32 mask itself moves under a small change of its input, the yardstick
   for the INT8 figures: for each S, the FP32 UNet on the same frames with Gaussian noise of S gray levels added
   to each preprocessed pixel (`noisy`: seeded, rounded and clipped to 0..255 as a uint8 frame is), its masks
   against FP32's on the clean frames, a row "FP32, input noise S gray levels" in each table (and with --phantom,
   on the phantom too). A set of frames on which a noise of 1-2 gray levels already moves the FP32 mask is one on
   which any numeric change, INT8's included, moves it as much.

6. `--ranges`: how far the INT8 file's activations (run simulated) reach past the range each activation
   QuantizeLinear can hold (`activation_ranges`: per tensor and frame, the furthest value over the range's end and
   the share of values that saturate), on the real frames and, with --phantom, on the phantom: a file calibrated on
   the phantom whose real-frame activations saturate in many layers is meeting inputs its ranges were not set for.

Variants of the INT8 file, to find out why its IoU is what it is (`build_variant`: a temporary copy is measured, the
file itself is never changed; the table and the JSON name the variant):
- `--activation-scale K`: every activation scale (the scale initializer of each QuantizeLinear whose input is not an
  initializer, and of the DequantizeLinear that reads it; never a weight scale) multiplied by K: a range K times
  wider, steps K times coarser.
- `--weights fp32-7bit|fp32-8bit`: every quantized weight (the int8 `<name>_quantized` initializer read by a
  DequantizeLinear, and its scale) replaced by the bundle's FP32 UNet weight of that name (for a sub-pixel file,
  the FP32 ConvTranspose weight rewritten as calibration.quantize.sub_pixel_conv_transpose rewrites it), quantized
  on the file's own granularity (per channel on the file's axis, or per tensor) to [-64, 64] (scale |w|max / 64) or
  [-127, 127] (|w|max / 127); the float initializers the file shares with the FP32 UNet (biases, layers kept in
  float) are the FP32 ones too. These are the FP32 weights, not the QAT-trained ones a distilled file holds.
- `--float-activations`: every activation QuantizeLinear/DequantizeLinear pair removed (the consumers read the
  float tensor): quantized weights, float activations.
Weights are replaced first, then activation scales multiplied or activation pairs removed.

The INT8 UNet: `--unet-int8`, else the bundle's installed one, else `<bundle>/calibration-rejected/unet.int8.onnx`
(calibration.run.int8_candidate). Exit status: 0 when the simulated INT8 mean IoU is at least `--min-iou`, 1 when it
is lower or cannot be measured (no frame has a mask pixel at either precision), 2 on bad input (one sentence).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from runtime.errors import UserError  # noqa: E402

PRECISIONS = (  # key, label in the table
    ("fp32", "FP32 (reference)"),
    ("fp16", "FP16"),
    ("int8_simulated", "INT8 (simulated)"),
    ("int8_cpu", "INT8 (this CPU)"),
)
WITHHELD = "withheld: possible burned-in text, no scan sector"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RealFrames:
    """The usable frames of the ultrasound DICOMs, preprocessed, and what was left out and why."""
    images: list[np.ndarray] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)   # (file name, frame number in the file)
    files: list[dict] = field(default_factory=list)                # per file: name, origin, frames, usable, skipped
    skipped: Counter = field(default_factory=Counter)              # reason -> frames


def read_real_frames(bundle, files=None) -> RealFrames:
    """Every frame of every ultrasound DICOM pydicom knows of (`files`: dicom_sweep.KnownFile list, default all of
    them), read by DicomSource and prepared by Pipeline.prepare, as `sonoscore run` reads and prepares them."""
    from dicom_sweep import ultrasound_files
    from runtime.pipeline import Pipeline
    from runtime.preprocess import NO_SECTOR, FrameError
    from runtime.sources import SourceError
    from runtime.sources.dicom import DicomSource

    files = ultrasound_files() if files is None else files
    pipe = Pipeline(bundle)   # not entered: only its preprocessing is used
    out = RealFrames()
    for f in files:
        row = {"file": f.name, "origin": f.origin, "photometric": f.photometric, "frames": 0, "usable": 0,
               "skipped": {}}
        out.files.append(row)
        try:
            source = DicomSource(f.path, realtime=False, warn_modality=False)
        except SourceError:
            row["frames"] = int(f.frames or 1)
            row["skipped"]["file not opened by the DICOM source"] = row["frames"]
            continue
        with source:
            for frame in source:
                row["frames"] += 1
                why = None
                if frame.error is not None or frame.pixels is None:
                    why = "not decoded"
                else:
                    try:
                        _, image, _ = pipe.prepare(frame)
                    except FrameError as e:
                        why = WITHHELD if NO_SECTOR in str(e) else "refused by preprocessing"
                if why:
                    row["skipped"][why] = row["skipped"].get(why, 0) + 1
                    out.skipped[why] += 1
                    continue
                row["usable"] += 1
                out.images.append(image)
                out.origins.append((f.name, frame.frame_in_file if frame.frame_in_file is not None else frame.index))
    return out


def unet_masks(graph, path: Path, images: list[np.ndarray], *, threads: int, simulated: bool,
               what: str) -> tuple[np.ndarray | None, float]:
    """([N, H, W] bool masks, seconds) of the UNet file `path` on the images (None for no image: only checks that
    the file loads and fits the graph); UserError when it cannot run."""
    from runtime.backends.base import short
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import BundleError, check_runner

    t0 = time.perf_counter()
    runner = OrtRunner(path, intra_op_threads=threads, simulated_quantization=simulated)
    try:
        runner.activate()
    except Exception as e:
        reason = short(e, 160).rstrip(".").replace(". ", "; ")   # one sentence, whatever onnxruntime wrote
        raise UserError(f"{what} '{path}' cannot be loaded by onnxruntime ({reason}); give an ONNX UNet "
                        f"made from this bundle") from None
    try:
        try:
            check_runner("unet", runner, graph, path)
        except BundleError:
            raise UserError(f"{what} '{path}' is not a UNet this bundle's graph can run (its input or output names "
                            f"or shapes differ from the manifest's); give the UNet made from this bundle") from None
        masks = np.stack([graph.segment(runner, img) > graph.mask_threshold for img in images]) if images else None
    finally:
        runner.deactivate()
    return masks, time.perf_counter() - t0


def _outputs(graph, masks: np.ndarray, num_classes: int):
    from runtime.agreement import Outputs
    n = len(masks)
    fractions = masks.reshape(n, -1).mean(1)
    accepted = np.array([graph.accepts(float(x)) for x in fractions], bool)
    # UNet only: no features or grades (compare's feature and grade figures are not reported)
    return Outputs(masks, fractions, accepted, np.full((n, 1), np.nan, np.float32), np.full((n, num_classes), np.nan))


def per_frame_iou(ref: np.ndarray, other: np.ndarray) -> list[float | None]:
    """IoU of each frame's masks; None where both are empty (not counted, as in runtime.agreement.compare)."""
    n = len(ref)
    inter = (ref & other).reshape(n, -1).sum(1)
    union = (ref | other).reshape(n, -1).sum(1)
    return [round(float(i / u), 6) if u else None for i, u in zip(inter, union)]


def picture_ids(images: list[np.ndarray]) -> list[str]:
    """A key per frame, the same for frames whose prepared pixels are identical: pydicom and pydicom-data ship some
    pictures in several encodings (one picture as uncompressed, RLE, big-endian and JPEG 2000 files), and the
    per-picture figures count each picture once."""
    return [hashlib.sha256(str(img.shape).encode() + np.ascontiguousarray(img).tobytes()).hexdigest()[:16]
            for img in images]


def mean_by_picture(values: list[float | None], ids: list[str]) -> tuple[float | None, int]:
    """(mean over pictures of each picture's mean value, pictures counted); frames whose value is None (not
    counted) are left out, and a picture none of whose frames counts is not counted."""
    groups: dict[str, list[float]] = {}
    for v, k in zip(values, ids):
        if v is not None:
            groups.setdefault(k, []).append(v)
    if not groups:
        return None, 0
    return round(float(np.mean([np.mean(v) for v in groups.values()])), 6), len(groups)


def activation_ranges(path: Path, graph, images: list[np.ndarray], *, threads: int) -> dict:
    """How far the activations of the INT8 file (run simulated: graph optimisations off) reach past the range each
    activation QuantizeLinear can hold, frame by frame. For each such node (scale s, zero point z of type int8 or
    uint8): the range is [(qmin - z) s, (qmax - z) s]; `ratio` is the largest value over the top of the range, or
    the most negative one over the bottom, whichever is larger (1: the range is just reached); `clipped` is the
    share of the tensor's values whose rounded level falls outside [qmin, qmax] (they saturate). Where every reader
    of the node's DequantizeLinear is a Relu, values below the range are not counted: the Relu zeroes them anyway
    (onnxruntime's quantizer gives such a tensor its Relu output's range, so they are below it by design)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper as nh
    from runtime.backends.ort import optimization_level

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    tensors = []
    for n in nodes:
        dqs = [r for r in readers.get(n.output[0], []) if r.op_type == "DequantizeLinear"]
        after = [r for dq in dqs for r in readers.get(dq.output[0], [])]
        relu_only = bool(after) and all(r.op_type == "Relu" for r in after)
        if n.input[1] not in inits:
            raise UserError(f"the INT8 UNet '{path}' gives the scale of the QuantizeLinear of {n.input[0]} as a "
                            f"computed tensor, not an initializer, so --ranges cannot read it; leave --ranges out "
                            f"for this file")
        scale = float(nh.to_array(inits[n.input[1]]).reshape(-1)[0])
        zp = nh.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else np.zeros((), np.uint8)
        info = np.iinfo(zp.dtype)
        z = int(zp.reshape(-1)[0])
        tensors.append({"tensor": n.input[0], "scale": scale, "zero_point": z, "qmin": int(info.min),
                        "qmax": int(info.max), "low": (int(info.min) - z) * scale, "high": (int(info.max) - z) * scale,
                        "relu_only": relu_only})
    graph_inputs = {i.name for i in model.graph.input}
    present = {o.name for o in model.graph.output}
    for t in tensors:
        if t["tensor"] not in graph_inputs and t["tensor"] not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t["tensor"], onnx.TensorProto.FLOAT, None))
            present.add(t["tensor"])
    so = ort.SessionOptions()
    so.graph_optimization_level = optimization_level(simulated_quantization=True)
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fetch = [t["tensor"] for t in tensors if t["tensor"] not in graph_inputs]
    ratio = np.zeros((len(images), len(tensors)))
    clipped = np.zeros((len(images), len(tensors)))
    for i, img in enumerate(images):
        feeds = graph.unet_feeds(img)
        values = dict(zip(fetch, session.run(fetch, feeds)))
        values.update(feeds)
        for j, t in enumerate(tensors):
            x = np.asarray(values[t["tensor"]], np.float64)
            over = [x.max() / t["high"]] if t["high"] > 0 else []
            over += [x.min() / t["low"]] if t["low"] < 0 and not t["relu_only"] else []
            ratio[i, j] = max(over) if over else 0.0
            level = np.rint(x / t["scale"]) + t["zero_point"]
            out = (level > t["qmax"]) if t["relu_only"] else (level > t["qmax"]) | (level < t["qmin"])
            clipped[i, j] = float(out.mean())
    per_frame = (clipped > 0).sum(1)
    return {"tensors": len(tensors), "frames": len(images),
            "frames_clipping": int((per_frame > 0).sum()),
            "tensors_clipping_median": float(np.median(per_frame)) if len(images) else None,
            "ratio_max": round(float(ratio.max()), 4) if ratio.size else None,
            "ratio_median": round(float(np.median(ratio.max(1))), 4) if ratio.size else None,
            "clipped_share_mean": round(float(clipped.mean()), 8) if clipped.size else None,
            "per_frame": [{"tensors_clipping": int(c), "ratio_max": round(float(r), 4)}
                          for c, r in zip(per_frame, ratio.max(1) if ratio.size else [])],
            "per_tensor": [{"tensor": t["tensor"], "scale": t["scale"], "zero_point": t["zero_point"],
                            "relu_only": t["relu_only"],
                            "ratio_max": round(float(ratio[:, j].max()), 4) if len(images) else None,
                            "frames_clipping": int((clipped[:, j] > 0).sum()),
                            "clipped_share_mean": round(float(clipped[:, j].mean()), 8) if len(images) else None}
                           for j, t in enumerate(tensors)]}


def ranges_line(where: str, r: dict) -> str:
    """One sentence on activation_ranges' result."""
    worst = sorted(r["per_tensor"], key=lambda t: -(t["ratio_max"] or 0))[:3]
    return (f"{where}: {r['frames_clipping']} of {r['frames']} frames saturate at least one of the {r['tensors']} "
            f"activation ranges (median {r['tensors_clipping_median']:g} tensors per frame); the furthest value "
            f"reaches {r['ratio_max']:.2f}x its range (median frame {r['ratio_median']:.2f}x); furthest tensors: "
            + ", ".join(f"{t['tensor']} {t['ratio_max']:.2f}x" for t in worst))


WEIGHTS = ("file", "fp32-7bit", "fp32-8bit")
WEIGHT_LEVELS = {"fp32-7bit": 64, "fp32-8bit": 127}    # weights quantized to [-L, L], scale |w|max / L


def noisy(images: list[np.ndarray], sigma: float, seed: int = 0) -> list[np.ndarray]:
    """The uint8 frames with Gaussian noise of `sigma` gray levels added to every pixel, rounded and clipped to
    0..255 (one seeded generator over the frames in order: the same noise on every run)."""
    rng = np.random.default_rng(seed)
    return [np.clip(np.rint(img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)), 0, 255).astype(np.uint8)
            for img in images]


def noise_key(sigma: float) -> str:
    return f"fp32_noise_{sigma:g}"


def variant_name(activation_scale: float = 1.0, weights: str = "file", float_activations: bool = False) -> str:
    """How a variant differs from the INT8 file as given ("as given" when it does not)."""
    parts = []
    if weights != "file":
        parts.append(f"weights {weights} (the bundle's FP32 weights, [-{WEIGHT_LEVELS[weights]}, "
                     f"{WEIGHT_LEVELS[weights]}])")
    if float_activations:
        parts.append("float activations")
    elif activation_scale != 1:
        parts.append(f"activation scales x{activation_scale:g}")
    return ", ".join(parts) or "as given"


def _activation_qdq(graph) -> tuple[list, list]:
    """(activation QuantizeLinear nodes: input not an initializer, the DequantizeLinear nodes that read them)."""
    inits = {i.name for i in graph.initializer}
    qs = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    outs = {q.output[0] for q in qs}
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in outs]
    return qs, dqs


def _weight_dqs(graph) -> list:
    """The DequantizeLinear nodes of quantized weights: their input is an initializer."""
    inits = {i.name for i in graph.initializer}
    return [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def _fp32_initializers(fp32_model) -> dict[str, np.ndarray]:
    """The FP32 UNet's initializers by name, with those of its sub-pixel rewrite (calibration.quantize
    .sub_pixel_conv_transpose: `<weight>_sub_pixel`, `<bias>_sub_pixel`) for files quantized that way."""
    from onnx import numpy_helper as nh

    from calibration.quantize import sub_pixel_conv_transpose
    out = {i.name: nh.to_array(i) for i in sub_pixel_conv_transpose(fp32_model)[0].graph.initializer}
    out.update({i.name: nh.to_array(i) for i in fp32_model.graph.initializer})
    return out


def build_variant(int8: Path, fp32: Path, *, activation_scale: float = 1.0, weights: str = "file",
                  float_activations: bool = False):
    """(the variant of the INT8 Q/DQ UNet `int8` as an onnx.ModelProto, what was changed: a dict of counts).

    `weights` "fp32-7bit" / "fp32-8bit": each quantized weight (an int8 initializer `<name>_quantized` read by a
    DequantizeLinear, with a symmetric zero point) becomes the FP32 UNet `fp32`'s weight `<name>` quantized on the
    DequantizeLinear's own granularity (per channel on its axis, or per tensor) to [-L, L] with scale |w|max / L
    (L = 64 or 127; a channel that is all zero gets scale 1 / L), and every float initializer of the file that the
    FP32 UNet has by the same name and shape (biases, layers kept in float) becomes the FP32 one. Then
    `activation_scale` K multiplies every activation scale initializer (of each QuantizeLinear whose input is not an
    initializer and of the DequantizeLinear reading it; once each, so pairs stay equal; never a weight scale), or
    `float_activations` removes every activation pair, its consumers reading the float tensor (and initializers no
    node reads any more are dropped). UserError when the file cannot be changed that way."""
    import onnx
    from onnx import numpy_helper as nh

    if weights not in WEIGHTS:
        raise UserError(f"--weights '{weights}' is not one of {', '.join(WEIGHTS)}; give one of them")
    if not (np.isfinite(activation_scale) and activation_scale > 0):
        raise UserError(f"--activation-scale {activation_scale:g} is not a positive factor; give a number above 0 "
                        f"(2 makes every activation range twice as wide)")
    if float_activations and activation_scale != 1:
        raise UserError(f"--activation-scale {activation_scale:g} has nothing to scale with --float-activations "
                        f"(no activation is quantized); give one of them")
    model = onnx.load(str(int8))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    info = {"name": variant_name(activation_scale, weights, float_activations), "activation_scale": activation_scale,
            "weights": weights, "float_activations": bool(float_activations), "weights_replaced": 0,
            "float_initializers_from_fp32": 0, "weight_error_max_steps": None, "activation_scales_multiplied": 0,
            "activation_pairs_removed": 0}
    w_dqs = _weight_dqs(g)
    weight_scales = {n.input[1] for n in w_dqs}

    if weights != "file":
        levels = WEIGHT_LEVELS[weights]
        fi = _fp32_initializers(onnx.load(str(fp32)))
        worst = 0.0
        for n in w_dqs:
            qname, sname = n.input[0], n.input[1]
            w = nh.to_array(inits[qname])
            base = qname[:-len("_quantized")] if qname.endswith("_quantized") else None
            fw = fi.get(base) if base else None
            if fw is None or fw.shape != w.shape or w.dtype != np.int8 or sname not in inits:
                raise UserError(f"the INT8 UNet's quantized weight '{qname}' has no FP32 weight of the same name and "
                                f"shape in {fp32}; give an INT8 UNet quantized from this bundle's FP32 UNet")
            if len(n.input) > 2 and n.input[2] and (n.input[2] not in inits or nh.to_array(inits[n.input[2]]).any()):
                raise UserError(f"the INT8 UNet's quantized weight '{qname}' has a zero point that is not 0; "
                                f"--weights takes symmetric INT8 weights only")
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("block_size"):
                raise UserError(f"the INT8 UNet's quantized weight '{qname}' is quantized in blocks; --weights "
                                f"takes per-channel or per-tensor weights only")
            s = nh.to_array(inits[sname])
            fw = fw.astype(np.float32)
            if s.ndim == 0:
                new_s = np.asarray(max(float(np.abs(fw).max()), 1e-12) / levels, dtype=s.dtype)
                step = new_s.astype(np.float32)
            else:
                axis = int(attrs.get("axis", 1))
                axis = axis + w.ndim if axis < 0 else axis
                if s.ndim != 1 or not 0 <= axis < w.ndim or s.shape[0] != w.shape[axis]:
                    raise UserError(f"the INT8 UNet's quantized weight '{qname}' has a scale of shape {s.shape} "
                                    f"that does not fit its shape {w.shape}; give a per-channel or per-tensor file")
                m = np.moveaxis(np.abs(fw), axis, 0).reshape(w.shape[axis], -1).max(1)
                new_s = (np.where(m > 0, m, np.float32(1)) / np.float32(levels)).astype(s.dtype)
                shape = [1] * w.ndim
                shape[axis] = -1
                step = new_s.astype(np.float32).reshape(shape)
            q = np.clip(np.round(fw / step), -levels, levels)
            worst = max(worst, float((np.abs(q * step - fw) / step).max()))
            inits[qname].CopyFrom(nh.from_array(q.astype(np.int8), qname))
            inits[sname].CopyFrom(nh.from_array(new_s, sname))
            info["weights_replaced"] += 1
        for name, init in inits.items():
            if name in weight_scales:
                continue
            a = nh.to_array(init)
            if name in fi and a.dtype.kind == "f" and fi[name].shape == a.shape:
                init.CopyFrom(nh.from_array(fi[name].astype(a.dtype), name))
                info["float_initializers_from_fp32"] += 1
        info["weight_error_max_steps"] = round(worst, 6)

    qs, dqs = _activation_qdq(g)
    act_scales = {n.input[1] for n in qs + dqs}
    missing = sorted(x for x in act_scales if x not in inits)
    if missing:
        raise UserError(f"the INT8 UNet's activation scale '{missing[0]}' is not an initializer; give a Q/DQ file "
                        f"whose scales are initializers")
    if act_scales & weight_scales:
        raise UserError(f"the INT8 UNet's scale '{sorted(act_scales & weight_scales)[0]}' is both an activation "
                        f"and a weight scale; give a file where they are separate")
    if activation_scale != 1:
        for name in sorted(act_scales):
            a = nh.to_array(inits[name])
            inits[name].CopyFrom(nh.from_array((a * a.dtype.type(activation_scale)).astype(a.dtype), name))
        info["activation_scales_multiplied"] = len(act_scales)
    if float_activations:
        outputs = {o.name for o in g.output}
        identities = []
        for q in qs:
            readers = [n for n in g.node if q.output[0] in n.input]
            if any(n.op_type != "DequantizeLinear" for n in readers) or q.output[0] in outputs:
                raise UserError(f"the INT8 UNet's activation QuantizeLinear '{q.name}' is read by more than its "
                                f"DequantizeLinear; --float-activations takes Q/DQ pairs only")
            for dq in readers:
                for n in g.node:
                    for i, x in enumerate(n.input):
                        if x == dq.output[0]:
                            n.input[i] = q.input[0]
                if dq.output[0] in outputs:     # a graph output keeps its name
                    identities.append(onnx.helper.make_node("Identity", [q.input[0]], [dq.output[0]],
                                                            name=f"{dq.name}_float"))
                g.node.remove(dq)
                info["activation_pairs_removed"] += 1
            g.node.remove(q)
        g.node.extend(identities)
        used = {x for n in g.node for x in n.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    qs_left, _ = _activation_qdq(g)
    info["activation_quantize_nodes"] = len(qs_left)
    info["weight_dequantize_nodes"] = len(_weight_dqs(g))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise UserError(f"the variant ({info['name']}) of the INT8 UNet {int8} is not a valid ONNX model "
                        f"({str(e).splitlines()[0].rstrip('.')}); report this with the file") from None
    return model, info


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: dict[str, dict], variant: str = "as given") -> str:
    """The markdown table of `rows` (precision key -> row); the INT8 rows name the variant unless it is "as given"."""
    head = ("precision", "mean IoU", "min IoU", "frames counted", "mean IoU per picture", "pictures counted",
            "mean IoU, a gate accepts", "frames a gate accepts", "mean abs Δ fraction", "gate agreement",
            "frames with mask", "gate accepts", "seconds")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    noise = [(k, f"FP32, input noise {rows[k]['input_noise']:g} gray level{'' if rows[k]['input_noise'] == 1 else 's'}")
             for k in rows if k.startswith("fp32_noise_")]
    for key, label in [*PRECISIONS, *noise]:
        r = rows.get(key)
        if r is None:
            continue
        ref = key == "fp32"
        if key.startswith("int8") and variant != "as given":
            label = f"{label}, {variant}"
        cells = (label, "ref" if ref else _fmt(r["mask_iou_mean"]), "ref" if ref else _fmt(r["mask_iou_min"]),
                 "ref" if ref else str(r["frames_counted"]),
                 "ref" if ref else _fmt(r["mask_iou_mean_pictures"]), "ref" if ref else str(r["pictures_counted"]),
                 "ref" if ref else _fmt(r["mask_iou_mean_gated"]), "ref" if ref else str(r["frames_gated"]),
                 "ref" if ref else _fmt(r["mask_fraction_error_mean"], 5),
                 "ref" if ref else _fmt(r["gate_agreement"], 3),
                 f"{r['frames_with_mask']}/{r['frames']}", f"{r['frames_accepted']}/{r['frames']}",
                 f"{r['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path, help="model bundle (its FP32 UNet is the reference)")
    ap.add_argument("--unet-int8", type=Path, help="INT8 UNet (default: the bundle's installed one, else "
                                                   "<bundle>/calibration-rejected/unet.int8.onnx)")
    ap.add_argument("--frames", type=int, default=40, help="frames, spread over all usable ones (default 40)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--min-iou", type=float, default=0.95, help="simulated INT8 mean IoU needed (default 0.95)")
    ap.add_argument("--mask-threshold", type=float, help="mask = prob > this (default: the manifest's gate)")
    ap.add_argument("--json", type=Path, help="write everything measured here")
    ap.add_argument("--activation-scale", default="1", metavar="K",
                    help="measure a copy of the INT8 file with every activation scale (never a weight scale) "
                         "multiplied by K (default 1: as in the file)")
    ap.add_argument("--weights", default="file", metavar="{" + ",".join(WEIGHTS) + "}",
                    help="file (default): the file's weights; fp32-7bit / fp32-8bit: a copy with every quantized "
                         "weight replaced by the bundle's FP32 UNet weight (the FP32 weights, not the QAT-trained "
                         "ones a distilled file holds) quantized on the file's granularity to [-64, 64] or "
                         "[-127, 127], and its float biases and float layers from the FP32 UNet")
    ap.add_argument("--float-activations", action="store_true",
                    help="measure a copy with every activation QuantizeLinear/DequantizeLinear pair removed")
    ap.add_argument("--phantom", type=Path, metavar="DIR",
                    help="also the mask IoU against FP32 on this labelled dataset folder (every labelled image; "
                         "INT8 simulated), e.g. out/demo/data/heldout")
    ap.add_argument("--ranges", action="store_true",
                    help="also how far the INT8 file's activations (simulated) reach past the range each activation "
                         "QuantizeLinear holds, on the real frames (and with --phantom, on the phantom)")
    ap.add_argument("--input-noise", metavar="S1,S2,...",
                    help="also the FP32 UNet with Gaussian noise of S gray levels on its input, against itself "
                         "without (how far the reference moves under a small input change), e.g. 1,2")
    a = ap.parse_args(argv)
    command = shlex.join([".venv/bin/python", "scripts/real_us_int8.py", *argv])
    try:
        with tempfile.TemporaryDirectory(prefix="real_us_int8-") as tmp:   # the variant's copy, if any
            a.tmp = Path(tmp)
            return _main(a, command)
    except UserError as e:
        _say(f"real_us_int8: {e}")
        return 2


def _main(a, command: str) -> int:
    from calibration.quantize import spread_indices
    from calibration.run import int8_candidate
    from runtime.agreement import compare
    from runtime.bundle import Bundle, BundleError

    t_start = time.perf_counter()
    if a.frames < 1:
        raise UserError(f"--frames {a.frames} is not a number of frames; give 1 or more")
    if a.threads < 1:
        raise UserError(f"--threads {a.threads} is not a number of threads; give 1 or more")
    try:
        a.activation_scale = float(a.activation_scale)
    except ValueError:
        raise UserError(f"--activation-scale '{a.activation_scale}' is not a number; give a factor above 0, "
                        f"such as 2") from None
    if not (np.isfinite(a.activation_scale) and a.activation_scale > 0):
        raise UserError(f"--activation-scale {a.activation_scale:g} is not a positive factor; give a number above 0")
    if a.weights not in WEIGHTS:
        raise UserError(f"--weights '{a.weights}' is not one of {', '.join(WEIGHTS)}; give one of them")
    if a.float_activations and a.activation_scale != 1:
        raise UserError(f"--activation-scale {a.activation_scale:g} has nothing to scale with --float-activations "
                        f"(no activation is quantized); give one of them")
    sigmas = []
    for part in (a.input_noise or "").split(",") if a.input_noise else []:
        try:
            sigma = float(part)
        except ValueError:
            raise UserError(f"--input-noise '{a.input_noise}' is not a list of noise levels; give gray levels "
                            f"separated by commas, such as 1,2") from None
        if not (np.isfinite(sigma) and sigma >= 0):
            raise UserError(f"--input-noise '{a.input_noise}' holds {part}, not a noise level; give gray levels of "
                            f"0 or more, such as 1,2")
        sigmas.append(sigma)
    if a.phantom is not None and not a.phantom.is_dir():
        raise UserError(f"--phantom '{a.phantom}' is not a folder; give a labelled dataset folder such as "
                        f"out/demo/data/heldout")
    try:
        bundle = Bundle.load(a.bundle)
    except BundleError as e:
        raise UserError(str(e)) from None
    graph = bundle.graph(mask_threshold=a.mask_threshold)
    unet_files = bundle.manifest["networks"]["unet"]["files"]
    int8 = a.unet_int8 or int8_candidate(bundle, "unet")
    if int8 is None:
        raise UserError(f"bundle {a.bundle} has no INT8 UNet (none installed, none in "
                        f"{a.bundle}/calibration-rejected/); give one with --unet-int8 or run `sonoscore calibrate`")
    if not Path(int8).is_file():
        raise UserError(f"--unet-int8 '{int8}' is not a file; give the path of an INT8 UNet (.onnx)")

    fp32_path = bundle.network_file("unet", "fp32")
    what = "--unet-int8" if a.unet_int8 else "the INT8 UNet"
    unet_masks(graph, Path(int8), [], threads=a.threads, simulated=True, what=what)   # refused now, not after reading
    measured, variant = Path(int8), None
    if a.activation_scale != 1 or a.weights != "file" or a.float_activations:
        import onnx
        model, variant = build_variant(Path(int8), fp32_path, activation_scale=a.activation_scale,
                                       weights=a.weights, float_activations=a.float_activations)
        measured = a.tmp / f"{Path(int8).stem}.variant.onnx"
        onnx.save(model, str(measured))
        what = f"the variant ({variant['name']}) of {what}"
        unet_masks(graph, measured, [], threads=a.threads, simulated=True, what=what)
        _say(f"real_us_int8: measuring a copy of {int8}: {variant['name']}")
    variant_label = variant["name"] if variant else "as given"
    runs = [("fp32", fp32_path, False, "the bundle's FP32 UNet")]
    if "fp16" in unet_files:
        runs.append(("fp16", bundle.network_file("unet", "fp16"), False, "the bundle's FP16 UNet"))
    runs += [("int8_simulated", measured, True, what), ("int8_cpu", measured, False, what)]

    phantom_images = None
    if a.phantom is not None:
        from export.recipe import load_preprocessed
        try:
            phantom_images = list(load_preprocessed(a.phantom, graph, progress=False)[0])
        except ValueError as e:
            raise UserError(f"--phantom '{a.phantom}' cannot be read ({str(e).rstrip('.')})") from None

    try:
        from dicom_sweep import known_files, ultrasound_files
        known = known_files()
    except ImportError:
        raise UserError("reading DICOM needs pydicom 3; install it with pip install 'sonoscore[dicom,dev]' "
                        "(pydicom-data holds most of the ultrasound test files)") from None
    files = ultrasound_files(known)
    if not files:
        raise UserError("no ultrasound DICOM is installed (pydicom ships a few, pydicom-data most); install them "
                        "with pip install 'sonoscore[dicom,dev]'")
    origins = Counter(f.origin for f in files)
    if "pydicom-data" not in origins:
        _say("real_us_int8: pydicom-data is not installed: only pydicom's own ultrasound files are used")

    by_origin = ", ".join(f"{n} from {o}" for o, n in origins.items())
    _say(f"real_us_int8: reading {len(files)} ultrasound DICOM files ({by_origin})")
    real = read_real_frames(bundle, files)
    usable = len(real.images)
    total = sum(r["frames"] for r in real.files)
    skipped = dict(real.skipped)
    if not usable:
        raise UserError(f"none of the {total} frames of the {len(files)} ultrasound DICOM files could be used "
                        f"({', '.join(f'{n} {w}' for w, n in skipped.items())}); nothing to measure")
    picked = spread_indices(usable, min(a.frames, usable))
    images = [real.images[i] for i in picked]
    origins_picked = [real.origins[i] for i in picked]
    used_files = sorted({name for name, _ in origins_picked})
    _say(f"real_us_int8: {total} frames, {usable} usable"
         + (f" ({', '.join(f'{n} {w}' for w, n in skipped.items())})" if skipped else "")
         + f"; {len(images)} picked from {len(used_files)} files")

    def row_of(m: np.ndarray, ref: np.ndarray | None, ids: list[str], *, file, simulated: bool,
               seconds: float) -> dict:
        """One table row: the masks `m` (their file, how they were run) and, unless they are the reference, their
        figures against the reference masks `ref`: over frames, over distinct pictures (`ids`, picture_ids of the
        frames), and over the frames whose mask either gate accepts (the masks that reach the VGG)."""
        out = _outputs(graph, m, bundle.num_classes)
        row = {"file": str(file), "simulated_quantization": simulated, "seconds": round(seconds, 2),
               "frames": len(m), "pictures": len(set(ids)), "frames_with_mask": int(m.reshape(len(m), -1).any(1).sum()),
               "frames_accepted": int(out.accepted.sum()),
               "mask_fraction_mean": round(float(out.fractions.mean()), 6),
               "per_frame_fraction": [round(float(x), 6) for x in out.fractions]}
        if ref is not None:
            ref_out = _outputs(graph, ref, bundle.num_classes)
            c = compare(ref_out, out)
            per = per_frame_iou(ref, m)
            by_picture, pictures = mean_by_picture(per, ids)
            gated = [v for v, x, y in zip(per, ref_out.accepted, out.accepted) if v is not None and (x or y)]
            row.update({"pictures_counted": pictures, "mask_iou_mean_pictures": by_picture,
                        "frames_gated": len(gated),
                        "mask_iou_mean_gated": round(float(np.mean(gated)), 6) if gated else None})
            row.update({"frames_counted": c["frames_with_kidney"], "mask_iou_mean": c["mask_iou_mean"],
                        "mask_iou_min": c["mask_iou_min"], "mask_fraction_error_mean": c["mask_fraction_error_mean"],
                        "mask_fraction_error_max": c["mask_fraction_error_max"],
                        "gate_agreement": c["gate_agreement"], "per_frame_iou": per})
        return row

    def measure(runs, images, ids, where: str) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        masks: dict[str, np.ndarray] = {}
        rows: dict[str, dict] = {}
        for key, path, simulated, what in runs:
            masks[key], seconds = unet_masks(graph, path, images, threads=a.threads, simulated=simulated, what=what)
            rows[key] = row_of(masks[key], None if key == "fp32" else masks["fp32"], ids, simulated=simulated,
                               file=int8 if key.startswith("int8") else path, seconds=seconds)
            if key.startswith("int8"):
                rows[key]["variant"] = variant_label
            _say(f"real_us_int8: {where}{key}: {seconds:.1f} s")
        return masks, rows

    def measure_noise(masks: dict[str, np.ndarray], rows: dict[str, dict], images, ids, where: str) -> None:
        """The FP32 UNet on noisy copies of the frames, against its masks on the frames (rows keyed noise_key;
        pictures as the clean frames')."""
        for sigma in sigmas:
            noisy_masks, seconds = unet_masks(graph, fp32_path, noisy(images, sigma), threads=a.threads,
                                              simulated=False, what="the bundle's FP32 UNet")
            rows[noise_key(sigma)] = {**row_of(noisy_masks, masks["fp32"], ids, file=fp32_path, simulated=False,
                                               seconds=seconds), "input_noise": sigma}
            _say(f"real_us_int8: {where}FP32 with input noise {sigma:g}: {seconds:.1f} s")

    ids = picture_ids(images)
    masks, rows = measure(runs, images, ids, "")
    measure_noise(masks, rows, images, ids, "")
    ranges = None
    if a.ranges:
        ranges = {"real": activation_ranges(measured, graph, images, threads=a.threads)}
        _say("real_us_int8: activation ranges measured on the real frames")
    phantom = None
    if phantom_images is not None:
        phantom_ids = picture_ids(phantom_images)
        pmasks, prows = measure([r for r in runs if r[0] in ("fp32", "int8_simulated")], phantom_images,
                                phantom_ids, "phantom ")
        measure_noise(pmasks, prows, phantom_images, phantom_ids, "phantom ")
        phantom = {"dir": str(a.phantom), "frames": len(phantom_images), "pictures": len(set(phantom_ids)),
                   "precisions": prows}
        if a.ranges:
            ranges["phantom"] = activation_ranges(measured, graph, phantom_images, threads=a.threads)
            _say("real_us_int8: activation ranges measured on the phantom")

    sim = rows["int8_simulated"]["mask_iou_mean"]
    passed = sim is not None and sim >= a.min_iou
    fp32_fractions = [round(float(x), 6) for x in masks["fp32"].reshape(len(images), -1).mean(1)]
    result = {
        "command": command, "bundle": str(a.bundle), "unet_int8": str(int8),
        "variant": variant or {"name": "as given", "activation_scale": 1.0, "weights": "file",
                               "float_activations": False},
        "threads": a.threads, "input_noise": sigmas,
        "mask_threshold": graph.mask_threshold, "min_mask_fraction": graph.min_mask_fraction, "min_iou": a.min_iou,
        "files": {"ultrasound": len(files), "by_origin": dict(origins), "used": len(used_files), "rows": real.files},
        "frames": {"total": total, "usable": usable, "skipped": skipped, "picked": len(images),
                   "pictures": len(set(ids)),
                   "picked_frames": [{"file": name, "frame": i, "picture": k, "fp32_mask_fraction": fr}
                                     for (name, i), k, fr in zip(origins_picked, ids, fp32_fractions)]},
        "precisions": rows, "phantom": phantom, "activation_ranges": ranges, "passed": passed,
        "seconds": round(time.perf_counter() - t_start, 1)}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")

    print(f"command: {command}")
    print(f"bundle {a.bundle}; INT8 UNet {int8}; mask = prob > {graph.mask_threshold:g}, gate accepts mask fraction "
          f">= {graph.min_mask_fraction:g}")
    if variant:
        print(f"INT8 variant measured (a temporary copy of the file): {variant['name']}")
    print(f"frames: {len(files)} ultrasound DICOM files ({', '.join(f'{n} {o}' for o, n in origins.items())}), "
          f"{total} frames, {usable} usable"
          + (f" ({', '.join(f'{n} {w}' for w, n in skipped.items())})" if skipped else "")
          + f"; {len(images)} picked, spread over them, from {len(used_files)} files; {len(set(ids))} distinct "
            f"pictures among them (identical prepared pixels)")
    print()
    print(table(rows, variant_label))
    print()
    if phantom is not None:
        print(f"phantom: {a.phantom}, all {phantom['frames']} labelled images (INT8 simulated against FP32)")
        print()
        print(table(phantom["precisions"], variant_label))
        print()
    if ranges is not None:
        print("activation ranges of the INT8 file, simulated (" + str(measured) + "):")
        for where, r in ranges.items():
            print("- " + ranges_line(where, r))
        print()
    if sim is None:
        print(f"INT8 (simulated) mask IoU not measured: no picked frame has a mask pixel in FP32 or INT8; "
              f"FAIL (needs >= {a.min_iou:g})")
    else:
        print(f"INT8 (simulated) mean mask IoU {sim:.4f} over {rows['int8_simulated']['frames_counted']} frames: "
              f"{'PASS' if passed else 'FAIL'} (needs >= {a.min_iou:g}); {result['seconds']:.0f} s in all")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
