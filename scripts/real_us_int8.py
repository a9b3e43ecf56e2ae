#!/usr/bin/env python3
"""INT8 UNet masks against FP32 on real ultrasound the project never trained on: the pydicom test DICOMs.

    .venv/bin/python scripts/real_us_int8.py --bundle out/demo/bundle [--unet-int8 FILE] [--frames 40]
        [--threads 2] [--min-iou 0.95] [--mask-threshold T] [--json out.json]

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
   gate accepts (mask fraction >= the manifest's minimum).

The INT8 UNet: `--unet-int8`, else the bundle's installed one, else `<bundle>/calibration-rejected/unet.int8.onnx`
(calibration.run.int8_candidate). Exit status: 0 when the simulated INT8 mean IoU is at least `--min-iou`, 1 when it
is lower or cannot be measured (no frame has a mask pixel at either precision), 2 on bad input (one sentence).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
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


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: dict[str, dict]) -> str:
    head = ("precision", "mean IoU", "min IoU", "frames counted", "mean abs Δ fraction", "gate agreement",
            "frames with mask", "gate accepts", "seconds")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for key, label in PRECISIONS:
        r = rows.get(key)
        if r is None:
            continue
        ref = key == "fp32"
        cells = (label, "ref" if ref else _fmt(r["mask_iou_mean"]), "ref" if ref else _fmt(r["mask_iou_min"]),
                 "ref" if ref else str(r["frames_counted"]),
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
    a = ap.parse_args(argv)
    command = shlex.join([".venv/bin/python", "scripts/real_us_int8.py", *argv])
    try:
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

    runs = [("fp32", bundle.network_file("unet", "fp32"), False, "the bundle's FP32 UNet")]
    if "fp16" in unet_files:
        runs.append(("fp16", bundle.network_file("unet", "fp16"), False, "the bundle's FP16 UNet"))
    what = "--unet-int8" if a.unet_int8 else "the INT8 UNet"
    runs += [("int8_simulated", Path(int8), True, what), ("int8_cpu", Path(int8), False, what)]
    unet_masks(graph, Path(int8), [], threads=a.threads, simulated=True, what=what)   # refused now, not after reading

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

    masks: dict[str, np.ndarray] = {}
    rows: dict[str, dict] = {}
    for key, path, simulated, what in runs:
        masks[key], seconds = unet_masks(graph, path, images, threads=a.threads, simulated=simulated, what=what)
        out = _outputs(graph, masks[key], bundle.num_classes)
        row = {"file": str(path), "simulated_quantization": simulated, "seconds": round(seconds, 2),
               "frames": len(images), "frames_with_mask": int(masks[key].reshape(len(images), -1).any(1).sum()),
               "frames_accepted": int(out.accepted.sum()), "mask_fraction_mean": round(float(out.fractions.mean()), 6),
               "per_frame_fraction": [round(float(x), 6) for x in out.fractions]}
        if key != "fp32":
            c = compare(_outputs(graph, masks["fp32"], bundle.num_classes), out)
            row.update({"frames_counted": c["frames_with_kidney"], "mask_iou_mean": c["mask_iou_mean"],
                        "mask_iou_min": c["mask_iou_min"], "mask_fraction_error_mean": c["mask_fraction_error_mean"],
                        "mask_fraction_error_max": c["mask_fraction_error_max"],
                        "gate_agreement": c["gate_agreement"],
                        "per_frame_iou": per_frame_iou(masks["fp32"], masks[key])})
        rows[key] = row
        _say(f"real_us_int8: {key}: {seconds:.1f} s")

    sim = rows["int8_simulated"]["mask_iou_mean"]
    passed = sim is not None and sim >= a.min_iou
    fp32_fractions = [round(float(x), 6) for x in masks["fp32"].reshape(len(images), -1).mean(1)]
    result = {
        "command": command, "bundle": str(a.bundle), "unet_int8": str(int8), "threads": a.threads,
        "mask_threshold": graph.mask_threshold, "min_mask_fraction": graph.min_mask_fraction, "min_iou": a.min_iou,
        "files": {"ultrasound": len(files), "by_origin": dict(origins), "used": len(used_files), "rows": real.files},
        "frames": {"total": total, "usable": usable, "skipped": skipped, "picked": len(images),
                   "picked_frames": [{"file": name, "frame": i, "fp32_mask_fraction": fr}
                                     for (name, i), fr in zip(origins_picked, fp32_fractions)]},
        "precisions": rows, "passed": passed, "seconds": round(time.perf_counter() - t_start, 1)}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")

    print(f"command: {command}")
    print(f"bundle {a.bundle}; INT8 UNet {int8}; mask = prob > {graph.mask_threshold:g}, gate accepts mask fraction "
          f">= {graph.min_mask_fraction:g}")
    print(f"frames: {len(files)} ultrasound DICOM files ({', '.join(f'{n} {o}' for o, n in origins.items())}), "
          f"{total} frames, {usable} usable"
          + (f" ({', '.join(f'{n} {w}' for w, n in skipped.items())})" if skipped else "")
          + f"; {len(images)} picked, spread over them, from {len(used_files)} files")
    print()
    print(table(rows))
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
