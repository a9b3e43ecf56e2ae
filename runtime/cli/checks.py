"""`eval` (metrics on a labelled dataset), `bench` (latency) and `doctor` (what is usable here)."""
from __future__ import annotations

import argparse

from runtime.cli.common import (EXIT_FRAME_ERRORS, EXIT_OK, LABEL_HELP, backend_opts, check_trust,
                                kidney_labels)


def cmd_eval(args: argparse.Namespace) -> int:
    labels = kidney_labels(args.label)        # a bad --label is refused before anything else
    check_trust(args)
    from runtime.evaluate import evaluate_bundle
    report = evaluate_bundle(args.bundle, args.data, precision=args.precision, backend=args.backend,
                             report=args.report, quiet=args.quiet, labels=labels)
    return EXIT_FRAME_ERRORS if report["errors"] else EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.precision:                    # a bad list is refused before the bundle is touched
        from runtime.bench import parse_precisions
        parse_precisions(args.precision)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from runtime.app import doctor
    doctor()
    return EXIT_OK


def add_parsers(sub) -> None:
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

    dr = sub.add_parser("doctor", help="which backends, providers and compilers are usable here")
    dr.set_defaults(func=cmd_doctor)
