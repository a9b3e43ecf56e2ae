"""`sonoscore` command line. Heavy modules are imported inside each command, so `--help` works on a bare install.

Exit codes (docs/design.md "Exit codes"): 0 success; 2 could not start (a bad option, bundle, source, dataset,
backend or output path: one sentence says which, and no output was touched); 3 `run`/`eval` finished but some
input frames carried an error (each still has its record); 4 `calibrate` ran but a lower precision missed an
accuracy threshold (the report says which); 5 `run` ran but an output could not be written (one sentence each
says which; the others are complete); 128 + the signal's number when `run` was stopped by SIGINT (130), SIGHUP
(129) or SIGTERM (143), after finishing its outputs; 1 internal failure. 5 wins over a signal's code, which
wins over 3.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_FRAME_ERRORS, EXIT_ACCURACY, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5
EXIT_SIGNAL_BASE = 128          # stopped by signal N: 128 + N (SIGINT 130, SIGHUP 129, SIGTERM 143)
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)

from runtime.errors import UserError  # noqa: E402

TRUST_HELP = ("the public key (PEM) the bundle must be signed with (`sonoscore sign`); an unsigned bundle or one "
              "changed since signing is refused (exit 2). Default: $SONOSCORE_TRUST. Without either, an unsigned "
              "bundle runs with one warning line")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from runtime.backends import BackendUnavailable
    from runtime.booster import BoosterError
    from runtime.bundle import BundleError
    from runtime.preprocess import FrameError
    from runtime.sources import SourceError
    return (UserError, BundleError, SourceError, BoosterError, BackendUnavailable, FrameError, FileNotFoundError)


# --- commands ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stop_signals(stop):
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, `systemctl stop`, a closed terminal or ssh session) end `run` the same
    way. While the stream runs, the first one asks it to stop after the frame in hand (its outputs are then
    finished: the results renamed into place, the video's index written, the summary and report written); a
    second one interrupts at once (the outputs are still finished). While the outputs are being finished, more
    signals are noted and ignored. Before the stream has started there is nothing to finish: the signal
    interrupts (KeyboardInterrupt). Outside the main thread (tests calling main() from a thread), nothing is
    installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        first = not stop.is_set()
        if stop.phase in ("finishing", "done"):
            stop.set(signum)
            return
        if stop.phase == "streaming" and first:
            stop.set(signum)
            print(f"sonoscore: {signal.Signals(signum).name} received: stopping after the frame in hand and "
                  f"finishing the outputs (send it again to stop at once)", file=sys.stderr, flush=True)
            return
        stop.set(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cmd_run(args: argparse.Namespace) -> int:
    from runtime.app import RunConfig, ViewConfig, run_bundle
    from runtime.stream import StopRequest
    view = (ViewConfig(host=args.view_host, port=args.view_port, token=args.view_token, keep=args.view_keep)
            if args.view else None)
    stop = StopRequest()
    from runtime.signing import trust_option
    trust, trust_label = trust_option(args.trust)
    config = RunConfig(bundle=args.bundle, source=args.source, backend=args.backend, precision=args.precision,
                       trust=trust, trust_label=trust_label,
                       policy=args.policy, threads=args.threads, results=args.results, video=args.video,
                       masks=args.save_masks, summary=args.study_summary, report=args.study_report,
                       smoothing=args.smooth, view=view, display=args.display, quiet=args.quiet,
                       record_paths=args.record_paths, mask_size=args.mask_size, send=args.send, stop=stop)
    if args.mask_size != "224" and not args.save_masks:
        raise UserError(f"--mask-size {args.mask_size} sets the size of the masks --save-masks writes; give "
                        f"--save-masks DIR too, or leave --mask-size out")
    with stop_signals(stop):
        try:
            stats = run_bundle(config)
        except KeyboardInterrupt:
            name = signal.Signals(stop.signum).name if stop.signum else "SIGINT"
            print(f"sonoscore: interrupted ({name})", file=sys.stderr)
            return EXIT_SIGNAL_BASE + (stop.signum or signal.SIGINT)
    if stats.sink_errors:
        return EXIT_OUTPUT
    if stop.signum:
        return EXIT_SIGNAL_BASE + stop.signum
    return EXIT_FRAME_ERRORS if stats.errors else EXIT_OK


def _check_trust(args: argparse.Namespace) -> None:
    """--trust (or SONOSCORE_TRUST) for eval and bench: the bundle's signature must verify with that key; without
    one, an unsigned bundle gets one warning line (runtime/signing.py)."""
    from runtime.bundle import Bundle
    from runtime.signing import check_trust, is_signed, trust_option, unsigned_warning
    trust, label = trust_option(args.trust)
    check_trust(args.bundle, trust, label=label)
    if not trust and not is_signed(args.bundle) and (Path(args.bundle) / "manifest.json").is_file():
        Bundle.load(args.bundle)          # a bundle that cannot load is refused before any warning
        print(unsigned_warning(args.bundle), file=sys.stderr, flush=True)


def cmd_listen(args: argparse.Namespace) -> int:
    from runtime.dicomnet.listen import listen_command
    from runtime.stream import StopRequest
    stop = StopRequest()
    with stop_signals(stop):
        try:
            return listen_command(args, stop)
        except KeyboardInterrupt:
            return EXIT_SIGNAL_BASE + (stop.signum or signal.SIGINT)


def cmd_eval(args: argparse.Namespace) -> int:
    labels = _kidney_labels(args.label)        # a bad --label is refused before anything else
    _check_trust(args)
    from runtime.evaluate import evaluate_bundle
    report = evaluate_bundle(args.bundle, args.data, precision=args.precision, backend=args.backend,
                             report=args.report, quiet=args.quiet, labels=labels)
    return EXIT_FRAME_ERRORS if report["errors"] else EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.precision:                    # a bad list is refused before the bundle is touched
        from runtime.bench import parse_precisions
        parse_precisions(args.precision)
    _check_trust(args)
    baseline = args.baseline or ("torch" if args.device == "cuda" else "none")
    if args.device is None and baseline == "none":
        from runtime.bench import bench_bundle
        bench_bundle(args.bundle, backend=args.backend, precision=args.precision or "fp32", frames=args.frames,
                     warmup=3 if args.warmup is None else args.warmup, json_path=args.json, threads=args.threads,
                     plot=args.plot)
        return EXIT_OK
    factory = None
    if baseline == "torch":  # the PyTorch side lives in export/, like train and demo: the runtime never imports torch
        from runtime.app import ensure_export_side
        ensure_export_side("bench --baseline torch")
        from export.baseline import TorchBaseline
        factory = TorchBaseline
    device = args.device or "cpu"
    from runtime.bench import bench_device
    bench_device(args.bundle, device=device, backend=args.backend,
                 precision=args.precision or ("fp32,fp16" if device == "cuda" else "fp32"),
                 cuda_graphs=args.cuda_graphs, baseline=factory, frames=args.frames,
                 warmup=(20 if device == "cuda" else 3) if args.warmup is None else args.warmup,
                 json_path=args.json, plot=args.plot, threads=args.threads)
    return EXIT_OK


def cmd_sim(args: argparse.Namespace) -> int:
    from runtime.dataset import write_dataset
    if args.patients < 1:
        raise UserError("--patients must be at least 1")
    out = write_dataset(Path(args.out), args.patients, seed=args.seed, frames_per_patient=args.frames_per_patient)
    print(f"wrote a synthetic dataset of {args.patients} patients to {out}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from export.recipe import TrainConfig, train_bundle
    cfg = TrainConfig(unet_width=args.unet_width, vgg_width=args.vgg_width, unet_epochs=args.unet_epochs,
                      vgg_epochs=args.vgg_epochs, seed=args.seed, grid_search=args.grid_search,
                      kidney_labels=_kidney_labels(args.label).given, qat=args.qat,
                      qat_unet_epochs=args.qat_unet_epochs, qat_vgg_epochs=args.qat_vgg_epochs, qat_lr=args.qat_lr)
    given = [o for o, v in (("--check", args.check), ("--report", args.report), ("--min-iou", args.min_iou),
                            ("--min-gate", args.min_gate), ("--min-grade", args.min_grade),
                            ("--min-cosine", args.min_cosine)) if v not in (None, [])]
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
                 thresholds=_thresholds(args) if args.qat else None)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from export.recipe import export_from_checkpoints
    export_from_checkpoints(args.unet, args.vgg, args.booster, Path(args.out), random_weights=args.random_weights,
                            unet_width=args.unet_width, vgg_width=args.vgg_width, unet_onnx=args.unet_onnx,
                            vgg_onnx=args.vgg_onnx, unet_input=args.unet_input, vgg_input=args.vgg_input,
                            name=args.name, version=args.version, card=args.card)
    return EXIT_OK


def _kidney_labels(texts: list[str] | None):
    """`--label kidney=...` (repeatable) -> runtime.dataset.LabelMap; a bad one is one sentence (exit 2)."""
    from runtime.dataset import LabelMap
    try:
        return LabelMap.parse(texts)
    except ValueError as e:
        raise UserError(str(e)) from None


LABEL_HELP = ("which labelme labels are the kidney, e.g. kidney=\"kidney,left kidney,Kidney_R\" (repeatable; case, "
              "spaces, underscores and hyphens ignored); default: kidney and its usual variants (left/right kidney, "
              "kidney_l/kidney_r, lt kidney, ...; docs/models.md, 'Labelme datasets')")


def _networks(text: str) -> tuple[str, ...] | str:
    if text.strip() == "auto":
        return "auto"
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in ("unet", "vgg")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"'{text}': name unet, vgg or both joined by a comma, or auto")
    return names


def _thresholds(args: argparse.Namespace):
    """calibrate's accuracy thresholds from --min-iou/--min-gate/--min-grade/--min-cosine (None: the default)."""
    from calibration.report import Thresholds
    given = {k: v for k, v in (("min_iou", args.min_iou), ("min_gate_agreement", args.min_gate),
                               ("min_grade_agreement", args.min_grade), ("min_cosine", args.min_cosine))
             if v is not None}
    return Thresholds(**given)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from runtime.app import ensure_calibration_side
    ensure_calibration_side()
    from calibration.report import Thresholds
    from calibration.run import CalibrationFailed, calibrate_bundle, check_gains
    th = Thresholds(min_iou=args.min_iou, min_gate_agreement=args.min_gate, min_grade_agreement=args.min_grade,
                    min_cosine=args.min_cosine)
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
                          check=args.check, networks=args.networks, labels=_kidney_labels(args.label).given,
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


def cmd_keygen(args: argparse.Namespace) -> int:
    from runtime.signing import key_fingerprint, keygen
    key, pub = keygen(args.out)
    print(f"private key: {key} (keep it secret; sign with: sonoscore sign BUNDLE --key {key})")
    print(f"public key:  {pub} (give it to the devices: --trust {pub}); fingerprint "
          f"{key_fingerprint(pub.read_bytes())}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from runtime.signing import sign_bundle
    sig = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle}: {sig}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from runtime.bundle import Bundle
    from runtime.signing import trust_option, verify_bundle
    trust, label = trust_option(args.trust)
    if not trust:
        raise UserError("verify needs the signer's public key: give --trust PUB (or set SONOSCORE_TRUST)")
    fingerprint = verify_bundle(args.bundle, trust, label=label)
    Bundle.load(args.bundle)          # and everything run checks: manifest checksum, schema, file hashes
    print(f"{args.bundle}: signature verified with {trust} (key {fingerprint[:16]}); every file is as signed")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    import json
    from runtime.bundle_info import bundle_info, format_info
    from runtime.signing import trust_option
    trust, label = trust_option(args.trust)
    info = bundle_info(args.bundle, trust, label=label)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from runtime.app import doctor
    doctor()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from runtime.app import ensure_export_side
    ensure_export_side("demo")
    from export.demo import run_demo
    run_demo(Path(args.out), frames=args.frames, fps=args.fps, bench_frames=args.bench_frames, rebuild=args.rebuild)
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sonoscore", description=(
        "Edge ultrasound inference runtime: kidney mask, quality gate, deep features and a compiled booster "
        "grade IFTA (1-4) frame by frame. Not a medical device."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def backend_opts(sp, several=False):
        sp.add_argument("--backend", default="ort", choices=["ort", "trt"], help="inference backend (default ort)")
        if several:
            sp.add_argument("--precision", default="fp32", help="fp32, fp16 or int8, or several joined by commas "
                            "(fp32,int8): they take turns frame by frame and the speed-up is reported")
        else:
            sp.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                            help="which of the bundle's network files to run (default fp32; int8 needs "
                                 "`sonoscore calibrate` first)")
        sp.add_argument("--threads", type=int, default=None, help="CPU threads per network (default: all cores)")
        sp.add_argument("--trust", metavar="PUB", default=None, help=TRUST_HELP)

    d = sub.add_parser("demo", help="build the demo bundle if missing, then run it on the simulated probe")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--frames", type=int, default=150, help="frames to stream from the simulated probe")
    d.add_argument("--fps", type=float, default=30.0, help="simulated probe frame rate")
    d.add_argument("--bench-frames", type=int, default=20, help="frames for the full-width benchmark")
    d.add_argument("--rebuild", action="store_true", help="rebuild the bundle even if it exists")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="stream a source through a bundle")
    r.add_argument("--bundle", required=True)
    r.add_argument("--source", required=True, help="image, folder, video, DICOM, sim://kidney?grade=3&fps=30&frames=300, "
                   "igtl://host:18944/Device, v4l2:///dev/video0 or gst://<pipeline>")
    backend_opts(r)
    r.add_argument("--policy", choices=["newest", "all"], default=None,
                   help="newest: live, keep only the latest frame; all: lossless (default: newest for live sources)")
    r.add_argument("--results", help="write one JSON object per input frame here (JSONL)")
    r.add_argument("--video", help="write the annotated overlay video here (MP4)")
    r.add_argument("--save-masks", metavar="DIR", help="write each frame's binary mask as DIR/<frame>.png (with "
                   "--record-paths: DIR/<its file's folders>/<its file's stem>-<frame in file>.png)")
    r.add_argument("--mask-size", choices=["224", "original"], default="224",
                   help="size of the saved masks: 224 (the network's, default) or original (the source frame's: "
                        "the mask mapped back into the region the network's image was cut from)")
    r.add_argument("--record-paths", action="store_true",
                   help="each record also carries source_file (the file, relative to the source folder; its name "
                        "for a single file) and frame_in_file (the frame's number inside it, from 0); off by "
                        "default because paths can carry names")
    r.add_argument("--study-summary", help="write the per-study aggregate here (JSON)")
    r.add_argument("--study-report", metavar="HTML", help="write the one-page study report here (self-contained HTML)")
    r.add_argument("--smooth", type=float, metavar="FRAMES", help="also smooth the grade over accepted frames "
                   "(exponential moving average with this half-life) in the study summary and report")
    r.add_argument("--view", action="store_true", help="serve the live viewer page (its URL is printed)")
    r.add_argument("--view-host", default="127.0.0.1", help="address the viewer listens on; any non-loopback "
                   "address needs a token (one is generated unless --view-token)")
    r.add_argument("--view-port", type=int, default=8765, help="viewer port (0: any free port)")
    r.add_argument("--view-token", help="token the viewer requires (?token=...)")
    r.add_argument("--view-keep", action="store_true", help="keep serving the last frame after the source ends, "
                   "until Ctrl-C")
    r.add_argument("--display", action="store_true", help="show the overlay in a window on this machine's screen (needs an "
                   "OpenCV with a GUI and a display; q, Esc or closing the window stops the showing, not the run)")
    r.add_argument("--quiet", action="store_true", help="no line per frame")
    r.add_argument("--send", metavar="YAML", help="also make the DICOM results (SR, SEG, SC) of a DICOM source and "
                   "send them to the destinations of this configuration, through its outbox "
                   "(docs/hospital.md, 'DICOM network')")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="kidney IoU and grade metrics on a labelled (labelme) dataset")
    e.add_argument("--bundle", required=True)
    e.add_argument("--data", required=True, help="dataset folder (labelme JSON beside images, optional labels.csv)")
    backend_opts(e)
    e.add_argument("--report", help="write the report JSON here (a confusion-matrix PNG goes beside it)")
    e.add_argument("--label", action="append", metavar="kidney=LABELS", help=LABEL_HELP)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="per-stage latency percentiles on simulated frames")
    b.add_argument("--bundle", required=True)
    backend_opts(b, several=True)
    b.add_argument("--frames", type=int, default=100)
    b.add_argument("--warmup", type=int, default=None, help="frames run before timing (default 3; 20 with "
                   "--device cuda: cuDNN's algorithm search and the CUDA graph capture happen there)")
    b.add_argument("--json", help="write the figures here")
    b.add_argument("--plot", help="write a latency picture here (PNG)")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cuda: the device-resident pipeline (frame up once, features back), fp32 and fp16 (default "
                        "precisions), CUDA graphs off and on, against the PyTorch eager FP32 baseline in the same "
                        "run; cpu: the CPU pipeline against the baseline on the CPU")
    b.add_argument("--baseline", choices=["none", "torch"], default=None,
                   help="also run the paper's networks in PyTorch eager FP32, frame to grade, and report the "
                        "speed-up (default: torch with --device cuda; needs the export extra)")
    b.add_argument("--cuda-graphs", choices=["off", "on", "both"], default="both",
                   help="with --device cuda: CUDA graphs off, on, or both as separate configurations (default)")
    b.set_defaults(func=cmd_bench, precision=None)

    s = sub.add_parser("sim", help="write a synthetic labelled kidney dataset (labelme JSON + labels.csv)")
    s.add_argument("--out", required=True)
    s.add_argument("--patients", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frames-per-patient", type=int, default=12)
    s.set_defaults(func=cmd_sim)

    t = sub.add_parser("train", help="train UNet, VGG-19-BN and XGBoost with the paper's recipes; writes a bundle")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--unet-width", type=float, default=0.25)
    t.add_argument("--vgg-width", type=float, default=0.0625)
    t.add_argument("--unet-epochs", type=int, default=4)
    t.add_argument("--vgg-epochs", type=int, default=24)
    t.add_argument("--seed", type=int, default=0)
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
    for opt, what in (("--min-iou", "mask IoU"), ("--min-gate", "gate agreement"), ("--min-grade", "grade agreement"),
                      ("--min-cosine", "feature cosine similarity")):
        t.add_argument(opt, type=float, default=None, help=f"with --qat: minimum {what} of the INT8 check "
                       f"(default: calibrate's)")
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
    x.add_argument("--booster", required=True, help="XGBoost model (.ubj or .json; multi:softprob or multi:softmax, "
                   "4 classes, as many features as the VGG's Fc2); checked before anything is exported")
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
    x.add_argument("--random-weights", action="store_true",
                   help="no checkpoints: random weights at the given widths (for timing only)")
    x.add_argument("--unet-width", type=float, default=None, help="with --random-weights (default 1.0)")
    x.add_argument("--vgg-width", type=float, default=None, help="with --random-weights (default 1.0)")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("calibrate", help="INT8: calibrate the bundle's networks on frames (Q/DQ ONNX) and check "
                       "INT8 and FP16 against FP32 on frames not used for calibration")
    c.add_argument("--bundle", required=True)
    c.add_argument("--frames", action="append", default=[],
                   help="calibration source: folder, video, DICOM or sim://kidney?frames=600 (repeatable); "
                        "frames not picked for calibration are held out for the accuracy check (with --qat: "
                        "optional, every frame is checked)")
    c.add_argument("--check", action="append", default=[],
                   help="another source checked in full and never used for calibration (repeatable)")
    c.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
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
    c.add_argument("--min-iou", type=float, default=0.97)
    c.add_argument("--min-gate", type=float, default=0.97, help="minimum gate agreement")
    c.add_argument("--min-grade", type=float, default=0.97, help="minimum grade agreement")
    c.add_argument("--min-cosine", type=float, default=0.99, help="minimum feature cosine similarity")
    c.add_argument("--report", help="report JSON (default <bundle>/calibration_report.json)")
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

    dr = sub.add_parser("doctor", help="which backends, providers and compilers are usable here")
    dr.set_defaults(func=cmd_doctor)

    ls = sub.add_parser("listen", help="DICOM Storage SCP: score the ultrasound studies received, send the results "
                        "(SR, SEG, SC) to a PACS")
    ls.add_argument("--config", required=True, metavar="YAML", help="the listen/send configuration "
                    "(docs/hospital.md, 'DICOM network'; device/listen.example.yaml)")
    ls.add_argument("--bundle", help="the model bundle (default: the configuration's processing.bundle)")
    ls.add_argument("--backend", choices=["ort", "trt"], default=None, help="default: processing.backend, else ort")
    ls.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                    help="default: processing.precision, else fp32")
    ls.add_argument("--threads", type=int, default=None, help="CPU threads per network (default: all cores)")
    ls.add_argument("--trust", metavar="PUB", default=None, help="the public key the bundle's signature must "
                    "verify with (default: $SONOSCORE_TRUST)")
    ls.add_argument("--deidentify", action="store_true", help="de-identified DICOM results (PS3.15 basic profile "
                    "pseudonyms, no Secondary Capture), for research; the same as results.deidentify: true")
    ls.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    ls.set_defaults(func=cmd_listen)

    kg = sub.add_parser("keygen", help="make a key pair for signing bundles (P-256: PREFIX.key and PREFIX.pub)")
    kg.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (private, mode 0600; "
                    "encrypted when SONOSCORE_KEY_PASSWORD is set) and PREFIX.pub; never overwrites")
    kg.set_defaults(func=cmd_keygen)

    sg = sub.add_parser("sign", help="sign every file of a bundle with a private key (writes BUNDLE/model.sig, "
                        "OpenSSF model-signing format)")
    sg.add_argument("bundle", metavar="BUNDLE")
    sg.add_argument("--key", required=True, help="the private key (PEM, from `sonoscore keygen`; its password in "
                    "SONOSCORE_KEY_PASSWORD when it has one)")
    sg.set_defaults(func=cmd_sign)

    vf = sub.add_parser("verify", help="check a bundle's signature with the signer's public key, and its files")
    vf.add_argument("bundle", metavar="BUNDLE")
    vf.add_argument("--trust", metavar="PUB", default=None, help="the signer's public key (default: "
                    "$SONOSCORE_TRUST)")
    vf.set_defaults(func=cmd_verify)

    inf = sub.add_parser("info", help="what a bundle is: model card, networks, inputs, booster, signature, "
                         "disclaimer")
    inf.add_argument("bundle", metavar="BUNDLE")
    inf.add_argument("--trust", metavar="PUB", default=None, help="also verify the signature with this public key "
                     "(default: $SONOSCORE_TRUST)")
    inf.add_argument("--json", action="store_true", help="print it as JSON")
    inf.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sonoscore: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_error_types()):
            print(f"sonoscore: {e}", file=sys.stderr)
            return EXIT_USER
        raise


if __name__ == "__main__":
    sys.exit(main())
