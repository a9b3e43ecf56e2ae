"""Pipelines: a bundle's per-frame graph (runtime.graph) run on frames, one record per frame.

    frame -> prepare (gray, crop, resize, Crimmins)  [preprocess]
          -> Graph.run: segment [unet] -> gate [gate] -> scope checks [scope] -> features [vgg]
                        -> the view check [scope] -> score [booster]

`FramePipeline` is what every pipeline shares: the bundle's graph and network files at a precision, the booster's
options, and `process()` (a record per frame that never raises for a bad frame, with its wait and total latency).
`Pipeline` runs the graph on the CPU-side runners (onnxruntime, TensorRT); runtime.gpu.pipeline.DevicePipeline
keeps the frame on the GPU; export.baseline.TorchBaseline runs it with eager torch modules. The commands (run,
listen, bench, eval) get theirs from one factory, runtime.pipelines.open_pipeline (device cpu or cuda).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from runtime import preprocess as pp
from runtime.backends import make_runner
from runtime.booster import Booster
from runtime.bundle import Bundle, check_runner
from runtime.graph import Source
from runtime.measure import measure_record
from runtime.record import FrameRecord
from runtime.sources import Frame


class FramePipeline:
    """A bundle's graph at one precision, run frame by frame. Subclasses load their runners on `__enter__` and
    fill in `_run(frame, rec, lap)`; `process` wraps it with the record, its error and its latencies."""

    def __init__(self, bundle: Bundle, *, backend: str = "ort", precision: str = "fp32",
                 booster_backend: str = "auto", cache_dir: Path | None = None,
                 min_mask_fraction: float | None = None, mask_threshold: float | None = None,
                 scope_open: bool = False):
        self.bundle, self.backend, self.precision = bundle, backend, precision
        self.graph = bundle.graph(mask_threshold=mask_threshold, min_mask_fraction=min_mask_fraction,
                                  scope_open=scope_open)
        self.unet_spec, self.vgg_spec = bundle.network("unet"), bundle.network("vgg")
        self.unet_file = bundle.network_file("unet", precision)
        self.vgg_file = bundle.network_file("vgg", precision)
        self.booster_backend, self.cache_dir = booster_backend, cache_dir
        self.unet = self.vgg = self.booster = None

    def load_booster(self) -> Booster:
        return Booster.load(self.bundle.booster_file, num_class=self.bundle.num_classes, cache_dir=self.cache_dir,
                            backend=self.booster_backend)

    def process(self, frame: Frame, t_start: float | None = None) -> FrameRecord:
        """One frame -> one record. Never raises for a bad frame: the record carries the error instead.
        `t_start`: the perf_counter at which the caller took the frame. Latencies (runtime/record.py): `wait` is
        capture -> t_start; the stages and `total` (t_start -> result) are processing only, the stages' laps
        running on from t_start, so they add up to `total` but for the little after the last lap."""
        t0 = time.perf_counter() if t_start is None else t_start
        rec = FrameRecord(frame.index, frame.source_id, frame.t_capture, meta=frame.meta, error=frame.error)
        lat = rec.latency_ms
        lat["wait"] = max(0.0, (time.time() - frame.t_capture) * 1e3 - ms_since(t0))
        if not frame.error:
            try:
                self._run(frame, rec, Laps(lat, t0))
            except pp.FrameError as e:
                rec.error = f"frame {frame.index}: {e}"
                rec.accepted = False
        lat["total"] = ms_since(t0)
        return rec

    def _run(self, frame: Frame, rec: FrameRecord, lap: "Laps") -> None:
        raise NotImplementedError


class Pipeline(FramePipeline):
    """Runs a bundle on frames with onnxruntime or TensorRT runners. A context manager: networks and the booster
    are loaded on enter."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None, **options):
        super().__init__(bundle, **options)
        self.threads = threads

    def __enter__(self) -> "Pipeline":
        opts = {"intra_op_threads": self.threads} if self.threads else {}
        if self.backend == "trt":  # engines are built per precision, cached beside the compiled booster
            opts.update(precision=self.precision, cache_dir=self.cache_dir)
        try:
            self.unet = make_runner(self.backend, self.unet_file, **opts).__enter__()
            check_runner("unet", self.unet, self.graph, self.unet_file)
            self.vgg = make_runner(self.backend, self.vgg_file, **opts).__enter__()
            check_runner("vgg", self.vgg, self.graph, self.vgg_file, self.bundle.num_features)
            self.booster = self.load_booster()
            if self.backend == "ort" and self.precision == "int8":   # this CPU's integer kernels: one quick check
                from runtime.fidelity import check_here              # of the bundle's reference frames (cached)
                check_here(self.bundle, self.unet, self.vgg, self.booster, cache_dir=self.cache_dir)
        except BaseException:
            self.__exit__(None, None, None)   # a runner already open is released, not leaked
            raise
        return self

    def __exit__(self, *exc) -> None:
        for r in (self.unet, self.vgg):
            if r is not None:
                r.__exit__(None, None, None)
        self.unet = self.vgg = None

    def _run(self, frame: Frame, rec: FrameRecord, lap: "Laps") -> None:
        gray, rec.image, source_region = self.prepare_source(frame)
        rec.frame_shape, rec.frame_region = gray.shape[:2], source_region     # for --mask-size original
        rec.display, rec.region = shown_part(gray, source_region, frame.meta)
        lap("preprocess")
        result = self.graph.run(rec.image, self.unet, self.vgg, self.booster, lap,
                                source=Source(frame.pixels, source_region))
        rec.mask, rec.mask_fraction = result.gate.mask, result.gate.fraction
        scope_record(rec, result.refused, result.scope)
        rec.probabilities, rec.grade = result.probabilities, result.grade
        if rec.accepted:   # kidney length and area in mm, measured in the source frame (runtime/measure.py)
            measure_record(rec, rec.mask, source_region, frame, prob=result.prob, image=rec.image,
                           threshold=self.graph.mask_threshold)

    def prepare(self, frame: Frame) -> tuple[np.ndarray, np.ndarray, pp.Region]:
        """(gray display frame, preprocessed image, region it came from): the preprocessing every path shares
        (streaming, evaluation, INT8 calibration), so ranges measured offline match deployment."""
        gray, image, region = self.prepare_source(frame)
        gray, region = shown_part(gray, region, frame.meta)
        return gray, image, region

    def prepare_source(self, frame: Frame) -> tuple[np.ndarray, np.ndarray, pp.Region]:
        """`prepare` before `shown_part`: (gray frame, preprocessed image, the region it came from in the SOURCE
        frame's pixel coordinates, which measurements in mm need): the graph's one source preparation
        (`Graph.prepare_source`: window, scan-sector rule, crop, resize, Crimmins)."""
        return self.graph.prepare_source(frame)


def shown_part(gray: np.ndarray | None, region: pp.Region, meta: dict) -> tuple[np.ndarray | None, pp.Region]:
    """What sinks may save and show of a frame (video, viewer): all of it, or only its ultrasound region when it
    has (or may have) names and dates burned into its pixels (a DICOM frame), never the scanner's text around it.
    Without a source region that region is the scan sector (`preprocess.sector_frame`, which has already blacked
    out everything of the frame outside the sector)."""
    if gray is None or meta.get("burned_in_annotation", False) is False:
        return gray, region
    gray = np.ascontiguousarray(gray[region.y0:region.y1, region.x0:region.x1])
    return gray, pp.Region(0, 0, gray.shape[1], gray.shape[0])


def scope_record(rec: FrameRecord, refused: str | None, verdict) -> None:
    """A record's verdicts: `accepted` (graded: both gates passed), `refused` (why not) and `scope` (the scope
    verdict as the results JSONL holds it), from `Result.refused` / `Graph.refusal` and the scope verdict."""
    rec.accepted = refused is None
    rec.refused = refused
    rec.scope = None if verdict is None else verdict.record()


class Laps:
    """Stage latencies: `lap(stage)` records the ms since the previous lap (or since `t_start`, default: when it was
    made); a stage lapped twice (the scope gate, before and after the VGG) adds up."""

    def __init__(self, latency_ms: dict[str, float], t_start: float | None = None):
        self.latency_ms, self.t = latency_ms, time.perf_counter() if t_start is None else t_start

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.latency_ms[stage] = self.latency_ms.get(stage, 0.0) + (now - self.t) * 1e3
        self.t = now


def ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3
