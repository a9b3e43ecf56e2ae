#!/usr/bin/env python3
"""Kidney length against the phantom's truth for a UNet trained again (docs/benchmarks.md, "Kidney length against
the phantom's truth"): how much of the length error is the training run, and how the contrast across the mask's
outline relates to it. A benchmark, not a test. Run from the repo root:

    .venv/bin/python scripts/unet_length_variants.py --loss mse --epochs 4 [--data out/demo/data/train]
                                                     [--bundle out/demo/bundle] [--patients 6] [--frames 200]
    .venv/bin/python scripts/unet_length_variants.py --bundle-unet      # the bundle's own UNet, no training

The UNet (width 0.25, seed 0, the demo's optimiser and schedule: export/train.py `_fit`) is trained on --data
(preprocessed by the bundle's graph) with the loss given: `mse` (the recipe's, MSE on the sigmoid) or `dice`
(binary cross-entropy + soft Dice). Each accepted frame of the simulated patients (seeds 7001..) is measured as
runtime/measure.py measures it; printed per patient: the share within 5 %, the median error, and the median outline
contrast (median grey level of a 5-pixel ring outside the outline minus that of a 5-pixel ring inside it, on the
preprocessed image); then the share within 5 % of the frames kept when frames below a contrast are refused, and of
the frames runtime/measure.py's outline rule measures (the probability's spread across the outline and the outline's
contrast, as the pipelines apply it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def dice_bce(out, y):
    import torch
    bce = torch.nn.functional.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), y)
    inter = (out * y).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (out.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    return bce + dice.mean()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "out" / "demo" / "bundle"))
    ap.add_argument("--data", default=str(ROOT / "out" / "demo" / "data" / "train"))
    ap.add_argument("--loss", choices=("mse", "dice"), default="mse")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bundle-unet", action="store_true", help="measure the bundle's own UNet instead")
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=7001)
    ap.add_argument("--dump", help="write each measured frame's seed, error, outline spread and contrast (.npz)")
    a = ap.parse_args(argv)

    import cv2

    from runtime.bundle import Bundle
    from runtime.measure import kidney_size, largest_component, outline_contrast, outline_spread
    from runtime.pipeline import Pipeline
    from runtime.sources.sim import SimSource

    bundle = Bundle.load(a.bundle)
    frames = []
    with Pipeline(bundle, threads=2) as pipe:
        graph = pipe.graph
        for seed in range(a.first_seed, a.first_seed + a.patients):
            for f in SimSource(seed=seed, fps=0, frames=a.frames, realtime=False):
                _, image, region = pipe.prepare_source(f)
                prob = graph.segment(pipe.unet, image) if a.bundle_unet else None
                frames.append((seed, image, region, f.pixels.shape, f.meta, prob))
    if not a.bundle_unet:
        import torch

        from export import train as T
        from export.models import UNet
        from export.recipe import load_preprocessed
        images, masks, _, _ = load_preprocessed(Path(a.data), graph, progress=False)
        T._threads()
        torch.manual_seed(0)
        loss = torch.nn.MSELoss() if a.loss == "mse" else dice_bce
        truth = (masks > 0).astype(np.uint8)
        t0 = time.perf_counter()
        model, _ = T._fit(UNet(width=0.25), images, lambda idx, flip: T._rows(truth, idx, flip).float(), loss,
                          channels=1, epochs=a.epochs, batch_size=8, lr=1e-3, seed=0, desc="unet", progress=False,
                          validate=lambda m: {}, normalization=graph.unet_normalization)
        print(f"trained {a.loss}, {a.epochs} epochs on {len(images)} images in {time.perf_counter() - t0:.0f} s")
        probs = T.predict_masks(model, np.stack([f[1] for f in frames]), normalization=graph.unet_normalization)
        frames = [f[:5] + (p,) for f, p in zip(frames, probs)]

    k = np.ones((3, 3), np.uint8)
    seeds, errors, contrast, ruled, spreads, contrasts = [], [], [], [], [], []
    for seed, image, region, shape, meta, prob in frames:
        gate = graph.gate(prob)
        true_mm = meta.get("truth_kidney_length_mm")
        if not gate.accepted or true_mm is None:
            continue
        length, _, _ = kidney_size(gate.mask, region, shape, meta)
        if length is None:
            continue
        kept, _, _ = kidney_size(gate.mask, region, shape, meta, prob=prob, image=image,
                                 threshold=graph.mask_threshold)                 # the outline rule's verdict
        ruled.append(kept is not None)
        comp = largest_component(gate.mask)
        if a.dump:                       # the two quantities the rule limits, as runtime/measure.py computes them
            sx, sy = (region.x1 - region.x0) / 224, (region.y1 - region.y0) / 224
            spreads.append(outline_spread(prob, graph.mask_threshold, length, region, (sx, sy),
                                          meta["pixel_spacing_rc_mm"]))
            contrasts.append(outline_contrast(image, comp))
        inner = comp.astype(bool) & ~cv2.erode(comp, k, iterations=5).astype(bool)
        outer = cv2.dilate(comp, k, iterations=5).astype(bool) & ~comp.astype(bool) & (image > 0)
        seeds.append(seed)
        errors.append(length / true_mm - 1.0)
        contrast.append(float(np.median(image[outer])) - float(np.median(image[inner])))
    seeds, e, c, r = np.array(seeds), np.array(errors), np.array(contrast), np.array(ruled, bool)
    print(f"{len(e)} accepted frames measured: within 5 % {np.mean(np.abs(e) <= 0.05):.1%}, "
          f"median |error| {np.median(np.abs(e)):.2%}, worst {np.abs(e).max():.1%}")
    for s in sorted(set(seeds)):
        m = seeds == s
        print(f"  seed {s}: {m.sum()} frames, within 5 % {np.mean(np.abs(e[m]) <= 0.05):.0%}, "
              f"median error {np.median(e[m]):+.1%}, outline contrast median {np.median(c[m]):.1f}")
    for t in (10, 15, 20, 25):
        m = c >= t
        if m.any():
            print(f"  contrast >= {t}: {m.mean():.0%} of frames kept, {np.mean(np.abs(e[m]) <= 0.05):.1%} of them "
                  f"within 5 %, worst {np.abs(e[m]).max():.1%}")
    if a.dump:
        np.savez(a.dump, seed=seeds, error=e, spread=np.array(spreads), contrast=np.array(contrasts))
    if r.any():
        print(f"  runtime/measure.py's outline rule: {r.mean():.0%} of frames measured, "
              f"{np.mean(np.abs(e[r]) <= 0.05):.1%} of them within 5 %, worst {np.abs(e[r]).max():.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
