#!/usr/bin/env python3
"""Does a booster that also learns from the INT8 set's features keep its grades under INT8 (a benchmark, not a test)?

    .venv/bin/python scripts/booster_int8_copies.py --bundle B --train-data TRAIN --data HELD_OUT
        [--unet-int8 F] [--vgg-int8 F] [--seeds 0,1,2] [--mask-thresholds 0.45,0.55] [--limit N] [--threads 2]
        [--cache DIR] [--save-boosters DIR] [--feature-noise S1,S2] [--json out.json]

docs/benchmarks.md ("Booster trained with the INT8 set's features as copies") ran it on the `train --qat` demo
bundle that `scripts/qat_seeds.py --seeds 2` writes (its check rejected the INT8 set, left in calibration-rejected/):

    .venv/bin/python scripts/booster_int8_copies.py --bundle out/qat-seeds/bundle-seed2 \\
        --train-data out/demo/data/train --data out/demo/data/heldout --seeds 0,1,2 --mask-thresholds 0.45,0.55 \\
        --threads 2 --json r.json

The booster is retrained as `export.recipe.train_bundle` trains it (`booster_features` through the bundle's FP32
networks on the gated kidney frames of `--train-data`, `train_booster` with the bundle's validation patients and
the paper's parameters), for each of `--seeds`:

  paper        the frames' FP32 features only (the bundle's recipe; with the bundle's seed it should give back the
               bundle's booster, which separates retraining noise from the effect of the copies)
  int8 copies  the same rows plus each training frame's features as the INT8 set computes them (the INT8 UNet's
               mask through the gate, the INT8 VGG; simulated quantization: onnxruntime with graph optimisations
               off), passed as augmented copies (`train_booster(copies=)`): a copy goes with its patient, the
               validation patients' copies are never fitted, validation scores the FP32 rows only
  thresholds   with `--mask-thresholds`: the paper's rows plus copies under the masks of those thresholds of the
               FP32 probability map (TrainConfig.booster_mask_thresholds); and "int8 copies + thresholds", both

Each booster, and the bundle's own, then grades two frame sets: `--data` (held-out patients) and the bundle's
validation patients' frames of `--train-data` (what `train --qat`'s check runs on). Per set and booster: grade
accuracy against the labels with FP32 and with the INT8 set (simulated), and grade agreement with FP32 as
`calibrate` defines it (runtime.agreement.graph_outputs / compare) for the INT8 set (both networks, simulated:
what decides), the INT8 VGG alone (simulated) and the INT8 set on this CPU's integer kernels (information). The
networks run once per set and precision; each booster re-grades the same features.

`--feature-noise S1,S2,...`: the yardstick for the agreement figures: for each S, the FP32 run's features with
seeded Gaussian noise whose norm is about S times each frame's feature norm (`feature_noise`; clipped at 0, as the
ReLU outputs they stand for are), graded by every booster and compared with FP32 like the INT8 runs (a run
"fp32 features + noise S" in the JSON; its cosine and agreement printed under each table). It says how small a
feature error the booster's grades tolerate: an INT8 set whose feature cosine is that of noise S agrees at most
about as well, since its error is not spread evenly over the features.

The INT8 files: `--unet-int8` / `--vgg-int8`, else the bundle's installed INT8 set, else the files `calibrate` left
in <bundle>/calibration-rejected/. `--cache DIR` keeps the training features (the simulated INT8 pass is the slow
part) keyed by the files and options. Nothing in the bundle changes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUNS = {   # name -> (UNet precision, VGG precision, simulated quantization)
    "fp32": ("fp32", "fp32", False),
    "int8 sim": ("int8", "int8", True),
    "int8-vgg sim": ("fp32", "int8", True),
    "int8 cpu": ("int8", "int8", False),
}
COLUMNS = (("fp32 acc", "fp32", "accuracy"), ("int8 acc", "int8 sim", "accuracy"),
           ("agree int8", "int8 sim", "grade_agreement"), ("agree vgg", "int8-vgg sim", "grade_agreement"),
           ("agree cpu", "int8 cpu", "grade_agreement"))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _int8_file(bundle, name: str, given: str | None) -> Path | None:
    from calibration.run import int8_candidate
    return Path(given) if given else int8_candidate(bundle, name)


def _spread(n: int, limit: int):
    import numpy as np

    from calibration.quantize import spread_indices
    return np.asarray(spread_indices(n, limit if limit else n), dtype=int)


def _digest(paths, extra) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def _training_rows(graph, files, images, frames, threads: int, cache: Path | None, key: str, thresholds=()):
    """booster_features through the FP32 networks (with the masks of `thresholds` too), and through the INT8 set
    (simulated, the gate's masks): (rows, row_thresholds, feats) each."""
    import numpy as np

    from export.recipe import booster_features
    from runtime.backends.ort import OrtRunner
    path = cache / f"booster_int8_copies-{key}.npz" if cache else None
    if path is not None and path.is_file():
        z = np.load(path)
        _say(f"booster_int8_copies: training features from {path}")
        return {k: (z[f"{k}_rows"], z[f"{k}_thr"], z[f"{k}_feats"]) for k in ("fp32", "int8")}
    out, secs = {}, {}
    for k, sim in (("fp32", False), ("int8", True)):
        t = time.perf_counter()
        with OrtRunner(files[f"unet {k}"], intra_op_threads=threads, simulated_quantization=sim) as un, \
                OrtRunner(files[f"vgg {k}"], intra_op_threads=threads, simulated_quantization=sim) as vg:
            out[k] = booster_features(graph, images, frames, un, vg, thresholds if k == "fp32" else ())
        secs[k] = time.perf_counter() - t
        _say(f"booster_int8_copies: {k} training features, {len(out[k][0])} rows, in {secs[k]:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"{k}_{n}": v for k, o in out.items() for n, v in zip(("rows", "thr", "feats"), o)})
    return out


def _outputs(bundle, graph, files, booster, images, threads: int) -> dict:
    """runtime.agreement.graph_outputs for every run in RUNS (the UNet's masks reused where the file is the same)."""
    from runtime.agreement import graph_outputs
    from runtime.backends.ort import OrtRunner
    out = {}
    for name, (u, v, sim) in RUNS.items():
        if files[f"unet {u}"] is None or files[f"vgg {v}"] is None:
            continue
        same_unet = next((o for n, o in out.items() if RUNS[n][0] == u and (u == "fp32" or RUNS[n][2] == sim)),
                         None)
        with OrtRunner(files[f"vgg {v}"], intra_op_threads=threads, simulated_quantization=sim) as vg:
            if same_unet is not None:
                out[name] = graph_outputs(graph, None, vg, booster, images, num_classes=bundle.num_classes,
                                          masks_from=same_unet)
            else:
                with OrtRunner(files[f"unet {u}"], intra_op_threads=threads, simulated_quantization=sim) as un:
                    out[name] = graph_outputs(graph, un, vg, booster, images, num_classes=bundle.num_classes)
    return out


def feature_noise(o, sigma: float, seed: int = 0):
    """The run's Outputs with seeded Gaussian noise on each frame's features: every element gets N(0, (sigma *
    |f| / sqrt(D))^2), |f| the frame's feature norm and D the feature count (so the noise's norm is about sigma |f|),
    then the features are clipped at 0, as the ReLU outputs they stand for are. Rows that are not a number (frames
    the gate rejected) stay so."""
    import numpy as np
    f = np.asarray(o.features, np.float64)
    rng = np.random.default_rng(seed)
    scale = np.linalg.norm(f, axis=1, keepdims=True) / np.sqrt(f.shape[1])
    noisy = np.maximum(f + rng.normal(0.0, 1.0, f.shape) * scale * sigma, 0.0)
    noisy[np.isnan(f)] = np.nan
    return dataclasses.replace(o, features=noisy.astype(np.float32))


def noise_run(sigma: float) -> str:
    return f"fp32 features + noise {sigma:g}"


def _regrade(o, booster):
    """The same run's Outputs with another booster's probabilities (the features are the booster's input only)."""
    import numpy as np
    probs = np.full((len(o.accepted), booster.num_class), np.nan)
    if o.accepted.any():
        probs[o.accepted] = booster.predict(o.features[o.accepted])
    return dataclasses.replace(o, probabilities=probs)


def _scores(outputs: dict, booster, grades) -> dict:
    """Per run: grade accuracy against the labels (frames the run's gate accepts that have a grade) and
    runtime.agreement.compare's figures against the FP32 run, both graded by `booster`."""
    from runtime.agreement import compare
    graded = {n: _regrade(o, booster) for n, o in outputs.items()}
    ref = graded["fp32"]
    out = {}
    for n, o in graded.items():
        ok = o.accepted & (grades > 0)
        acc = float((o.probabilities[ok].argmax(1) + 1 == grades[ok]).mean()) if ok.any() else None
        m = {"accuracy": acc, "graded_frames": int(ok.sum())}
        if n != "fp32":
            m.update({k: v for k, v in compare(ref, o).items() if k in (
                "frames", "frames_accepted_by_both", "mask_iou_mean", "gate_agreement", "feature_cosine_mean",
                "grade_agreement")})
        out[n] = m
    return out


def _summary(per: dict, names: list[str]) -> dict:
    """Mean and sd over `names` of every figure (the seeds of one recipe)."""
    import numpy as np
    out = {}
    for run in per[names[0]]:
        out[run] = {}
        for k, v in per[names[0]][run].items():
            vals = [per[n][run][k] for n in names]
            if all(isinstance(x, (int, float)) for x in vals):
                out[run][k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals)), "n": len(vals)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--train-data", required=True, help="the bundle's training dataset (e.g. out/demo/data/train)")
    ap.add_argument("--data", required=True, help="labelled held-out dataset (e.g. out/demo/data/heldout)")
    ap.add_argument("--unet-int8", help="INT8 (Q/DQ) UNet file (default: the bundle's, else calibration-rejected/)")
    ap.add_argument("--vgg-int8", help="INT8 (Q/DQ) VGG file (default: the bundle's, else calibration-rejected/)")
    ap.add_argument("--seeds", help="booster seeds, e.g. 0,1,2 (default: the bundle's training seed)")
    ap.add_argument("--mask-thresholds", default="",
                    help="also boosters with copies under these masks of the FP32 probability map (TrainConfig."
                         "booster_mask_thresholds), without and with the INT8 copies, e.g. 0.45,0.55")
    ap.add_argument("--limit", type=int, default=0,
                    help="at most this many training frames and frames of each graded set (spread over each)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads (xgboost uses at most 2)")
    ap.add_argument("--cache", help="folder that keeps the training features between runs")
    ap.add_argument("--save-boosters", help="folder to write the retrained boosters to (.ubj)")
    ap.add_argument("--feature-noise", default="", metavar="S1,S2,...",
                    help="also the FP32 features with seeded noise of about S times their norm, graded and compared "
                         "with FP32 like the INT8 runs (the yardstick for the agreement), e.g. 0.02,0.06")
    ap.add_argument("--json", help="write every figure here")
    a = ap.parse_args(argv)

    import numpy as np

    from export.recipe import booster_thresholds, load_preprocessed
    from export.train import train_booster
    from runtime.booster import Booster
    from runtime.bundle import Bundle, BundleError

    t_all = time.perf_counter()
    sigmas = []
    for part in [x for x in a.feature_noise.split(",") if x.strip()]:
        try:
            sigma = float(part)
        except ValueError:
            sigma = float("nan")
        if not (np.isfinite(sigma) and sigma >= 0):
            _say(f"booster_int8_copies: --feature-noise '{a.feature_noise}' holds {part.strip()}, not a noise level; "
                 f"give fractions of the feature norm of 0 or more separated by commas, such as 0.02,0.06")
            return 2
        sigmas.append(sigma)
    try:
        bundle = Bundle.load(a.bundle)
    except BundleError as e:
        _say(f"booster_int8_copies: {e}")
        return 2
    graph = bundle.graph()
    try:
        extra = booster_thresholds(graph, [float(t) for t in a.mask_thresholds.split(",") if t.strip()])
    except ValueError as e:
        _say(f"booster_int8_copies: --mask-thresholds: {e}")
        return 2
    prov = bundle.manifest.get("provenance", {})
    val = prov.get("validation_patients")
    if not val:
        _say(f"booster_int8_copies: bundle {a.bundle} names no validation patients in its provenance; give a "
             f"bundle made by `sonoscore train`")
        return 2
    seeds = ([int(s) for s in a.seeds.split(",") if s.strip()] if a.seeds
             else [int(prov.get("config", {}).get("seed", 0))])
    files = {"unet fp32": bundle.network_file("unet", "fp32"), "vgg fp32": bundle.network_file("vgg", "fp32"),
             "unet int8": _int8_file(bundle, "unet", a.unet_int8), "vgg int8": _int8_file(bundle, "vgg", a.vgg_int8)}
    missing = [k for k, p in files.items() if p is None or not Path(p).is_file()]
    if missing:
        _say(f"booster_int8_copies: no {missing[0]} file; give --unet-int8 / --vgg-int8 or a bundle with an INT8 set "
             f"(installed or in calibration-rejected/)")
        return 2
    _say(f"booster_int8_copies: INT8 UNet {files['unet int8']}, INT8 VGG {files['vgg int8']}; seeds "
         f"{','.join(map(str, seeds))}")

    # -- training rows ------------------------------------------------------------------------------------------
    t = time.perf_counter()
    images, masks, grades, patients = load_preprocessed(Path(a.train_data), graph, progress=False)
    kidney = np.array([graph.gate_mask(m).accepted for m in masks]) & (grades > 0)   # as train_bundle
    frames = np.flatnonzero(kidney)[_spread(int(kidney.sum()), a.limit)]
    key = _digest([Path(bundle.root) / "manifest.json"] + [files[k] for k in sorted(files)],
                  {"train": str(Path(a.train_data).resolve()), "frames": frames.tolist(), "thresholds": extra})
    feats = _training_rows(graph, files, images, frames, a.threads, Path(a.cache) if a.cache else None, key, extra)
    t_feats = time.perf_counter() - t
    (r32, thr32, f32), (r8, _, f8) = feats["fp32"], feats["int8"]
    own = thr32 == graph.mask_threshold        # the gate's masks; the rest are the threshold copies
    recipes = {"paper": (own, False), "int8 copies": (own, True)}
    if extra:
        recipes.update({"thresholds": (np.ones(len(r32), bool), False),
                        "int8 copies + thresholds": (np.ones(len(r32), bool), True)})

    def recipe_rows(fp32_rows, with_int8):
        x, rows, copies = f32[fp32_rows], r32[fp32_rows], ~own[fp32_rows]
        if with_int8:
            x, rows, copies = np.concatenate([x, f8]), np.concatenate([rows, r8]), np.r_[copies, np.ones(len(r8), bool)]
        return x, rows, copies

    # -- boosters -------------------------------------------------------------------------------------------------
    boosters = {"bundle": Booster.load(bundle.booster_file, num_class=bundle.num_classes, backend="gtil")}
    info: dict = {"bundle": {k: prov.get("booster", {}).get(k) for k in (
        "val_accuracy", "val_mlogloss", "best_iteration", "train_images", "val_images", "seconds")}}
    save = Path(a.save_boosters) if a.save_boosters else None
    t_fit = 0.0
    with tempfile.TemporaryDirectory(prefix="booster-int8-copies-") as tmp:
        where = save or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        for recipe, spec in recipes.items():
            x, rows, copies = recipe_rows(*spec)
            for seed in seeds:
                t = time.perf_counter()
                model, i = train_booster(x, grades[rows] - 1, patients[rows], seed=seed, val_patients=val,
                                         progress=False, copies=copies)
                name = f"{recipe} s{seed}"
                path = where / f"booster-{recipe.replace(' ', '-')}-s{seed}.ubj"
                model.save_model(str(path))
                boosters[name] = Booster.load(path, num_class=bundle.num_classes, backend="gtil")
                i = {k: i.get(k) for k in ("val_accuracy", "val_mlogloss", "best_iteration", "train_images",
                                           "train_copies", "train_rows", "val_images", "val_copies_left_out")}
                i["seconds"] = round(time.perf_counter() - t, 1)
                t_fit += i["seconds"]
                info[name] = i
                _say(f"  {name}: {i['train_rows'] or i['train_images']} rows fitted, val accuracy "
                     f"{i['val_accuracy']:.3f}, best iteration {i['best_iteration']} ({i['seconds']:.0f} s)")

        # -- the frame sets -----------------------------------------------------------------------------------------
        t = time.perf_counter()
        held = load_preprocessed(Path(a.data), graph, progress=False)
        is_val = np.isin(patients, np.asarray(val))
        sets = {"held-out": (held[0], held[2]), "validation": (images[is_val], grades[is_val])}
        results: dict = {}
        for set_name, (imgs, grd) in sets.items():
            keep = _spread(len(imgs), a.limit)
            imgs, grd = imgs[keep], grd[keep]
            ts = time.perf_counter()
            outputs = _outputs(bundle, graph, files, boosters["bundle"], list(imgs), a.threads)
            for sigma in sigmas:
                outputs[noise_run(sigma)] = feature_noise(outputs["fp32"], sigma)
            per = {name: _scores(outputs, b, grd) for name, b in boosters.items()}
            for recipe in recipes:
                names = [f"{recipe} s{s}" for s in seeds]
                if len(names) > 1:
                    per[f"{recipe} (mean over seeds)"] = _summary(per, names)
            results[set_name] = {"frames": int(len(imgs)), "scores": per}
            _say(f"booster_int8_copies: {set_name}, {len(imgs)} frames graded in {time.perf_counter() - ts:.0f} s")
        t_eval = time.perf_counter() - t

    # -- the tables -------------------------------------------------------------------------------------------------
    def cell(m):
        if m is None:
            return "n/a"
        if isinstance(m, dict):
            return f"{m['mean']:.3f} +-{m['sd']:.3f}"
        return f"{m:.3f}"

    for set_name, r in results.items():
        print(f"{set_name} ({r['frames']} frames; agreement: runtime.agreement.compare against FP32, same booster)")
        print(f"{'booster':<44}" + "".join(f"{c:>15}" for c, _, _ in COLUMNS))
        for name, per in r["scores"].items():
            print(f"{name:<44}" + "".join(f"{cell(per.get(run, {}).get(k)):>15}" for _, run, k in COLUMNS))
        fp = r["scores"]["bundle"]
        print(f"  INT8 set vs FP32 (bundle booster): mask IoU {cell(fp['int8 sim'].get('mask_iou_mean'))}, gate "
              f"{cell(fp['int8 sim'].get('gate_agreement'))}, feature cosine "
              f"{fp['int8 sim'].get('feature_cosine_mean'):.5f}; VGG alone cosine "
              f"{fp['int8-vgg sim'].get('feature_cosine_mean'):.5f}")
        for sigma in sigmas:
            m = fp[noise_run(sigma)]
            print(f"  FP32 features + noise {sigma:g} (bundle booster): feature cosine {m['feature_cosine_mean']:.5f}, "
                  f"grade agreement {cell(m.get('grade_agreement'))}")
    out = {"bundle": str(bundle.root), "train_data": str(a.train_data), "data": str(a.data),
           "files": {k: str(v) for k, v in files.items()}, "seeds": seeds, "limit": a.limit,
           "validation_patients": len(val), "training_frames": int(len(frames)),
           "mask_thresholds": list(extra), "feature_noise": sigmas,
           "training_rows": {"fp32": int(own.sum()), "threshold copies": int((~own).sum()), "int8": int(len(r8))},
           "boosters": info, "sets": results,
           "seconds": {"training_features": round(t_feats, 1), "booster_fits": round(t_fit, 1),
                       "grading": round(t_eval, 1), "total": round(time.perf_counter() - t_all, 1)},
           "threads": a.threads}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    _say(f"booster_int8_copies: {time.perf_counter() - t_all:.0f} s (training features {t_feats:.0f} s, fits "
         f"{t_fit:.0f} s, grading {t_eval:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
