"""The paper's training recipes, arrays in and models out (dataset plumbing lives in `export.recipe`).

Each network sees its images as the runtime will feed them: uint8 * float32(1/255) (runtime.preprocess.to_input's
scale, bit for bit), then its input normalization (`normalization=`: runtime.normalize's unit, minmax or meanstd,
applied with `runtime.normalize.torch_transform`, which is `runtime.normalize.to_input`'s arithmetic); the bundle
records it in the manifest, so the runtime feeds the exported networks exactly what they were trained on.

- UNet: MSE on the sigmoid output against the 0/1 mask, Adam, random horizontal flips; validation IoU at 0.5.
- VGG-19-BN: cross-entropy over the grades (`num_classes`, the paper's 4 by default) on masked kidney images, Adam, random horizontal flips.
- XGBoost on the VGG's Fc2 features: multi:softprob, eta 0.01, max_depth 16, subsample 0.5, lambda 10, mlogloss,
  early stopping on a validation split made BY PATIENT (frames of one patient are near-duplicates: splitting by
  image would leak them across and flatter every validation number). Optional augmented copies of frames (the
  features under masks of nearby thresholds, export.recipe.booster_features) are fitted with their patient's
  training frames and never validated on.

Everything is seeded; CPU threads are capped at two (the machines this runs on are shared).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable

import numpy as np

from runtime import logs, normalize
from runtime.graph import Graph
from runtime.progress import Progress

log = logs.get("train")

NUM_CLASSES = 4
BOOSTER_PARAMS = {  # the paper's XGBoost
    "objective": "multi:softprob", "num_class": NUM_CLASSES, "eta": 0.01, "max_depth": 16, "subsample": 0.5,
    "lambda": 10.0, "eval_metric": "mlogloss",
    # Exact greedy splits: what XGBoost's "auto" chose for data this small when the paper was written, and on a few
    # hundred frames x 1024 features about 2.5x faster than "hist" (whose 256-bin histograms dominate there).
    "tree_method": "exact",
}
BOOSTER_GRID = {"max_depth": (6, 16), "eta": (0.01, 0.05), "subsample": (0.5, 0.8)}
# The paper trained about 100 rounds. More rounds did not raise held-out accuracy on the phantom (the 48-patient
# demo booster cut from 300 to its first 100 rounds scored the same on held-out patients) while tripling the trees
# the compiled booster walks on every frame (its in-pipeline cost is mostly fetching that code into cold caches).
PAPER_ROUNDS = 100


def _threads() -> int:
    import torch
    n = min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def _bar(total: int, desc: str, progress: bool) -> Progress:
    """A bar on a terminal only: logs (CI, systemd) get the one summary line per epoch instead."""
    return Progress(desc, total, enabled=progress, lines=False)


def _rows(arr: np.ndarray, idx: np.ndarray, flip: np.ndarray | None = None):
    """uint8 [N,H,W] rows -> tensor [B,1,H,W], optionally mirrored left-right per sample."""
    import torch
    x = arr[idx]
    if flip is not None and flip.any():
        x = x.copy()
        x[flip] = x[flip, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)


def _batch(images: np.ndarray, idx: np.ndarray, channels: int, flip: np.ndarray | None = None,
           normalization: dict | None = None):
    """uint8 [N,H,W] rows -> float32 [B,C,H,W]: uint8 * float32(1/255) (runtime.preprocess.to_input's scale), gray
    repeated to C channels, then the input normalization (runtime.normalize.torch_transform): what
    runtime.normalize.to_input gives the runtime's networks, bit for bit."""
    t = _rows(images, idx, flip).float().mul_(float(normalize.SCALE))
    t = t.expand(-1, channels, -1, -1).contiguous() if channels > 1 else t
    return normalize.torch_transform(normalization)(t)


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{what} must be uint8 [N,H,W]; got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{what} is empty: there is nothing to train on")
    return images


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image IoU of boolean masks [N,H,W]; an image where both are empty scores 1."""
    pred, truth = pred.reshape(len(pred), -1).astype(bool), truth.reshape(len(truth), -1).astype(bool)
    inter, union = (pred & truth).sum(1), (pred | truth).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def predict_masks(model, images: np.ndarray, batch_size: int = 16, normalization: dict | None = None) -> np.ndarray:
    """Sigmoid probabilities [N,H,W] float32 of a UNet in eval mode (inputs normalized as `normalization`)."""
    import torch
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            idx = np.arange(s, min(s + batch_size, len(images)))
            out.append(model(_batch(images, idx, 1, normalization=normalization))[:, 0].numpy())
    return np.concatenate(out)


def predict_logits(model, images: np.ndarray, batch_size: int = 32, normalization: dict | None = None) -> np.ndarray:
    """Logits [N, classes] of a VGG19BN in eval mode (inputs normalized as `normalization`)."""
    import torch
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            idx = np.arange(s, min(s + batch_size, len(images)))
            out.append(model(_batch(images, idx, model.in_channels, normalization=normalization)).numpy())
    return np.concatenate(out)


def _fit(model, images, targets, loss_fn, *, channels, epochs, batch_size, lr, seed, desc, progress, validate,
         shift: int = 0, normalization: dict | None = None):
    """The loop both networks share: shuffled batches, random flips, Adam with a cosine learning-rate decay;
    `validate(model)` -> dict per epoch. With validation, the epoch with the best first validation score is the
    one returned (a BatchNorm network's validation score can swing from epoch to epoch on small data)."""
    import copy

    import torch
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(images)
    steps = max(1, epochs * ((n + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.02)
    history: dict[str, list] = {"train_loss": [], "epoch_seconds": []}
    best_score, best_state = -np.inf, None
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = rng.permutation(n)
        flips = rng.random(n) < 0.5
        total, seen = 0.0, 0
        with _bar(n, f"{desc} epoch {epoch + 1}/{epochs}", progress) as bar:
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                x = _batch(images, idx, channels, flips[idx], normalization)   # roll below: a permutation
                if shift:  # random translation: the kidney is anywhere in the sector; masked background is zero
                    for k, (dy, dx) in enumerate(rng.integers(-shift, shift + 1, (len(idx), 2))):
                        x[k] = torch.roll(x[k], (int(dy), int(dx)), (1, 2))
                y = targets(idx, flips[idx])
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                bar.advance(len(idx))
                bar.note(loss=f"{total / seen:.4f}")
        history["train_loss"].append(total / seen)
        scores = validate(model)
        for k, v in scores.items():
            history.setdefault(k, []).append(v)
        if scores and next(iter(scores.values())) >= best_score:
            best_score = next(iter(scores.values()))
            best_state = copy.deepcopy(model.state_dict())
            history["best_epoch"] = epoch + 1
        history["epoch_seconds"].append(round(time.perf_counter() - t0, 2))
        if progress:
            extra = "".join(f", {k} {v[-1]:.4f}" for k, v in history.items() if k.startswith("val_"))
            log.info(f"  {desc} epoch {epoch + 1}/{epochs}: loss {total / seen:.4f}{extra} "
                     f"({history['epoch_seconds'][-1]:.1f} s)")
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def train_unet(images: np.ndarray, masks: np.ndarray, *, width: float = 0.25, epochs: int = 8, batch_size: int = 8,
               lr: float = 1e-3, seed: int = 0, val: tuple[np.ndarray, np.ndarray] | None = None,
               progress: bool = True, graph: Graph | None = None, normalization: dict | None = None):
    """UNet on preprocessed uint8 images [N,224,224] and 0/1 masks; MSE on the sigmoid (the paper's loss).
    `normalization`: the UNet's input normalization (runtime.normalize; None = unit, else the graph's).

    Returns (model in eval mode, history: train_loss, epoch_seconds and, with `val`, val_iou per epoch).
    """
    import torch
    from export.models import UNet
    images = _check_images(images, "UNet training images")
    masks = np.asarray(masks)
    if masks.shape != images.shape:
        raise ValueError(f"UNet masks {masks.shape} do not match images {images.shape}")
    _threads()
    torch.manual_seed(seed)
    model = UNet(width=width)
    truth = (masks > 0).astype(np.uint8)
    graph = graph or Graph()   # validation IoU of the masks the gate would make
    if normalization is None:
        normalization = graph.unet_normalization
    normalization = normalize.check(normalization, 1, "UNet input: ")

    def validate(m):
        if val is None or len(val[0]) == 0:
            return {}
        v_img, v_mask = _check_images(val[0], "UNet validation images"), np.asarray(val[1]) > 0
        masks = np.stack([graph.gate(prob).mask for prob in predict_masks(m, v_img, normalization=normalization)])
        return {"val_iou": float(mask_iou(masks, v_mask).mean())}

    return _fit(model, images, lambda idx, flip: _rows(truth, idx, flip).float(), torch.nn.MSELoss(), channels=1,
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, desc="unet", progress=progress,
                validate=validate, normalization=normalization)


def train_vgg(images: np.ndarray, labels: np.ndarray, *, width: float = 0.0625, in_channels: int = 3,
              epochs: int = 8, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
              val: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = True, shift: int = 0,
              normalization: dict | None = None, num_classes: int = NUM_CLASSES):
    """VGG-19-BN on masked uint8 images [N,224,224] (gray, repeated to `in_channels`) and grades 0..num_classes-1.
    `normalization`: the VGG's input normalization (runtime.normalize; None = unit), of the masked image.

    Returns (model in eval mode, history: train_loss, epoch_seconds and, with `val`, val_accuracy per epoch).
    """
    import torch
    from export.models import VGG19BN
    images = _check_images(images, "VGG training images")
    labels = np.asarray(labels).astype(np.int64)
    normalization = normalize.check(normalization, in_channels, "VGG input: ")
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"VGG labels must be {len(images)} integers in 0..{num_classes - 1}")
    _threads()
    torch.manual_seed(seed)
    model = VGG19BN(width=width, in_channels=in_channels, num_classes=num_classes)
    y_all = torch.from_numpy(labels)

    def validate(m):
        if val is None or len(val[0]) == 0:
            return {}
        v_img = _check_images(val[0], "VGG validation images")
        pred = predict_logits(m, v_img, normalization=normalization).argmax(1)
        return {"val_accuracy": float((pred == np.asarray(val[1])).mean())}

    return _fit(model, images, lambda idx, flip: y_all[idx], torch.nn.CrossEntropyLoss(), channels=in_channels,
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, desc="vgg", progress=progress,
                validate=validate, shift=shift, normalization=normalization)


def split_by_patient(labels: np.ndarray, patients: np.ndarray, fraction: float, seed: int,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Boolean 'is validation' per row. Whole patients only, drawn per grade (a patient's most common label) so
    every grade with two or more patients has one on each side. Empty when there is a single patient."""
    rng = np.random.default_rng(seed)
    labels, patients = np.asarray(labels), np.asarray(patients)
    unique = sorted(set(patients.tolist()))
    if len(unique) < 2 or fraction <= 0:
        return np.zeros(len(patients), dtype=bool)
    grade_of = {p: int(np.bincount(labels[patients == p], minlength=num_classes).argmax()) for p in unique}
    held = set()
    for g in range(max(num_classes, int(labels.max(initial=0)) + 1)):
        ps = [p for p in unique if grade_of[p] == g]
        rng.shuffle(ps)
        if len(ps) > 1:
            held.update(ps[:max(1, int(round(len(ps) * fraction)))])
    if not held:  # every grade has a single patient: hold out whole patients regardless of grade
        ps = list(unique)
        rng.shuffle(ps)
        held.update(ps[:max(1, int(round(len(ps) * fraction)))])
    if held == set(unique):
        held.discard(sorted(held)[0])
    return np.array([p in held for p in patients.tolist()])


def _mlogloss(prob: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(prob[np.arange(len(y)), y], 1e-15, 1.0)).mean())


def train_booster(features: np.ndarray, labels: np.ndarray, patients: np.ndarray, *, seed: int = 0,
                  val_fraction: float = 0.25, num_boost_round: int = PAPER_ROUNDS, early_stopping_rounds: int = 30,
                  grid_search: bool = False, val_patients: Iterable | None = None, progress: bool = True,
                  copies: np.ndarray | None = None, num_classes: int = NUM_CLASSES):
    """The paper's XGBoost on Fc2 features [N,1024] with labels 0..num_classes-1 (`num_class` of the booster), validated on held-out patients.

    The held-out patients are drawn here (`split_by_patient`, `val_fraction`, `seed`) unless `val_patients` names
    them, e.g. the patients the networks were validated on, so no validation frame was seen by any training step.

    `copies`: boolean per row, True where the row is an augmented copy of a frame (export.recipe.booster_features:
    the same frame's features under a mask from another threshold). The split is drawn on the other rows, by
    patient, so every copy goes with its patient: a training patient's copies are trained on, a validation
    patient's are left out (validation scores the masks deployment makes, and nothing of a validation patient is
    ever fitted).

    Early stopping on validation mlogloss; the returned booster holds only the trees up to the best iteration, so
    any consumer (xgboost, treelite) predicts with exactly what was validated. With `grid_search`, a small grid
    over max_depth / eta / subsample is fitted and the lowest validation mlogloss wins. With one patient there is
    nothing to hold out: all `num_boost_round` rounds are trained and the validation numbers are None.

    Returns (booster, info): best_iteration, num_trees, val_mlogloss, val_accuracy, params, train_patients,
    val_patients, train_images, val_images (frames' own rows), seconds, `grid` (every fit's params and scores) when
    searched, and with copies train_copies, train_rows (what was fitted) and val_copies_left_out.
    """
    import xgboost as xgb
    t0 = time.perf_counter()
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    y = np.asarray(labels).astype(np.int64)
    patients = np.asarray(patients)
    if x.ndim != 2 or len(x) != len(y) or len(y) != len(patients) or len(y) == 0:
        raise ValueError(f"booster needs features [N,D], labels [N] and patients [N]; got {x.shape}, {y.shape}, "
                         f"{patients.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"booster labels must be in 0..{num_classes - 1}")
    copy = np.zeros(len(y), bool) if copies is None else np.asarray(copies, dtype=bool)
    if copy.shape != y.shape:
        raise ValueError(f"copies must be one boolean per row ({len(y)}); got {copy.shape}")
    if copy.all():
        raise ValueError("every booster row is marked as an augmented copy: give the frames' own rows too")
    if val_patients is not None:
        is_val = np.isin(patients, np.asarray(list(val_patients)))
        if is_val[~copy].all():
            raise ValueError("val_patients holds every patient: nothing would be left to train the booster on")
    else:   # drawn on the frames' own rows, by patient: a patient's copies follow it
        held = set(patients[~copy][split_by_patient(y[~copy], patients[~copy], val_fraction, seed)].tolist())
        is_val = np.array([p in held for p in patients.tolist()], dtype=bool)
    fit_rows, val_rows = ~is_val, is_val & ~copy
    nthread = min(2, os.cpu_count() or 1)
    dtrain = xgb.DMatrix(x[fit_rows], label=y[fit_rows], nthread=nthread)
    dval = xgb.DMatrix(x[val_rows], label=y[val_rows], nthread=nthread) if val_rows.any() else None

    base = dict(BOOSTER_PARAMS, seed=seed, nthread=nthread, num_class=num_classes)
    candidates = [base]
    if grid_search and dval is not None:
        candidates = [dict(base, max_depth=d, eta=e, subsample=s) for d in BOOSTER_GRID["max_depth"]
                      for e in BOOSTER_GRID["eta"] for s in BOOSTER_GRID["subsample"]]
    fits = []
    for i, params in enumerate(candidates):
        desc = f"xgboost {i + 1}/{len(candidates)}" if len(candidates) > 1 else "xgboost"
        fits.append(_fit_booster(xgb, params, dtrain, dval, y[val_rows], num_boost_round, early_stopping_rounds,
                                 desc, progress))
    best = min(fits, key=lambda f: (f["val_mlogloss"] is None, f["val_mlogloss"] or 0.0))
    info = {k: v for k, v in best.items() if k != "booster"}
    info.update({
        "train_patients": sorted(set(patients[~is_val].tolist())),
        "val_patients": sorted(set(patients[is_val].tolist())),
        "train_images": int((~is_val & ~copy).sum()), "val_images": int(val_rows.sum()),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    if copy.any():
        info.update({"train_copies": int((fit_rows & copy).sum()), "train_rows": int(fit_rows.sum()),
                     "val_copies_left_out": int((is_val & copy).sum())})
    if len(fits) > 1:
        info["grid"] = [{k: f[k] for k in ("params", "best_iteration", "val_mlogloss", "val_accuracy")} for f in fits]
    if progress:
        scores = (f"val mlogloss {info['val_mlogloss']:.4f}, val accuracy {info['val_accuracy']:.3f} on "
                  f"{len(info['val_patients'])} held-out patients" if info["val_mlogloss"] is not None
                  else "no held-out patients")
        log.info(f"  xgboost: best iteration {info['best_iteration']} ({info['num_trees']} trees), {scores} "
                 f"({info['seconds']:.1f} s)")
    return best["booster"], info


def _fit_booster(xgb, params, dtrain, dval, y_val, num_boost_round, early_stopping_rounds, desc, progress):
    rounds = num_boost_round
    with _bar(rounds, desc, progress) as bar:
        class _Tick(xgb.callback.TrainingCallback):
            def after_iteration(self, model, epoch, evals_log):
                bar.advance()
                return False

        booster = xgb.train(params, dtrain, num_boost_round=rounds, evals=[(dval, "val")] if dval is not None else (),
                            early_stopping_rounds=early_stopping_rounds if dval is not None else None,
                            callbacks=[_Tick()], verbose_eval=False)
    best_iteration = int(booster.best_iteration) if dval is not None else rounds - 1
    booster = booster[: best_iteration + 1]  # keep only what was validated
    booster.set_attr(best_iteration=str(best_iteration))
    fit = {"booster": booster, "params": {k: v for k, v in params.items() if k != "nthread"},
           "best_iteration": best_iteration, "num_trees": (best_iteration + 1) * int(params["num_class"]),
           "val_mlogloss": None, "val_accuracy": None}
    if dval is not None:
        prob = booster.predict(dval)
        fit["val_mlogloss"] = _mlogloss(prob, y_val)
        fit["val_accuracy"] = float((prob.argmax(1) == y_val).mean())
    return fit
