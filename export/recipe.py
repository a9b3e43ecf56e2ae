"""From a labelled dataset (or checkpoints) to a model bundle.

Every image goes through `runtime.preprocess.preprocess`, the function the device runs, and the booster is
trained on features computed by the exported ONNX networks through `runtime.graph`, so what the booster
learns from is what it will see in deployment (predicted masks, not hand-drawn ones).
"""
from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime import logs
from runtime import preprocess as pp
from runtime.bundle import CLASS_NAMES, DEMO_DISCLAIMER, Bundle, write_manifest
from runtime.graph import MASK_THRESHOLD, MIN_MASK_FRACTION, Graph, masked

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
    are the gate, used in training and recorded. `card`: the model card (export.recipe.read_card; None: the default).

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


def export_networks(unet, vgg, out: Path, unet_width: float | None, vgg_width: float | None, graph: Graph) -> dict:
    """ONNX fp32 + fp16 of both networks into `out`, with the graph's tensor names and input normalizations;
    returns the manifest's `networks` section. Each network is a torch module of export.models (exported, parity
    checked against torch) or an `export.checkpoints.OnnxNetwork` (a user's file, copied as it is)."""
    from export.checkpoints import OnnxNetwork
    nets = {}
    for name, model, width in (("unet", unet, unet_width), ("vgg", vgg, vgg_width)):
        if isinstance(model, OnnxNetwork):
            nets[name] = _import_onnx(name, model, out, graph)
        else:
            nets[name] = _export_torch(name, model, out, width, graph)
    check_fp16(out, nets, graph)
    return nets


# FP16 files are checked against FP32 on frames (check_fp16): the largest difference allowed, per network. The
# UNet's is of its kidney probability; the VGG's of its Fc2 features, relative to the largest FP32 feature on the
# same frames (features have no fixed scale). FP16 rounding gives about 1e-3 on both; a network whose activations
# leave FP16's range or lose its precision gives far more.
FP16_TOLERANCE = {"unet": 0.02, "vgg": 0.02}
FP16_FRAMES = 6


def _phantom_images(graph: Graph, count: int = FP16_FRAMES) -> list[np.ndarray]:
    """`count` synthetic kidney frames (one per grade in turn), prepared as the runtime prepares a frame."""
    from runtime.phantom import KidneyPhantom
    from runtime.sources import Frame
    images = []
    for i in range(count):
        pixels = KidneyPhantom(grade=1 + i % 4, seed=100 + i).frame(i * 5).image
        images.append(graph.prepare_source(Frame(i, "fp16-check", 0.0, pixels))[1])
    return images


def _unet_fp16_difference(graph: Graph, images, fp32, fp16) -> tuple[float, list[np.ndarray]]:
    """(max |p16 - p32| of the UNet's probability over the images, the FP32 masks)."""
    worst, masks = 0.0, []
    for image in images:
        a = graph.run(image, fp32, until="gate")
        b = graph.run(image, fp16, until="gate")
        worst = max(worst, float(np.max(np.abs(a.prob.astype(np.float64) - b.prob))))
        masks.append(a.gate.mask)
    return worst, masks


def _vgg_fp16_difference(graph: Graph, images, masks, fp32, fp16) -> tuple[float, float]:
    """(max |f16 - f32| of the VGG's features, that relative to the largest |f32|) on the images under the masks
    (the whole image where a mask is empty: the gate is opened, this measures the network alone)."""
    from dataclasses import replace
    open_gate = replace(graph, min_mask_fraction=0.0)
    worst, scale = 0.0, 0.0
    for image, mask in zip(images, masks):
        mask = mask if mask.any() else np.ones_like(mask)
        a = open_gate.run(image, vgg=fp32, mask=mask, until="vgg").features.astype(np.float64)
        b = open_gate.run(image, vgg=fp16, mask=mask, until="vgg").features
        worst, scale = max(worst, float(np.max(np.abs(a - b)))), max(scale, float(np.max(np.abs(a))))
    return worst, worst / scale if scale > 0 else worst


def check_fp16(out: Path, nets: dict, graph: Graph) -> None:
    """Each network's FP16 file against its FP32 file on FP16_FRAMES synthetic kidney frames, prepared and run
    through the graph as the runtime runs them. The difference is recorded in its manifest entry
    (`parity.fp16_vs_fp32_frames`); a network whose difference exceeds FP16_TOLERANCE loses its FP16 file (the
    bundle then has no FP16 precision) with one warning line naming the network and the figures."""
    from runtime.backends.ort import OrtRunner
    images = _phantom_images(graph)
    with OrtRunner(out / nets["unet"]["files"]["fp32"]) as u32, OrtRunner(out / nets["unet"]["files"]["fp16"]) as u16:
        unet_diff, masks = _unet_fp16_difference(graph, images, u32, u16)
    with OrtRunner(out / nets["vgg"]["files"]["fp32"]) as v32, OrtRunner(out / nets["vgg"]["files"]["fp16"]) as v16:
        vgg_abs, vgg_rel = _vgg_fp16_difference(graph, images, masks, v32, v16)
    measured = {"unet": ("max_abs_probability", unet_diff, {"max_abs_probability": unet_diff}),
                "vgg": ("max_abs_relative", vgg_rel, {"max_abs": vgg_abs, "max_abs_relative": vgg_rel})}
    for name, (measure, value, figures) in measured.items():
        tol = FP16_TOLERANCE[name]
        passed = bool(value <= tol)
        nets[name].setdefault("parity", {})["fp16_vs_fp32_frames"] = _jsonable({
            "frames": len(images), "source": "synthetic kidney phantom", **figures, "measure": measure,
            "tolerance": tol, "passed": passed})
        if not passed:
            fp16 = nets[name]["files"].pop("fp16")
            (out / fp16).unlink(missing_ok=True)
            what = "probability" if name == "unet" else "Fc2 features, relative to their largest value"
            log.info(f"export: warning: the {name}'s FP16 file differs from its FP32 file by {value:.3g} ({what}) on "
                 f"{len(images)} frames, beyond the tolerance {tol:g}; it is left out, so the bundle has no FP16 "
                 f"precision (FP32 and INT8 are unaffected)")


def _normalization(graph: Graph, name: str) -> dict | None:
    return getattr(graph, f"{name}_normalization", None)


def _network_entry(name: str, graph: Graph, channels: int, features: int | None) -> dict:
    from runtime.normalize import input_section
    s = graph.size
    in_name, out_name = ((graph.unet_input, graph.unet_output) if name == "unet" else
                         (graph.vgg_input, graph.vgg_output))
    return {
        "files": {"fp32": f"{name}.onnx", "fp16": f"{name}.fp16.onnx"},
        "input": input_section(in_name, channels, s, _normalization(graph, name)),
        "output": {"name": out_name, "shape": ["N", 1, s, s] if name == "unet" else ["N", int(features)],
                   "dtype": "float32"},
        "channels": channels,
    }


def _export_torch(name: str, model, out: Path, width: float | None, graph: Graph) -> dict:
    from export.onnx_export import export_unet, export_vgg, to_fp16
    t = time.time()
    exporter = export_unet if name == "unet" else export_vgg
    channels = 1 if name == "unet" else int(model.in_channels)
    info = exporter(model, out / f"{name}.onnx", graph)   # the graph's tensor names, size and normalization
    half = to_fp16(out / f"{name}.onnx", out / f"{name}.fp16.onnx", _normalization(graph, name), channels)
    log.info(f"export: {name} -> {name}.onnx, {name}.fp16.onnx in {time.time() - t:.1f} s "
         f"(parity vs torch {info.get('parity_max_abs', float('nan')):.2e})")
    entry = _network_entry(name, graph, channels, None if name == "unet" else model.features_dim)
    entry.update({
        "architecture": (getattr(model, "architecture", "unet-jakeoung-bn-leakyrelu") if name == "unet"
                         else f"vgg19_bn-fc2-{model.features_dim}"),
        "width": float(width if width is not None else getattr(model, "width", 1.0)),
        "opset": info.get("opset"),
        "parity": {"fp32_vs_torch_max_abs": info.get("parity_max_abs"), "fp16_vs_fp32": _jsonable(half)},
    })
    return entry


def _import_onnx(name: str, net, out: Path, graph: Graph) -> dict:
    from export.checkpoints import copy_onnx
    from export.onnx_export import to_fp16
    t = time.time()
    copy_onnx(net, out / f"{name}.onnx")
    half = to_fp16(out / f"{name}.onnx", out / f"{name}.fp16.onnx", _normalization(graph, name), net.channels)
    log.info(f"export: {name} <- {net.path.name} (ONNX as given), {name}.fp16.onnx made in {time.time() - t:.1f} s")
    entry = _network_entry(name, graph, net.channels, net.features)
    if net.static_batch:   # the file's batch is a fixed 1: the pipelines feed one frame at a time
        entry["input"]["shape"][0] = entry["output"]["shape"][0] = 1
    entry.update({"architecture": "onnx", "source_file": net.path.name, "opset": net.opset,
                  "static_batch": net.static_batch, "parity": {"fp16_vs_fp32": _jsonable(half)}})
    return entry


def _booster_section(booster) -> dict:
    """The manifest's `booster` section for an xgboost.Booster saved as booster.ubj."""
    config = json.loads(booster.save_config())["learner"]
    return {"file": "booster.ubj", "format": "xgboost-ubj",
            "num_class": int(config["learner_model_param"].get("num_class", 0)),
            "num_features": int(config["learner_model_param"]["num_feature"]),
            "objective": str(config["objective"]["name"])}


def default_card(name: str, *, demo: bool, data_source: str | None = None) -> dict:
    """The model card a bundle gets when none is given (runtime.bundle's `card` section)."""
    card = {"name": name, "version": _sonoscore_version() if demo else "unversioned"}
    if demo:
        card.update({"description": "IFTA grader trained by sonoscore on its synthetic kidney phantom",
                     "intended_use": "demonstration and testing of the runtime only; not for clinical use",
                     "data_source": data_source or "synthetic kidney phantom (sonoscore sim)"})
    elif data_source:
        card["data_source"] = data_source
    return card


def _sonoscore_version() -> str:
    try:
        import importlib.metadata
        return importlib.metadata.version("sonoscore")
    except Exception:  # noqa: BLE001 (not installed: running from a checkout)
        return "0.1.0"


def write_bundle_manifest(directory: Path, networks: dict, provenance: dict, graph: Graph, *, demo: bool,
                          card: dict | None = None, booster: dict | None = None, classes=None) -> Path:
    """manifest.json for the files in `directory`. `demo`: trained on the synthetic phantom (or random weights):
    the synthetic-data disclaimer. Otherwise the card's own `disclaimer`, if any. `card`: the model card (a
    default one from the name when None); `booster`: the booster section (the paper's when None); `classes`: the
    class names (the paper's four when None); the gate is the graph's."""
    import onnx
    import onnxruntime
    import torch
    import xgboost
    provenance = dict(provenance)
    provenance["libraries"] = {"torch": torch.__version__, "onnx": onnx.__version__,
                               "onnxruntime": onnxruntime.__version__, "xgboost": xgboost.__version__,
                               "numpy": np.__version__, "python": platform.python_version()}
    card = dict(card) if card else default_card("sonoscore-ifta" + ("-synthetic-demo" if demo else ""), demo=demo)
    classes = list(classes) if classes is not None else list(CLASS_NAMES)
    own_disclaimer = card.pop("disclaimer", None)
    manifest = {
        "name": card["name"],
        "disclaimer": DEMO_DISCLAIMER if demo else own_disclaimer,
        "card": card,
        "classes": classes,
        **graph.manifest_sections(),   # preprocess, gate
        "networks": networks,
        "booster": booster or {"file": "booster.ubj", "format": "xgboost-ubj", "num_class": len(classes),
                               "num_features": 1024, "objective": "multi:softprob"},
        "provenance": provenance,
    }
    return write_manifest(directory, manifest)


# -- `sonoscore export` ---------------------------------------------------------------------------------------------

CARD_KEYS = ("name", "version", "description", "changelog", "authors", "license", "intended_use", "data_source",
             "references", "disclaimer")


def read_card(path: Path | str | None, name: str | None, version: str | None, default_name: str) -> dict:
    """The model card from --card FILE (JSON or YAML, keys CARD_KEYS; `licence` is taken for `license`), with
    --name and --version over the file's. One sentence for a file that cannot be read or a field of the wrong
    type."""
    from runtime.errors import UserError
    card: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--card '{path}' does not exist; give a JSON or YAML file with the model card's fields")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--card '{path}' cannot be read as UTF-8 text ({type(e).__name__}); give a JSON or YAML "
                            f"file") from None
        try:
            if path.suffix.lower() == ".json":
                card = json.loads(text)
            else:
                import yaml
                card = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 (json.JSONDecodeError, yaml.YAMLError)
            if isinstance(e, json.JSONDecodeError):
                line = e.lineno
            else:   # yaml marks count lines from 0
                mark = getattr(e, "problem_mark", None)
                line = None if mark is None else mark.line + 1
            at = f" near line {line}" if line is not None else ""
            raise UserError(f"--card '{path}' is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}"
                            f"{at}; fix the file") from None
        if card is None:
            card = {}
        if not isinstance(card, dict):
            raise UserError(f"--card '{path}' holds a {type(card).__name__}, not a mapping of the card's fields "
                            f"({', '.join(CARD_KEYS)})")
        if "licence" in card and "license" not in card:
            card["license"] = card.pop("licence")
        unknown = [str(k) for k in card if k not in CARD_KEYS]
        if unknown:
            raise UserError(f"--card '{path}' has field '{unknown[0]}', which a model card does not have; use "
                            f"{', '.join(CARD_KEYS)}")
    where = f"--card '{path}'" if path else "the model card"

    def text_field(key):
        v = card.get(key)
        if v is None:
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)   # version: 1.0 written without quotes
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"{where} field '{key}' must be text, got {v!r}")
        return v.strip()

    out: dict = {}
    for key in ("name", "version", "description", "license", "intended_use", "data_source", "disclaimer"):
        v = text_field(key)
        if v is not None:
            out[key] = v
    for key in ("authors", "references"):
        v = card.get(key)
        if v is None:
            continue
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise UserError(f"{where} field '{key}' must be a list of text (or one text), got {v!r}")
        out[key] = [x.strip() for x in v]
    log = card.get("changelog")
    if log is not None:
        if not isinstance(log, dict) or not all(isinstance(t, str) for t in log.values()):
            raise UserError(f"{where} field 'changelog' must map each version to its text, got {log!r}")
        out["changelog"] = {str(k): t for k, t in log.items()}
    if name is not None:
        if not str(name).strip():
            raise UserError("--name is empty; give the model's name")
        out["name"] = str(name).strip()
    if version is not None:
        if not str(version).strip():
            raise UserError("--version is empty; give the model's version")
        out["version"] = str(version).strip()
    out.setdefault("name", default_name)
    out.setdefault("version", "unversioned")
    return {"name": out.pop("name"), "version": out.pop("version"), **out}


def _check_out(out: Path) -> None:
    """--out must be a new folder, an empty one, or an existing bundle (replaced once the new one is complete)."""
    from runtime.errors import UserError
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out '{out}' is a file; give a folder for the bundle")
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise UserError(f"--out '{out}' is a folder that holds other files and no bundle; give a new folder (an "
                            f"existing bundle there is replaced once the new one is complete)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """The complete bundle in `tmp` becomes `out`; a bundle already there is replaced only now."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_from_checkpoints(unet_ckpt, vgg_ckpt, booster_path, out: Path, *, random_weights=False,
                            unet_width=None, vgg_width=None, unet_onnx=None, vgg_onnx=None, unet_input=None,
                            vgg_input=None, name=None, version=None, card=None, num_class=None, classes=None,
                            mask_threshold=None, min_mask_fraction=None, unet_output=None, vgg_output=None,
                            reference_frames=None, reference_keep: float = 0.98) -> Path:
    """`sonoscore export`: checkpoints or ONNX files (or random weights, for timing) + an XGBoost model -> bundle.

    Everything is checked before anything is written: the options, the booster (loads, objective, class count),
    the VGG (its Fc2 width is the booster's feature count), the UNet. The bundle is then made in a folder beside
    `out` and moved into place only when complete; on any failure that folder is removed.

    `num_class` / `classes` (`--num-class`, `--classes`): the class names (export.recipe.class_names; the booster
    must predict that many); `mask_threshold` / `min_mask_fraction`: the gate; `unet_output` / `vgg_output`: the
    output of a user's ONNX file to read. The problems of both ONNX files are reported together.
    `reference_frames` (`--reference-frames`): the user's in-scope frames, on which the bundle's scope reference is
    fitted (runtime.scope_fit, keeping `reference_keep` of the held-out ones); without it, one warning line says
    the bundle has none (not for a random-weights timing bundle)."""
    import tempfile
    from export import checkpoints as ck
    from runtime import normalize
    from runtime.errors import UserError
    t0 = time.time()
    out = Path(out)
    _check_out(out)
    unet_norm = normalize.parse(unet_input, "--unet-input") if unet_input else dict(normalize.UNIT)
    vgg_norm = normalize.parse(vgg_input, "--vgg-input") if vgg_input else dict(normalize.UNIT)
    unet_norm = normalize.check(unet_norm, 1, "--unet-input for the 1-channel UNet: ")
    names_of_classes = class_names(num_class, classes)
    gate = dict(zip(("mask_threshold", "min_mask_fraction"), check_gate(mask_threshold, min_mask_fraction)))
    for net, onnx_file, output in (("unet", unet_onnx, unet_output), ("vgg", vgg_onnx, vgg_output)):
        if output is not None and not onnx_file:
            raise UserError(f"--{net}-output names an output of --{net}-onnx; give --{net}-onnx FILE or leave it out")
    if random_weights:
        if unet_ckpt or vgg_ckpt or unet_onnx or vgg_onnx:
            raise UserError("give either checkpoints (or ONNX files) or --random-weights, not both")
        card = read_card(card, name, version, "sonoscore-random-weights-timing")
    else:
        for net, ckpt, onnx_file in (("unet", unet_ckpt, unet_onnx), ("vgg", vgg_ckpt, vgg_onnx)):
            if ckpt and onnx_file:
                raise UserError(f"give the {net} as --{net} (a checkpoint) or --{net}-onnx (an ONNX file), not both")
            if not (ckpt or onnx_file):
                raise UserError(f"export needs the {net}: --{net} CHECKPOINT or --{net}-onnx FILE (or "
                                f"--random-weights for a timing bundle)")
        card = read_card(card, name, version, out.name)
    if booster_path is None:
        raise UserError("export needs --booster, an XGBoost model (.json or .ubj)")
    if reference_frames is not None and not Path(reference_frames).exists():
        raise UserError(f"--reference-frames '{reference_frames}' does not exist; give the folder of your own "
                        f"training or validation kidney frames (images, DICOM or a labelme dataset)")
    booster, binfo = ck.check_booster(booster_path, len(names_of_classes))
    size = Graph().size
    sources: dict = {}
    onnx_nets: dict = {}
    if unet_onnx or vgg_onnx:   # every problem of both files in one pass
        problems: list[str] = []
        for net, onnx_file, option, norm, output in (("vgg", vgg_onnx, "--vgg-onnx", vgg_norm, vgg_output),
                                                     ("unet", unet_onnx, "--unet-onnx", unet_norm, unet_output)):
            if onnx_file:
                onnx_nets[net], found = ck.onnx_problems(onnx_file, net, option, size, norm, output=output)
                problems += found
        if problems:
            raise UserError(ck.join_problems(problems))

    # The VGG first: its Fc2 width is what the booster must take.
    if random_weights:
        import torch
        from export.models import UNet, VGG19BN
        torch.manual_seed(0)
        vgg = VGG19BN(width=vgg_width or 1.0, in_channels=3).eval()
        vw, vch, features, vgg_what = vgg_width or 1.0, 3, vgg.features_dim, "the random-weights VGG"
    elif vgg_onnx:
        vgg = onnx_nets["vgg"]
        vw, vch, features, vgg_what = None, vgg.channels, vgg.features, f"--vgg-onnx '{vgg_onnx}'"
        sources["vgg"] = {"onnx": Path(vgg_onnx).name}
    else:   # recognised and sized from the tensors; the network is built once everything is checked
        vgg = ck.recognise_checkpoint(vgg_ckpt, "vgg", "--vgg")
        vw, vch, features = vgg.width, vgg.channels, vgg.features
        vgg_what, sources["vgg"] = f"--vgg '{vgg_ckpt}'", vgg.source
    ck.check_features(binfo, features, booster_path, vgg_what)
    vgg_norm = normalize.check(vgg_norm, vch, f"--vgg-input for a {vch}-channel VGG: ")
    if random_weights:
        unet, uw = UNet(width=unet_width or 1.0).eval(), unet_width or 1.0
    elif unet_onnx:
        unet, uw = onnx_nets["unet"], None
        sources["unet"] = {"onnx": Path(unet_onnx).name}
    else:
        unet = ck.recognise_checkpoint(unet_ckpt, "unet", "--unet")
        uw, sources["unet"] = unet.width, unet.source
    unet, vgg = (n.build().model if isinstance(n, ck.Recognised) else n for n in (unet, vgg))
    names = {}
    if isinstance(unet, ck.OnnxNetwork):
        names.update(unet_input=unet.input_name, unet_output=unet.output_name)
    if isinstance(vgg, ck.OnnxNetwork):
        names.update(vgg_input=vgg.input_name, vgg_output=vgg.output_name)
    graph = Graph(vgg_channels=vch, unet_normalization=unet_norm, vgg_normalization=vgg_norm, **names, **gate)
    log.info(f"export: booster {Path(booster_path).name} ({binfo['objective']}, {binfo['num_class']} classes, "
         f"{binfo['num_features']} features) fits; VGG {vgg_what} gives {features} features")

    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as e:
        raise UserError(f"--out '{out}': cannot write a folder beside it ({e.strerror or type(e).__name__}); give a "
                        f"folder you can write to") from None
    try:
        nets = export_networks(unet, vgg, tmp, uw, vw, graph)
        booster.save_model(str(tmp / "booster.ubj"))
        prov = {"made_by": "sonoscore export", "random_weights": bool(random_weights),
                "unet_checkpoint": None if random_weights or unet_onnx else Path(unet_ckpt).name,
                "vgg_checkpoint": None if random_weights or vgg_onnx else Path(vgg_ckpt).name,
                "booster": Path(booster_path).name, "sources": sources, "seconds": round(time.time() - t0, 1)}
        if random_weights:
            prov["note"] = "random network weights: for timing only, its grades mean nothing"
        write_bundle_manifest(tmp, nets, prov, graph, demo=bool(random_weights), card=card,
                              booster=_booster_section(booster), classes=names_of_classes)
        if reference_frames is not None:
            from runtime.scope import ScopeError
            from runtime.scope_fit import fit_bundle
            try:
                fit_bundle(tmp, reference_frames, keep=reference_keep, who="export", say=log.info)
            except ScopeError as e:
                raise UserError(f"--reference-frames '{reference_frames}': {e}; nothing written") from None
        Bundle.load(tmp)   # verify what was written
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:   # folders made for --out's parent, innermost first, if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    log.info(f"export: bundle written to {out} in {time.time() - t0:.0f} s")
    if reference_frames is None and not random_weights:
        from runtime.scope_fit import no_reference_warning
        log.info(no_reference_warning(out, "export"))
    return out


def load_checkpoint(path: Path, kind: str):
    """A checkpoint file -> (model, width), the architecture recognised from its keys (export.checkpoints)."""
    from export.checkpoints import load_network
    net = load_network(path, kind, f"--{kind}")
    return net.model, net.width


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
