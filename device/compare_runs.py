#!/usr/bin/env python3
"""Compare two `sonoscore run --results` files of the same frames (e.g. --device cpu and --device cuda), and
optionally their `--save-masks` folders: how often the gate and the grade agree, how far the mask fractions and
probabilities are apart, the masks' IoU, and each run's latency. Prints one JSON object (and writes it to --json).

    python3 device/compare_runs.py cpu.jsonl cuda.jsonl --masks masks_cpu masks_cuda --json compare.json

Exit status: 0 when both files have the same frames, 2 when they cannot be compared (one sentence says why)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit(f"compare_runs: {path} is not a readable results file ({e}); give two --results files")


def p50(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[len(values) // 2], 3) if values else None


def share(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 6) if hits else None


def compare(a: list[dict], b: list[dict], masks: tuple[Path, Path] | None = None) -> dict:
    import numpy as np
    if [r["frame"] for r in a] != [r["frame"] for r in b]:
        raise SystemExit(f"compare_runs: the two runs hold different frames ({len(a)} and {len(b)} records); run "
                         f"both on the same source with --policy all")
    ok = [(x, y) for x, y in zip(a, b) if not x["error"] and not y["error"]]
    both = [(x, y) for x, y in ok if x["accepted"] and y["accepted"]]
    out = {"frames": len(a), "compared": len(ok),
           "errors": [sum(bool(r["error"]) for r in run) for run in (a, b)],
           "accepted": [sum(r["accepted"] for r in run) for run in (a, b)],
           "gate_agreement": share([x["accepted"] == y["accepted"] for x, y in ok]),
           "grade_agreement": share([x["grade"] == y["grade"] for x, y in both]),   # frames both accepted
           "max_abs_mask_fraction_diff": round(max((abs(x["mask_fraction"] - y["mask_fraction"]) for x, y in ok),
                                                   default=0.0), 6),
           "max_abs_probability_diff": round(max((float(np.max(np.abs(np.subtract(x["probabilities"],
                                                                                  y["probabilities"]))))
                                                  for x, y in both), default=0.0), 6),
           "total_p50_ms": [p50([r["latency_ms"].get("total", 0.0) for r in run if not r["error"]])
                            for run in (a, b)]}
    if masks:
        import cv2
        ious, missing = [], 0
        for f in sorted(masks[0].rglob("*.png")):
            g = masks[1] / f.relative_to(masks[0])
            if not g.is_file():
                missing += 1
                continue
            x, y = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) > 0 for p in (f, g))
            if x.shape != y.shape:
                ious.append(0.0)
                continue
            union = np.logical_or(x, y).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(x, y).sum() / union))
        out["masks"] = {"compared": len(ious), "missing_in_second": missing,
                        "mean_iou": round(float(np.mean(ious)), 6) if ious else None,
                        "min_iou": round(float(np.min(ious)), 6) if ious else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--masks", nargs=2, type=Path, metavar=("DIR1", "DIR2"), help="the two runs' --save-masks folders")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    try:
        out = compare(records(args.first), records(args.second), tuple(args.masks) if args.masks else None)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
