"""The per-frame graph of the IFTA grader, read top to bottom:

    frame -> gray -> crop -> 224x224 -> Crimmins          preprocess
          -> UNet -> sigmoid mask                          unet
          -> mask > 0.5, fraction, gate, image * mask      gate
          -> VGG-19-BN -> 1024 features (Fc2)              vgg
          -> XGBoost softprob -> grade = argmax + 1        booster
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from runtime import preprocess as pp
from runtime.backends import make_runner
from runtime.booster import Booster
from runtime.bundle import Bundle
from runtime.record import FrameRecord
from runtime.sources import Frame


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked image with cv2.multiply semantics (uint8, saturating; mask is 0/1)."""
    return cv2.multiply(image, mask)


def bind_bundle(pipe, bundle: Bundle, *, backend: str, precision: str, booster_backend: str,
                cache_dir: Path | None, min_mask_fraction: float | None, mask_threshold: float | None) -> None:
    """What a pipeline (this one, or runtime.gpu's DevicePipeline) takes from its bundle and options: the
    networks' specs and files at `precision`, the gate's threshold and minimum fraction (the bundle's unless
    given), the preprocessing size and Crimmins iterations."""
    pipe.bundle, pipe.backend, pipe.precision = bundle, backend, precision
    pipe.unet_spec, pipe.vgg_spec = bundle.network("unet"), bundle.network("vgg")
    pipe.unet_file = bundle.network_file("unet", precision)
    pipe.vgg_file = bundle.network_file("vgg", precision)
    pipe.booster_backend, pipe.cache_dir = booster_backend, cache_dir
    pipe.threshold = bundle.mask_threshold if mask_threshold is None else mask_threshold
    pipe.min_fraction = bundle.min_mask_fraction if min_mask_fraction is None else min_mask_fraction
    pipe.size, pipe.iterations = bundle.size, bundle.crimmins_iterations


def start_record(frame: Frame, t0: float) -> FrameRecord:
    """A frame's record as processing starts at perf_counter `t0`: its queue time (capture to `t0`) and the
    frame's own error, if it carries one."""
    rec = FrameRecord(frame.index, frame.source_id, frame.t_capture, meta=frame.meta, error=frame.error)
    rec.latency_ms["queue"] = max(0.0, (time.time() - frame.t_capture) * 1e3 - (time.perf_counter() - t0) * 1e3)
    return rec


class Pipeline:
    """Runs a bundle on frames. A context manager: networks and the booster are loaded on enter."""

    def __init__(self, bundle: Bundle, *, backend: str = "ort", precision: str = "fp32",
                 booster_backend: str = "auto", cache_dir: Path | None = None, threads: int | None = None,
                 min_mask_fraction: float | None = None, mask_threshold: float | None = None):
        bind_bundle(self, bundle, backend=backend, precision=precision, booster_backend=booster_backend,
                    cache_dir=cache_dir, min_mask_fraction=min_mask_fraction, mask_threshold=mask_threshold)
        self.threads = threads
        self.unet = self.vgg = self.booster = None

    def __enter__(self) -> "Pipeline":
        opts = {"intra_op_threads": self.threads} if self.threads else {}
        if self.backend == "trt":  # engines are built per precision, cached beside the compiled booster
            opts.update(precision=self.precision, cache_dir=self.cache_dir)
        try:
            self.unet = make_runner(self.backend, self.unet_file, **opts).__enter__()
            self.vgg = make_runner(self.backend, self.vgg_file, **opts).__enter__()
            self.booster = Booster.load(self.bundle.booster_file, num_class=self.bundle.num_classes,
                                        cache_dir=self.cache_dir, backend=self.booster_backend)
        except BaseException:
            self.__exit__(None, None, None)   # a runner already open is released, not leaked
            raise
        return self

    def __exit__(self, *exc) -> None:
        for r in (self.unet, self.vgg):
            if r is not None:
                r.__exit__(None, None, None)
        self.unet = self.vgg = None

    # -- the graph -------------------------------------------------------------------------------------------
    def process(self, frame: Frame, t_start: float | None = None) -> FrameRecord:
        """One frame -> one record. Never raises for a bad frame: the record carries the error instead."""
        t0 = time.perf_counter() if t_start is None else t_start
        rec = start_record(frame, t0)
        lat = rec.latency_ms
        if frame.error:
            return finish_record(rec, t0)
        try:
            t = time.perf_counter()
            rec.display, rec.image, rec.region = self.prepare(frame)
            image = rec.image
            lat["preprocess"] = ms_since(t)

            t = time.perf_counter()
            prob = self.unet.infer({self.unet_spec.input_name: pp.to_input(image, 1)})[self.unet_spec.output_name]
            lat["unet"] = ms_since(t)

            t = time.perf_counter()
            mask = (prob[0, 0] > self.threshold).astype(np.uint8)
            rec.mask = mask
            rec.mask_fraction = float(mask.mean())
            rec.accepted = rec.mask_fraction >= self.min_fraction
            masked = apply_mask(image, mask) if rec.accepted else None
            lat["gate"] = ms_since(t)
            if not rec.accepted:
                return finish_record(rec, t0)

            t = time.perf_counter()
            feats = self.vgg.infer({self.vgg_spec.input_name: pp.to_input(masked, self.vgg_spec.channels)},
                                   [self.vgg_spec.output_name])[self.vgg_spec.output_name]
            lat["vgg"] = ms_since(t)

            t = time.perf_counter()
            rec.probabilities, rec.grade = self.booster.predict_one(feats)
            lat["booster"] = ms_since(t)
        except pp.FrameError as e:
            rec.error = f"frame {frame.index}: {e}"
            rec.accepted = False
        return finish_record(rec, t0)

    def prepare(self, frame: Frame) -> tuple[np.ndarray, np.ndarray, pp.Region]:
        """(gray display frame, preprocessed 224x224 image, region it came from): the preprocessing every path
        shares (streaming, evaluation, INT8 calibration), so ranges measured offline match deployment."""
        gray = pp.to_gray(frame.pixels, frame.channel_order, frame.window)
        image, region = pp.preprocess(gray, frame.region, size=self.size, crimmins_iterations=self.iterations)
        if frame.meta.get("burned_in_annotation", False) is not False:
            # A DICOM frame that has (or may have) names and dates burned into its pixels: what sinks save and show
            # (video, viewer) is the ultrasound region only, never the scanner's text around it.
            gray = np.ascontiguousarray(gray[region.y0:region.y1, region.x0:region.x1])
            region = pp.Region(0, 0, gray.shape[1], gray.shape[0])
        return gray, image, region

    def features(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """VGG features of a preprocessed image under a 0/1 mask (training the booster uses this)."""
        masked = apply_mask(image, mask)
        return self.vgg.infer({self.vgg_spec.input_name: pp.to_input(masked, self.vgg_spec.channels)},
                              [self.vgg_spec.output_name])[self.vgg_spec.output_name][0]

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Binary 0/1 mask of a preprocessed image."""
        prob = self.unet.infer({self.unet_spec.input_name: pp.to_input(image, 1)})[self.unet_spec.output_name]
        return (prob[0, 0] > self.threshold).astype(np.uint8)


def finish_record(rec: FrameRecord, t0: float) -> FrameRecord:
    """The record's total latency: its queue time plus the time since perf_counter `t0`."""
    rec.latency_ms["total"] = rec.latency_ms.get("queue", 0.0) + ms_since(t0)
    return rec


def ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3
