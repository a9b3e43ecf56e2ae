#!/usr/bin/env python3
"""Kidney length in mm against the phantom's truth, on the frames the gate accepts (issue 15's acceptance point).

    .venv/bin/python scripts/measure_check.py [--bundle out/demo/bundle] [--patients 6] [--frames 200]
                                              [--first-seed 7001] [--json out.json]

Each simulated patient (`sim://kidney?seed=S&fps=0&frames=F`, the source `sonoscore run` reads, seeds
first-seed ... first-seed + patients - 1, grades drawn from the seed) goes frame by frame through the bundle's CPU
pipeline (runtime.pipeline.Pipeline, onnxruntime, FP32), which measures every accepted frame (runtime/measure.py)
with the pixel spacing the simulated probe declares. On each accepted frame the measured length is compared with
the phantom's true length of the kidney that frame shows (`PhantomFrame.kidney_length_mm`: the maximum Feret
diameter of the kidney's section by the image plane, cut to the fan, computed in mm from the anatomy). The
sweep of F frames covers a whole elevational pass when F >= 200 (the sweep's period is 150-200 frames), so
accepted frames include off-centre sections, where the kidney looks shorter and is harder to segment.

The pipeline measures a frame only where its outline can be measured (runtime/measure.py: the network sure of
the outline, the outline visible in the image); the others keep their grade and get a `size_note`, counted here.
Printed: accepted frames, those measured, those the gate accepted with no kidney in the truth, the notes of those
not measured, and the relative error of the length |measured / true - 1|: median, 90th percentile, worst, and the
share within 5 %; the same for the truth's own mask taken through the same path (cut and resized to 224x224 like
the network's mask, then measured), which isolates the measurement from the segmentation; then per patient, the
frames measured of those accepted and their worst error. Exit status 0 when every measured frame is within 5 % of
the truth (issue 15's acceptance), else 1. A benchmark, not a test: its figures depend on the bundle's weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime import preprocess as pp  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from runtime.measure import kidney_size  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.sources.sim import SimSource  # noqa: E402

TOLERANCE = 0.05


def errors_summary(errors: list[float]) -> dict:
    e = np.abs(np.asarray(errors, np.float64))
    if e.size == 0:
        return {"n": 0, "median": None, "p90": None, "worst": None, "within_5_percent": None}
    return {"n": int(e.size), "median": round(float(np.median(e)), 5), "p90": round(float(np.percentile(e, 90)), 5),
            "worst": round(float(e.max()), 5), "within_5_percent": round(float((e <= TOLERANCE).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "out" / "demo" / "bundle"))
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--frames", type=int, default=200, help="frames per patient, from frame 0 of the sweep")
    ap.add_argument("--first-seed", type=int, default=7001)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)

    bundle = Bundle.load(args.bundle)
    net_err, truth_err, rows = [], [], []
    accepted = measured = false_accepts = 0
    per_patient: dict[int, list[float]] = {}
    accepted_of: dict[int, int] = {}
    notes: dict[str, int] = {}
    t0 = time.perf_counter()
    with Pipeline(bundle, threads=args.threads) as pipe:
        for seed in range(args.first_seed, args.first_seed + args.patients):
            src = SimSource(seed=seed, fps=0, frames=args.frames, realtime=False)
            for frame in src:
                rec = pipe.process(frame)
                if not rec.accepted:
                    continue
                accepted += 1
                accepted_of[seed] = accepted_of.get(seed, 0) + 1
                truth = frame.meta["truth_kidney_length_mm"]
                if truth is None:
                    false_accepts += 1
                    continue
                if rec.kidney_length_mm is None:
                    notes[rec.size_note] = notes.get(rec.size_note, 0) + 1
                    continue
                measured += 1
                net = rec.kidney_length_mm / truth - 1.0
                # the truth's mask through the same path: cut and resized like the image, measured the same way
                region = pp.auto_region(frame.pixels)
                ref, _, _ = kidney_size(pp.crop_mask(frame.meta["truth_mask"], region), region,
                                        frame.pixels.shape, frame.meta)
                net_err.append(net)
                truth_err.append(ref / truth - 1.0)
                per_patient.setdefault(seed, []).append(abs(net))
                rows.append({"seed": seed, "frame": frame.index, "true_mm": round(truth, 3),
                             "measured_mm": rec.kidney_length_mm, "truth_mask_mm": ref,
                             "relative_error": round(net, 5)})
    out = {"bundle": str(args.bundle), "patients": args.patients, "frames_per_patient": args.frames,
           "seeds": [args.first_seed, args.first_seed + args.patients - 1],
           "accepted": accepted, "measured": measured, "accepted_without_kidney": false_accepts,
           "not_measured": notes, "network_mask": errors_summary(net_err), "truth_mask": errors_summary(truth_err),
           "seconds": round(time.perf_counter() - t0, 1)}
    worst = max(rows, key=lambda r: abs(r["relative_error"])) if rows else None
    out["worst_frame"] = worst
    n, t = out["network_mask"], out["truth_mask"]
    seeds = f"{args.first_seed}..{args.first_seed + args.patients - 1}"
    print(f"{args.patients} patients x {args.frames} frames (seeds {seeds}), bundle {args.bundle}")
    print(f"accepted {accepted}, measured {measured}, accepted with no kidney in the truth {false_accepts}, "
          f"not measured {sum(notes.values())} {notes if notes else ''}")
    for name, e in (("network mask", n), ("truth mask  ", t)):
        if e["n"]:
            print(f"{name}: |length error| median {e['median']:.2%}, p90 {e['p90']:.2%}, worst {e['worst']:.2%}, "
                  f"within 5% {e['within_5_percent']:.1%} of {e['n']} frames")
    if worst:
        print(f"worst frame: seed {worst['seed']} frame {worst['frame']}: true {worst['true_mm']:.1f} mm, "
              f"measured {worst['measured_mm']:.1f} mm (truth mask {worst['truth_mask_mm']:.1f} mm)")
    out["per_patient"] = {str(k): {"accepted": accepted_of.get(k, 0), "measured": len(per_patient.get(k, [])),
                                   "worst": round(max(per_patient[k]), 5) if per_patient.get(k) else None}
                          for k in sorted(accepted_of)}
    print("per patient, measured / accepted (worst error): " + ", ".join(
        f"{k} {v['measured']}/{v['accepted']}" + (f" ({v['worst']:.1%})" if v["worst"] is not None else "")
        for k, v in out["per_patient"].items()))
    print(f"{out['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "frames": rows}, indent=1) + "\n")
    return 0 if n["worst"] is not None and n["worst"] <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
