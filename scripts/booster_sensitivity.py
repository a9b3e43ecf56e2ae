#!/usr/bin/env python3
"""How much of the INT8 grade loss is the booster's sensitivity to the mask boundary (a benchmark, not a test).

    .venv/bin/python scripts/booster_sensitivity.py --bundle B --data HELD_OUT_DATASET
        [--unet-int8 F] [--vgg-int8 F] [--thresholds 0.4,0.45,0.48,0.52,0.55,0.6] [--booster NAME=FILE ...]
        [--train-data TRAIN --retrain "0.45,0.55;0.4,0.45,0.55,0.6" --seeds 0,1,2]
        [--limit N] [--threads 1] [--json out.json]

On every frame of the labelled dataset (`--data`, e.g. out/demo/data/heldout: patients the bundle never saw) the
FP32 UNet's probability map gives the reference mask (the bundle's gate threshold). Each frame the gate accepts is
then graded (the bundle's booster, and every `--booster`) with:

  threshold T    the mask of the same FP32 probability map at each of `--thresholds`, FP32 VGG
  erode/dilate   the reference mask eroded / dilated by 1 pixel (3x3 cross), FP32 VGG
  int8 mask      the INT8 UNet's mask (its gate threshold), FP32 VGG            -- the mask part of INT8's loss
  int8 vgg       the reference mask, INT8 VGG                                   -- the feature part
  int8 both      the INT8 UNet's mask, INT8 VGG                                 -- what the INT8 set gives

For each variant: frames scored by both, the share of kidney-mask pixels that moved (|xor| / |reference mask|, mean
and median), mask IoU, feature cosine against the reference features, grade flips against the reference grade, and
grade accuracy against the labels (FP32 reference alongside). Flips are also binned by the share of mask pixels
moved, pooled over the threshold and erode/dilate variants (the booster's dose-response to the boundary).

With `--retrain`, the booster is also retrained as `export.recipe.train_bundle` trains it, on the bundle's own FP32
networks over `--train-data` (the bundle's validation patients held out), once with the paper's recipe and once
per ';'-separated set of extra mask thresholds (TrainConfig.booster_mask_thresholds: the booster also learns from
each training frame's features under those masks), for each of `--seeds`; every retrained booster grades the same
variants, and a last table gives each one's FP32 accuracy, flips and INT8 accuracy (mean +- sd over the seeds).

The INT8 files: `--unet-int8` / `--vgg-int8`, else the bundle's installed INT8 set, else the files `calibrate` left
in <bundle>/calibration-rejected/; a variant whose file is missing is skipped. Nothing in the bundle changes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BINS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, float("inf"))   # share of kidney-mask pixels moved


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _int8_file(bundle, name: str, given: str | None) -> Path | None:
    from calibration.run import int8_candidate
    return Path(given) if given else int8_candidate(bundle, name)


def _bin_label(lo: float, hi: float) -> str:
    return f"{lo * 100:g}-{hi * 100:g}%" if hi != float("inf") else f">={lo * 100:g}%"


def _per_booster(rows: dict, names: list, thr: float) -> dict:
    """Per booster (seeds pooled: 'NAME sK'): FP32 accuracy, grade flips of the nearby thresholds (pooled in pairs
    around the gate's), of 1-px erosion/dilation and of the INT8 variants, and the INT8 set's accuracy."""
    import numpy as np
    near = sorted((k for k in rows if k.startswith("threshold ")), key=lambda k: abs(float(k.split()[1]) - thr))
    cols = {"fp32 acc": (["fp32"], "accuracy")}
    for k in near:
        d = abs(float(k.split()[1]) - thr)
        cols.setdefault(f"thr +-{d:g} flips", ([], "grade_flips"))[0].append(k)
    cols["erode/dilate flips"] = ([k for k in ("erode 1px", "dilate 1px") if k in rows], "grade_flips")
    for k, label in (("int8 mask", "int8 mask flips"), ("int8 vgg", "int8 vgg flips"), ("int8 both", "int8 flips"),
                     ("int8 both", "int8 acc")):
        if k in rows:
            cols[label] = ([k], "accuracy" if label.endswith("acc") else "grade_flips")
    groups: dict = {}
    for n in names:
        head, _, tail = n.rpartition(" s")
        groups.setdefault(head if head and tail.isdigit() else n, []).append(n)
    out = {}
    for g, members in groups.items():
        out[g] = {}
        for c, (keys, metric) in cols.items():
            vals = [np.mean([rows[k]["boosters"][n][metric] for k in keys]) for n in members]
            out[g][c] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals)), "n": len(vals)}
    return out


def _set_name(extra) -> str:
    return "paper" if not extra else "+" + "/".join(f"{t:g}" for t in extra)


def _retrain(bundle, graph, data: Path, sets, seeds, threads: int) -> dict:
    """The booster retrained as export.recipe.train_bundle trains it (booster_features, train_booster, the
    bundle's validation patients) on the bundle's own FP32 networks, once per threshold set and seed."""
    import numpy as np

    from export.recipe import booster_features, booster_thresholds, load_preprocessed
    from export.train import train_booster
    from runtime.backends.ort import OrtRunner
    val = bundle.manifest.get("provenance", {}).get("validation_patients")
    images, masks, grades, patients = load_preprocessed(data, graph, progress=False)
    kidney = np.array([graph.gate_mask(m).accepted for m in masks]) & (grades > 0)
    every = booster_thresholds(graph, [t for s in sets for t in s])
    t = time.perf_counter()
    with OrtRunner(bundle.network_file("unet", "fp32"), intra_op_threads=threads) as un, \
            OrtRunner(bundle.network_file("vgg", "fp32"), intra_op_threads=threads) as vg:
        rows, thr, feats = booster_features(graph, images, np.flatnonzero(kidney), un, vg, every)
    _say(f"booster_sensitivity: training features, {int((thr == graph.mask_threshold).sum())} frames and "
         f"{int((thr != graph.mask_threshold).sum())} copies, in {time.perf_counter() - t:.0f} s")
    out = {}
    for extra in sets:
        extra = booster_thresholds(graph, extra)
        keep = (thr == graph.mask_threshold) | np.isin(thr, extra)
        for seed in seeds:
            t = time.perf_counter()
            model, info = train_booster(feats[keep], grades[rows[keep]] - 1, patients[rows[keep]], seed=seed,
                                        val_patients=val or None, progress=False,
                                        copies=thr[keep] != graph.mask_threshold)
            info = {k: info.get(k) for k in ("val_accuracy", "val_mlogloss", "best_iteration", "train_images",
                                             "train_rows", "val_images")}
            info.update(thresholds=[graph.mask_threshold, *extra], seed=seed,
                        seconds=round(time.perf_counter() - t, 1))
            out[f"{_set_name(extra)} s{seed}"] = (model, info)
            _say(f"  retrained {_set_name(extra)} seed {seed}: {info['train_rows'] or info['train_images']} rows, "
                 f"val accuracy {info['val_accuracy']:.3f} ({info['seconds']:.0f} s)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="labelled dataset folder (labels.csv + labelme), e.g. held-out")
    ap.add_argument("--unet-int8", help="INT8 (Q/DQ) UNet file (default: the bundle's, else calibration-rejected/)")
    ap.add_argument("--vgg-int8", help="INT8 (Q/DQ) VGG file (default: the bundle's, else calibration-rejected/)")
    ap.add_argument("--thresholds", default="0.4,0.45,0.48,0.52,0.55,0.6",
                    help="mask thresholds of the FP32 probability map")
    ap.add_argument("--booster", action="append", default=[], metavar="NAME=FILE",
                    help="another booster (XGBoost .ubj/.json on the bundle's VGG features) to grade with")
    ap.add_argument("--train-data", help="with --retrain: the bundle's training dataset (e.g. out/demo/data/train)")
    ap.add_argument("--retrain", metavar="T,T;T,T", help="retrain the booster on the bundle's FP32 networks over "
                    "--train-data with each ';'-separated set of extra mask thresholds (TrainConfig."
                    "booster_mask_thresholds), the paper's recipe alongside, the bundle's validation patients")
    ap.add_argument("--seeds", default="0", help="with --retrain: booster seeds, e.g. 0,1,2")
    ap.add_argument("--limit", type=int, default=0, help="at most this many frames (spread over the dataset)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime and xgboost threads")
    ap.add_argument("--json", help="write every figure here")
    a = ap.parse_args(argv)

    import cv2
    import numpy as np
    import xgboost as xgb

    from export.recipe import load_preprocessed
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle, BundleError

    try:
        bundle = Bundle.load(a.bundle)
    except BundleError as e:
        _say(f"booster_sensitivity: {e}")
        return 2
    graph = bundle.graph()
    thresholds = [float(t) for t in a.thresholds.split(",") if t.strip()]
    boosters = {"bundle": bundle.booster_file}
    for spec in a.booster:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            _say(f"booster_sensitivity: --booster '{spec}' must be NAME=FILE with an existing XGBoost model")
            return 2
        boosters[name] = Path(path)
    models = {}
    for name, path in boosters.items():
        b = xgb.Booster(model_file=str(path))
        b.set_param({"nthread": a.threads})
        models[name] = b
    retrained = {}
    if a.retrain:
        if not a.train_data:
            _say("booster_sensitivity: --retrain needs --train-data, the bundle's training dataset")
            return 2
        sets = [()] + [tuple(float(t) for t in part.split(",") if t.strip()) for part in a.retrain.split(";")]
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        for name, (model, info) in _retrain(bundle, graph, Path(a.train_data), sets, seeds, a.threads).items():
            model.set_param({"nthread": a.threads})
            models[name], retrained[name] = model, info

    t0 = time.perf_counter()
    images, labelled, grades, patients = load_preprocessed(Path(a.data), graph, progress=False)
    if a.limit and a.limit < len(images):
        keep = np.unique(np.linspace(0, len(images) - 1, a.limit).round().astype(int))
        images, labelled, grades, patients = images[keep], labelled[keep], grades[keep], patients[keep]
    n = len(images)
    files = {"unet fp32": bundle.network_file("unet", "fp32"), "vgg fp32": bundle.network_file("vgg", "fp32"),
             "unet int8": _int8_file(bundle, "unet", a.unet_int8), "vgg int8": _int8_file(bundle, "vgg", a.vgg_int8)}
    _say(f"booster_sensitivity: {n} frames of {len(set(patients.tolist()))} patients from {a.data}; INT8 UNet "
         f"{files['unet int8'] or 'none'}, INT8 VGG {files['vgg int8'] or 'none'}")

    def runner(path):
        return OrtRunner(path, intra_op_threads=a.threads)

    # The probability maps, once per UNet.
    probs = {}
    for key in ("unet fp32", "unet int8"):
        if files[key] is None:
            continue
        with runner(files[key]) as un:
            probs[key] = np.stack([graph.segment(un, img) for img in images])
    t_unet = time.perf_counter() - t0
    thr = graph.mask_threshold
    ref_mask = (probs["unet fp32"] > thr).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    masks = {f"threshold {t:g}": (probs["unet fp32"] > t).astype(np.uint8) for t in thresholds}
    masks["erode 1px"] = np.stack([cv2.erode(m, kernel) for m in ref_mask])
    masks["dilate 1px"] = np.stack([cv2.dilate(m, kernel) for m in ref_mask])
    if "unet int8" in probs:
        masks["int8 mask"] = (probs["unet int8"] > thr).astype(np.uint8)
    # variant -> (masks, vgg key)
    variants = {"fp32": (ref_mask, "vgg fp32")}
    variants.update({k: (m, "vgg fp32") for k, m in masks.items()})
    if files["vgg int8"] is not None:
        variants["int8 vgg"] = (ref_mask, "vgg int8")
        if "int8 mask" in masks:
            variants["int8 both"] = (masks["int8 mask"], "vgg int8")

    fractions = {k: m.reshape(n, -1).mean(1) for k, (m, _) in variants.items()}
    accepted = {k: np.array([graph.accepts(f) for f in fr]) for k, fr in fractions.items()}
    feats, head_grade = {}, {}
    for vkey in ("vgg fp32", "vgg int8"):
        if files[vkey] is None:
            continue
        with runner(files[vkey]) as vg:
            for k, (m, key) in variants.items():
                if key != vkey:
                    continue
                f, lg = None, np.zeros(n, int)
                heads = [graph.vgg_output] + (["logits"] if "logits" in vg.outputs else [])
                for i in np.flatnonzero(accepted[k]):
                    out = vg.infer(graph.vgg_feeds(images[i], m[i]), heads)
                    x = out[graph.vgg_output][0]
                    if f is None:
                        f = np.full((n, x.shape[-1]), np.nan, np.float32)
                    f[i] = x
                    lg[i] = int(out["logits"][0].argmax()) + 1 if "logits" in out else 0
                feats[k] = f
                head_grade[k] = lg
    t_feats = time.perf_counter() - t0 - t_unet
    grade_of = {}
    for bname, model in models.items():
        for k, f in feats.items():
            g = np.zeros(n, int)
            ok = accepted[k]
            if ok.any():
                g[ok] = model.predict(xgb.DMatrix(f[ok], nthread=a.threads)).argmax(1) + 1
            grade_of[bname, k] = g
    if all(g.any() for g in head_grade.values()):   # the VGG's own softmax head (trained with it), for comparison
        models["vgg head"] = None
        grade_of.update({("vgg head", k): g for k, g in head_grade.items()})

    ref = accepted["fp32"]
    moved_all = {}
    rows = {}
    for k, (m, _) in variants.items():
        both = ref & accepted[k]
        xor = (m != ref_mask).reshape(n, -1).sum(1)
        union = (m | ref_mask).reshape(n, -1).sum(1)
        moved = xor / np.maximum(ref_mask.reshape(n, -1).sum(1), 1)
        moved_all[k] = moved
        a_f, b_f = feats["fp32"][both].astype(np.float64), feats[k][both].astype(np.float64)
        cos = (a_f * b_f).sum(1) / np.maximum(np.linalg.norm(a_f, axis=1) * np.linalg.norm(b_f, axis=1), 1e-30)
        graded = both & (grades > 0)
        row = {"frames_scored": int(both.sum()), "gate_agreement": float((accepted[k] == ref).mean()),
               "mask_pixels_moved_mean": float(moved[both].mean()),
               "mask_pixels_moved_median": float(np.median(moved[both])),
               "mask_iou_mean": float((1 - xor[both] / np.maximum(union[both], 1)).mean()),
               "feature_cosine_mean": float(cos.mean()), "feature_cosine_min": float(cos.min()), "boosters": {}}
        for bname in models:
            g, g0 = grade_of[bname, k], grade_of[bname, "fp32"]
            row["boosters"][bname] = {
                "grade_flips": float((g[both] != g0[both]).mean()),
                "accuracy": float((g[graded] == grades[graded]).mean()),
                "accuracy_fp32_same_frames": float((g0[graded] == grades[graded]).mean()),
                "graded_frames": int(graded.sum())}
        rows[k] = row

    # Dose-response: flips binned by the share of mask pixels moved, pooled over the threshold/morphology variants.
    pooled = [k for k in masks if k != "int8 mask"]
    dose = {}
    for bname in models:
        table = []
        mv = np.concatenate([moved_all[k][ref & accepted[k]] for k in pooled])
        fl = np.concatenate([(grade_of[bname, k] != grade_of[bname, "fp32"])[ref & accepted[k]] for k in pooled])
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            sel = (mv >= lo) & (mv < hi)
            table.append({"moved": _bin_label(lo, hi), "frames": int(sel.sum()),
                          "grade_flips": float(fl[sel].mean()) if sel.any() else None})
        dose[bname] = table
    # The INT8 loss split: flips of the mask alone, of the features alone, of both.
    split = {}
    if "int8 both" in rows:
        for bname in models:
            split[bname] = {part: rows[k]["boosters"][bname]["grade_flips"]
                            for part, k in (("mask part (int8 UNet, fp32 VGG)", "int8 mask"),
                                            ("feature part (fp32 UNet, int8 VGG)", "int8 vgg"),
                                            ("both (int8 set)", "int8 both"))}

    # The compact table.
    names = list(models)
    shown = [b for b in names if b in ("bundle", "vgg head")]   # the others: the per-booster table below
    head = f"{'variant':<16}{'frames':>7}{'moved%':>8}{'IoU':>8}{'cos':>8}" + "".join(
        f"{(b + ' flips'):>16}{(b + ' acc'):>14}" for b in shown)
    print(head)
    for k, r in rows.items():
        print(f"{k:<16}{r['frames_scored']:>7}{100 * r['mask_pixels_moved_mean']:>8.2f}{r['mask_iou_mean']:>8.4f}"
              f"{r['feature_cosine_mean']:>8.4f}" + "".join(
                  f"{r['boosters'][b]['grade_flips']:>16.3f}{r['boosters'][b]['accuracy']:>14.3f}" for b in shown))
    print("grade flips by share of mask pixels moved (threshold and erode/dilate variants pooled):")
    for b in shown:
        print(f"  {b}: " + ", ".join(f"{d['moved']} {d['grade_flips']:.3f} ({d['frames']})" if d["frames"] else
                                     f"{d['moved']} - (0)" for d in dose[b]))
    for b, s in ((b, split[b]) for b in shown if b in split):
        print(f"INT8 loss split, {b}: " + ", ".join(f"{p} {v:.3f}" for p, v in s.items()))
    per_booster = _per_booster(rows, names, thr)
    if len(per_booster) > 2:
        cols = list(next(iter(per_booster.values())))
        print(f"{'booster (mean +-sd over seeds)':<32}" + "".join(f"{c:>21}" for c in cols))
        for g, r in per_booster.items():
            print(f"{g:<32}" + "".join(f"{r[c]['mean']:>14.3f}" + (f" +-{r[c]['sd']:.3f}" if r[c]["n"] > 1 else
                                                                    " " * 7) for c in cols))
    out = {"bundle": str(bundle.root), "data": str(a.data), "frames": n,
           "patients": len(set(patients.tolist())), "gate_threshold": thr, "thresholds": thresholds,
           "files": {k: (str(v) if v else None) for k, v in files.items()},
           "boosters": {k: str(v) for k, v in boosters.items()}, "retrained": retrained, "variants": rows,
           "flips_by_moved": dose, "int8_split": split, "per_booster": per_booster,
           "seconds": {"unet": round(t_unet, 1), "vgg": round(t_feats, 1), "total": round(time.perf_counter() - t0, 1)},
           "threads": a.threads}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    _say(f"booster_sensitivity: {time.perf_counter() - t0:.0f} s (UNet {t_unet:.0f} s, VGG {t_feats:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
