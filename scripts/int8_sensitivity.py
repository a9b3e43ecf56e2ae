#!/usr/bin/env python3
"""Which UNet layers cost the INT8 set its grade agreement: one layer at a time back in float, ranked.

    .venv/bin/python scripts/int8_sensitivity.py --bundle B --frames SRC [--check SRC ...] [--count 300]
        [--holdout 300] [--method minmax] [--k 0,1,2,4,8] [--json out.json]

1. Frames are read and split as `sonoscore calibrate` splits them (calibration.run): `--count` spread over the
   source calibrate the UNet, `--holdout` of the rest are held out; every `--check` source is held out whole.
2. The UNet is quantized once (calibration.quantize.quantize_int8, the same file `calibrate` makes).
3. Each quantized layer in turn is put back in float (calibration.quantize.float_layers: the other layers keep
   their scales) and scored by the mask pixels that still differ from FP32 on the calibration frames; the layers
   are ranked by it, most helpful first.
4. For each k in `--k`, the k best-ranked layers in float: mask IoU, gate and grade agreement against FP32 on the
   calibration frames and on every held-out set, end to end (calibration.report.run_precision), with the VGG of
   the bundle's INT8 set when it has one (else FP32).

The ranking uses calibration frames only; the held-out sets only measure. Nothing in the bundle changes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--frames", required=True, action="append", help="calibration source (as for calibrate)")
    ap.add_argument("--check", action="append", default=[], help="another held-out source (repeatable)")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--holdout", type=int, default=300)
    ap.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    ap.add_argument("--k", default="0,1,2,4,8", help="how many of the best-ranked layers to put in float")
    ap.add_argument("--json", help="write the ranking and the table here")
    a = ap.parse_args(argv)

    import numpy as np
    import onnx
    import onnxruntime as ort

    from calibration.quantize import float_layers, quantize_int8, quantized_layers, spread_indices
    from calibration.report import compare, run_precision
    from calibration.run import read_frames
    from runtime.booster import Booster
    from runtime.bundle import Bundle, BundleError
    from runtime.pipeline import Pipeline

    try:
        bundle = Bundle.load(a.bundle)
    except BundleError as e:
        _say(f"int8_sensitivity: {e}")
        return 2
    ks = sorted({int(k) for k in a.k.split(",") if k.strip()})
    pipe = Pipeline(bundle)
    data = read_frames(a.frames, pipe, max_frames=3000)
    n = len(data.images)
    if n < 4:
        _say(f"int8_sensitivity: {n} readable frames in {', '.join(a.frames)}; give a source with more")
        return 2
    calib_idx = spread_indices(n, min(a.count, n // 2))
    rest = sorted(set(range(n)) - set(calib_idx))
    hold_idx = [rest[i] for i in spread_indices(len(rest), min(a.holdout, len(rest)))]
    sets = {"calibration": [data.images[i] for i in calib_idx], "held-out": [data.images[i] for i in hold_idx]}
    for spec in a.check:
        extra = read_frames([spec], pipe, max_frames=3000)
        sets[f"check {extra.sources[0]['source_id']}"] = extra.images
    graph = bundle.graph()
    inputs = [graph.unet_feeds(img)[graph.unet_input] for img in sets["calibration"]]
    fp32_file = bundle.network_file("unet", "fp32")
    fp32 = onnx.load(str(fp32_file))
    vgg = bundle.network_file("vgg", "int8") if "vgg" in bundle.int8_networks else bundle.network_file("vgg", "fp32")

    with tempfile.TemporaryDirectory(prefix="sonoscore-sensitivity-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        quantize_int8(fp32_file, tmp / "unet.int8.onnx", graph.unet_input, inputs, method=a.method)
        qdq = onnx.load(str(tmp / "unet.int8.onnx"))
        layers = quantized_layers(qdq)
        _say(f"int8_sensitivity: UNet quantized ({a.method}, {len(inputs)} frames) in {time.perf_counter() - t:.0f} "
             f"s; {len(layers)} quantized layers, each tried in float on the calibration frames")
        so = ort.SessionOptions()
        so.log_severity_level = 3

        def masks(model) -> np.ndarray:
            s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return np.stack([graph.gate(s.run(None, {graph.unet_input: x})[0][0, 0]).mask for x in inputs])

        ref = masks(fp32)
        base = int((masks(qdq) != ref).sum())
        differ = {}
        for i, name in enumerate(layers, 1):
            differ[name] = int((masks(float_layers(qdq, fp32, [name])) != ref).sum())
            _say(f"  {i}/{len(layers)} {name}: {differ[name]} mask pixels differ from FP32 (all INT8: {base})")
        rank = sorted(layers, key=lambda name: differ[name])

        booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes)
        fp32_files = {"unet": fp32_file, "vgg": bundle.network_file("vgg", "fp32")}
        refs = {s: run_precision(bundle, fp32_files, booster, imgs, quiet=True) for s, imgs in sets.items()}
        rows = []
        for k in ks:
            path = tmp / f"unet.k{k}.onnx"
            onnx.save(float_layers(qdq, fp32, rank[:k]), str(path))
            row = {"k": k, "float_layers": rank[:k], "sets": {}}
            for s, imgs in sets.items():
                c = compare(refs[s], run_precision(bundle, {"unet": path, "vgg": vgg}, booster, imgs, quiet=True))
                row["sets"][s] = {key: c[key] for key in ("frames", "mask_iou_mean", "gate_agreement",
                                                          "grade_agreement")}
            rows.append(row)
            _say(f"k={k}: " + " | ".join(
                f"{s}: IoU {m['mask_iou_mean']:.4f} gate {m['gate_agreement']:.3f} grade {m['grade_agreement']:.3f}"
                for s, m in row["sets"].items()))
    out = {"bundle": str(bundle.root), "method": a.method, "vgg": Path(vgg).name, "all_int8_pixels_differ": base,
           "mask_pixels": int(ref.sum()), "pixels_differ_with_layer_in_float": differ, "rank": rank, "rows": rows,
           "frames": {s: len(v) for s, v in sets.items()}}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"rank": rank[:max(ks, default=0)], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
