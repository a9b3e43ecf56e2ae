"""`eval` (metrics on a labelled dataset), `bench` (latency; --soak, a long run watched from outside; --profile,
per-operator time) and `doctor` (what is usable here; --dicom, every ultrasound DICOM pydicom knows of)."""
from __future__ import annotations

import argparse

from pathlib import Path

from runtime.cli.common import (EXIT_FRAME_ERRORS, EXIT_INTERNAL, EXIT_OK, LABEL_HELP, backend_opts, check_trust,
                                kidney_labels)
from runtime.errors import UserError


def cmd_eval(args: argparse.Namespace) -> int:
    labels = kidney_labels(args.label)        # a bad --label is refused before anything else
    check_trust(args)
    from runtime.evaluate import evaluate_bundle
    report = evaluate_bundle(args.bundle, args.data, precision=args.precision, backend=args.backend,
                             report=args.report, quiet=args.quiet, labels=labels, out_of_scope=args.out_of_scope)
    return EXIT_FRAME_ERRORS if report["errors"] else EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.precision:                    # a bad list is refused before the bundle is touched
        from runtime.bench import parse_precisions
        parse_precisions(args.precision)
    if args.soak is not None or args.profile:
        return _bench_soak_or_profile(args)
    if args.soak_out:
        raise UserError("--soak-out belongs to --soak; add --soak MINUTES or leave it out")
    check_trust(args)
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


def _bench_soak_or_profile(args: argparse.Namespace) -> int:
    if args.soak is not None and args.profile:
        raise UserError("--soak and --profile are two separate measurements; give one of them")
    which = "--soak" if args.soak is not None else "--profile"
    other = [o for o, v in (("--device", args.device), ("--baseline", args.baseline)) if v is not None]
    if other:
        raise UserError(f"{other[0]} does not apply to bench {which}; leave it out")
    if args.soak is None and args.soak_out:
        raise UserError("--soak-out belongs to --soak; add --soak MINUTES or leave it out")
    check_trust(args)
    if args.soak is not None:
        precision = args.precision or "fp32"
        if "," in precision:
            raise UserError(f"bench --soak runs one precision, not '{precision}'; give one of fp32, fp16, int8")
        from runtime.soak import format_report, soak
        report = soak(args.bundle, args.soak, json_path=args.json, plot=args.plot, keep=args.soak_out,
                      backend=args.backend, precision=precision, threads=args.threads, trust=args.trust)
        print(format_report(report), flush=True)
        for what, path in (("report", args.json), ("picture", args.plot)):
            if path:
                print(f"soak {what}: {path}")
        return EXIT_OK if report["exit_code"] == 0 and report["records"] == report["frames_asked"] \
            else EXIT_INTERNAL
    if args.backend != "ort":
        raise UserError("bench --profile reads onnxruntime's profiler; leave --backend out (ort)")
    if args.plot:
        raise UserError("bench --profile draws no picture; leave --plot out")
    from runtime.bench import parse_precisions
    from runtime.profile import profile_bundle
    profile_bundle(args.bundle, precisions=list(parse_precisions(args.precision or "fp32")), runs=args.frames,
                   warmup=3 if args.warmup is None else args.warmup, threads=args.threads, json_path=args.json)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    given = [o for o, v in (("--bundle", args.bundle), ("--trust", args.trust), ("--json", args.json)) if v]
    if not args.dicom and given:
        raise UserError(f"{given[0]} belongs to --dicom; add --dicom or leave it out")
    from runtime.app import doctor
    doctor()
    if not args.dicom:
        return EXIT_OK
    bundle = args.bundle
    if bundle is None:
        if not (Path("out/demo/bundle") / "manifest.json").is_file():
            raise UserError("doctor --dicom needs --bundle BUNDLE (the default, out/demo/bundle, is not here: "
                            "`make demo` makes it)")
        bundle = "out/demo/bundle"
    from runtime.doctor_dicom import check_dicom
    out = check_dicom(bundle, json_path=args.json, **({"trust": args.trust} if args.trust else {}))
    return EXIT_OK if out["ok"] else EXIT_FRAME_ERRORS


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="kidney IoU and grade metrics on a labelled (labelme) dataset")
    e.add_argument("--bundle", required=True, help="the bundle folder to evaluate")
    e.add_argument("--data", required=True, help="dataset folder (labelme JSON beside images, optional labels.csv)")
    backend_opts(e)
    e.add_argument("--report", help="write the report JSON here (a confusion-matrix PNG goes beside it, and with a "
                   "scope reference the scope check's score histograms, <report>.scope.png)")
    e.add_argument("--out-of-scope", metavar="DIR", help="also run frames that are not kidney views (images, DICOM, "
                   "videos, a folder at any depth) and report the share refused (by the mask gate and by the scope "
                   "check, per reason) and graded, and their scores in the picture")
    e.add_argument("--label", action="append", metavar="kidney=LABELS", help=LABEL_HELP)
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="per-stage latency percentiles on simulated frames")
    b.add_argument("--bundle", required=True, help="the bundle folder to time")
    backend_opts(b, several=True)
    b.add_argument("--frames", type=int, default=100, help="frames timed after the warm-up (default 100)")
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
    b.add_argument("--soak", type=float, metavar="MINUTES", default=None,
                   help="instead of timing frames: stream the simulated probe (30 frames/s) through `sonoscore run` "
                        "for MINUTES with every output on (results, video, study summary and report, the live "
                        "viewer) and report its memory (RSS) and latency over time; --json and --plot take the "
                        "report and its picture (Linux)")
    b.add_argument("--soak-out", metavar="DIR", default=None,
                   help="with --soak: keep the run's outputs here (default: a temporary folder, removed)")
    b.add_argument("--profile", action="store_true",
                   help="instead of timing frames: each network's time per operator type, for each --precision, "
                        "from onnxruntime's profiler (--frames profiled runs per network, --json the figures)")
    b.set_defaults(func=cmd_bench, precision=None)

    dr = sub.add_parser("doctor", help="which backends, providers and compilers are usable here")
    dr.add_argument("--dicom", action="store_true",
                    help="also run every ultrasound DICOM that pydicom (and pydicom-data) know of through "
                         "`sonoscore run` and say, per file, its frames, records and errors (exit 3 when a file "
                         "gives other than one record per frame or an error other than the burned-in-text refusal)")
    dr.add_argument("--bundle", help="with --dicom: the bundle to run them through (default out/demo/bundle)")
    dr.add_argument("--trust", metavar="PUB", default=None, help="with --dicom: as `run --trust`")
    dr.add_argument("--json", help="with --dicom: write the per-file rows here")
    dr.set_defaults(func=cmd_doctor)
