"""`sonoscore calibrate`: frames -> INT8 Q/DQ networks in the bundle, accepted only with an accuracy report.

    frames (any source: the scanner's DICOM cine or folder, a video, an image folder, sim://) -> runtime's own
      preprocessing (Pipeline.prepare) -> 224x224 uint8 images, each with its study (the patient where the source
      says it: a labelled dataset's labels.csv, a sim:// source's simulated patient; else the source is one study)
      and its label where one is known (labels.csv's grade, the simulated patient's grade)
      -> a spread-out subset calibrates the UNet (the images) and the VGG (images masked the way deployment
         masks them: FP32 UNet, threshold, gate, cv2.multiply; frames the gate rejects are left out), each fed
         as the bundle's graph feeds it (Graph.unet_feeds / vgg_feeds: the manifest's input normalization)
      -> onnxruntime quantize_static, QDQ, symmetric INT8, per-channel weights (calibration/quantize.py)
      -> the other frames, never used for calibration, and every --check source run through FP32, through FP32
         again with one grey level of seeded noise (the per-frame grade's noise floor), and through each lower
         precision: judged on what reaches the patient (runtime.agreement.Criteria: study grades, per-frame grade
         agreement against FP32's noise floor, gate agreement, mask IoU (accepted frames), accuracy against the
         labels), with the other figures reported beside them (calibration/report.py)
      -> every check met: the INT8 files join the bundle and the manifest records their hashes and provenance;
         a check missed: the files go to <bundle>/calibration-rejected/ and the command says which one failed and
         by how much.

Each INT8 candidate is checked twice on the same frames (docs/design.md "INT8 fidelity: simulated and this CPU"):
with simulated quantization (onnxruntime with graph optimisations off: Q/DQ as float ops, the same on every CPU,
what TensorRT computes up to accumulation order), which decides, and with this CPU's integer kernels, reported for
information (and said in one line when they miss where the simulated figures pass). An installed set gets
reference frames with its simulated outputs (runtime/fidelity.py), which `run --precision int8` checks this CPU on.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calibration.quantize import METHODS, QuantizeResult, quantize_int8, spread_indices
from calibration.report import (Criteria, Outputs, Reference, against, describe, format_table, run_precision,
                                with_noise)
from runtime import logs
from runtime.bundle import Bundle, write_manifest
from runtime.errors import UserError
from runtime.labelme import labels_table as read_labels_table
from runtime.fidelity import REFERENCE_FILE, cpu_flags, cpu_summary, pick_frames, write_reference
from runtime.pipeline import Pipeline
from runtime.sources import SourceError, open_source
from runtime.progress import Progress

log = logs.get("calibrate")

INT8_FILES = {"unet": "unet.int8.onnx", "vgg": "vgg.int8.onnx"}


def with_gain(image: np.ndarray, gain: float) -> np.ndarray:
    """A prepared uint8 frame as a scanner with `gain` times the brightness would give it: pixels times the gain,
    rounded, saturating at 0 and 255 (gain 1: the frame itself)."""
    if gain == 1.0:
        return image
    return np.clip(np.rint(image.astype(np.float64) * gain), 0, 255).astype(np.uint8)


def check_gains(gains, qat: bool = False) -> tuple[float, ...]:
    """The gains as floats; UserError (one sentence) unless each is a finite number above 0 and 1 is among them
    (the frames as they are always calibrate), and, for a QAT set (`qat`), unless 1 is the only one: QAT's ranges
    come from training, not from calibration frames."""
    out = []
    for g in gains:
        try:
            g = float(g)
        except (TypeError, ValueError):
            raise UserError(f"--unet-gains holds '{g}', not a gain; give numbers above 0 separated by commas, "
                            f"such as 1,1.6") from None
        if not (np.isfinite(g) and g > 0):
            raise UserError(f"--unet-gains holds {g:g}, not a gain; give numbers above 0 separated by commas, "
                            f"such as 1,1.6")
        out.append(g)
    if 1.0 not in out:
        raise UserError(f"--unet-gains {','.join(f'{g:g}' for g in out)} leaves out the frames as they are; "
                        f"include 1, such as 1,{out[0]:g}")
    out = tuple(dict.fromkeys(out))
    if qat and out != (1.0,):
        raise UserError("--unet-gains sets the ranges calibration measures, and a QAT set has its ranges from "
                        "training; leave --unet-gains out with --qat")
    return out


class CalibrationFailed(UserError):
    """A lower precision missed an accuracy threshold; the message names it."""


@dataclass
class FrameSet:
    """Preprocessed 224x224 uint8 images read from one or more sources, each with its study and label."""
    images: list[np.ndarray] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)     # opaque source id of each image
    unreadable: int = 0
    sources: list[dict] = field(default_factory=list)    # per source: opaque id, kind, frames read
    studies: list[str] = field(default_factory=list)     # each image's study: source id, + patient where known
    labels: list[int] = field(default_factory=list)      # each image's grade 1..C where known, else 0

    @classmethod
    def of(cls, images, studies=None, labels=None) -> "FrameSet":
        """Images already preprocessed (a labelled dataset's, say) as a set: `studies` (a key per image, e.g. the
        patient; None: one study) and `labels` (grade per image, 0 or None unknown; None: no labels)."""
        images = list(images)
        n = len(images)
        return cls(images=images, origins=[""] * n,
                   studies=[str(s) for s in studies] if studies is not None else [""] * n,
                   labels=[int(g or 0) for g in labels] if labels is not None else [0] * n)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "FrameSet":
        return FrameSet([self.images[i] for i in idx], [self.origins[i] for i in idx], 0, self.sources,
                        [self.studies[i] for i in idx], [self.labels[i] for i in idx])


def labels_table(spec: str) -> dict[Path, tuple[str, int]] | None:
    """A folder source's labels.csv (runtime.labelme.labels_table), or None for any other source."""
    if "://" in spec or not Path(spec).is_dir():
        return None
    return read_labels_table(spec)


def read_frames(specs: list[str], pipe, *, max_frames: int, quiet: bool = False) -> FrameSet:
    """Every readable frame of every source, preprocessed exactly as `sonoscore run` preprocesses it, with its study
    and label: a folder with a labels.csv (in it or above it: a labelled dataset) gives each listed image its
    patient and grade; a sim:// source is one simulated patient with its grade; any other source is one study."""
    out = FrameSet()
    for spec in specs:
        try:
            source = open_source(spec, realtime=False)
        except SourceError as e:
            raise UserError(str(e)) from None
        n0 = len(out.images)
        table = labels_table(spec)
        total = source.total
        step = -(-total // max_frames) if total else 1   # every step-th frame: at most max_frames, spread out
        if not quiet:
            log.info(f"calibrate: reading frames from {source.source_id}"
                 + (f" ({total} frames{', every ' + str(step) + 'th' if step > 1 else ''})" if total else "")
                 + (f"; {source.annotations} annotation files beside their images skipped"
                    if getattr(source, "annotations", 0) else ""))
        with source:
            for k, frame in enumerate(source):
                if len(out.images) - n0 >= max_frames:
                    break
                if k % step:
                    continue
                if frame.error is not None or frame.pixels is None:
                    out.unreadable += 1
                    continue
                try:
                    _, image, _ = pipe.prepare(frame)
                except Exception:  # a frame the runtime could not preprocess would not be scored either
                    out.unreadable += 1
                    continue
                out.images.append(image)
                out.origins.append(source.source_id)
                study, label = source.source_id, int(frame.meta.get("truth_grade") or 0)
                if table is not None and frame.source_file is not None:
                    patient, label = table.get((Path(spec) / frame.source_file).resolve(), (None, 0))
                    study = source.source_id if patient is None else f"{source.source_id} {patient}"
                out.studies.append(study)
                out.labels.append(label)
        out.sources.append({"source_id": source.source_id, "kind": type(source).__name__,
                            "frames": len(out.images) - n0})
    return out


def _versions() -> dict[str, str]:
    v = {"python": platform.python_version()}
    for pkg in ("onnxruntime", "onnx", "numpy", "opencv-python-headless"):
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


REJECTED_DIR = "calibration-rejected"   # where a failed check leaves its INT8 files, for inspection


def int8_candidate(bundle: Bundle, name: str) -> Path | None:
    """A bundle's INT8 file of network `name`: the installed one, else the one a failed check left in
    REJECTED_DIR; None when there is neither (the measurement scripts' default INT8 file)."""
    if name in bundle.int8_networks:
        return bundle.network_file(name, "int8")
    rejected = Path(bundle.root) / REJECTED_DIR / f"{name}.int8.onnx"
    return rejected if rejected.is_file() else None


# How each ConvTranspose weight is held (the manifest's int8.conv_transpose_weights), by the file's form: calibrate's
# own files, and QAT's (export.qat: trained on one per-tensor grid, written as its placement says).
CONV_TRANSPOSE_WEIGHTS = {
    "sub-pixel": "per-channel (sub-pixel Conv + DepthToSpace)",
    "per-tensor": "per-tensor",
    "qat-sub-pixel": "per-tensor scale on every channel of the sub-pixel Conv + DepthToSpace (QAT)",
    "qat-per-tensor": "per-tensor (QAT)",
}


def calibrate_bundle(bundle_path: str | Path, frames: list[str], *, check: list[str] | None = None,
                     method: str = "minmax", count: int = 300, holdout: int = 300, max_frames: int = 3000,
                     conv_transpose: str = "sub-pixel", thresholds: Criteria | None = None,
                     precisions: tuple[str, ...] = ("int8", "fp16"), report: str | Path | None = None,
                     full_range_weights: bool = False, timing_only: bool = False, quiet: bool = False,
                     networks: tuple[str, ...] | str = ("unet", "vgg"), qat: dict | None = None,
                     frame_sets: dict[str, FrameSet | list[np.ndarray]] | None = None,
                     unet_gains: tuple[float, ...] = (1.0,)) -> dict:
    """Calibrate, report, and (when every check of `thresholds`, a runtime.agreement.Criteria, holds on every set)
    install the INT8 networks into the bundle.

    `networks` names the ones to quantize; one left out stays FP32 in the INT8 set (its manifest entry for int8 names
    the FP32 file), which is mixed precision as TensorRT builds it from a strongly typed network. "auto" quantizes
    both and also checks the set with the VGG alone in INT8 (`int8-vgg`, against the same FP32 reference): both
    are installed when they pass, else the VGG alone when that passes, else nothing.

    `qat`: the INT8 candidates come from quantization-aware training (export.qat), not from calibrating here:
    {"files": {net: Q/DQ file}, "info": {net: export_qdq's info}, "settings": {...}} (export.qat.qat_networks). No
    frame is used for calibration then: every frame of `frames` is held out for the check (up to `holdout`).
    `frame_sets`: more check sets, name -> images already preprocessed as the runtime preprocesses them, as a
    `FrameSet` (with its studies and labels: `FrameSet.of`) or a list (one study, no labels).
    `unet_gains`: the UNet calibrates on each calibration frame at each of these gains (`with_gain`: the prepared
    pixels times the gain, saturating at 255), so its activation ranges also cover a scanner set brighter (or
    darker) than the calibration frames; the VGG, whose input is min-max normalized, calibrates on the frames as
    they are. The check runs on the frames as they are."""
    from runtime.backends import make_runner
    from runtime.booster import Booster

    if method not in METHODS:
        raise UserError(f"--method {method} is not one of {', '.join(METHODS)}")
    if count < 1 or holdout < 1:
        raise UserError("--count and --holdout must be at least 1")
    gains = check_gains(unet_gains, qat=qat is not None)
    auto = networks == "auto"
    networks = ("unet", "vgg") if auto else tuple(n for n in ("unet", "vgg") if n in networks)
    if not networks:
        raise UserError("--networks must name unet, vgg or both")
    thresholds = thresholds or Criteria()
    if qat is not None and not set(networks) <= set(qat["files"]):
        raise UserError("quantization-aware training gave no INT8 file for "
                        + " and ".join(n for n in networks if n not in qat["files"]))
    bundle = Bundle.load(bundle_path)
    root = bundle.root
    t_start = time.perf_counter()
    shape = Pipeline(bundle)  # not entered: only its preprocessing is used here
    data = read_frames(frames, shape, max_frames=max_frames, quiet=quiet)
    n = len(data.images)
    if qat is not None and n + sum(map(len, (frame_sets or {}).values())) < 1 and not check:
        raise UserError("the INT8 accuracy check needs frames to check on; give a folder, video, DICOM cine or "
                        "sim:// source")
    if qat is None and n < 4:
        raise UserError(f"calibration needs at least 4 readable frames, the source(s) gave {n}; give a folder, "
                        f"video, DICOM cine or sim:// source with more frames")
    calib_idx = spread_indices(n, min(count, n // 2)) if qat is None else []
    rest = sorted(set(range(n)) - set(calib_idx))
    hold_idx = [rest[i] for i in spread_indices(len(rest), min(holdout, len(rest)))]
    calib_images = [data.images[i] for i in calib_idx]

    graph = bundle.graph()
    unet_inputs = [graph.unet_feeds(with_gain(img, g))[graph.unet_input] for g in gains for img in calib_images]
    with make_runner("ort", bundle.network_file("unet", "fp32")) as unet32:
        vgg_inputs, rejected = [], 0
        for img in calib_images if qat is None else ():
            # the VGG's input as deployment makes it: FP32 UNet, gate, masked image (Graph.run up to the gate)
            r = graph.run(img, unet32, until="gate")
            if not r.gate.accepted:
                if not timing_only:
                    rejected += 1
                    continue
                # timing only (random weights): the whole image calibrates the VGG
                r = graph.run(img, mask=np.ones_like(r.gate.mask), until="gate")
            vgg_inputs.append(r.vgg_feeds[graph.vgg_input])
    if not vgg_inputs and qat is None:
        raise UserError(f"none of the {len(calib_images)} calibration frames passed the quality gate (kidney mask "
                        f"below {graph.min_mask_fraction:.0%} of the frame), so the VGG cannot be calibrated; "
                        f"give frames that show the kidney")
    if not quiet and qat is not None:
        held = ([f"{len(hold_idx)} frames of {', '.join(s['source_id'] for s in data.sources)}"] if frames else []) \
            + [f"{len(v)} frames of {k}" for k, v in (frame_sets or {}).items()]
        log.info(f"calibrate: INT8 from quantization-aware training, checked against FP32 on "
             f"{', '.join(held) or 'the --check frames'}")
    elif not quiet:
        log.info(f"calibrate: {n} frames read ({data.unreadable} could not be read, or would not be scored: "
             f"docs/calibration.md); {len(calib_idx)} "
             f"calibrate the UNet"
             + (f" (each at gains {', '.join(f'{g:g}' for g in gains)}: {len(unet_inputs)} inputs)"
                if gains != (1.0,) else "") + ", "
             + (f"{len(vgg_inputs)} of them pass the gate and calibrate the VGG ({rejected} rejected); "
                if not timing_only else f"{len(vgg_inputs)} calibrate the VGG (timing only: a frame the gate "
                                         f"rejects as the whole image); ")
             + f"{len(hold_idx)} held out for the accuracy check; method {method}")

    work = root / ".calibration-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    results = {}
    for name, input_name, inputs in (("unet", graph.unet_input, unet_inputs), ("vgg", graph.vgg_input, vgg_inputs)):
        if name not in networks:
            continue
        if qat is not None:
            shutil.copyfile(qat["files"][name], work / INT8_FILES[name])
            i = qat["info"][name]
            placed = (qat.get("settings", {}).get(name, {}).get("placement") or {}).get("conv_transpose")
            results[name] = QuantizeResult(work / INT8_FILES[name], "qat", 0,
                                           f"qat-{placed}" if placed else conv_transpose, i["weight_bits"],
                                           i["quantized_ops"], i["float_ops"], i["opset"])
            continue
        prog = Progress(f"calibrating {name}", len(inputs), unit="frame", enabled=not quiet, indent="  ")
        t = time.perf_counter()
        try:
            results[name] = quantize_int8(bundle.network_file(name, "fp32"), work / INT8_FILES[name],
                                          input_name, inputs, method=method, conv_transpose=conv_transpose,
                                          full_range_weights=full_range_weights, progress=prog.update)
        finally:
            prog.close()
        if not quiet:
            r = results[name]
            log.info(f"calibrate: {name} -> {INT8_FILES[name]} in {time.perf_counter() - t:.0f} s (INT8 weights: "
                 f"{_counts(r.quantized_ops)}; float weights: {_counts(r.float_ops) or 'none'})")

    # -- accuracy against FP32 on frames that did not calibrate ------------------------------------------------
    sets: dict[str, FrameSet] = {"held-out": data.subset(hold_idx)} if frames else {}
    sets.update({k: v if isinstance(v, FrameSet) else FrameSet.of(v) for k, v in (frame_sets or {}).items()})
    check_sets = []
    for spec in check or []:
        extra = read_frames([spec], shape, max_frames=max_frames, quiet=quiet)
        key = f"check {extra.sources[0]['source_id']}"
        sets[key] = extra
        check_sets.append({**extra.sources[0], "unreadable": extra.unreadable})
    files = {p: {net: (work / INT8_FILES[net] if p == "int8" and net in networks
                       else bundle.network_file(net, "fp32" if p == "int8" else p))
                 for net in ("unet", "vgg")}
             for p in precisions if p == "int8" or p in bundle.precisions}
    if auto and not timing_only:
        files["int8-vgg"] = {"unet": bundle.network_file("unet", "fp32"), "vgg": work / INT8_FILES["vgg"]}
    accuracy: dict[str, dict] = {}        # what decides: the simulated figures for an INT8 candidate
    this_cpu: dict[str, dict] = {}        # the INT8 candidates with this CPU's integer kernels, for information
    simulated: dict[tuple[str, str], Outputs] = {}
    failures: list[str] = []
    cpu = cpu_summary()
    if not timing_only:
        booster = Booster.load(bundle.booster_file, num_class=bundle.num_classes)
        for set_name, fs in sets.items():
            images = fs.images
            if not images:
                failures.append(f"{set_name}: no readable frames to check against")
                continue
            fp32_files = {n: bundle.network_file(n, "fp32") for n in ("unet", "vgg")}
            reference = run_precision(bundle, fp32_files, booster, images, label=f"{set_name} fp32", quiet=quiet)
            levels = thresholds.grade_noise
            noisy = (run_precision(bundle, fp32_files, booster, with_noise(images, levels), quiet=quiet,
                                   label=f"{set_name} fp32 with {levels} grey level(s) of noise")
                     if levels > 0 else None)
            labels = np.array([g if 1 <= g <= bundle.num_classes else 0 for g in fs.labels], int)
            ref = Reference(reference, bundle.num_classes, studies=fs.studies, noisy=noisy, noise_levels=levels,
                            labels=labels if labels.any() else None)
            accuracy[set_name], this_cpu[set_name] = {}, {}
            for p, pfiles in files.items():
                masks = reference if pfiles["unet"] == fp32_files["unet"] else None
                int8 = p.startswith("int8")
                other = run_precision(bundle, pfiles, booster, images, quiet=quiet, masks_from=masks,
                                      label=f"{set_name} {p}" + (" simulated" if int8 else ""), simulated=int8)
                metrics = against(ref, other)
                metrics["criteria"] = thresholds.judge(metrics)
                missed = [describe(r, metrics) for r in metrics["criteria"] if not r["passed"]]
                metrics["passed"] = not missed
                accuracy[set_name][p] = metrics
                failures += [f"{p} on {set_name}: {m}" for m in missed]
                if not int8:
                    continue
                simulated[(set_name, p)] = other
                kernels = run_precision(bundle, pfiles, booster, images, quiet=quiet, masks_from=masks,
                                        label=f"{set_name} {p} this CPU ({cpu})")
                m_cpu = against(ref, kernels)
                m_cpu["criteria"] = thresholds.judge(m_cpu)
                m_cpu["missed"] = [describe(r, m_cpu) for r in m_cpu["criteria"] if not r["passed"]]
                m_cpu["passed"] = not m_cpu["missed"]
                this_cpu[set_name][p] = m_cpu
        if not quiet:
            log.info(format_table(accuracy, thresholds, this_cpu, f"this CPU: {cpu}"))

    fallback = None
    if auto and not timing_only:
        full_missed = [f for f in failures if f.startswith("int8 ")]
        vgg_missed = [f for f in failures if f.startswith("int8-vgg ")]
        if full_missed and not vgg_missed:   # the UNet's INT8 is what misses: install the VGG's alone
            networks, fallback = ("vgg",), full_missed
            failures = [f for f in failures if f not in full_missed]
            if not quiet:
                log.info(f"calibrate: INT8 UNet + VGG missed ({full_missed[0]}); the VGG alone in INT8 passes, so the "
                     f"UNet stays FP32 in the INT8 set (its INT8 file is kept in {root / REJECTED_DIR})")
        elif not full_missed:
            failures = [f for f in failures if f not in vgg_missed]
    int8_ok = timing_only or not any(f.startswith("int8 ") or f.startswith("int8-vgg ") for f in failures)
    chosen = "int8-vgg" if fallback else "int8"     # the candidate whose files are installed
    # The installed set passes on the simulated figures; where this CPU's kernels miss on the same frames, say so.
    cpu_missed = [f"{m} on {s}" for s, per in this_cpu.items() if chosen in per and accuracy[s][chosen]["passed"]
                  for m in per[chosen]["missed"]] if int8_ok else []
    fidelity = {"decided_by": "not checked (timing only)" if timing_only else "simulated",
                "simulated": f"onnxruntime {_versions().get('onnxruntime', '?')} CPU provider with graph "
                             f"optimisations off: QuantizeLinear/DequantizeLinear as float ops, no integer kernels",
                "this_cpu": cpu, "cpu_flags": list(cpu_flags()), "this_cpu_missed": cpu_missed}
    if cpu_missed and not quiet:
        log.info(f"calibrate: on this CPU ({cpu}) onnxruntime's INT8 kernels miss {cpu_missed[0]}"
             + (f" (and {len(cpu_missed) - 1} more)" if len(cpu_missed) > 1 else "")
             + "; the INT8 set is installed all the same: the simulated figures decide, and they pass (this CPU's "
               "integer kernels differ from them; a GPU/TensorRT target computes the simulated figures up to "
               "accumulation order)")
    out = {
        "bundle": str(root), "method": method, "conv_transpose": conv_transpose, "int8_networks": list(networks),
        "unet_gains": list(gains),
        "networks_choice": "auto" if auto else "given", "int8_both_missed": fallback,
        "frames": {"read": n, "unreadable": data.unreadable, "calibration": len(calib_idx),
                   "calibration_vgg": len(vgg_inputs), "rejected_by_gate": rejected, "held_out": len(hold_idx)},
        "sources": data.sources, "check_sources": check_sets,
        "networks": {k: {"file": INT8_FILES[k], "int8_weights": r.quantized_ops, "float_weights": r.float_ops,
                         "opset": r.opset} for k, r in results.items()},
        "criteria": asdict(thresholds), "accuracy": accuracy, "accuracy_this_cpu": this_cpu,
        "fidelity": fidelity, "accuracy_checked": not timing_only,
        "passed": int8_ok and not failures, "failures": failures, "versions": _versions(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if qat is not None:
        out["method"] = "qat"
        out["qat"] = qat.get("settings", {})
    if int8_ok:
        reference = None if timing_only else _reference(bundle, files.get(chosen), booster, sets, simulated, chosen,
                                                        work / REFERENCE_FILE)
        for name in ("unet", "vgg"):
            if name in networks:
                shutil.move(str(work / INT8_FILES[name]), str(root / INT8_FILES[name]))
            else:  # an earlier calibration's file for it is no longer what int8 means in this bundle
                (root / INT8_FILES[name]).unlink(missing_ok=True)
        manifest = dict(bundle.manifest)
        if reference is not None:
            shutil.move(str(work / REFERENCE_FILE), str(root / REFERENCE_FILE))
            manifest["int8_reference"] = {**reference, "cpu_at_calibration": cpu}
        else:   # an earlier calibration's reference is not this INT8 set's
            manifest.pop("int8_reference", None)
            (root / REFERENCE_FILE).unlink(missing_ok=True)
        for name in ("unet", "vgg"):
            net = manifest["networks"][name]
            if name not in networks:
                net["files"]["int8"] = net["files"]["fp32"]
                net["int8"] = {"format": "fp32 (not quantized: calibrate --networks left it out)"}
                continue
            net["files"]["int8"] = INT8_FILES[name]
            r = results[name]
            net["int8"] = {"format": "onnx-qdq", "activations": "int8 symmetric per-tensor",
                           "weights": "int8 symmetric per-channel (output-channel axis)",
                           "weight_bits": r.weight_bits,
                           "conv_transpose_weights": CONV_TRANSPOSE_WEIGHTS.get(r.conv_transpose, "float")
                           if "ConvTranspose" in r.quantized_ops or "ConvTranspose" in r.float_ops else "n/a",
                           "biases": "float", "int8_weights": r.quantized_ops, "float_weights": r.float_ops,
                           "fidelity": fidelity["decided_by"]}
            if name == "unet" and qat is None:
                net["int8"]["calibration_gains"] = list(gains)
            if qat is not None:   # the scales and integer weights are the QAT model's (export.qat), not calibrated
                net["int8"]["qat"] = {**qat.get("settings", {}).get(name, {}), "file_info": qat["info"][name]}
        manifest["calibration"] = {
            "networks": list(networks), "method": method if qat is None else "qat", "frames": len(calib_idx), "frames_vgg": len(vgg_inputs),
            "sources": data.sources, "accuracy_checked": not timing_only,
            "accuracy": {s: {p: {k: v for k, v in m.items() if k in _SUMMARY} for p, m in ps.items()}
                         for s, ps in accuracy.items()},
            "accuracy_this_cpu": {s: {p: {k: v for k, v in m.items() if k in _SUMMARY} for p, m in ps.items()}
                                  for s, ps in this_cpu.items()},
            "fidelity": fidelity,
            "criteria": asdict(thresholds), "versions": out["versions"],
            **({"qat": qat.get("settings", {})} if qat is not None else {}),
            "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest(root, manifest)
        dropped = [n for n in ("unet", "vgg") if n not in networks and (work / INT8_FILES[n]).is_file()]
        if fallback and dropped:   # `auto` left a quantized network out: its file is kept for inspection
            rejected_dir = root / REJECTED_DIR
            shutil.rmtree(rejected_dir, ignore_errors=True)
            rejected_dir.mkdir()
            for name in dropped:
                shutil.move(str(work / INT8_FILES[name]), str(rejected_dir / INT8_FILES[name]))
            out["rejected_files"] = str(rejected_dir)
        shutil.rmtree(work, ignore_errors=True)
    else:
        rejected_dir = root / REJECTED_DIR
        if rejected_dir.exists():
            shutil.rmtree(rejected_dir)
        work.rename(rejected_dir)
        out["rejected_files"] = str(rejected_dir)
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(out, indent=2) + "\n")
    if failures:
        where = (f"the INT8 files were not added to the bundle (kept in {root / REJECTED_DIR} for "
                 f"inspection)" if not int8_ok else "the INT8 files passed and were added to the bundle")
        raise CalibrationFailed(f"accuracy check failed: {failures[0]}"
                                + (f" (and {len(failures) - 1} more, see the report)" if len(failures) > 1 else "")
                                + f"; {where}; calibrate on more varied frames, try --method entropy or "
                                  f"percentile, quantize only the network that keeps its accuracy (--networks "
                                  f"vgg), or calibrate on the scanner's own frames (docs/calibration.md)")
    if not quiet:
        log.info(f"calibrate: INT8 networks added to {root} in {out['seconds']:.0f} s"
             + ("" if not timing_only else " (timing only: accuracy not checked)"))
    return out


def _reference(bundle, files, booster, sets, simulated, chosen, path: Path) -> dict | None:
    """The installed set's reference frames (runtime/fidelity.py): up to REFERENCE_FRAMES frames of the held-out
    set (else the first set checked), those its simulated run accepted first, with their simulated outputs."""
    names = [s for s in sets if (s, chosen) in simulated]
    if files is None or not names:
        return None
    set_name = "held-out" if "held-out" in names else names[0]
    idx = pick_frames(simulated[(set_name, chosen)].accepted)
    images = [sets[set_name].images[i] for i in idx]
    out = run_precision(bundle, files, booster, images, quiet=True, simulated=True, keep_prob=True)
    write_reference(path, images, out.prob, out.features)
    return {"file": REFERENCE_FILE, "frames": len(images), "set": set_name,
            "outputs": "simulated INT8 (onnxruntime with graph optimisations off)"}


_SUMMARY = ("frames", "studies", "study_agreement", "grade_agreement", "grade_floor", "near_tie_share",
            "gate_agreement", "mask_iou_accepted_mean", "mask_iou_mean", "feature_cosine_mean", "accuracy",
            "accuracy_reference", "passed")


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(d.items()))
