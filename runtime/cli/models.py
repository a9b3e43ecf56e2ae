"""`sim`, `train`, `export`, `scope` and `calibrate`: the model side (datasets, training, bundles, the scope
reference, INT8)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.cli.common import EXIT_ACCURACY, EXIT_OK, LABEL_HELP, UserError, kidney_labels


def cmd_sim(args: argparse.Namespace) -> int:
    from runtime.dataset import write_dataset
    if args.patients < 1:
        raise UserError("--patients must be at least 1")
    out = write_dataset(Path(args.out), args.patients, seed=args.seed, frames_per_patient=args.frames_per_patient)
    print(f"wrote a synthetic dataset of {args.patients} patients to {out}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from export.card import read_card
    from export.recipe import TrainConfig, check_gate, class_names, train_bundle
    mask_threshold, min_mask_fraction = check_gate(args.mask_threshold, args.min_mask_fraction)
    cfg = TrainConfig(unet_width=args.unet_width, vgg_width=args.vgg_width, unet_epochs=args.unet_epochs,
                      vgg_epochs=args.vgg_epochs, seed=args.seed, grid_search=args.grid_search,
                      kidney_labels=kidney_labels(args.label).given, qat=args.qat,
                      qat_unet_epochs=args.qat_unet_epochs, qat_vgg_epochs=args.qat_vgg_epochs, qat_lr=args.qat_lr,
                      classes=tuple(class_names(args.num_class, args.classes)), mask_threshold=mask_threshold,
                      min_mask_fraction=min_mask_fraction)
    card = (read_card(args.card, args.name, args.version, Path(args.out).name)
            if (args.card or args.name is not None or args.version is not None) else None)
    given = [o for o, v in (("--check", args.check), ("--report", args.report),
                            *((f"--{k.replace('_', '-')}", getattr(args, k)) for k in CRITERIA_OPTIONS))
             if v not in (None, [])]
    if not args.qat and given:
        raise UserError(f"{given[0]} belongs to --qat (the INT8 check after quantization-aware training); "
                        "add --qat or leave them out")
    if args.qat and min(args.qat_unet_epochs, args.qat_vgg_epochs) < 1:
        raise UserError("--qat-unet-epochs and --qat-vgg-epochs must be at least 1")
    from runtime.normalize import parse
    train_bundle(Path(args.data), Path(args.out), cfg,
                 unet_input=parse(args.unet_input, "--unet-input", 1) if args.unet_input else None,
                 vgg_input=parse(args.vgg_input, "--vgg-input", cfg.vgg_channels) if args.vgg_input else None,
                 check=args.check or None, report=Path(args.report) if args.report else None,
                 thresholds=_criteria(args) if args.qat else None, card=card)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from export.bundle_export import export_from_checkpoints
    export_from_checkpoints(args.unet, args.vgg, args.booster, Path(args.out), random_weights=args.random_weights,
                            unet_width=args.unet_width, vgg_width=args.vgg_width, unet_onnx=args.unet_onnx,
                            vgg_onnx=args.vgg_onnx, unet_input=args.unet_input, vgg_input=args.vgg_input,
                            name=args.name, version=args.version, card=args.card, num_class=args.num_class,
                            classes=args.classes, mask_threshold=args.mask_threshold,
                            min_mask_fraction=args.min_mask_fraction, unet_output=args.unet_output,
                            vgg_output=args.vgg_output, reference_frames=args.reference_frames,
                            reference_keep=check_keep(args.reference_keep, "--reference-keep"))
    return EXIT_OK


def check_keep(keep: float, option: str) -> float:
    """A scope keep share (`--keep`, `--reference-keep`): in [0.5, 1)."""
    if not 0.5 <= keep < 1.0:
        raise UserError(f"{option} {keep:g} is outside [0.5, 1); give the share of in-scope frames the scope check "
                        f"must keep, e.g. 0.98")
    return keep


def cmd_scope(args: argparse.Namespace) -> int:
    """Fit (or refit) the scope reference of an existing bundle on a folder of its in-scope frames."""
    from runtime.scope import ScopeError
    from runtime.scope_fit import fit_bundle
    from runtime.signing import SIGNATURE_FILE, is_signed
    keep = check_keep(args.keep, "--keep")
    labels = kidney_labels(args.label).given
    signed = is_signed(args.bundle)
    try:
        fit_bundle(args.bundle, args.frames, keep=keep, labels=labels, say=print)
    except ScopeError as e:
        raise UserError(f"{e}; the bundle is unchanged") from None
    if signed:
        print(f"sonoscore: warning: {args.bundle} was signed; its signature ({SIGNATURE_FILE}) no longer matches the "
              f"new manifest and {'scope.npz'}: sign it again (`sonoscore sign {args.bundle} --key KEY`)",
              file=sys.stderr)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """One image through the bundle's graph, every network's exact feeds and outputs written as .npy."""
    import json

    import numpy as np
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.sources import open_source
    bundle = Bundle.load(args.bundle)
    if args.precision not in bundle.precisions:
        raise UserError(f"--precision {args.precision}: bundle {args.bundle} has {', '.join(bundle.precisions)}")
    with open_source(str(args.image), realtime=False) as src:
        frame = next(iter(src), None)
    if frame is None or frame.pixels is None:
        raise UserError(f"--image '{args.image}' gave no frame{f' ({frame.error})' if frame else ''}; give an image "
                        f"file (PNG, JPEG, DICOM, ...)")
    out = Path(args.out or "inspect")
    out.mkdir(parents=True, exist_ok=True)
    with Pipeline(bundle, precision=args.precision, threads=1) as pipe:
        graph = pipe.graph
        gray, image, _ = graph.prepare_source(frame)
        unet_feeds = graph.unet_feeds(image)
        result = graph.run(image, pipe.unet, pipe.vgg, pipe.booster)
    arrays = {"gray": gray, "image": image, f"unet_input.{graph.unet_input}": unet_feeds[graph.unet_input],
              f"unet_output.{graph.unet_output}": result.prob[None, None], "mask": result.gate.mask}
    if result.vgg_feeds is not None:
        arrays[f"vgg_input.{graph.vgg_input}"] = result.vgg_feeds[graph.vgg_input]
    if result.features is not None:
        arrays[f"vgg_output.{graph.vgg_output}"] = result.features
    if result.probabilities is not None:
        arrays["booster_probabilities"] = np.asarray(result.probabilities, np.float32)[None]
    files = {}
    for key, value in arrays.items():
        np.save(out / f"{key}.npy", value)
        files[f"{key}.npy"] = {"shape": list(value.shape), "dtype": str(value.dtype)}
    info = {"bundle": str(args.bundle), "image": str(args.image), "precision": args.precision,
            "gate": {"mask_fraction": result.gate.fraction, "accepted": result.gate.accepted,
                     "mask_threshold": graph.mask_threshold, "min_mask_fraction": graph.min_mask_fraction},
            "grade": result.grade, "classes": bundle.manifest["classes"], "files": files}
    (out / "inspect.json").write_text(json.dumps(info, indent=2) + "\n")
    for name, meta in files.items():
        print(f"{out / name}  {meta['dtype']}{meta['shape']}")
    verdict = (f"grade {result.grade} ({bundle.manifest['classes'][result.grade - 1]})" if result.grade
               else "rejected by the gate: no VGG input, features or grade")
    print(f"inspect: mask fraction {result.gate.fraction:.4f}, {verdict}; {out / 'inspect.json'} lists the files")
    return EXIT_OK


def _model_options(p) -> None:
    """What the bundle grades and how its gate decides: `train` and `export` alike."""
    p.add_argument("--num-class", type=int, metavar="N", help="how many grades the bundle gives (default 4, the "
                   "IFTA grades; the booster's num_class)")
    p.add_argument("--classes", metavar="NAME,NAME,...", help="the grades' names in order, joined by commas (their "
                   "count is the class count; default: the IFTA ranges for 4, 'grade 1'.. otherwise)")
    p.add_argument("--mask-threshold", type=float, metavar="P", help="the gate: a pixel is kidney where the UNet's "
                   "probability is above P (default 0.5)")
    p.add_argument("--min-mask-fraction", type=float, metavar="F", help="the gate: a frame is scored when the "
                   "kidney covers at least this share of the image (default 0.05)")


def _networks(text: str) -> tuple[str, ...] | str:
    if text.strip() == "auto":
        return "auto"
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in ("unet", "vgg")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"'{text}': name unet, vgg or both joined by a comma, or auto")
    return names


# calibrate's criteria (runtime.agreement.Criteria, docs/design.md "Precision policy"): option -> help text. The
# defaults shown are Criteria's own.
CRITERIA_OPTIONS = {
    "min_study": "the share of studies (patients where the frames carry them, else each source) whose study grade "
                 "must be FP32's (default 1: every one; 0: off)",
    "min_grade": "the per-frame grade agreement with FP32 must reach: 'noise' (default), FP32's own agreement with "
                 "itself under --grade-noise grey levels of seeded input noise, measured in the same run; or a "
                 "fixed share; 0: off",
    "grade_noise": "grey levels of the seeded input noise (+-L, uniform, clipped) the noise floor of --min-grade "
                   "is measured under (default 1; 0: no noise run, and then --min-grade noise checks nothing)",
    "min_gate": "minimum gate agreement with FP32 (default 0.98; 0: off)",
    "min_iou": "minimum mean mask IoU with FP32 over the frames FP32's gate accepts, the masks that reach the VGG "
               "(default 0.98; 0: off)",
    "max_accuracy_drop": "where the frames have labels: accuracy at most this far below FP32's (default 0.01; 1: "
                         "off)",
    "min_cosine": "minimum mean VGG feature cosine with FP32 (default 0: reported, not checked)",
}


def _grade_limit(text: str) -> float | str:
    if text.strip().lower() == "noise":
        return "noise"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': give noise or a share such as 0.97") from None


def _add_criteria(p, prefix: str = "") -> None:
    types = {"min_grade": _grade_limit, "grade_noise": int}
    for key, text in CRITERIA_OPTIONS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=types.get(key, float), default=None,
                       metavar="noise|G" if key == "min_grade" else "L" if key == "grade_noise" else "X",
                       help=prefix + text)


def _criteria(args: argparse.Namespace):
    """calibrate's criteria from their options (None: the default)."""
    from runtime.agreement import Criteria
    given = {k: getattr(args, k) for k in CRITERIA_OPTIONS if getattr(args, k) is not None}
    if given.get("min_grade") == "noise":
        given["min_grade"] = None
    if given.get("grade_noise", 0) < 0:
        raise UserError("--grade-noise is a number of grey levels, 0 or more")
    return Criteria(**given)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from runtime.app import ensure_calibration_side
    ensure_calibration_side()
    from calibration.run import CalibrationFailed, calibrate_bundle, check_gains
    th = _criteria(args)
    report = args.report or str(Path(args.bundle) / "calibration_report.json")
    qat_given = [o for o, v in (("--unet", args.unet), ("--vgg", args.vgg), ("--data", args.data),
                                ("--label", args.label), ("--qat-unet-epochs", args.qat_unet_epochs),
                                ("--qat-vgg-epochs", args.qat_vgg_epochs), ("--qat-lr", args.qat_lr))
                 if v is not None]
    if not args.qat and qat_given:
        raise UserError(f"{qat_given[0]} belongs to --qat (quantization-aware training from the bundle's "
                        f"checkpoints); add --qat or leave it out")
    if not args.qat and not args.frames:
        raise UserError("calibrate needs --frames SOURCE (folder, video, DICOM or sim://kidney), the frames to "
                        "calibrate on (or --qat with --data)")
    if args.diagnose:   # per-layer INT8 sensitivity (calibration/diagnose.py): reports, installs nothing
        from calibration.diagnose import run_diagnose
        return run_diagnose(args)
    if args.qat:   # said before any training, not after it
        check_gains(args.unet_gains.split(","), qat=True)
    if args.qat and (args.timing_only or not args.data):
        raise UserError("--timing-only skips the accuracy check, which is what decides a QAT set; leave it out"
                        if args.timing_only else "calibrate --qat needs --data DIR, the labelled dataset (labelme "
                        "masks and grades, as `sonoscore train` reads it) to fine-tune on")
    try:
        if args.qat:
            from runtime.app import ensure_export_side
            ensure_export_side("calibrate --qat")
            from export.qat_calibrate import calibrate_qat
            calibrate_qat(args.bundle, unet=args.unet, vgg=args.vgg, data=args.data, frames=args.frames,
                          check=args.check, networks=args.networks, labels=kidney_labels(args.label).given,
                          unet_epochs=args.qat_unet_epochs, vgg_epochs=args.qat_vgg_epochs, lr=args.qat_lr,
                          count=args.count, holdout=args.holdout, max_frames=args.max_frames, method=args.method,
                          conv_transpose=args.conv_transpose or "sub-pixel",
                          full_range_weights=args.full_range_weights, thresholds=th, report=report)
        else:
            calibrate_bundle(args.bundle, args.frames, check=args.check, method=args.method, count=args.count,
                             holdout=args.holdout, max_frames=args.max_frames,
                             conv_transpose=args.conv_transpose or "sub-pixel",
                             thresholds=th, report=report, full_range_weights=args.full_range_weights,
                             timing_only=args.timing_only, networks=args.networks,
                             unet_gains=tuple(args.unet_gains.split(",")))
    except CalibrationFailed as e:
        print(f"sonoscore: {e}", file=sys.stderr)
        print(f"sonoscore: report written to {report}", file=sys.stderr)
        return EXIT_ACCURACY
    print(f"calibration report: {report}")
    return EXIT_OK


def add_parsers(sub) -> None:
    s = sub.add_parser("sim", help="write a synthetic labelled kidney dataset (labelme JSON + labels.csv)")
    s.add_argument("--out", required=True, help="the dataset folder to write")
    s.add_argument("--patients", type=int, required=True, help="how many simulated patients (grades spread evenly)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the phantom (default 0)")
    s.add_argument("--frames-per-patient", type=int, default=12, help="frames per patient (default 12)")
    s.set_defaults(func=cmd_sim)

    t = sub.add_parser("train", help="train UNet, VGG-19-BN and XGBoost with the paper's recipes; writes a bundle")
    t.add_argument("--data", required=True, help="labelme dataset folder (images, labelme JSON, labels.csv with "
                   "image,patient,grade or grade flags)")
    t.add_argument("--out", required=True, help="the bundle folder to write")
    t.add_argument("--unet-width", type=float, default=0.25, help="UNet channel width relative to the paper's "
                   "(default 0.25; 1 is the paper's)")
    t.add_argument("--vgg-width", type=float, default=0.0625, help="VGG-19-BN channel width relative to the paper's "
                   "(default 0.0625; 1 is the paper's)")
    t.add_argument("--unet-epochs", type=int, default=4, help="UNet training epochs (default 4)")
    t.add_argument("--vgg-epochs", type=int, default=24, help="VGG training epochs (default 24)")
    t.add_argument("--seed", type=int, default=0, help="random seed of every training step and the split (default 0)")
    t.add_argument("--grid-search", action="store_true", help="small XGBoost grid search on the validation split")
    t.add_argument("--label", action="append", metavar="kidney=LABELS", help=LABEL_HELP)
    t.add_argument("--unet-input", metavar="NORM", help="the UNet's input normalization after uint8/255, used in "
                   "training and recorded in the manifest: unit (default), minmax (per image), or meanstd:MEAN/STD (one "
                   "channel: one value each)")
    t.add_argument("--vgg-input", metavar="NORM", help="the same for the VGG (of the masked image): unit (default), "
                   "minmax, imagenet, or meanstd:M1,M2,M3/S1,S2,S3")
    t.add_argument("--qat", action="store_true", help="after FP32 training, quantization-aware fine-tuning of both "
                   "networks; the INT8 Q/DQ set it gives is checked as `calibrate --networks auto` checks it (on the "
                   "validation patients and --check data) and installed when it passes")
    t.add_argument("--qat-unet-epochs", type=int, default=2, help="QAT epochs of the UNet (default 2)")
    t.add_argument("--qat-vgg-epochs", type=int, default=3, help="QAT epochs of the VGG (default 3)")
    t.add_argument("--qat-lr", type=float, default=1e-4, help="QAT learning rate, Adam (default 1e-4)")
    t.add_argument("--check", action="append", default=[], help="with --qat: held-out frames (folder, video, DICOM "
                   "or sim://) the INT8 set is also checked on (repeatable)")
    t.add_argument("--report", help="with --qat: the INT8 check's report (default <out>/calibration_report.json)")
    _add_criteria(t, "with --qat, as calibrate's: ")
    _model_options(t)
    t.add_argument("--name", help="the model's name in the manifest and on reports (default: sonoscore-ifta)")
    t.add_argument("--version", help="the model's version (default: the card's, else 'unversioned')")
    t.add_argument("--card", metavar="FILE", help="model card, JSON or YAML: name, version, description, changelog, "
                   "authors, license, intended_use, data_source, references, disclaimer")
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("export", help="checkpoints + booster -> bundle (ONNX fp32/fp16, UBJ booster, manifest)")
    x.add_argument("--unet", help="UNet checkpoint as jakeoung/Unet_pytorch saves it, with or without BatchNorm "
                   "(bare state dict or {'state_dict': ...}; 'module.' prefixes and the legacy format are fine)")
    x.add_argument("--vgg", help="VGG-19-BN checkpoint: torchvision keys (features.N, classifier.0/3[/6]) or "
                   "sonoscore's (fc1, fc2[, head]); a network cut at Fc2 is fine, Fc1/Fc2 sizes come from the tensors")
    x.add_argument("--unet-onnx", metavar="FILE", help="instead of --unet: a UNet you exported to ONNX yourself "
                   "(one float input [N,1,224,224], dynamic batch, sigmoid output [N,1,224,224])")
    x.add_argument("--vgg-onnx", metavar="FILE", help="instead of --vgg: a VGG you exported to ONNX yourself "
                   "(one float input [N,C,224,224], dynamic batch; the Fc2 features as its one output or 'features')")
    x.add_argument("--unet-output", metavar="NAME", help="with --unet-onnx: the output that is the kidney "
                   "probability, when the file has several (default: its only one, or 'mask')")
    x.add_argument("--vgg-output", metavar="NAME", help="with --vgg-onnx: the output that is the Fc2 features, when "
                   "the file has several (default: its only one, or 'features')")
    x.add_argument("--booster", required=True, help="XGBoost model (.ubj or .json; multi:softprob or multi:softmax, "
                   "one class per grade (--num-class), as many features as the VGG's Fc2); checked before anything "
                   "is exported")
    x.add_argument("--out", required=True, help="the bundle folder: a new one, or an existing bundle (replaced "
                   "only once the new one is complete)")
    x.add_argument("--unet-input", metavar="NORM", help="what the UNet was trained on after uint8/255: unit "
                   "(default), minmax (per image), or meanstd:MEAN/STD (one value each: the UNet takes one channel)")
    x.add_argument("--vgg-input", metavar="NORM", help="the same for the VGG: unit (default), minmax, imagenet, or "
                   "meanstd:M1,M2,M3/S1,S2,S3")
    x.add_argument("--name", help="the model's name in the manifest and on reports (default: the --out folder's name)")
    x.add_argument("--version", help="the model's version (default: the card's, else 'unversioned')")
    x.add_argument("--card", metavar="FILE", help="model card, JSON or YAML: name, version, description, changelog, "
                   "authors, license, intended_use, data_source, references, disclaimer")
    x.add_argument("--reference-frames", metavar="FOLDER", help="your own training or validation kidney frames (a "
                   "labelme dataset, or a folder of images, DICOM or videos at any depth, grouped by labels.csv's "
                   "patients, else by subfolder, else by file): the bundle's scope reference is fitted on them, the "
                   "limits on a quarter of the groups held out (docs/models.md); without it the bundle grades any "
                   "frame its gate accepts, and says so")
    x.add_argument("--reference-keep", type=float, default=0.98, metavar="SHARE", help="with --reference-frames: "
                   "the share of the held-out frames the scope limits keep (default 0.98)")
    x.add_argument("--random-weights", action="store_true",
                   help="no checkpoints: random weights at the given widths (for timing only)")
    x.add_argument("--unet-width", type=float, default=None, help="with --random-weights (default 1.0)")
    x.add_argument("--vgg-width", type=float, default=None, help="with --random-weights (default 1.0)")
    _model_options(x)
    x.set_defaults(func=cmd_export)

    sc = sub.add_parser("scope", help="fit the bundle's scope reference (what in-scope frames look like, and the "
                        "limits that keep a stated share of them) on a folder of its in-scope frames; rewrites the "
                        "manifest")
    sc.add_argument("--bundle", required=True, help="the bundle folder; scope.npz and the manifest's scope section "
                    "are written into it (a signed bundle must be signed again)")
    sc.add_argument("--frames", required=True, metavar="FOLDER",
                    help="in-scope frames: a labelme dataset (its labelled kidneys the gate accepts) or a folder of "
                         "kidney frames (images, DICOM, videos, at any depth), grouped by labels.csv's patients, "
                         "else by subfolder, else by file; a quarter of the groups (or the bundle's own validation "
                         "patients, where present) are held out to set the limits on")
    sc.add_argument("--keep", type=float, default=0.98, metavar="SHARE",
                    help="the share of held-out in-scope frames the limits keep (default 0.98)")
    sc.add_argument("--label", action="append", metavar="kidney=LABELS", help=LABEL_HELP)
    sc.set_defaults(func=cmd_scope)

    i = sub.add_parser("inspect", help="one image through a bundle: the preprocessed frame and each network's exact "
                       "feeds and outputs as .npy, to compare with your own code")
    i.add_argument("--bundle", required=True, help="the bundle folder")
    i.add_argument("--image", required=True, help="an image file (PNG, JPEG, DICOM, ...); its first frame is used")
    i.add_argument("--out", help="the folder for the .npy files and inspect.json (default ./inspect)")
    i.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="which of the bundle's network files to run (default fp32)")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("calibrate", help="INT8: calibrate the bundle's networks on frames (Q/DQ ONNX) and check "
                       "INT8 and FP16 against FP32 on frames not used for calibration")
    c.add_argument("--bundle", required=True, help="the bundle folder; its INT8 set is written into it")
    c.add_argument("--frames", action="append", default=[],
                   help="calibration source: the scanner's own DICOM cine or folder of DICOM files, a video, an "
                        "image folder (with a labels.csv beside it: patients and grades) or sim://kidney?frames=600 "
                        "(repeatable); frames not picked for calibration are held out for the accuracy check (with "
                        "--qat: optional, every frame is checked); docs/calibration.md")
    c.add_argument("--check", action="append", default=[],
                   help="another source checked in full and never used for calibration, such as another day's "
                        "frames from the same scanner (repeatable)")
    c.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="how activation ranges are calibrated (default minmax)")
    c.add_argument("--count", type=int, default=300, help="calibration frames, spread over the source (default 300)")
    c.add_argument("--holdout", type=int, default=300, help="held-out frames for the check (default 300)")
    c.add_argument("--max-frames", type=int, default=3000, help="frames read per source at most (spread evenly)")
    c.add_argument("--conv-transpose", default=None, choices=["sub-pixel", "per-tensor", "float"],
                   help="ConvTranspose layers: INT8 as a sub-pixel Conv + DepthToSpace, per-channel weights (default; "
                        "onnxruntime's CPU has no integer ConvTranspose; with --qat the weights are trained per "
                        "tensor and written so), INT8 ConvTranspose with per-tensor weights (TensorRT rejects "
                        "onnxruntime's per-channel axis 1 for them), or left in float")
    c.add_argument("--full-range-weights", action="store_true",
                   help="8-bit weights instead of 7-bit; only for targets never checked on an x86 CPU without "
                        "VNNI, where 8-bit weights saturate onnxruntime's integer kernels")
    c.add_argument("--unet-gains", default="1", metavar="G1,G2,...",
                   help="the UNet also calibrates on each frame at these gains (pixels times G, saturating at "
                        "255), so its INT8 ranges cover a brighter scanner setting than the frames show, e.g. 1,1.6 "
                        "(default 1: the frames as they are; docs/benchmarks.md has what it costs on the phantom)")
    c.add_argument("--networks", default="unet,vgg", type=_networks,
                   help="which networks to quantize (default unet,vgg); one left out runs in FP32 in the INT8 set "
                        "(mixed precision, as TensorRT builds it), e.g. --networks vgg when the UNet's INT8 masks "
                        "move grades; auto: both if they pass, else the VGG alone if it passes")
    _add_criteria(c)
    c.add_argument("--report", help="report JSON (default <bundle>/calibration_report.json)")
    c.add_argument("--diagnose", action="store_true", help="instead of calibrating: each quantized layer of "
                   "--networks put back in float in turn, ranked by how close it brings the INT8 file to FP32 "
                   "(calibration/diagnose.py); installs nothing")
    c.add_argument("--timing-only", action="store_true",
                   help="skip the accuracy check (random-weight bundles made for timing)")
    c.add_argument("--qat", action="store_true", help="INT8 from quantization-aware training instead of calibration: "
                   "fine-tunes the checkpoints the bundle was exported from (--unet, --vgg; refused unless they "
                   "compute what the bundle's FP32 files compute) on --data's training patients, then checks the "
                   "INT8 files against the bundle's unchanged FP32 files on its held-out patients (and --frames, "
                   "--check) and installs what passes; FP32, FP16 and the booster stay as they are")
    c.add_argument("--unet", help="with --qat: the UNet checkpoint the bundle was exported from (as `export --unet`)")
    c.add_argument("--vgg", help="with --qat: the VGG-19-BN checkpoint, with its classification head (as `export "
                   "--vgg`)")
    c.add_argument("--data", help="with --qat: labelled dataset folder (labelme masks, grades in labels.csv or flags; "
                   "as `train --data`); a quarter of its patients is held out for the check")
    c.add_argument("--label", action="append", metavar="kidney=LABELS", help="with --qat: " + LABEL_HELP)
    c.add_argument("--qat-unet-epochs", type=int, default=None, help="with --qat: UNet QAT epochs (default 2)")
    c.add_argument("--qat-vgg-epochs", type=int, default=None, help="with --qat: VGG QAT epochs (default 3)")
    c.add_argument("--qat-lr", type=float, default=None, help="with --qat: learning rate, Adam (default 1e-4)")
    c.set_defaults(func=cmd_calibrate)
