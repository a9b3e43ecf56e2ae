"""`sonoscore calibrate --qat`: a bundle's INT8 set from quantization-aware training of the checkpoints the bundle
was exported from, on the user's labelled data, judged and installed by calibrate's own accuracy check.

    --unet U.pt / --vgg V.pt (export/checkpoints.py reads them as `sonoscore export` does)
      -> each must BE the bundle's network: the bundle's FP32 ONNX and the checkpoint, run on the export's parity
         inputs (export.onnx_export.parity_inputs, normalized as the bundle feeds the network), agree within
         IDENTITY_ATOL + IDENTITY_RTOL x the output's magnitude (an export differs from its torch model by about
         1e-6); a checkpoint that is not the bundle's is refused in one sentence, before anything is written
      -> --data (runtime.dataset: labelme masks for the UNet, grades for the VGG), preprocessed by the bundle's graph;
         whole patients split as `sonoscore train` splits them (export.train.split_by_patient, a quarter held out)
      -> export.qat.qat_networks on the training patients: placement read from calibration's own Q/DQ file (with
         --method, --conv-transpose, --full-range-weights), fine-tuning (each network distilled from the bundle's
         FP32 network: the UNet's probability map, the VGG's Fc2 features), the Q/DQ files written in a scratch
         folder outside the bundle
      -> calibration.run.calibrate_bundle with those files as the INT8 candidates: the held-out patients' frames,
         each with its patient and grade (study grades per patient, accuracy against the grades), and --frames /
         --check sources checked against FP32 with simulated quantization, the criteria (runtime.agreement.Criteria)
         and --networks (auto included) as for post-training calibration; only what passes is installed.

What changes in the bundle: only what calibrate installs (the INT8 files, int8_reference.npz, the manifest's int8
entries and `calibration` section, whose `qat` records per network the epochs, learning rate, frames, placement and
the checkpoint's file name and sha256). The FP32/FP16 files and the booster stay as they are, and the INT8 files are
judged against those unchanged FP32 files (the networks they were distilled from), and the grades compared are the
unchanged booster's on the INT8 set's features. (`train --qat` distils in the same way, after its FP32 training: its
FP32/FP16 files and booster are the FP32 networks' too.)
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime import logs
from runtime.bundle import sha256_file
from runtime.errors import UserError

log = logs.get("calibrate")

IDENTITY_ATOL = 1e-4      # an FP32 export differs from its torch model by about 1e-6 (test_onnx_export: < 1e-4)
IDENTITY_RTOL = 1e-3
VAL_FRACTION = 0.25       # as `sonoscore train` (export.recipe.TrainConfig.val_fraction)
DEFAULT_EPOCHS = {"unet": 2, "vgg": 3}   # as `sonoscore train --qat`
DEFAULT_LR = 1e-4
VGG_SHIFT = 16            # the training recipe's random translation of the masked VGG images
HELD_OUT = "held-out patients (--data)"


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        log.info(msg)


# -- the checkpoints must be the bundle's networks ------------------------------------------------------------------

def check_same_network(kind: str, model, bundle, graph, option: str, path: Path | str) -> dict:
    """Refuse (UserError) unless `model` (a UNet or VGG19BN read from the checkpoint at `path`) computes what the
    bundle's FP32 ONNX of `kind` computes: the same input channels and outputs, and every output within
    IDENTITY_ATOL + IDENTITY_RTOL x its largest magnitude on four of the export's parity inputs. Returns the figures."""
    import torch

    from export.models import VGGFeaturesAndLogits
    from export.onnx_export import _run_ort, ort_session, parity_inputs

    label = "UNet" if kind == "unet" else "VGG"
    file = bundle.network_file(kind, "fp32")
    what = f"{option} '{path}' is not the {label} bundle {bundle.root} was exported from"
    advice = "give the checkpoint the bundle was exported from, or export a bundle from this one (`sonoscore export`)"
    session = ort_session(file)
    want_channels = session.get_inputs()[0].shape[1]
    channels = 1 if kind == "unet" else int(model.in_channels)
    if isinstance(want_channels, int) and want_channels != channels:
        raise UserError(f"{what}: it takes {channels} input channels where {file.name} takes {want_channels}; {advice}")
    if kind == "unet":
        module, names = model.eval(), [graph.unet_output]
    else:
        module = VGGFeaturesAndLogits(model.eval())
        names = [graph.vgg_output] + (["logits"] if model.head is not None else [])
    have = [o.name for o in session.get_outputs()]
    if sorted(have) != sorted(names):
        raise UserError(f"{what}: it gives {', '.join(names)} where {file.name} gives {', '.join(have)}; {advice}")
    norm = graph.unet_normalization if kind == "unet" else graph.vgg_normalization
    batches = parity_inputs(channels, size=graph.size, normalization=norm)[:2]   # 4 frames: noise, ramp, speckle, disc
    got = _run_ort(session, batches)
    worst = {"max_abs": 0.0, "tolerance": float("inf")}
    with torch.no_grad():
        for x, onnx_out in zip(batches, got):
            out = module(torch.from_numpy(x))
            out = out if isinstance(out, tuple) else (out,)
            for name, t in zip(names, out):
                a, b = t.numpy().astype(np.float64), onnx_out[name].astype(np.float64)
                if a.shape != b.shape:
                    raise UserError(f"{what}: its {name} has shape {list(a.shape)} where {file.name}'s has "
                                    f"{list(b.shape)}; {advice}")
                diff = float(np.max(np.abs(a - b)))
                tol = IDENTITY_ATOL + IDENTITY_RTOL * float(np.max(np.abs(b)))
                if diff > tol:
                    raise UserError(f"{what}: its {name} differs from {file.name}'s by up to {diff:.3g} (an export "
                                    f"of the same weights stays within {tol:.1g}); {advice}")
                if diff - tol > worst["max_abs"] - worst["tolerance"]:
                    worst = {"max_abs": diff, "tolerance": tol}
    return {"file": file.name, "inputs": int(sum(len(x) for x in batches)), **worst}


# -- the labelled data ----------------------------------------------------------------------------------------------

def read_labelled(data: Path, graph, labels, quiet: bool):
    """--data -> (images [N,S,S] uint8, masks [N,S,S] 0/1, grades [N] (0 unknown), patients [N]) preprocessed by
    the bundle's graph (export.recipe.load_preprocessed, the one dataset loop `sonoscore train` uses too); images
    whose kidney annotation is missing are left out (their mask is unknown)."""
    from export.recipe import NoLabelledImages, load_preprocessed
    try:
        return load_preprocessed(Path(data), graph, progress=False, kidney_labels=labels,
                                 say=lambda m: _say(m, quiet), who="calibrate")
    except NoLabelledImages:
        raise UserError(f"--data '{data}' has no image whose kidney is annotated (labelme JSON beside each image, "
                        f"kidney outlined or no kidney shape); the UNet's QAT trains on those masks") from None
    except ValueError as e:
        raise UserError(f"--data: {e}") from None


def _precheck_sources(specs: Sequence[str], option: str) -> None:
    """A --frames/--check path that cannot be opened is refused before minutes of QAT (live sources are left to
    calibrate: opening them connects)."""
    from runtime.sources import SourceError, open_source
    for spec in specs:
        if "://" in spec and not spec.startswith("sim://"):
            continue
        try:
            with open_source(spec, realtime=False):
                pass
        except SourceError as e:
            raise UserError(f"{option}: {e}") from None


# -- the command ----------------------------------------------------------------------------------------------------

def calibrate_qat(bundle_path: str | Path, *, unet: str | None, vgg: str | None, data: str | Path,
                  frames: Sequence[str] = (), check: Sequence[str] = (), networks: tuple[str, ...] | str = "auto",
                  labels=None, unet_epochs: int | None = None, vgg_epochs: int | None = None, lr: float | None = None,
                  seed: int = 0, count: int = 300, holdout: int = 300, max_frames: int = 3000,
                  method: str = "minmax", conv_transpose: str = "sub-pixel", full_range_weights: bool = False,
                  thresholds=None, report: str | Path | None = None, quiet: bool = False) -> dict:
    """`sonoscore calibrate --qat` (module docstring). Every input is checked before anything is written; a bad one
    is a UserError (exit 2) and the bundle is left as it was. Returns calibrate_bundle's result; raises
    calibration.run.CalibrationFailed as calibrate does when a threshold is missed."""
    from calibration.quantize import METHODS
    from calibration.run import calibrate_bundle
    from export import checkpoints as ck
    from runtime.bundle import Bundle
    from runtime.graph import masked

    t0 = time.perf_counter()
    nets = ("unet", "vgg") if networks == "auto" else tuple(n for n in ("unet", "vgg") if n in networks)
    if not nets:
        raise UserError("--networks must name unet, vgg or both, or auto")
    if method not in METHODS:
        raise UserError(f"--method {method} is not one of {', '.join(METHODS)}")
    epochs = {"unet": DEFAULT_EPOCHS["unet"] if unet_epochs is None else int(unet_epochs),
              "vgg": DEFAULT_EPOCHS["vgg"] if vgg_epochs is None else int(vgg_epochs)}
    lr = DEFAULT_LR if lr is None else float(lr)
    if min(epochs[n] for n in nets) < 1:
        raise UserError("--qat-unet-epochs and --qat-vgg-epochs must be at least 1")
    if not lr > 0:
        raise UserError(f"--qat-lr must be above 0 (got {lr:g})")
    if count < 1 or holdout < 1:
        raise UserError("--count and --holdout must be at least 1")
    given = {"unet": unet, "vgg": vgg}
    for name in ("unet", "vgg"):
        if name in nets and not given[name]:
            label, other = ("UNet", "vgg") if name == "unet" else ("VGG", "unet")
            raise UserError(f"calibrate --qat needs --{name} CHECKPOINT, the {label} checkpoint the bundle was "
                            f"exported from (or --networks {other} to quantize the other network alone)")
        if name not in nets and given[name]:
            raise UserError(f"--{name} is not used with --networks {','.join(nets)}; leave it out, or name {name} "
                            f"in --networks")
    bundle = Bundle.load(bundle_path)
    graph = bundle.graph()
    _precheck_sources(frames, "--frames")
    _precheck_sources(check, "--check")

    models, provenance = {}, {}
    for name in nets:
        option, path = f"--{name}", Path(given[name])
        rec = ck.recognise_checkpoint(path, name, option)
        net = rec.build()
        if name == "vgg" and net.model.head is None:
            raise UserError(f"--vgg '{path}' is cut at Fc2 (no classification head), which calibrate --qat does not "
                            f"take; give the checkpoint with its head (classifier.6 or head), or --networks unet")
        same = check_same_network(name, net.model, bundle, graph, option, path)
        _say(f"calibrate: {option} {path.name} is the bundle's {name} (outputs within {same['max_abs']:.1e} of "
             f"{same['file']} on {same['inputs']} inputs)", quiet)
        models[name] = net.model
        provenance[name] = {"checkpoint": {"file": path.name, "sha256": sha256_file(path), "layout": rec.family.key},
                            "checked_against": same}

    images, masks, grades, patients = read_labelled(Path(data), graph, labels, quiet)
    from export.train import split_by_patient
    is_val = split_by_patient(np.maximum(grades - 1, 0), patients, VAL_FRACTION, seed)
    tr = ~is_val
    kidney = graph.kidney_frames(masks, grades)   # the labelled kidneys the gate passes, graded
    if "vgg" in nets and not (kidney & tr).any():
        raise UserError(f"--data '{data}' has no graded image with a kidney the gate passes among its training "
                        f"patients (grades come from labels.csv's image,patient,grade or the labelme flags); the VGG's "
                        f"QAT trains on those grades (or give --networks unet)")
    from calibration.run import FrameSet   # each frame with its patient and grade: study grades, accuracy
    if is_val.any():
        frame_sets = {HELD_OUT: FrameSet.of(images[is_val], patients[is_val], grades[is_val])}
        held_words = f"{len(set(patients[is_val].tolist()))} patients ({int(is_val.sum())} frames) held out"
    else:
        frame_sets = {"training frames (--data has one patient)": FrameSet.of(images, patients, grades)}
        held_words = "one patient only: the check runs on the training frames"
    _say(f"calibrate: QAT on {int(tr.sum())} frames of {len(set(patients[tr].tolist()))} patients of --data "
         f"({held_words}); UNet {epochs['unet'] if 'unet' in nets else '-'} / VGG "
         f"{epochs['vgg'] if 'vgg' in nets else '-'} epochs at lr {lr:g}", quiet)

    placement_options = {"method": method, "conv_transpose": conv_transpose,
                         "full_range_weights": bool(full_range_weights)}
    with tempfile.TemporaryDirectory(prefix="sonoscore-qat-") as work:
        masked_images = (np.stack([masked(i, m) for i, m in zip(images[kidney & tr], masks[kidney & tr])])
                         if "vgg" in nets else None)
        from export.qat import qat_networks
        qat = qat_networks(models.get("unet"), models.get("vgg"), unet_images=images[tr],
                           unet_masks=(masks[tr] > 0).astype(np.uint8), vgg_images=masked_images,
                           vgg_labels=grades[kidney & tr] - 1 if "vgg" in nets else None, graph=graph,
                           out_dir=Path(work), unet_epochs=epochs["unet"], vgg_epochs=epochs["vgg"], lr=lr,
                           seed=seed, vgg_shift=VGG_SHIFT, calibration_frames=count,
                           log=(lambda m: None) if quiet else _say, networks=nets,
                           placement_options=placement_options, log_prefix="calibrate")
        for name in nets:
            qat["qat"]["settings"][name].update({
                **provenance[name], "seed": int(seed), **({"vgg_shift": VGG_SHIFT} if name == "vgg" else {}),
                "made_by": "sonoscore calibrate --qat",
                "patients": {"trained_on": len(set(patients[tr].tolist())),
                             "held_out": len(set(patients[is_val].tolist()))},
                "reference": "the bundle's FP32 file, unchanged (FP32, FP16 and the booster are not re-exported)",
                "seconds": qat["seconds"][name]})
        result = calibrate_bundle(bundle.root, list(frames), check=list(check) or None, method=method,
                                  holdout=holdout, max_frames=max_frames, conv_transpose=conv_transpose,
                                  thresholds=thresholds, report=report, full_range_weights=full_range_weights,
                                  quiet=quiet, networks=networks, qat=qat["qat"], frame_sets=frame_sets)
    _say(f"calibrate: QAT and check took {time.perf_counter() - t0:.0f} s", quiet)
    return result
