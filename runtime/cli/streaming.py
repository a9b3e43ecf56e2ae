"""`run` (stream a source through a bundle) and `demo`."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from runtime.cli.common import (EXIT_FRAME_ERRORS, EXIT_OK, EXIT_OUTPUT, EXIT_SIGNAL_BASE, UserError,
                                backend_opts, stop_signals)
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from runtime.app import RunConfig, ViewConfig, run_bundle
    from runtime.stream import StopRequest
    view = (ViewConfig(host=args.view_host, port=args.view_port, token=args.view_token, keep=args.view_keep)
            if args.view else None)
    stop = StopRequest()
    from runtime.signing import trust_option
    trust, trust_label = trust_option(args.trust)
    config = RunConfig(bundle=args.bundle, source=args.source, backend=args.backend, precision=args.precision,
                       device=run_device(args.device), cuda_graphs=args.cuda_graphs,
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


def run_device(given: str | None) -> str:
    """--device, else $SONOSCORE_DEVICE (the service's env file sets it), else cpu; a bad value in the environment
    is one sentence naming it."""
    if given:
        return given
    env = os.environ.get("SONOSCORE_DEVICE", "").strip()
    if env and env not in ("cpu", "cuda"):
        raise UserError(f"SONOSCORE_DEVICE is '{env}' in the environment; set it to cpu or cuda (or give --device)")
    return env or "cpu"


def cmd_demo(args: argparse.Namespace) -> int:
    from runtime.app import ensure_export_side
    ensure_export_side("demo")
    from export.demo import run_demo
    run_demo(Path(args.out), frames=args.frames, fps=args.fps, bench_frames=args.bench_frames, rebuild=args.rebuild)
    return EXIT_OK


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="build the demo bundle if missing, then run it on the simulated probe")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--frames", type=int, default=150, help="frames to stream from the simulated probe")
    d.add_argument("--fps", type=float, default=30.0, help="simulated probe frame rate")
    d.add_argument("--bench-frames", type=int, default=20, help="frames for the full-width benchmark")
    d.add_argument("--rebuild", action="store_true", help="rebuild the bundle even if it exists")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="stream a source through a bundle")
    r.add_argument("--bundle", required=True, help="the bundle folder (manifest.json, networks, booster)")
    r.add_argument("--source", required=True, help="image, folder, video, DICOM, sim://kidney?grade=3&fps=30&frames=300, "
                   "igtl://host:18944/Device, v4l2:///dev/video0 or gst://<pipeline>")
    backend_opts(r)
    r.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cpu: each network on --backend with the frame in host memory; cuda: the frame uploaded "
                        "once and kept on the GPU (GPU kernels, IO binding; the path `bench --device cuda` "
                        "measures; needs pycuda, nvcc and onnxruntime-gpu or TensorRT). Default: "
                        "$SONOSCORE_DEVICE, else cpu")
    r.add_argument("--cuda-graphs", action="store_true",
                   help="with --device cuda and --backend ort: replay each network as a CUDA graph")
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
