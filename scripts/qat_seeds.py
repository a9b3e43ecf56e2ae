#!/usr/bin/env python3
"""Issue 14's acceptance, "three demo models, three seeds": the demo's data and training recipe with quantization-
aware training (`sonoscore train --qat`), one model per seed, each INT8 set checked as `calibrate --networks auto`
checks it (thresholds unchanged) on the validation patients and on the demo's held-out patients. Run from the repo
root:

    .venv/bin/python scripts/qat_seeds.py [--seeds 0,1,2] [--out out/qat-seeds] [--data out/demo/data] [--vgg-width W]
        [--qat-scales calibration|observed]

`--data`: a folder with the demo's train/ and heldout/ datasets (export/demo.py makes them in out/demo/data; made
here under --out when not given or missing). For each seed it reports, one JSON line each: which networks were
installed in INT8, the check's figures for INT8 (both networks) per frame set, held-out IoU and grade accuracy
in FP32 and in the installed INT8 set (`sonoscore eval` on the held-out patients; when the check installed no set,
the QAT set is installed by force in a copy of the bundle, thresholds 0, and evaluated there as "int8 (forced)"),
and the wall time of training (the QAT phase separately) and of the check. It exits 1 when any seed misses the acceptance: both networks in
INT8, and |held-out IoU / accuracy INT8 - FP32| <= 0.01.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _forced_int8(bundle: Path, copy: Path, cal: dict, held: Path) -> dict:
    """Held-out eval of the QAT INT8 set the check rejected: installed in a copy of the bundle with every threshold
    0 (calibrate's own installation), then `eval --precision int8` there."""
    from calibration.report import Thresholds
    from calibration.run import calibrate_bundle
    from runtime.bundle import Bundle
    from runtime.evaluate import evaluate_bundle

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("calibration-rejected", "calibration_report.json"))
    settings = Bundle.load(bundle).manifest["provenance"]["qat"]["settings"]
    qat = {"files": {n: bundle / "calibration-rejected" / f"{n}.int8.onnx" for n in ("unet", "vgg")},
           "info": {n: {"weight_bits": 8 if settings[n]["placement"]["full_range_weights"] else 7,
                        "quantized_ops": cal["networks"][n]["int8_weights"],
                        "float_ops": cal["networks"][n]["float_weights"], "opset": cal["networks"][n]["opset"]}
                    for n in ("unet", "vgg")},
           "settings": settings}
    calibrate_bundle(copy, [], check=[str(held / "images")], networks=("unet", "vgg"), qat=qat, quiet=True,
                     thresholds=Thresholds(0, 0, 0, 0), report=copy / "calibration_report.json")
    return evaluate_bundle(copy, held, precision="int8", quiet=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="out/qat-seeds")
    ap.add_argument("--data", default=None, help="folder holding the demo's train/ and heldout/ datasets")
    ap.add_argument("--json", default=None, help="all rows as one JSON file (default <out>/summary.json)")
    ap.add_argument("--vgg-width", type=float, default=None,
                    help="the VGG's width (`train --vgg-width`; default: the demo's)")
    ap.add_argument("--qat-scales", choices=["calibration", "observed"], default="calibration",
                    help="QAT's activation scales: the calibration's, fixed (default, the recipe's), or observed "
                         "during fine-tuning (TrainConfig.qat_activation_scales)")
    args = ap.parse_args()
    if args.vgg_width is not None and not args.vgg_width > 0:
        ap.error(f"--vgg-width {args.vgg_width:g} is not a width; give a number above 0 (the paper's VGG is 1)")
    from export.demo import HELDOUT_FRAMES, HELDOUT_PATIENTS, TRAIN_FRAMES, TRAIN_PATIENTS
    from export.recipe import TrainConfig, train_bundle
    from runtime.bundle import Bundle
    from runtime.dataset import write_dataset
    from runtime.evaluate import evaluate_bundle

    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    train, held = data / "train", data / "heldout"
    if not (train / "labels.csv").is_file():   # the demo's datasets: train seed 0, held-out seed 1000
        write_dataset(train, TRAIN_PATIENTS, seed=0, frames_per_patient=TRAIN_FRAMES)
    if not (held / "labels.csv").is_file():
        write_dataset(held, HELDOUT_PATIENTS, seed=1000, frames_per_patient=HELDOUT_FRAMES)
    rows, ok = [], True
    t_all = time.time()
    for seed in (int(s) for s in args.seeds.split(",")):
        b = out / f"bundle-seed{seed}"
        report = out / f"calibration-seed{seed}.json"
        load0 = os.getloadavg()[0]
        t0 = time.time()
        width = {} if args.vgg_width is None else {"vgg_width": args.vgg_width}
        cfg = TrainConfig(demo=True, seed=seed, qat=True, qat_activation_scales=args.qat_scales, **width)
        train_bundle(train, b, cfg, check=[str(held / "images")], report=report)
        t_total = time.time() - t0
        bundle = Bundle.load(b)
        prov = bundle.manifest["provenance"]
        cal = json.loads(report.read_text())
        int8 = list(bundle.int8_networks)
        ev = {p: evaluate_bundle(b, held, precision=p, quiet=True) for p in ["fp32"] + (["int8"] if int8 else [])}
        if not int8 and (b / "calibration-rejected").is_dir():
            ev["int8 (forced)"] = _forced_int8(b, out / f"bundle-seed{seed}-int8-forced", cal, held)
        qat_s = sum(sum(v.values()) for v in prov["qat"]["seconds"].values())
        row = {"seed": seed, "vgg_width": cfg.vgg_width, "qat_scales": cfg.qat_activation_scales,
               "int8_networks": int8,
               "train_s": round(prov["seconds"]), "of_which_qat_s": round(qat_s),
               "check_s": round(cal["seconds"]), "total_s": round(t_total), "load_avg_1min_at_start": round(load0, 2),
               "check_failures": cal["failures"], "both_int8_missed": cal.get("int8_both_missed"),
               "check": {s: {p: {k: m.get(k) for k in ("frames", "mask_iou_mean", "gate_agreement",
                                                        "feature_cosine_mean", "grade_agreement", "passed")}
                             for p, m in ps.items()} for s, ps in cal["accuracy"].items()},
               "heldout": {p: {"iou_mean": e["iou_mean"], "accuracy": e.get("accuracy"),
                               "graded_frames": e.get("graded_frames")} for p, e in ev.items()}}
        good = int8 == ["unet", "vgg"] and all(
            abs((ev["int8"][k] or 0) - (ev["fp32"][k] or 0)) <= 0.01 for k in ("iou_mean", "accuracy"))
        row["passed"] = good
        ok &= good
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = Path(args.json) if args.json else out / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"rows": rows, "seconds": round(time.time() - t_all), "passed": ok}, indent=2)
                       + "\n")
    print(f"qat_seeds: {sum(r['passed'] for r in rows)}/{len(rows)} seeds pass in {time.time() - t_all:.0f} s; "
          f"{summary}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
