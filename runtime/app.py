"""What the commands do, as functions (the CLI parses arguments and calls these; tests call them directly)."""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sysconfig
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime import logs
from runtime.bundle import Bundle
from runtime.pipelines import open_pipeline
from runtime.record import DROPPED, FrameRecord
from runtime.sources import open_source
from runtime.stream import StopRequest, StreamStats, run_stream

log = logs.get("run")


def format_record(rec: FrameRecord) -> str:
    total = rec.latency_ms.get("total", 0.0)
    if rec.error:
        return f"frame {rec.frame:5d}  ERROR     {rec.error}"
    if not rec.accepted:
        why = "no kidney in view" if rec.scope is None or not rec.refused else f"not graded: {rec.refused}"
        return f"frame {rec.frame:5d}  rejected  mask {rec.mask_fraction:6.1%}  ({why})  {total:7.1f} ms"
    p = max(rec.probabilities or [0.0])
    return (f"frame {rec.frame:5d}  accepted  mask {rec.mask_fraction:6.1%}  grade {rec.grade} (p={p:.2f})"
            f"  {total:7.1f} ms")


@dataclass(frozen=True)
class ViewConfig:
    """`--view`: where the live browser viewer listens (runtime/sinks/viewer.py). A host beyond loopback needs a
    token; one is generated when `token` is None. `port` 0 picks a free port. `keep`: serve the last frame after
    the source ends, until Ctrl-C."""
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    keep: bool = False


@dataclass(frozen=True)
class RunConfig:
    """What `sonoscore run` does: the bundle and source, how to run them, and which outputs to write (each None
    or False: not written or not shown). Paths may be str or Path."""
    bundle: str | Path
    source: str                                   # a source string (runtime/sources)
    backend: str = "ort"                          # ort or trt
    device: str = "cpu"                           # cpu, or cuda: the device-resident pipeline (runtime/gpu)
    cuda_graphs: bool = False                     # --cuda-graphs: replay the networks as CUDA graphs (cuda, ort)
    precision: str = "fp32"                       # fp32, fp16 or int8
    policy: str | None = None                     # newest or all; None: newest for live sources, else all
    threads: int | None = None                    # CPU threads per network; None: all cores
    cache_dir: str | Path | None = None           # compiled booster / engine cache; None: the default
    results: str | Path | None = None             # --results: JSONL, one record per input frame
    video: str | Path | None = None               # --video: the overlay video (MP4)
    masks: str | Path | None = None               # --save-masks: a folder of mask PNGs
    summary: str | Path | None = None             # --study-summary: the per-study aggregate (JSON)
    report: str | Path | None = None              # --study-report: the one-page study report (HTML)
    smoothing: float | None = None                # --smooth: EMA half-life, in accepted frames
    view: ViewConfig | None = None                # --view: the live browser viewer
    display: bool = False                         # --display: the overlay in a window on this machine's screen
    quiet: bool = False                           # no line per frame (errors are still shown)
    trust: str | Path | None = None               # --trust: the public key a signed bundle must verify with
    trust_label: str = "--trust"                  # how to name it (--trust, or SONOSCORE_TRUST from the environment)
    record_paths: bool = False                    # --record-paths: records carry source_file and frame_in_file
    mask_size: str = "224"                        # --mask-size: 224, or original (the source frame's size)
    send: str | Path | None = None                # --send: a YAML configuration; DICOM results to its destinations
    # Set to end the run early (the CLI's SIGINT/SIGTERM/SIGHUP handlers): the stream stops after the frame in
    # hand and the outputs are finished. Not part of what the run does, so not compared.
    stop: StopRequest | None = field(default=None, compare=False, repr=False)


def _output_paths(config: RunConfig) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    files = [(label, Path(p)) for label, p in (("--results", config.results), ("--video", config.video),
                                                ("--study-summary", config.summary),
                                                ("--study-report", config.report)) if p]
    folders = [("--save-masks", Path(config.masks))] if config.masks else []
    return files, folders


def check_run_outputs(config: RunConfig) -> None:
    """Refuse, before anything starts or is written, output paths that cannot work (runtime.sinks.outputs.check_outputs):
    UserError, one sentence."""
    from runtime.sinks.outputs import check_outputs
    files, folders = _output_paths(config)
    inputs = [config.source] if os.path.exists(config.source) else []
    check_outputs(files, folders, inputs=inputs, stream_ok=("--results",))


def _close_all(sinks: list, *, discard: bool = False) -> list[str]:
    """Close (or discard) every sink, each whatever the others do; one sentence per output that could not be
    finished."""
    from runtime.sinks import reason
    failures = []
    for sk in sinks:
        try:
            sk.discard() if discard and hasattr(sk, "discard") else sk.close()
        except Exception as e:
            label = getattr(sk, "label", type(sk).__name__)
            if type(sk).__name__ == "StudySummary":
                named = [(what, p) for what, p in (("study summary", sk.path), ("study report", sk.html_path)) if p]
                where = str(getattr(e, "filename", None) or "")
                hit = [(what, p) for what, p in named if where.startswith(str(p))]
                if where.endswith(".tmp"):          # the summary's own partial file (runtime/sinks/summary.py)
                    Path(where).unlink(missing_ok=True)
                label = " and ".join(f"{what} {p}" for what, p in (hit or named))
                failures.append(f"{label} could not be written ({reason(e)})")
            elif isinstance(e, OSError) and not e.strerror:
                failures.append(str(e))       # the sink's own sentence
            else:
                failures.append(f"{label} could not be finished ({reason(e)})")
    return failures


def run_bundle(config: RunConfig) -> StreamStats:
    """`sonoscore run`: stream a source through a bundle into the requested sinks.

    Output paths are checked before anything starts; the output files are created only once the pipeline is
    ready, written to partial files and renamed into place when the stream ends (or is stopped through
    `config.stop`), so a run that fails to start leaves every previous output as it was. An output that fails
    while the run goes on stops with one sentence; the run goes on for the others and `stats.sink_errors` lists
    them."""
    from runtime.errors import UserError
    from runtime.sinks import reason
    from runtime.sinks.jsonl import JsonlSink
    from runtime.sinks.masks import MaskSink
    from runtime.sinks.summary import StudySummary
    from runtime.sinks.video import VideoSink

    stop = config.stop if config.stop is not None else StopRequest()
    check_run_outputs(config)
    sender = None
    if config.send:                      # runtime/dicomnet/send.py: its configuration is checked before anything
        from runtime.dicomnet.send import SendRun, setup_logging
        setup_logging("sonoscore", quiet=config.quiet)
        sender = SendRun.prepare(config.send, config.source)
    from runtime.signing import check_trust, is_signed, unsigned_warning
    check_trust(config.bundle, config.trust, label=config.trust_label)   # under --trust: verified before parsed
    bundle = Bundle.load(config.bundle)
    # Made before anything is opened: a device this machine cannot run (--device cuda without pycuda, the GPU
    # kernels, onnxruntime-gpu or TensorRT) is one sentence now. What the sinks draw or save is all that the device
    # pipeline brings back from the GPU besides the features and the mask fraction.
    shown = bool(config.video or config.view is not None or config.display or config.send)
    pipeline = open_pipeline(bundle, device=config.device, backend=config.backend, precision=config.precision,
                             threads=config.threads, cache_dir=config.cache_dir, cuda_graphs=config.cuda_graphs,
                             keep_display=shown, keep_mask=shown or bool(config.masks))
    if not config.trust and not is_signed(bundle.root):
        log.info(unsigned_warning(bundle.root))
    if bundle.scope_warning:             # no scope gate: said at every start, never silently
        log.warning(bundle.scope_warning)
    source = open_source(config.source)
    policy = config.policy or ("newest" if source.live else "all")
    ui = []                              # the viewer and the display: they show, they write no file
    viewer = None
    try:
        if config.view is not None:
            from runtime.sinks.viewer import LiveViewer
            viewer = LiveViewer(config.view.host, config.view.port, config.view.token, disclaimer=bundle.disclaimer,
                                model=bundle.label, class_names=_shown_classes(bundle))
            ui.append(viewer)
            log.info(f"live viewer: {viewer.url}")
        if config.display:
            from runtime.sinks.display import DisplayWindow
            ui.append(DisplayWindow(disclaimer=bundle.disclaimer, model=bundle.label,
                                    class_names=_shown_classes(bundle)))
    except BaseException:
        _close_all(ui)
        source.close()
        raise
    if bundle.disclaimer:
        log.info(f"NOTE: {bundle.disclaimer}")
    on = ", frames on the GPU" + (", CUDA graphs" if config.cuda_graphs else "") if config.device == "cuda" else ""
    log.info(f"running {bundle.root} ({config.precision}, {config.backend}{on}) on {source.source_id}, policy {policy}"
         + (f" ({source.annotations} annotation files beside their images are not frames)"
            if getattr(source, "annotations", 0) else ""))

    truth: set[int] = set()

    def show(rec: FrameRecord, stats: StreamStats) -> None:
        if "truth_grade" in rec.meta:  # the simulated probe knows its patient's grade
            truth.add(int(rec.meta["truth_grade"]))
        if rec.error == DROPPED:
            return
        if not config.quiet:
            print(format_record(rec), flush=True)
        elif rec.error:  # errors are shown even when quiet: they name an input the user must fix
            log.info(format_record(rec))

    def open_outputs() -> list:
        """The output files' sinks, made once the pipeline is ready; a file that cannot be created is a run that
        could not start (UserError), and those already made are discarded."""
        made: list = []
        makers = [("--results", config.results, lambda p: JsonlSink(p)),
                  ("--video", config.video,
                   lambda p: VideoSink(p, fps=source.fps or 30.0, disclaimer=bundle.disclaimer, model=bundle.label,
                                       class_names=_shown_classes(bundle))),
                  ("--save-masks", config.masks, lambda p: MaskSink(p, size=config.mask_size))]
        for option, path, make in makers:
            if not path:
                continue
            try:
                made.append(make(Path(path)))
            except OSError as e:
                _close_all(made, discard=True)
                raise UserError(f"{option} {path} could not be created ({reason(e)})") from None
        made.append(StudySummary(Path(config.summary) if config.summary else None, disclaimer=bundle.disclaimer,
                                 card=bundle.card, class_names=_shown_classes(bundle),
                                 html_path=Path(config.report) if config.report else None,
                                 smoothing_half_life=config.smoothing))
        return made

    outputs: list = []
    started = False
    stats = None
    failures: list[str] = []
    try:
        with pipeline as pipe:
            if stop.is_set():
                raise KeyboardInterrupt
            outputs = open_outputs()
            study = outputs[-1]
            if sender is not None:
                outputs.append(sender.sink)
            started = True
            stop.phase = "streaming"
            process = sender.tag(pipe.process) if sender else pipe.process   # --send: each record's file
            stats = run_stream(source, process, outputs + ui, policy=policy, on_record=show, stop=stop,
                               on_sink_error=lambda msg: log.info(f"sonoscore: {msg}"), record_paths=config.record_paths)
        if viewer is not None and config.view.keep and not stop.is_set():
            log.info(f"stream ended; the viewer keeps the last frame at {viewer.url}; Ctrl-C to quit")
            while not stop.is_set():
                time.sleep(0.2)
    finally:
        if started:
            stop.phase = "finishing"
        failures = _close_all(outputs, discard=not started) + _close_all(ui)
        source.close()
        for msg in failures:
            log.info(f"sonoscore: {msg}")
        stop.phase = "done"
    if sender is not None:               # DICOM results to the outbox and on to the destinations
        sent = sender.finish(bundle, stopped=stop.is_set())
        for msg in sent:
            log.info(f"sonoscore: {msg}")
        failures += sent
    stats.sink_errors.extend(failures)
    if stop.is_set():
        log.info(f"sonoscore: stopped by {_signal_name(stop.signum)} after {stats.frames} frames; the outputs hold "
             f"every record up to then")
    s = study.summary()
    final = (f"final grade {s['final_grade']} (confidence {s['confidence']:.2f})" if s.get("final_grade")
             else f"no grade ({s.get('no_grade_reason') or 'no frame passed the quality gate'})")
    if truth:
        final += f" (the simulated patient's true grade: {', '.join(map(str, sorted(truth)))})"
    lat = s.get("latency_ms", {}).get("total", {})
    wait = s.get("latency_ms", {}).get("wait", {})
    log.info(f"{stats.frames} frames: {stats.accepted} accepted, {stats.frames - stats.accepted - stats.errors - stats.dropped}"
         f" not graded (the gates), {stats.errors} errors, {stats.dropped} dropped; {stats.fps:.1f} fps processed; "
         f"latency p50 {lat.get('p50', float('nan')):.1f} ms, p95 {lat.get('p95', float('nan')):.1f} ms"
         f" (processing; before it, frames waited p50 {wait.get('p50', float('nan')):.1f} ms); {final}")
    if bundle.disclaimer:
        log.info(f"NOTE: {bundle.disclaimer}")
    return stats


def _signal_name(signum: int | None) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except (TypeError, ValueError):
        return "a stop request"


def ensure_calibration_side() -> None:
    """`calibrate` needs the onnx package (the quantizer edits the graph); the device install may lack it."""
    if importlib.util.find_spec("onnx") is None:
        from runtime.errors import UserError
        raise UserError("`sonoscore calibrate` needs the onnx package, which this install lacks; install "
                        "sonoscore with its export extra (pip install 'sonoscore[export]')")


def ensure_export_side(command: str) -> None:
    missing = [m for m in ("torch", "onnx", "xgboost") if importlib.util.find_spec(m) is None]
    if missing:
        from runtime.errors import UserError
        raise UserError(f"`sonoscore {command}` needs the export extras ({', '.join(missing)} missing); "
                        f"install them with: pip install 'sonoscore[export]' (or run `make demo`)")


def doctor() -> dict:
    """Print and return what can run here: backends/providers, booster compiler, optional packages."""
    from runtime.backends import available_backends
    report = {"python": sys.version.split()[0], "platform": platform.platform(),
              "backends": available_backends(),
              "c_compiler": shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or None,
              "python_headers": (Path(sysconfig.get_paths().get("include") or "") / "Python.h").is_file(),
              "packages": {}}
    for mod in ("numpy", "cv2", "onnxruntime", "treelite", "tl2cgen", "pydicom", "tensorrt", "pycuda", "torch",
                "onnx", "xgboost"):
        if importlib.util.find_spec(mod) is None:
            report["packages"][mod] = "not installed"
            continue
        try:
            m = __import__(mod)
            report["packages"][mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # a package that is there but broken is worth a line
            report["packages"][mod] = f"installed but fails to import ({type(e).__name__}: {e})"
    print(f"python {report['python']} on {report['platform']}")
    print("backends:")
    for k, v in report["backends"].items():
        print(f"  {k:28s} {v}")
    print(f"booster compiler: {report['c_compiler'] or 'none (the booster falls back to treelite GTIL, slower)'}")
    print("booster per-frame call: " + ("a small CPython extension (Python headers found)" if report["python_headers"]
                                       else "ctypes (no Python.h: install python3-dev for the faster call)"))
    print("packages:")
    for k, v in report["packages"].items():
        print(f"  {k:12s} {v}")
    return report


def _shown_classes(bundle) -> tuple[str, ...]:
    """The bundle's class names as the overlay, viewer, window and report show them (runtime.sinks.report)."""
    from runtime.sinks.report import display_class_names
    return display_class_names(bundle.manifest.get("classes"))
