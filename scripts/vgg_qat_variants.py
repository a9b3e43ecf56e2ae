#!/usr/bin/env python3
"""What the VGG's quantization-aware fine-tuning should target (a benchmark, not a test).

    .venv/bin/python scripts/vgg_qat_variants.py --bundle out/demo/bundle --train-data out/demo/data/train \
        --data out/demo/data/heldout [--seeds 0,1] [--variants ptq,ce,distill,...] [--vgg-width W] [--threads 2]
        [--cache DIR] [--json out.json]

Only the VGG and the booster are trained, as `export.recipe.train_bundle` trains them with the demo's TrainConfig;
the UNet is the bundle's FP32 one (its files are not changed):

1. `load_preprocessed` on `--train-data`; the validation patients drawn by `split_by_patient` with the seed; the VGG
   trained by `train_vgg` (the demo's width, epochs, lr, shift) on the training patients' labelled kidneys, masked.
   `--vgg-width W` trains it at another width (`train --vgg-width`), the rest of the recipe unchanged; `--cache`
   keeps each width's VGG under its own name.
2. Per variant (and per `--qat-seeds`: the seed of the fine-tuning's batches and of the booster), the VGG's INT8
   file and the float VGG that ships beside it:
     ptq          no fine-tuning: the FP32 VGG and its Q/DQ file with the min-max scales of 64 training frames
     ce           `qat_networks` as `train --qat` runs it: cross-entropy on the grades, 3 epochs at lr 1e-4
     distill      the same, loss 1 - cosine between the fake-quant Fc2 features and the FP32 VGG's (frozen)
     distill+ce   the sum of both
     ...-w8       8-bit weights (`full_range_weights`) instead of 7-bit
     ...-e6       6 epochs instead of 3 (distill-e12: 12)
     ...-observed the activation scales follow the batches (moving-average min/max observers, frozen for the
                  last epoch) instead of staying the 64 frames' min-max calibration (the default with distillation;
                  cross-entropy observes them anyway), e.g. distill-observed, distill-w8-observed
   Two ways to ship the INT8 file, each with its booster (`train_booster`, the validation patients held out,
   trained on the shipped float VGG's features of every training frame the bundle's FP32 UNet passes through the
   gate, under the gate's mask: what `booster_features` computes; the masks are computed once, the UNet being
   fixed):
     FP32 kept    the FP32 VGG before fine-tuning and its booster ship unchanged (what `calibrate --qat` does)
     QAT float    the fine-tuned float weights ship and the booster learns from them (what `train --qat` does)
3. On every frame of `--data` (patients never seen) that the FP32 UNet's gate accepts, under that mask: the shipped
   float VGG's features (onnxruntime) and the INT8 file's with simulated quantization (graph optimisations off, the
   same figures on every CPU): feature cosine (mean, 5th percentile), grade agreement INT8 vs float, grade accuracy
   of both against the labels, and the cosine of the shipped float VGG's features to the FP32 VGG's before QAT.

The INT8 figure is the VGG's alone (both grade the FP32 UNet's mask): the part of the INT8 set's grade loss that
docs/benchmarks.md ("Booster sensitivity to the mask boundary") traces to the VGG's feature error.
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

# name -> (vgg_loss, full_range_weights, epochs); lr is --lr for all
OBSERVED = "-observed"   # suffix: activation scales observed during QAT (all epochs but the last), not calibrated
VARIANTS = {
    "ptq": (None, False, 0),
    "ce": ("ce", False, 3),
    "distill": ("distill", False, 3),
    "distill+ce": ("distill+ce", False, 3),
    "ce-w8": ("ce", True, 3),
    "distill-w8": ("distill", True, 3),
    "distill-e6": ("distill", False, 6),
    "distill-e12": ("distill", False, 12),
    "ce-e6": ("ce", False, 6),
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _features(graph, runner, images, masks, batch: int = 32):
    import numpy as np
    out = []
    for s in range(0, len(images), batch):
        feeds = [graph.vgg_feeds(i, m)[graph.vgg_input] for i, m in zip(images[s:s + batch], masks[s:s + batch])]
        out.append(runner.infer({graph.vgg_input: np.concatenate(feeds)}, [graph.vgg_output])[graph.vgg_output])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _gated(graph, unet, images, frames):
    """(frames the gate accepts, their masks) under the FP32 UNet, as booster_features / Graph.run gate them."""
    import numpy as np
    rows, masks = [], []
    for i in frames:
        gate = graph.gate(graph.segment(unet, images[i]))
        if gate.accepted:
            rows.append(int(i))
            masks.append(gate.mask)
    return np.array(rows, dtype=np.int64), masks


def _cos(a, b):
    import numpy as np
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="out/demo/bundle")
    ap.add_argument("--train-data", default="out/demo/data/train")
    ap.add_argument("--data", default="out/demo/data/heldout")
    ap.add_argument("--seeds", default="0", help="seeds of the FP32 VGG (and of the validation split)")
    ap.add_argument("--qat-seeds", default=None,
                    help="seeds of the fine-tuning's batches and of the booster, per FP32 VGG (default: its seed)")
    ap.add_argument("--variants", default="ptq,ce,distill,distill+ce,ce-w8,distill-w8")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--vgg-width", type=float, default=None,
                    help="the VGG's width (default: the demo's TrainConfig.vgg_width); wider VGGs train slower")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="folder for the trained FP32 VGGs (reused when present)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.vgg_width is not None and not a.vgg_width > 0:
        ap.error(f"--vgg-width {a.vgg_width:g} is not a width; give a number above 0 (the paper's VGG is 1, the demo's "
                 f"0.0625)")
    for v in a.variants.split(","):
        base = v[:-len(OBSERVED)] if v.endswith(OBSERVED) else v
        if base not in VARIANTS or (base != v and base == "ptq"):
            ap.error(f"--variants: unknown variant '{v}'; choose from {', '.join(VARIANTS)}, each but ptq "
                     f"optionally with {OBSERVED}")

    import numpy as np
    import torch
    import xgboost as xgb

    from export.onnx_export import export_vgg
    from export.qat import export_qdq, prepare_qat, qat_networks, qdq_placement
    from export.recipe import TrainConfig, load_preprocessed
    from export.train import _batch, split_by_patient, train_booster, train_vgg
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle, BundleError
    from runtime.graph import masked

    torch.set_num_threads(a.threads)
    cfg = TrainConfig() if a.vgg_width is None else TrainConfig(vgg_width=a.vgg_width)
    try:
        bundle = Bundle.load(Path(a.bundle))
    except BundleError as e:
        _say(f"vgg_qat_variants: {e}")
        return 2
    graph = bundle.graph()
    t0 = time.perf_counter()
    images, masks, grades, patients = load_preprocessed(Path(a.train_data), graph, progress=False)
    h_images, _, h_grades, _ = load_preprocessed(Path(a.data), graph, progress=False)
    kidney = np.array([graph.gate_mask(m).accepted for m in masks]) & (grades > 0)
    masked_images = np.stack([masked(i, m) for i, m in zip(images, masks)])
    with OrtRunner(bundle.network_file("unet", "fp32"), intra_op_threads=a.threads) as un:
        b_rows, b_masks = _gated(graph, un, images, np.flatnonzero(kidney))
        h_rows, h_masks = _gated(graph, un, h_images, np.arange(len(h_images)))
    _say(f"vgg_qat_variants: {len(images)} training frames ({len(b_rows)} gated kidneys for the booster), "
         f"{len(h_images)} held-out frames ({len(h_rows)} gated) in {time.perf_counter() - t0:.0f} s")
    h_img = h_images[h_rows]
    h_lab = h_grades[h_rows]
    labelled = h_lab > 0

    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        is_val = split_by_patient(np.maximum(grades - 1, 0), patients, cfg.val_fraction, seed)
        tr, va = ~is_val, is_val
        sel = kidney & tr
        width_tag = "" if cfg.vgg_width == TrainConfig().vgg_width else f"_w{cfg.vgg_width:g}"
        cache = Path(a.cache) / f"vgg_seed{seed}{width_tag}.pt" if a.cache else None
        t = time.perf_counter()
        if cache and cache.is_file():
            from export.models import VGG19BN
            vgg = VGG19BN(width=cfg.vgg_width, in_channels=cfg.vgg_channels, num_classes=4)
            vgg.load_state_dict(torch.load(cache))
            vgg.eval()
        else:
            vgg, _ = train_vgg(masked_images[sel], grades[sel] - 1, width=cfg.vgg_width, in_channels=cfg.vgg_channels,
                               epochs=cfg.vgg_epochs, seed=seed, lr=cfg.vgg_lr, shift=cfg.vgg_shift,
                               val=(masked_images[kidney & va], grades[kidney & va] - 1), progress=False,
                               normalization=graph.vgg_normalization)
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(vgg.state_dict(), cache)
        _say(f"seed {seed}: FP32 VGG ({time.perf_counter() - t:.0f} s)")
        val_patients = sorted(set(patients[va].tolist()))
        with tempfile.TemporaryDirectory(prefix="vgg-qat-variants-") as tmp:
            tmp = Path(tmp)
            export_vgg(vgg, tmp / "fp32.onnx", graph)
            with OrtRunner(tmp / "fp32.onnx", intra_op_threads=a.threads) as r:
                b_ref = _features(graph, r, images[b_rows], b_masks)
                h_ref = _features(graph, r, h_img, h_masks)
            ref_boosters: dict = {}

            def booster_for(feats, qseed):
                model, info = train_booster(feats, grades[b_rows] - 1, patients[b_rows], seed=qseed,
                                            val_patients=val_patients, progress=False)
                return model

            def measure(booster, h_float, h_int8):
                g_float = booster.predict(xgb.DMatrix(h_float, nthread=a.threads)).argmax(1) + 1
                g_int8 = booster.predict(xgb.DMatrix(h_int8, nthread=a.threads)).argmax(1) + 1
                cos = _cos(h_int8, h_float)
                return {"cosine_mean": float(cos.mean()), "cosine_p05": float(np.percentile(cos, 5)),
                        "grade_agreement": float((g_float == g_int8).mean()),
                        "fp32_accuracy": float((g_float == h_lab)[labelled].mean()),
                        "int8_accuracy": float((g_int8 == h_lab)[labelled].mean()),
                        "float_vs_before_cosine": float(_cos(h_float, h_ref).mean())}

            qat_seeds = [int(s) for s in a.qat_seeds.split(",")] if a.qat_seeds else [seed]
            for qseed, name in [(q, n) for q in qat_seeds for n in a.variants.split(",")]:
                observed = name.endswith(OBSERVED)
                loss, w8, epochs = VARIANTS[name[:-len(OBSERVED)] if observed else name]
                if qseed not in ref_boosters:
                    ref_boosters[qseed] = booster_for(b_ref, qseed)
                t = time.perf_counter()
                opts = {"full_range_weights": True} if w8 else {}
                if loss is None:
                    calib = [_batch(masked_images[sel], np.array([i]), cfg.vgg_channels, None,
                                    graph.vgg_normalization).numpy()
                             for i in np.linspace(0, int(sel.sum()) - 1, 64).round().astype(int)]
                    pl = qdq_placement(vgg, calib, graph, **opts)
                    int8 = tmp / f"{name}.int8.onnx"
                    export_qdq(prepare_qat(vgg, pl, graph), int8, graph)
                    shipped, scales = None, None
                else:
                    q = qat_networks(None, vgg, unet_images=None, unet_masks=None, vgg_images=masked_images[sel],
                                     vgg_labels=grades[sel] - 1, graph=graph, out_dir=tmp / name, vgg_epochs=epochs,
                                     lr=a.lr, seed=qseed, vgg_shift=cfg.vgg_shift, log=_say, networks=("vgg",),
                                     placement_options=opts, vgg_loss=loss,
                                     activation_scales="observed" if observed else None)
                    int8, shipped = q["qat"]["files"]["vgg"], q["finetuned"]["vgg"]
                    scales = q["qat"]["settings"]["vgg"]["activation_scales"]
                t_qat = time.perf_counter() - t
                with OrtRunner(int8, intra_op_threads=a.threads, simulated_quantization=True) as r:
                    h_int8 = _features(graph, r, h_img, h_masks)
                # "FP32 kept": the FP32 VGG and its booster ship unchanged beside the INT8 file (calibrate --qat);
                # "QAT float": the fine-tuned float weights ship and the booster learns from them (train --qat).
                ships = [("FP32 kept", ref_boosters[qseed], h_ref)]
                if shipped is not None:
                    export_vgg(shipped, tmp / f"{name}.fp32.onnx", graph)
                    with OrtRunner(tmp / f"{name}.fp32.onnx", intra_op_threads=a.threads) as r:
                        b_feats = _features(graph, r, images[b_rows], b_masks)
                        h_float = _features(graph, r, h_img, h_masks)
                    ships.append(("QAT float", booster_for(b_feats, qseed), h_float))
                for ship, booster, h_float in ships:
                    row = {"seed": seed, "qat_seed": qseed, "vgg_width": cfg.vgg_width, "variant": name,
                           "activation_scales": scales, "ships": ship, "loss": loss,
                           "weight_bits": 8 if w8 else 7, "epochs": epochs, "lr": a.lr if loss else None,
                           "frames": int(len(h_rows)), "labelled": int(labelled.sum()),
                           **measure(booster, h_float, h_int8),
                           "qat_seconds": round(t_qat, 1), "seconds": round(time.perf_counter() - t, 1)}
                    results.append(row)
                    _say(f"seed {seed}/{qseed} {name:11s} {ship:9s} cos {row['cosine_mean']:.4f} "
                         f"(p05 {row['cosine_p05']:.4f}) agreement {row['grade_agreement']:.3f} acc fp32 "
                         f"{row['fp32_accuracy']:.3f} int8 {row['int8_accuracy']:.3f} drift "
                         f"{row['float_vs_before_cosine']:.4f} ({row['qat_seconds']:.0f} s QAT)")
                if a.json:
                    Path(a.json).write_text(json.dumps(results, indent=1))
    print("| VGG width | seed (VGG/QAT) | variant | ships | feature cosine (p05) | grade agreement | FP32 accuracy | "
          "INT8 accuracy | float vs pre-QAT cosine | QAT s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['vgg_width']:g} | {r['seed']}/{r['qat_seed']} | {r['variant']} | {r['ships']} | "
              f"{r['cosine_mean']:.4f} ({r['cosine_p05']:.4f}) | "
              f"{r['grade_agreement']:.3f} | {r['fp32_accuracy']:.3f} | {r['int8_accuracy']:.3f} | "
              f"{r['float_vs_before_cosine']:.4f} | {r['qat_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
