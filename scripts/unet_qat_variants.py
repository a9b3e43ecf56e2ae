#!/usr/bin/env python3
"""What the UNet's quantization-aware fine-tuning should target: the labels or the FP32 UNet's mask (a benchmark,
not a test).

    .venv/bin/python scripts/unet_qat_variants.py --bundle B --train-data TRAIN --data HELD_OUT
        [--variants bundle,distill,distill-e4] [--vgg-int8 F] [--unet-int8 F] [--threads 2] [--work DIR]
        [--json out.json]

docs/benchmarks.md ("UNet QAT: labels or the FP32 mask") ran it on the `train --qat` demo bundle that
`scripts/qat_seeds.py --seeds 2` writes (its check rejected the INT8 set, left in calibration-rejected/):

    .venv/bin/python scripts/unet_qat_variants.py --bundle out/qat-seeds/bundle-seed2 \\
        --train-data out/demo/data/train --data out/demo/data/heldout --variants bundle,distill,distill-e4 \\
        --threads 2 --work /tmp/u14/work --json r.json

Nothing in the bundle changes and no FP32 network is retrained: the bundle's FP32 UNet, FP32 VGG and booster are the
reference and stay as they are; only the UNet's INT8 file varies, always beside the same INT8 VGG (`--vgg-int8`,
else the bundle's, else calibration-rejected/'s: with `train --qat` the VGG distilled toward the FP32 VGG):

  bundle       the bundle's INT8 UNet (`--unet-int8`, else the bundle's, else calibration-rejected/'s): `train --qat`'s
               fine-tuning on the label masks (the recipe's MSE on the sigmoid)
  mse          `qat_networks(unet_loss="mse")` from the bundle's FP32 UNet: the same loss again, its epochs and lr
  distill      `qat_networks(unet_loss="distill")`: MSE between the fake-quant UNet's probability map and the frozen
               FP32 UNet's on the same (flipped) batch, so the INT8 mask follows the FP32 mask the booster was
               trained on; the bundle's QAT epochs and lr
  distill-e4   the same with twice the epochs (the suffix -eN sets N epochs for mse or distill)
  distill-observed  distillation with the activation scales following the batches (moving-average min/max
               observers, frozen for the last epoch) instead of staying the placement's min-max calibration, the
               default with distillation (the suffix -observed goes last: distill-e4-observed)

The fine-tuning starts from the bundle's FP32 UNet (read back from its unet.onnx into export.models.UNet, folded, and
checked against that file as `calibrate --qat` checks a checkpoint) on the bundle's training patients' frames (those
not among its validation patients), batches drawn with the bundle's seed, as `train --qat` runs it; its placement is
the bundle's. Each INT8 set is then run on two frame sets, `--data` (held-out patients) and the bundle's validation
patients' frames of `--train-data`, against FP32 as `calibrate` compares them (runtime.agreement.graph_outputs /
compare, the bundle's booster): mask IoU INT8 vs FP32, gate agreement, grade agreement (simulated quantization:
onnxruntime with graph optimisations off, what decides; and this CPU's integer kernels, information), and grade
accuracy against the labels of FP32 and of the INT8 set. The INT8 VGG alone (FP32 UNet's masks) is given once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANT = re.compile(r"^(bundle|mse|distill)(?:-e([1-9][0-9]*))?(-observed)?$")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _int8_file(bundle, name: str, given: str | None) -> Path | None:
    from calibration.run import int8_candidate
    return Path(given) if given else int8_candidate(bundle, name)


def unet_from_onnx(bundle, graph, width: float):
    """The bundle's FP32 UNet as a torch model: export.models.UNet of `width` with its BatchNorms folded (what the
    bundle's exporter writes), weights read from unet.onnx by name, then checked against that file on the export's
    parity inputs (export.qat_calibrate.check_same_network)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from export.models import UNet
    from export.qat import fold_batch_norm
    from export.qat_calibrate import check_same_network

    path = bundle.network_file("unet", "fp32")
    model = fold_batch_norm(UNet(width=width))
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    want = model.state_dict()
    missing = [k for k in want if k not in inits or tuple(inits[k].shape) != tuple(want[k].shape)]
    if missing:
        raise ValueError(f"{path} is not a folded UNet of width {width}: no matching initializer for "
                         f"{', '.join(missing[:3])}")
    model.load_state_dict({k: torch.from_numpy(inits[k].copy()) for k in want}, strict=True)
    model.eval()
    check = check_same_network("unet", model, bundle, graph, "--bundle", path)
    return model, check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a `train --qat` bundle")
    ap.add_argument("--train-data", required=True, help="the bundle's training dataset (e.g. out/demo/data/train)")
    ap.add_argument("--data", required=True, help="labelled held-out dataset (e.g. out/demo/data/heldout)")
    ap.add_argument("--variants", default="bundle,distill,distill-e4",
                    help="bundle, mse, distill, each optionally with -eN (N epochs)")
    ap.add_argument("--unet-int8", help="the 'bundle' variant's INT8 UNet (default: the bundle's, else "
                                        "calibration-rejected/)")
    ap.add_argument("--vgg-int8", help="the INT8 VGG of every set (default: the bundle's, else calibration-rejected/)")
    ap.add_argument("--epochs", type=int, help="QAT epochs without -eN (default: the bundle's qat_unet_epochs)")
    ap.add_argument("--lr", type=float, help="QAT learning rate (default: the bundle's qat_lr)")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--work", help="folder that keeps the fine-tuned INT8 UNets (reused when present)")
    ap.add_argument("--json", help="write every figure here")
    a = ap.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if not VARIANT.match(v) or v.startswith("bundle-"):
            ap.error(f"--variants: unknown variant '{v}'; give bundle, mse or distill, the last two optionally "
                     f"with -eN and then -observed")

    import numpy as np
    import torch

    from export.qat import qat_networks
    from export.recipe import load_preprocessed
    from runtime.agreement import CLEAR_GAP, compare, graph_outputs
    from runtime.backends.ort import OrtRunner
    from runtime.booster import Booster
    from runtime.bundle import Bundle, BundleError

    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    try:
        bundle = Bundle.load(a.bundle)
    except BundleError as e:
        _say(f"unet_qat_variants: {e}")
        return 2
    graph = bundle.graph()
    prov = bundle.manifest.get("provenance", {})
    cfg, val = prov.get("config", {}), prov.get("validation_patients")
    if not val or "qat" not in prov:
        _say(f"unet_qat_variants: bundle {a.bundle} names no validation patients or QAT settings in its provenance; "
             f"give a bundle made by `sonoscore train --qat`")
        return 2
    epochs = a.epochs or int(cfg.get("qat_unet_epochs", 2))
    lr = a.lr or float(cfg.get("qat_lr", 1e-4))
    seed = int(cfg.get("seed", 0))
    placement_options = prov["qat"]["settings"]["unet"].get("placement") or {}
    unet_int8, vgg_int8 = _int8_file(bundle, "unet", a.unet_int8), _int8_file(bundle, "vgg", a.vgg_int8)
    for what, f in (("INT8 UNet", unet_int8), ("INT8 VGG", vgg_int8)):
        if f is None or not Path(f).is_file():
            _say(f"unet_qat_variants: no {what} file; give --unet-int8 / --vgg-int8 or a bundle with an INT8 set "
                 f"(installed or in calibration-rejected/)")
            return 2
    booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes, backend="gtil")

    t = time.perf_counter()
    images, masks, grades, patients = load_preprocessed(Path(a.train_data), graph, progress=False)
    held = load_preprocessed(Path(a.data), graph, progress=False)
    is_val = np.isin(patients, np.asarray(val))
    tr = ~is_val
    sets = {"held-out": (held[0], held[2]), "validation": (images[is_val], grades[is_val])}
    _say(f"unet_qat_variants: {int(tr.sum())} training frames, {len(held[0])} held-out, {int(is_val.sum())} "
         f"validation ({time.perf_counter() - t:.0f} s)")

    # -- the INT8 UNets ---------------------------------------------------------------------------------------------
    files: dict[str, Path] = {}
    info: dict[str, dict] = {}
    fp32_unet = None
    for v in variants:
        kind, n, observed = VARIANT.match(v).groups()
        if kind == "bundle":
            files[v], info[v] = Path(unet_int8), {"loss": prov["qat"]["settings"]["unet"].get("loss", "mse"),
                                                  "epochs": prov["qat"]["settings"]["unet"].get("epochs"),
                                                  "lr": prov["qat"]["settings"]["unet"].get("lr"), "seconds": None}
            continue
        e = int(n) if n else epochs
        scales = "observed" if observed else None              # None: qat_networks' default for the loss
        key = hashlib.sha256(bundle.network_file("unet", "fp32").read_bytes()
                             + json.dumps([kind, e, lr, seed, placement_options, scales]).encode()).hexdigest()[:12]
        work = Path(a.work) / f"{v}-{key}" if a.work else None
        info[v] = {"loss": kind, "epochs": e, "lr": lr}
        if work is not None and (work / "unet.int8.onnx").is_file():
            files[v] = work / "unet.int8.onnx"
            info[v].update(json.loads((work / "info.json").read_text()) if (work / "info.json").is_file() else {})
            _say(f"unet_qat_variants: {v}: INT8 UNet from {files[v]}")
            continue
        if fp32_unet is None:
            t = time.perf_counter()
            fp32_unet, check = unet_from_onnx(bundle, graph, float(cfg.get("unet_width", 0.25)))
            _say(f"unet_qat_variants: FP32 UNet read back from {bundle.network_file('unet', 'fp32').name}: within "
                 f"{check['max_abs']:.2g} of it ({time.perf_counter() - t:.0f} s)")
        import tempfile
        out_dir = work or Path(tempfile.mkdtemp(prefix="unet-qat-variants-"))
        t = time.perf_counter()
        q = qat_networks(fp32_unet, None, unet_images=images[tr], unet_masks=(masks[tr] > 0).astype(np.uint8),
                         vgg_images=None, vgg_labels=None, graph=graph, out_dir=out_dir, unet_epochs=e, lr=lr,
                         seed=seed, log=_say, networks=("unet",), placement_options=placement_options,
                         log_prefix=f"unet_qat_variants: {v}", unet_loss=kind, activation_scales=scales)
        info[v]["seconds"] = round(time.perf_counter() - t, 1)
        info[v]["phases"] = q["seconds"]["unet"]
        files[v] = q["qat"]["files"]["unet"]
        (out_dir / "info.json").write_text(json.dumps(info[v]) + "\n")
        _say(f"unet_qat_variants: {v}: {e} epochs in {info[v]['seconds']:.0f} s -> {files[v]}")

    # -- the frame sets -------------------------------------------------------------------------------------------
    fp32_files = (bundle.network_file("unet", "fp32"), bundle.network_file("vgg", "fp32"))
    results: dict = {}
    t_eval = time.perf_counter()
    for set_name, (imgs, grd) in sets.items():
        imgs = list(imgs)
        ts = time.perf_counter()

        def accuracy(o):
            ok = o.accepted & (grd > 0)
            return float((o.probabilities[ok].argmax(1) + 1 == grd[ok]).mean()) if ok.any() else None

        with OrtRunner(fp32_files[0], intra_op_threads=a.threads) as un, \
                OrtRunner(fp32_files[1], intra_op_threads=a.threads) as vg:
            ref = graph_outputs(graph, un, vg, booster, imgs, num_classes=bundle.num_classes)
        with OrtRunner(vgg_int8, intra_op_threads=a.threads, simulated_quantization=True) as vg:
            vgg_alone = compare(ref, graph_outputs(graph, None, vg, booster, imgs, num_classes=bundle.num_classes,
                                                   masks_from=ref))
        rows = {}
        for v in variants:
            row = {}
            for run, sim in (("sim", True), ("cpu", False)):
                with OrtRunner(files[v], intra_op_threads=a.threads, simulated_quantization=sim) as un, \
                        OrtRunner(vgg_int8, intra_op_threads=a.threads, simulated_quantization=sim) as vg:
                    o = graph_outputs(graph, un, vg, booster, imgs, num_classes=bundle.num_classes)
                m = compare(ref, o)
                row[run] = {k: m[k] for k in ("frames_with_kidney", "frames_accepted_by_both", "mask_iou_mean",
                                              "mask_iou_min", "gate_agreement", "feature_cosine_mean",
                                              "grade_agreement", "grade_agreement_clear", "frames_clear")}
                row[run]["accuracy"] = accuracy(o)
            rows[v] = row
            _say(f"  {set_name} {v}: mask IoU {row['sim']['mask_iou_mean']:.4f}, gate {row['sim']['gate_agreement']:.3f}, "
                 f"agreement {row['sim']['grade_agreement']:.3f} (this CPU {row['cpu']['grade_agreement']:.3f}), "
                 f"accuracy {row['sim']['accuracy']:.3f}")
        results[set_name] = {"frames": len(imgs), "fp32_accuracy": accuracy(ref),
                             "vgg_alone_grade_agreement": vgg_alone["grade_agreement"],
                             "vgg_alone_grade_agreement_clear": vgg_alone["grade_agreement_clear"],
                             "vgg_alone_frames_clear": vgg_alone["frames_clear"],
                             "vgg_alone_frames": vgg_alone["frames_accepted_by_both"],
                             "vgg_alone_feature_cosine": vgg_alone["feature_cosine_mean"], "variants": rows}
        _say(f"unet_qat_variants: {set_name}, {len(imgs)} frames in {time.perf_counter() - ts:.0f} s")
    t_eval = time.perf_counter() - t_eval

    def f3(x, d=3):
        return "n/a" if x is None else f"{x:.{d}f}"

    print("| set | INT8 UNet | loss, epochs | mask IoU | gate agreement | grade agreement | FP32 accuracy | "
          "INT8 accuracy | this CPU: agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for set_name, r in results.items():
        for v, row in r["variants"].items():
            s = row["sim"]
            print(f"| {set_name} ({r['frames']}) | {v} | {info[v]['loss']}, {info[v]['epochs']} | "
                  f"{f3(s['mask_iou_mean'], 4)} | {f3(s['gate_agreement'])} | {f3(s['grade_agreement'])} | "
                  f"{f3(r['fp32_accuracy'])} | {f3(s['accuracy'])} | {f3(row['cpu']['grade_agreement'])} |")
    for set_name, r in results.items():
        print(f"{set_name}: INT8 VGG alone (FP32 UNet's masks) grade agreement {f3(r['vgg_alone_grade_agreement'])} "
              f"over {r['vgg_alone_frames']} frames, {f3(r['vgg_alone_grade_agreement_clear'])} over the "
              f"{r['vgg_alone_frames_clear']} where FP32's top grade leads by at least {CLEAR_GAP:g}, feature cosine "
              f"{f3(r['vgg_alone_feature_cosine'], 5)}")
    out = {"bundle": str(bundle.root), "train_data": str(a.train_data), "data": str(a.data),
           "files": {"vgg int8": str(vgg_int8), **{v: str(p) for v, p in files.items()}}, "variants": info,
           "lr": lr, "seed": seed, "sets": results, "threads": a.threads,
           "seconds": {"grading": round(t_eval, 1), "total": round(time.perf_counter() - t_all, 1)}}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    _say(f"unet_qat_variants: {time.perf_counter() - t_all:.0f} s (grading {t_eval:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
