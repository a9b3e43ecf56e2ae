"""`sonoscore calibrate --diagnose`: which layers of a network cost its INT8 file its accuracy, one layer at a time
back in float, ranked. Nothing in the bundle changes.

1. Frames are read and split as `calibrate` splits them (calibration.run.read_frames, spread_indices): `--count`
   spread over the sources are the calibration frames, `--holdout` of the rest are held out; every `--check`
   source is held out whole.
2. The INT8 file of each network asked (`--networks`, default both): the one `calibrate` made for the bundle
   (installed, or left in calibration-rejected/ by a failed check); without one, the network is quantized here as
   `calibrate` quantizes it (`--method`, per-channel 7-bit weights, sub-pixel upsamplers) and not installed.
3. Each quantized layer in turn is put back in float (calibration.quantize.float_layers: the other layers keep
   their scales) and the network is scored against FP32 on the calibration frames, through the bundle's graph
   (Graph.run) with simulated quantization (the same figures on every CPU, what `calibrate` decides on):
     UNet  the mask pixels that differ from the FP32 masks (ties: the mean |probability - FP32's|);
     VGG   1 - the mean feature cosine with FP32, on the FP32 masks of the frames FP32's gate accepts.
   The layers are ranked by it, the most helpful first (the lowest error with that layer in float).
4. For k = 0, 1, 2, 4, 8 (at most the layer count), the k best-ranked layers in float: the end-to-end figures
   `calibrate` checks (mask IoU, gate, feature cosine and grade agreement against FP32; calibration.report) on the
   calibration frames and on every held-out set, with the other network as the bundle's INT8 set has it (INT8 when
   installed, else FP32).

The ranking uses the calibration frames only; the held-out sets only measure.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from calibration.quantize import float_layers, quantize_int8, quantized_layers, spread_indices
from calibration.report import compare, run_precision
from calibration.run import int8_candidate, read_frames
from runtime import logs
from runtime.bundle import Bundle
from runtime.errors import UserError

log = logs.get("calibrate")

KS = (0, 1, 2, 4, 8)
METRIC = {"unet": "mask pixels that differ from FP32", "vgg": "1 - feature cosine with FP32"}



def _unet_outputs(graph, runner, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks [N, H, W] bool, probabilities [N, H, W] and the gate's verdicts [N] of a UNet runner on the images
    (the graph up to the gate)."""
    rs = [graph.run(img, runner, until="gate") for img in images]
    return (np.stack([r.gate.mask.astype(bool) for r in rs]), np.stack([r.prob for r in rs]),
            np.array([r.gate.accepted for r in rs], bool))


def _unet_inputs(graph, images) -> list[np.ndarray]:
    """The UNet's calibration inputs, as `calibrate` feeds them."""
    return [graph.unet_feeds(img)[graph.unet_input] for img in images]


def _features(graph, runner, images, masks) -> np.ndarray:
    """The VGG's features [N, F] of the images under the given masks (the graph from the gate to the VGG)."""
    return np.concatenate([graph.run(img, vgg=runner, mask=m.astype(np.uint8), until="vgg").features
                           for img, m in zip(images, masks)])


def _cosine_error(ref: np.ndarray, other: np.ndarray) -> float:
    a, b = ref.astype(np.float64), other.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(1.0 - cos.mean())


def diagnose(bundle_path, frames: list[str], *, check: list[str] | None = None, networks=("unet", "vgg"),
             count: int = 300, holdout: int = 300, max_frames: int = 3000, method: str = "minmax",
             ks=KS, report=None, quiet: bool = False) -> dict:
    """Rank each network's quantized layers by how much putting that one back in float brings it to FP32 on the
    calibration frames, then measure the k best in float end to end on every set (see the module's docstring)."""
    import onnx

    from runtime.backends import make_runner
    from runtime.booster import Booster
    from runtime.pipeline import Pipeline

    bundle = Bundle.load(bundle_path)
    if networks == "auto":
        networks = ("unet", "vgg")
    pipe = Pipeline(bundle)                   # not entered: only its preprocessing is used
    data = read_frames(frames, pipe, max_frames=max_frames, quiet=quiet)
    n = len(data.images)
    if n < 4:
        raise UserError(f"calibrate --diagnose needs at least 4 readable frames, the source(s) gave {n}; give a "
                        f"folder, video, DICOM cine or sim:// source with more frames")
    calib_idx = spread_indices(n, min(count, n // 2))
    rest = sorted(set(range(n)) - set(calib_idx))
    hold_idx = [rest[i] for i in spread_indices(len(rest), min(holdout, len(rest)))]
    sets = {"calibration": [data.images[i] for i in calib_idx], "held-out": [data.images[i] for i in hold_idx]}
    for spec in check or []:
        extra = read_frames([spec], pipe, max_frames=max_frames, quiet=quiet)
        if extra.images:
            sets[f"check {extra.sources[0]['source_id']}"] = extra.images
    graph = bundle.graph()
    calib = sets["calibration"]
    fp32 = {net: bundle.network_file(net, "fp32") for net in ("unet", "vgg")}
    booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes)
    out: dict = {"bundle": str(bundle.root), "frames": {s: len(v) for s, v in sets.items()}, "networks": {}}

    with tempfile.TemporaryDirectory(prefix="sonoscore-diagnose-") as tmp:
        tmp = Path(tmp)
        with make_runner("ort", fp32["unet"]) as unet32:
            ref_masks, ref_prob, accepted = _unet_outputs(graph, unet32, calib)
        refs = {s: run_precision(bundle, fp32, booster, imgs, quiet=True) for s, imgs in sets.items()}
        for net in networks:
            given = int8_candidate(bundle, net)
            if given is not None:
                qdq_path, origin = given, str(given.relative_to(bundle.root))
            else:
                qdq_path, origin = tmp / f"{net}.int8.onnx", f"quantized here ({method})"
                if net == "unet":
                    inputs = _unet_inputs(graph, calib)
                else:
                    inputs = [graph.run(img, mask=m.astype(np.uint8), until="gate").vgg_feeds[graph.vgg_input]
                              for img, m, a in zip(calib, ref_masks, accepted) if a]
                    if not inputs:
                        raise UserError(f"none of the {len(calib)} calibration frames passed the quality gate, so "
                                        f"the VGG cannot be quantized; give frames that show the kidney")
                quantize_int8(fp32[net], qdq_path, graph.unet_input if net == "unet" else graph.vgg_input, inputs,
                              method=method)
            qdq, fp32_model = onnx.load(str(qdq_path)), onnx.load(str(fp32[net]))
            layers = quantized_layers(qdq)
            if not quiet:
                log.info(f"calibrate --diagnose: {net} INT8 file {origin}, {len(layers)} quantized layers, each put back "
                     f"in float in turn and scored on {len(calib)} calibration frames ({METRIC[net]})")
            if net == "vgg" and not accepted.any():
                raise UserError(f"none of the {len(calib)} calibration frames passed the FP32 gate, so the VGG's "
                                f"features cannot be compared; give frames that show the kidney")

            def score(model) -> tuple[float, float]:
                path = tmp / f"{net}.try.onnx"
                onnx.save(model, str(path))
                with make_runner("ort", path, simulated_quantization=True) as r:
                    if net == "unet":
                        masks, prob, _ = _unet_outputs(graph, r, calib)
                        return float((masks != ref_masks).sum()), float(np.abs(prob - ref_prob).mean())
                    feats = _features(graph, r, [c for c, a in zip(calib, accepted) if a], ref_masks[accepted])
                    return _cosine_error(ref_feats, feats), 0.0

            if net == "vgg":
                with make_runner("ort", fp32["vgg"]) as vgg32:
                    ref_feats = _features(graph, vgg32, [c for c, a in zip(calib, accepted) if a],
                                          ref_masks[accepted])
            t = time.perf_counter()
            base = score(qdq)
            errors = {}
            for i, name in enumerate(layers, 1):
                errors[name] = score(float_layers(qdq, fp32_model, [name]))
                if not quiet:
                    log.info(f"  {i}/{len(layers)} {name}: {errors[name][0]:.6g} (every layer INT8: {base[0]:.6g})")
            rank = sorted(layers, key=lambda name: errors[name])
            other = "vgg" if net == "unet" else "unet"
            other_file = bundle.network_file(other, "int8") if other in bundle.int8_networks else fp32[other]
            rows = []
            for k in sorted({k for k in ks if k <= len(layers)}):
                path = tmp / f"{net}.k{k}.onnx"
                onnx.save(float_layers(qdq, fp32_model, rank[:k]), str(path))
                files = {net: path, other: other_file}
                row = {"k": k, "float_layers": rank[:k], "sets": {}}
                for s, imgs in sets.items():
                    c = compare(refs[s], run_precision(bundle, files, booster, imgs, quiet=True, simulated=True))
                    row["sets"][s] = {key: c[key] for key in ("frames", "mask_iou_mean", "gate_agreement",
                                                              "feature_cosine_mean", "grade_agreement")}
                rows.append(row)
            out["networks"][net] = {
                "int8_file": origin, "other_network": f"{other} {Path(other_file).name}", "metric": METRIC[net],
                "all_int8": base[0], "with_layer_in_float": {name: errors[name][0] for name in layers},
                "tie_break": {name: errors[name][1] for name in layers} if net == "unet" else None,
                "rank": rank, "rows": rows, "seconds": round(time.perf_counter() - t, 1)}
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(out, indent=1) + "\n")
    return out


def _v(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_diagnosis(out: dict, top: int = 10) -> str:
    """The terminal summary: each network's best layers, then the k-in-float table."""
    lines = []
    for net, d in out["networks"].items():
        lines.append(f"{net} ({d['int8_file']}; {d['metric']}, every layer INT8: {d['all_int8']:.6g})")
        for i, name in enumerate(d["rank"][:top], 1):
            lines.append(f"  {i:>2}. {name}: {d['with_layer_in_float'][name]:.6g} with it in float")
        if len(d["rank"]) > top:
            lines.append(f"  ... {len(d['rank']) - top} more in the report")
        lines.append(f"  best k layers in float, with {d['other_network']}: mask IoU / gate / cosine / grade")
        for row in d["rows"]:
            lines.append(f"  k={row['k']}: " + " | ".join(
                f"{s} {_v(m['mask_iou_mean'], 4)} / {_v(m['gate_agreement'])} / {_v(m['feature_cosine_mean'], 4)} / "
                f"{_v(m['grade_agreement'])}" for s, m in row["sets"].items()))
    return "\n".join(lines)


def run_diagnose(args) -> int:
    """`sonoscore calibrate --diagnose`: the options calibrate shares with it, the ranking on the terminal, the
    report as JSON with --report (nothing is written otherwise)."""
    not_here = [o for o, v in (("--qat", args.qat), ("--timing-only", args.timing_only),
                               ("--full-range-weights", args.full_range_weights),
                               ("--conv-transpose", args.conv_transpose),
                               ("--unet-gains", args.unet_gains not in ("1", None))) if v]
    if not_here:
        raise UserError(f"{not_here[0]} does not apply to --diagnose, which diagnoses the bundle's INT8 file (or "
                        f"one quantized here as calibrate does by default); leave it out")
    out = diagnose(args.bundle, args.frames, check=args.check, networks=args.networks, count=args.count,
                   holdout=args.holdout, max_frames=args.max_frames, method=args.method, report=args.report)
    print(format_diagnosis(out), flush=True)
    if args.report:
        print(f"diagnosis report: {args.report}")
    return 0
