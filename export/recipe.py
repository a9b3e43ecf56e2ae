"""From a labelled dataset to a model bundle (`sonoscore train`; from a user's checkpoints or ONNX files:
export/bundle_export.py, `sonoscore export`; the bundle's ONNX files and manifest: export/bundle_files.py).

Every image goes through `runtime.preprocess.preprocess`, the function the device runs, and the booster is
trained on features computed by the exported ONNX networks through `runtime.graph`, so what the booster
learns from is what it will see in deployment (predicted masks, not hand-drawn ones).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime import logs
from runtime import preprocess as pp
from runtime.bundle import CLASS_NAMES, Bundle
from runtime.graph import MASK_THRESHOLD, MIN_MASK_FRACTION, Graph, masked
from export.bundle_files import _booster_section, _jsonable, export_networks, write_bundle_manifest

log = logs.get("export")


@dataclass
class TrainConfig:
    unet_width: float = 0.25
    vgg_width: float = 0.0625
    vgg_channels: int = 3
    unet_epochs: int = 4
    vgg_epochs: int = 24
    vgg_lr: float = 5e-4
    vgg_shift: int = 16       # random translation (pixels) of the masked training images
    seed: int = 0
    val_fraction: float = 0.25
    grid_search: bool = False
    crimmins_iterations: int = 1
    demo: bool | None = None  # trained on the phantom: the bundle carries the synthetic-data disclaimer; None: True
                              # when the data folder is one `sonoscore sim` wrote (runtime.dataset.is_synthetic)
    kidney_labels: tuple[str, ...] | None = None  # `train --label kidney=...`; None: runtime.dataset's default variants
    qat: bool = False         # `train --qat`: quantization-aware fine-tuning after FP32 training (export.qat), INT8 set
    qat_unet_epochs: int = 2  # from it, checked as `calibrate --networks auto` checks
    qat_vgg_epochs: int = 3
    qat_lr: float = 1e-4
    qat_unet_loss: str = "distill"  # the UNet's QAT loss (export.qat.qat_networks' unet_loss): "distill" toward the
                                    # FP32 UNet's probability map (that FP32 UNet ships), or "mse" on the labels (the
                                    # fine-tuned float weights ship)
    qat_activation_scales: str = "calibration"  # QAT's activation scales (qat_networks' activation_scales): the
                                    # min-max calibration's, fixed, or "observed" (moving-average observers)
    # The booster also learns from each training frame's features under masks of these thresholds of the same UNet
    # probability map (booster_features; the gate's own threshold is always used, and validated on). () = the
    # paper's recipe: the gate's masks only.
    booster_mask_thresholds: tuple[float, ...] = ()
    # What the bundle grades and how its gate decides (`train --num-class / --classes`, `--mask-threshold`,
    # `--min-mask-fraction`): the manifest's `classes`, `booster.num_class` and `gate`.
    classes: tuple[str, ...] = tuple(CLASS_NAMES)
    mask_threshold: float = MASK_THRESHOLD
    min_mask_fraction: float = MIN_MASK_FRACTION
    scope_keep: float = 0.98  # the share of the validation patients' in-scope frames the scope limits keep


def class_names(num_class: int | None = None, names=None) -> list[str]:
    """The bundle's class names from `--num-class N` and/or `--classes NAME,NAME,...` (a list or one comma-separated
    text): the paper's four IFTA names by default, "grade 1".."grade N" for another count without names. One
    sentence (UserError) for names that are empty, repeated, fewer than 2 or more than 64, or a count they contradict."""
    from runtime.errors import UserError
    if isinstance(names, str):
        names = names.split(",")
    if names is not None:
        names = [str(n).strip() for n in names]
        if any(not n for n in names):
            raise UserError(f"--classes '{','.join(names)}' has an empty name; give one name per grade, in grade "
                            f"order, joined by commas")
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise UserError(f"--classes names '{dup}' twice; give each grade its own name")
        if num_class is not None and int(num_class) != len(names):
            raise UserError(f"--num-class {num_class} but --classes names {len(names)}; give one name per class "
                            f"(or leave one of them out)")
        num_class = len(names)
    if num_class is None:
        return list(CLASS_NAMES)
    num_class = int(num_class)
    if not 2 <= num_class <= 64:
        raise UserError(f"--num-class {num_class} is outside 2..64; a grader has at least 2 classes")
    if names is not None:
        return names
    return list(CLASS_NAMES) if num_class == len(CLASS_NAMES) else [f"grade {g}" for g in range(1, num_class + 1)]


def check_gate(mask_threshold: float | None, min_mask_fraction: float | None) -> tuple[float, float]:
    """(`--mask-threshold`, `--min-mask-fraction`) with the defaults for those not given; one sentence for a value
    outside [0, 1) / [0, 1]."""
    import math
    from runtime.errors import UserError
    t = MASK_THRESHOLD if mask_threshold is None else float(mask_threshold)
    f = MIN_MASK_FRACTION if min_mask_fraction is None else float(min_mask_fraction)
    if not (math.isfinite(t) and 0.0 <= t < 1.0):
        raise UserError(f"--mask-threshold {t:g} is outside [0, 1); give the UNet's kidney probability above which a "
                        f"pixel is kidney (default {MASK_THRESHOLD})")
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        raise UserError(f"--min-mask-fraction {f:g} is outside [0, 1]; give the share of the image the kidney mask "
                        f"must cover for a frame to be scored (default {MIN_MASK_FRACTION})")
    return t, f


class NoLabelledImages(ValueError):
    """The dataset has no image whose kidney is annotated (`load_preprocessed`)."""


def load_preprocessed(data_dir: Path, graph: Graph, progress: bool = True, kidney_labels=None, *,
                      say=None, who: str = "train"):
    """Dataset -> (images [N,S,S] uint8, masks [N,S,S] 0/1, grades [N] (0 = unknown), patients [N]): the one
    preprocessing loop over a labelled dataset (`sonoscore train`, `calibrate --qat`). Each image goes through the
    graph's own source preparation (`Graph.prepare_source`, as a frame of an image source) and its labelled mask is
    cut and resized by the same region (`preprocess.crop_mask`). `kidney_labels`: the labelme labels that are the
    kidney (None: runtime.dataset's default variants). Images whose kidney annotation is missing (runtime.dataset)
    are left out: their mask is unknown; the dataset's summary line (through `say`, default stderr, prefixed
    `who`) names them. ValueError for a dataset that cannot be read, NoLabelledImages when no image is left."""
    from runtime.labelme import read_dataset
    from runtime.sources import Frame
    say = log.info if say is None else say
    samples = read_dataset(Path(data_dir), labels=kidney_labels)
    say(f"{who}: {samples.summary_line()}")
    samples = [s for s in samples if not s.kidney_missing]
    if not samples:
        raise NoLabelledImages(f"dataset {data_dir} has no labelled images")
    images, masks, grades, patients = [], [], [], []
    for i, s in enumerate(samples):
        _, img, region = graph.prepare_source(Frame(i, "dataset", 0.0, s.load_gray()))
        images.append(img)
        masks.append(pp.crop_mask(s.load_mask(), region, graph.size))
        grades.append(s.grade or 0)
        patients.append(s.patient)
        if progress and ((i + 1) % 100 == 0 or i + 1 == len(samples)):
            say(f"  preprocessed {i + 1}/{len(samples)} images")
    return np.stack(images), np.stack(masks), np.array(grades), np.array(patients)


def train_bundle(data_dir: Path, out: Path, cfg: TrainConfig, progress: bool = True, *,
                 unet_input: dict | None = None, vgg_input: dict | None = None, check: list[str] | None = None,
                 report: Path | None = None, thresholds=None, card: dict | None = None) -> Path:
    """The paper's recipes end to end: UNet (MSE), VGG-19-BN (cross-entropy), XGBoost on VGG Fc2 features.
    `unet_input` / `vgg_input`: each network's input normalization (runtime.normalize; None = unit), used in
    training and recorded in the manifest (`sonoscore train --unet-input / --vgg-input`). `cfg.classes` names the
    grades (their count is the VGG head's and the booster's `num_class`; a dataset grade above it is refused, and
    each grade without a training example gets a warning line); `cfg.mask_threshold` / `cfg.min_mask_fraction`
    are the gate, used in training and recorded. `card`: the model card (export.card.read_card; None: the default).

    With `cfg.qat`: after FP32 training, quantization-aware fine-tuning of each network (export.qat.qat_networks);
    the FP32/FP16 files are exported from the networks it returns (the FP32 UNet and the FP32 VGG whose probability
    map and Fc2 features the INT8 files were distilled to reproduce; with `cfg.qat_unet_loss="mse"` the UNet's
    fine-tuned weights), the booster learns from that VGG's features, and
    the Q/DQ files with the trained scales become the bundle's INT8 set after calibrate's accuracy check
    (calibration.run.calibrate_bundle, `--networks auto`, thresholds unchanged) on the validation patients' frames
    and on `check` sources (held-out data); the report goes to `report` (default <bundle>/calibration_report.json);
    `thresholds`: runtime.agreement.Criteria (None: calibrate's defaults)."""
    from export.train import split_by_patient, train_booster, train_unet, train_vgg
    t_start = time.time()
    classes = class_names(names=list(cfg.classes))
    n_classes = len(classes)
    mask_threshold, min_mask_fraction = check_gate(cfg.mask_threshold, cfg.min_mask_fraction)
    graph = Graph(crimmins_iterations=cfg.crimmins_iterations, vgg_channels=cfg.vgg_channels,
                  unet_normalization=unet_input, vgg_normalization=vgg_input, mask_threshold=mask_threshold,
                  min_mask_fraction=min_mask_fraction)
    log.info(f"train: reading and preprocessing {data_dir}")
    try:
        extra = booster_thresholds(graph, cfg.booster_mask_thresholds)
        images, masks, grades, patients = load_preprocessed(data_dir, graph, progress, cfg.kidney_labels)
    except ValueError as e:
        from runtime.errors import UserError
        raise UserError(str(e)) from None
    if not (grades > 0).any():
        from runtime.errors import UserError
        raise UserError(f"dataset {data_dir} has no grades (labels.csv with image,patient,grade is needed to train)")
    if grades.max() > n_classes:
        from runtime.errors import UserError
        raise UserError(f"dataset {data_dir} has grade {int(grades.max())} but the bundle grades {n_classes} "
                        f"classes; give --num-class (or --classes) for every grade the data holds")
    # Whole patients, spread over grades: the same split the booster validates on.
    is_val = split_by_patient(np.maximum(grades - 1, 0), patients, cfg.val_fraction, cfg.seed, n_classes)
    tr, va = ~is_val, is_val
    for g in sorted(set(range(1, n_classes + 1)) - set(grades[tr].tolist())):
        log.info(f"train: warning: grade {g} ({classes[g - 1]}) has no examples in the training data; the bundle "
             f"will never learn to give it")
    log.info(f"train: {len(images)} images of {len(set(patients))} patients; "
         f"{len(set(patients[va]))} patients held for validation")

    log.info(f"train: UNet width {cfg.unet_width}, {cfg.unet_epochs} epochs (MSE loss)")
    unet, unet_hist = train_unet(images[tr], masks[tr], width=cfg.unet_width, epochs=cfg.unet_epochs,
                                 seed=cfg.seed, val=(images[va], masks[va]) if va.any() else None,
                                 progress=progress, graph=graph, normalization=graph.unet_normalization)
    # The VGG learns from labelled kidneys the gate would pass, under their labelled masks.
    kidney = graph.kidney_frames(masks, grades)
    masked_images = np.stack([masked(i, m) for i, m in zip(images, masks)])
    log.info(f"train: VGG-19-BN width {cfg.vgg_width}, {cfg.vgg_epochs} epochs (cross-entropy) on "
         f"{int((kidney & tr).sum())} masked kidney images")
    vgg, vgg_hist = train_vgg(masked_images[kidney & tr], grades[kidney & tr] - 1, width=cfg.vgg_width,
                              in_channels=cfg.vgg_channels, epochs=cfg.vgg_epochs, seed=cfg.seed,
                              lr=cfg.vgg_lr, shift=cfg.vgg_shift, num_classes=n_classes,
                              val=(masked_images[kidney & va], grades[kidney & va] - 1) if (kidney & va).any() else None,
                              progress=progress, normalization=graph.vgg_normalization)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    qat_work, qat = out.with_name(out.name + ".qat-work"), None
    if cfg.qat:
        from export.qat import qat_networks
        shutil.rmtree(qat_work, ignore_errors=True)
        log.info(f"train: quantization-aware fine-tuning (UNet {cfg.qat_unet_epochs}, VGG {cfg.qat_vgg_epochs} epochs)")
        qat = qat_networks(unet, vgg, unet_images=images[tr], unet_masks=(masks[tr] > 0).astype(np.uint8),
                           vgg_images=masked_images[kidney & tr], vgg_labels=grades[kidney & tr] - 1, graph=graph,
                           out_dir=qat_work, unet_epochs=cfg.qat_unet_epochs, vgg_epochs=cfg.qat_vgg_epochs,
                           lr=cfg.qat_lr, seed=cfg.seed, vgg_shift=cfg.vgg_shift, log=log.info,
                           unet_loss=cfg.qat_unet_loss, activation_scales=cfg.qat_activation_scales)
        unet, vgg = qat["unet"], qat["vgg"]   # the networks the FP32/FP16 files and the booster use
    tmp.mkdir(parents=True)
    nets = export_networks(unet, vgg, tmp, cfg.unet_width, cfg.vgg_width, graph)

    # Booster features from the exported networks, the deployed way: predicted mask, gate, masked image.
    from runtime.backends.ort import OrtRunner
    log.info("train: VGG features of every gated kidney image through the exported ONNX networks"
         + (f", also under the masks of thresholds {', '.join(f'{t:g}' for t in extra)}" if extra else ""))
    booster_masks = "predicted"
    t_feats = time.time()
    with OrtRunner(tmp / nets["unet"]["files"]["fp32"]) as un, OrtRunner(tmp / nets["vgg"]["files"]["fp32"]) as vg:
        rows, row_thresholds, feats = booster_features(graph, images, np.flatnonzero(kidney), un, vg, extra)
        copies = row_thresholds != graph.mask_threshold
        chosen = rows[~copies]
        if len(set(grades[chosen])) < 2 or len(chosen) < 8:
            # An undertrained UNet (a few epochs on a few images) may pass no frame through the gate. The booster
            # still needs examples: use the labelled masks, and say so in the manifest.
            log.info("train: warning: the UNet passed too few frames through the gate; the booster is trained on "
                 "features of the labelled masks instead")
            rows = np.flatnonzero(kidney)
            feats = np.stack([graph.run(images[i], vgg=vg, mask=masks[i], until="vgg").features[0] for i in rows])
            copies = np.zeros(len(rows), bool)
            booster_masks = "labelled"
    t_feats = time.time() - t_feats
    labels, pats = grades[rows] - 1, patients[rows]
    log.info(f"train: XGBoost (multi:softprob, eta 0.01, max_depth 16, subsample 0.5, lambda 10) on "
         f"{int((~copies).sum())} frames" + (f" and {int(copies.sum())} copies under other thresholds' masks "
                                               f"(training patients' copies only are fitted)" if copies.any() else ""))
    val_patients = sorted(set(patients[va].tolist())) or None
    booster, booster_info = train_booster(feats, labels, pats, seed=cfg.seed, val_patients=val_patients,
                                          grid_search=cfg.grid_search, progress=progress, copies=copies,
                                          num_classes=n_classes)
    booster.save_model(str(tmp / "booster.ubj"))
    booster_info["mask_thresholds"] = ([graph.mask_threshold, *extra] if booster_masks == "predicted"
                                       else [graph.mask_threshold])
    booster_info["feature_seconds"] = round(t_feats, 1)
    provenance = {
        "made_by": "sonoscore train", "data": str(data_dir), "images": int(len(images)),
        "patients": int(len(set(patients))), "validation_patients": sorted(set(patients[va].tolist())),
        "config": asdict(cfg), "unet_history": unet_hist, "vgg_history": vgg_hist,
        "booster": _jsonable(booster_info), "booster_trained_on_masks": booster_masks, "seconds": round(time.time() - t_start, 1),
    }
    if qat is not None:
        provenance["qat"] = {"settings": _jsonable(qat["qat"]["settings"]), "seconds": qat["seconds"]}
    from runtime.dataset import is_synthetic
    demo = is_synthetic(data_dir) if cfg.demo is None else cfg.demo
    write_bundle_manifest(tmp, nets, provenance, graph, demo=demo, booster=_booster_section(booster), card=card,
                          classes=classes)
    # The scope reference (runtime.scope_fit): training patients' in-scope frames, limits on the validation ones.
    from runtime.scope_fit import fit_or_warn
    fit_or_warn(tmp, data_dir, held_out=sorted(set(patients[va].tolist())), labels=cfg.kidney_labels,
                keep=cfg.scope_keep, who="train", shown=out, say=log.info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    Bundle.load(out)  # verify what was written
    log.info(f"train: bundle written to {out} in {time.time() - t_start:.0f} s")
    if qat is not None:
        try:
            from calibration.run import FrameSet   # each frame with its patient and grade: study grades, accuracy
            _install_qat(out, qat["qat"], {"validation patients": FrameSet.of(images[va], patients[va], grades[va])}
                         if va.any() else {"training frames (no patient held out)": FrameSet.of(images, patients,
                                                                                                  grades)},
                         check, report, thresholds)
        finally:
            shutil.rmtree(qat_work, ignore_errors=True)
    return out


def booster_thresholds(graph: Graph, thresholds) -> tuple[float, ...]:
    """The extra mask thresholds the booster learns from (TrainConfig.booster_mask_thresholds): sorted, without the
    gate's own; each must lie strictly between 0 and 1 (ValueError naming it otherwise)."""
    out = set()
    for t in thresholds or ():
        t = float(t)
        if not 0.0 < t < 1.0:
            raise ValueError(f"booster mask threshold {t:g} is outside (0, 1); give thresholds of the UNet's kidney "
                             f"probability, e.g. 0.45,0.55")
        if t != graph.mask_threshold:
            out.add(t)
    return tuple(sorted(out))


def booster_features(graph: Graph, images: np.ndarray, frames, unet, vgg, thresholds=()):
    """The booster's training rows, the deployed way: for each of `frames` (indices into `images`), `Graph.run` up
    to the VGG (the UNet's probability map, the gate at the graph's threshold and, when it accepts the frame, the
    VGG features of the image under that mask). With `thresholds` (others than the gate's), the same frame's
    features under the mask of the same probability map at each of them too (the graph with that threshold, given
    the map), an augmented copy where the gate would also accept that mask; a frame the gate rejects at its own
    threshold gets no row at all.

    Returns (rows: the frame index of each row, row_thresholds: the threshold of its mask, features [R, F])."""
    from dataclasses import replace
    others = [(float(t), replace(graph, mask_threshold=float(t)))
              for t in thresholds if t != graph.mask_threshold]
    rows, row_thresholds, feats = [], [], []
    for i in frames:
        r = graph.run(images[i], unet, vgg, until="vgg")
        if not r.gate.accepted:   # deployment never scores it
            continue
        rows.append(i)
        row_thresholds.append(graph.mask_threshold)
        feats.append(r.features[0])
        for t, at_t in others:
            copy = at_t.run(images[i], vgg=vgg, prob=r.prob, until="vgg")   # as the gate compares (float32)
            if copy.gate.accepted:
                rows.append(i)
                row_thresholds.append(t)
                feats.append(copy.features[0])
    width = feats[0].shape[-1] if feats else 0
    return (np.array(rows, dtype=np.int64), np.array(row_thresholds, dtype=np.float64),
            np.stack(feats) if feats else np.zeros((0, width), np.float32))


def _install_qat(bundle: Path, qat: dict, frame_sets: dict, check: list[str] | None, report: Path | None,
                 thresholds=None) -> None:
    """The QAT Q/DQ files become the bundle's INT8 set through calibrate's own accuracy check and installation
    (`--networks auto`: both networks when they pass, else the VGG alone, else none); one line says which."""
    from calibration.run import CalibrationFailed, calibrate_bundle
    report = Path(report) if report else bundle / "calibration_report.json"
    t = time.time()
    missed = None
    try:
        calibrate_bundle(bundle, [], check=check, frame_sets=frame_sets, networks="auto", qat=qat, report=report,
                         thresholds=thresholds)
    except CalibrationFailed as e:
        missed = str(e).split(";")[0]
    result = json.loads(report.read_text())
    nets = Bundle.load(bundle).int8_networks
    if list(nets) == ["unet", "vgg"]:
        what = "both networks in INT8"
    elif list(nets) == ["vgg"]:
        what = f"the VGG alone in INT8, the UNet stays FP32 (both in INT8 missed: {result['int8_both_missed'][0]})"
    else:
        what = "no INT8 set installed, the bundle is FP32/FP16"
    log.info(f"train: QAT INT8 check on {', '.join(result['accuracy']) or 'no frames'}: {what}"
         + (f"; {missed}" if missed else "") + f"; report {report} ({time.time() - t:.0f} s)")
