"""What the commands do, as functions (the CLI parses arguments and calls these; tests call them directly)."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import sysconfig
import sys
import time
from pathlib import Path

import numpy as np

from runtime.bundle import Bundle
from runtime.pipeline import Pipeline
from runtime.record import FrameRecord
from runtime.sources import Frame, open_source
from runtime.stream import DROPPED, StreamStats, run_stream

BENCH_STAGES = ("preprocess", "unet", "gate", "vgg", "booster", "total")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_record(rec: FrameRecord) -> str:
    total = rec.latency_ms.get("total", 0.0)
    if rec.error:
        return f"frame {rec.frame:5d}  ERROR     {rec.error}"
    if not rec.accepted:
        return f"frame {rec.frame:5d}  rejected  mask {rec.mask_fraction:6.1%}  (no kidney in view)  {total:7.1f} ms"
    p = max(rec.probabilities or [0.0])
    return (f"frame {rec.frame:5d}  accepted  mask {rec.mask_fraction:6.1%}  grade {rec.grade} (p={p:.2f})"
            f"  {total:7.1f} ms")


def run_bundle(bundle_path, source_spec: str, *, backend="ort", precision="fp32", policy=None, results=None,
               video=None, masks=None, summary=None, quiet=False, threads=None, cache_dir=None, report=None,
               smoothing=None, view=None, display=False, keep_view=False) -> StreamStats:
    """`sonoscore run`: stream a source through a bundle into the requested sinks."""
    from runtime.sinks.jsonl import JsonlSink
    from runtime.sinks.masks import MaskSink
    from runtime.sinks.summary import StudySummary
    from runtime.sinks.video import VideoSink

    bundle = Bundle.load(bundle_path)
    source = open_source(source_spec)
    policy = policy or ("newest" if source.live else "all")
    sinks = []
    if results:
        sinks.append(JsonlSink(Path(results)))
    if video:
        sinks.append(VideoSink(Path(video), fps=source.fps or 30.0, disclaimer=bundle.disclaimer))
    if masks:
        sinks.append(MaskSink(Path(masks)))
    study = StudySummary(Path(summary) if summary else None, disclaimer=bundle.disclaimer,
                         html_path=Path(report) if report else None, smoothing_half_life=smoothing)
    sinks.append(study)
    viewer = None
    try:
        if view is not None:
            from runtime.viewer import LiveViewer
            viewer = LiveViewer(view.get("host", "127.0.0.1"), view.get("port", 0), view.get("token"),
                                disclaimer=bundle.disclaimer)
            sinks.append(viewer)
            _say(f"live viewer: {viewer.url}")
        if display:
            from runtime.viewer import DisplayWindow
            sinks.append(DisplayWindow(disclaimer=bundle.disclaimer))
    except BaseException:
        for sk in sinks:
            sk.close()
        source.close()
        raise
    if bundle.disclaimer:
        _say(f"NOTE: {bundle.disclaimer}")
    _say(f"running {bundle.root} ({precision}, {backend}) on {source.source_id}, policy {policy}"
         + (f" ({source.annotations} annotation files beside their images are not frames)"
            if getattr(source, "annotations", 0) else ""))

    truth: set[int] = set()

    def show(rec: FrameRecord, stats: StreamStats) -> None:
        if "truth_grade" in rec.meta:  # the simulated probe knows its patient's grade
            truth.add(int(rec.meta["truth_grade"]))
        if rec.error == DROPPED:
            return
        if not quiet:
            print(format_record(rec), flush=True)
        elif rec.error:  # errors are shown even when quiet: they name an input the user must fix
            _say(format_record(rec))

    try:
        with Pipeline(bundle, backend=backend, precision=precision, threads=threads, cache_dir=cache_dir) as pipe:
            stats = run_stream(source, pipe.process, sinks, policy=policy, on_record=show)
        if viewer is not None and keep_view:
            _say(f"stream ended; the viewer keeps the last frame at {viewer.url}; Ctrl-C to quit")
            import threading
            threading.Event().wait()
    finally:
        for s in sinks:
            s.close()
        source.close()
    s = study.summary()
    final = (f"final grade {s['final_grade']} (confidence {s['confidence']:.2f})" if s.get("final_grade")
             else "no frame passed the quality gate: no grade")
    if truth:
        final += f" (the simulated patient's true grade: {', '.join(map(str, sorted(truth)))})"
    lat = s.get("latency_ms", {}).get("total", {})
    _say(f"{stats.frames} frames: {stats.accepted} accepted, {stats.frames - stats.accepted - stats.errors - stats.dropped}"
         f" rejected by the gate, {stats.errors} errors, {stats.dropped} dropped; {stats.fps:.1f} fps processed; "
         f"latency p50 {lat.get('p50', float('nan')):.1f} ms, p95 {lat.get('p95', float('nan')):.1f} ms; {final}")
    for err in stats.sink_errors:
        _say(f"warning: an output could not be written: {err}")
    if bundle.disclaimer:
        _say(f"NOTE: {bundle.disclaimer}")
    return stats


def evaluate_bundle(bundle_path, data_dir, *, precision="fp32", backend="ort", report=None, quiet=False,
                    cache_dir=None) -> dict:
    """`sonoscore eval`: kidney IoU and grade metrics on a labelme dataset, through the deployed pipeline."""
    from runtime.dataset import read_dataset
    from runtime.evaluate import classification_report, confusion_png, iou
    from runtime import preprocess as pp

    bundle = Bundle.load(bundle_path)
    try:
        samples = read_dataset(Path(data_dir))
    except ValueError as e:
        from runtime.errors import UserError
        raise UserError(str(e)) from None
    if not samples:
        from runtime.errors import UserError
        raise UserError(f"dataset {data_dir} has no labelled images; point --data at a labelme folder")
    ious, y_true, y_pred, errors = [], [], [], []
    gate_ok = gate_n = 0
    with Pipeline(bundle, backend=backend, precision=precision, cache_dir=cache_dir) as pipe:
        for i, s in enumerate(samples):
            try:
                gray = s.load_gray()
                truth = s.load_mask()
            except Exception as e:  # unreadable image: counted, reported, evaluation goes on
                errors.append(f"{s.image_path.name}: {e}")
                continue
            rec = pipe.process(Frame(i, "eval", time.time(), gray))
            if rec.error:
                errors.append(rec.error)
                continue
            truth224 = pp.crop_mask(truth, rec.region, bundle.size)
            has_kidney = truth224.mean() >= bundle.min_mask_fraction
            if truth224.any():
                ious.append(iou(rec.mask, truth224))
            gate_n += 1
            gate_ok += rec.accepted == has_kidney
            if has_kidney and s.grade is not None and rec.accepted:
                y_true.append(s.grade - 1)
                y_pred.append(rec.grade - 1)
            if not quiet and (i + 1) % 25 == 0:
                _say(f"  evaluated {i + 1}/{len(samples)} images")
    graded_truth = sum(1 for s in samples if s.grade is not None)
    out = {"bundle": str(bundle.root), "precision": precision, "images": len(samples),
           "iou_mean": float(np.mean(ious)) if ious else None, "iou_images": len(ious),
           "gate_agreement": gate_ok / gate_n if gate_n else None,
           "graded_frames": len(y_true), "errors": errors}
    if y_true:
        out.update(classification_report(y_true, y_pred, n_classes=bundle.num_classes,
                                         class_names=[str(g) for g in range(1, bundle.num_classes + 1)]))
    elif graded_truth:
        out["note"] = "no labelled kidney frame passed the gate: no grade metrics"
    if bundle.disclaimer:
        out["disclaimer"] = bundle.disclaimer
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(out, indent=2) + "\n")
        if y_true:
            png = Path(report).with_suffix(".confusion.png")
            confusion_png(np.array(out["confusion_matrix"]), png, [f"grade {g}" for g in range(1, 5)],
                          f"IFTA grade, {len(y_true)} frames ({precision})")
    acc = out.get("accuracy")
    _say(f"eval: {len(samples)} images, kidney IoU {out['iou_mean'] if out['iou_mean'] is not None else float('nan'):.3f}, "
         f"gate agreement {out['gate_agreement'] or 0:.3f}, grade accuracy "
         f"{acc if acc is not None else float('nan'):.3f} on {len(y_true)} frames, {len(errors)} errors")
    return out


def bench_frames(n: int, seed: int = 7) -> list[Frame]:
    """Kidney frames from the simulated probe, made before timing starts."""
    from runtime.phantom import KidneyPhantom
    frames, i = [], 0
    ph = KidneyPhantom(grade=None, seed=seed)
    while len(frames) < n:
        pf = ph.frame(i)
        if pf.has_kidney:
            frames.append(Frame(len(frames), "bench", 0.0, pf.image))
        i += 1
    return frames


def bench_bundle(bundle_path, *, backend="ort", precision="fp32", frames=100, warmup=3, json_path=None,
                 threads=None, plot=None, cache_dir=None) -> dict:
    """`sonoscore bench`: per-stage latency of the whole pipeline, every stage run on every frame.

    The gate is opened (min mask fraction 0) so the VGG and the booster run on every frame whatever the UNet
    says: this measures cost, not accuracy. Frames are generated before timing.

    `precision` may name several ("fp32,int8"): each gets its own pipeline and they take turns frame by frame,
    so a load change on the machine hits all of them alike and the speed-up between them is measured in one run.
    The top-level figures are those of the first precision; "precisions" holds each one's, and "speedup" each
    one's networks-only and total p50 against the first.
    """
    bundle = Bundle.load(bundle_path)
    precisions = [p.strip() for p in str(precision).split(",") if p.strip()]
    from runtime.errors import UserError
    if frames < 1:
        raise UserError("--frames must be at least 1")
    bad = [p for p in precisions if p not in ("fp32", "fp16", "int8")]
    if not precisions or bad:
        raise UserError(f"--precision {precision}: use fp32, fp16 or int8, or several joined by commas")
    data = bench_frames(frames + warmup)
    samples = {p: {s: [] for s in BENCH_STAGES} for p in precisions}
    walls = {p: 0.0 for p in precisions}
    pipes = {}
    try:
        for p in precisions:
            pipes[p] = Pipeline(bundle, backend=backend, precision=p, threads=threads, min_mask_fraction=0.0,
                                cache_dir=cache_dir).__enter__()
        first = pipes[precisions[0]]
        _say(f"bench: {frames} frames (+{warmup} warm-up), {', '.join(precisions)} on {backend}, "
             f"booster {first.booster.backend}" + (" (precisions take turns frame by frame)" if len(pipes) > 1 else ""))
        for k, f in enumerate(data):
            for p, pipe in pipes.items():
                t0 = time.perf_counter()
                f.t_capture = time.time()
                rec = pipe.process(f, t0)
                if rec.error:
                    raise RuntimeError(f"bench frame failed ({p}): {rec.error}")
                if k >= warmup:
                    walls[p] += time.perf_counter() - t0
                    for s in BENCH_STAGES:
                        samples[p][s].append(rec.latency_ms.get(s, 0.0))
            if (k + 1) % max(1, (frames + warmup) // 10) == 0:
                _say(f"  {k + 1}/{frames + warmup} frames")
        booster_warm = _booster_isolated(first, data[warmup:warmup + 5])
    finally:
        for pipe in pipes.values():
            pipe.__exit__(None, None, None)

    def summary(p: str) -> dict:
        smp = samples[p]
        nets = np.array(smp["unet"]) + np.array(smp["vgg"])
        return {"frames": frames, "fps": frames / max(walls[p], 1e-9),
                "stages": {s: _percentiles(v) for s, v in smp.items()},
                "networks_p50_ms": float(np.percentile(nets, 50)),
                "cpu_overhead_fraction": 1.0 - float(nets.sum() / max(1e-9, np.sum(smp["total"]))),
                "files": {n: bundle.network_file(n, p).name for n in ("unet", "vgg")}}

    per = {p: summary(p) for p in precisions}
    head = per[precisions[0]]
    out = {"frames": frames, "fps": head["fps"], "stages": head["stages"], "backend": backend,
           "precision": precisions[0], "booster_backend": first.booster.backend,
           "booster_call": first.booster.row_call,
           "cpu_overhead_fraction": head["cpu_overhead_fraction"], "booster_isolated": booster_warm,
           "networks": {n: {"width": bundle.manifest["networks"][n].get("width"),
                            "file": bundle.network_file(n, precisions[0]).name} for n in ("unet", "vgg")},
           "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()}}
    if len(precisions) > 1:
        out["precisions"] = per
        out["speedup"] = {p: {"networks_p50": head["networks_p50_ms"] / per[p]["networks_p50_ms"],
                              "total_p50": head["stages"]["total"]["p50_ms"] / per[p]["stages"]["total"]["p50_ms"]}
                          for p in precisions[1:]}
    for p in precisions:
        if len(precisions) > 1:
            _say(f"  -- {p} ({per[p]['files']['unet']}, {per[p]['files']['vgg']})")
        for s in BENCH_STAGES:
            st = per[p]["stages"][s]
            _say(f"  {s:10s} p50 {st['p50_ms']:9.3f}  p95 {st['p95_ms']:9.3f}  p99 {st['p99_ms']:9.3f}  "
                 f"max {st['max_ms']:9.3f} ms")
        _say(f"  {per[p]['fps']:.2f} frames/s; everything but the two networks: "
             f"{per[p]['cpu_overhead_fraction']:.2%} of the per-frame total")
    for p, sp in out.get("speedup", {}).items():
        _say(f"  {p} vs {precisions[0]}: the two networks {sp['networks_p50']:.2f}x faster (p50 "
             f"{per[p]['networks_p50_ms']:.1f} vs {head['networks_p50_ms']:.1f} ms), whole frame {sp['total_p50']:.2f}x")
    _say(f"  booster alone, warm caches (same frames' features, back to back): p50 {booster_warm['p50_us']:.1f} us, "
         f"p99 {booster_warm['p99_us']:.1f} us; in the pipeline it runs right after the VGG, with cold caches")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
    if plot:
        from runtime.evaluate import latency_png
        latency_png(samples[precisions[0]], Path(plot),
                    f"sonoscore bench: {precisions[0]}, {backend}, {frames} frames")
    return out


def _booster_isolated(pipe: Pipeline, frames: list[Frame], repeats: int = 200) -> dict[str, float]:
    """The booster's own cost per frame, warm: predict() on real features back to back."""
    from runtime import preprocess as pp
    feats = []
    for f in frames:
        img, _ = pp.preprocess(pp.to_gray(f.pixels, f.channel_order), size=pipe.size,
                               crimmins_iterations=pipe.iterations)
        feats.append(pipe.features(img, pipe.segment(img))[None])
    ts = []
    for _ in range(repeats):
        for x in feats:
            t = time.perf_counter()
            pipe.booster.predict_one(x)
            ts.append((time.perf_counter() - t) * 1e6)
    return {"p50_us": float(np.percentile(ts, 50)), "p99_us": float(np.percentile(ts, 99)), "calls": len(ts)}


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


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
