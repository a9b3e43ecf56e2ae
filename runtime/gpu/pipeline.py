"""The device-resident pipeline: a frame goes up to the GPU once; only the features and the mask fraction (and the
mask or preprocessed image when a sink asks for them) come back. Same records as `runtime.pipeline.Pipeline`, so
sinks and the results JSONL are unchanged.

    with DevicePipeline(bundle, precision="fp16", cuda_graphs=True) as pipe:
        rec = pipe.process(frame)          # FrameRecord

Per frame, everything below is enqueued on ONE CUDA stream, and the host waits for it ONCE:

    host frame -> pinned upload -> gray/crop/resize/Crimmins -> UNet input     kernels.preprocess   [preprocess]
               (each network input normalised as the manifest declares: runtime.normalize)
               -> UNet (onnxruntime CUDA EP on our stream, or TensorRT)          runner.infer_device  [unet]
               -> mask > threshold, fraction (async copy), image * mask -> VGG input   kernels.gate   [gate]
               -> VGG -> Fc2 features -> async copy to pinned host memory       runner.infer_device  [vgg]
               == stream.synchronize() ==
               -> the scope gate on the CPU (Graph.check_scope), frames the gate accepted         [scope]
               -> booster on the CPU (runtime.booster, unchanged), graded frames only             [booster]

Gating on the GPU: the VGG runs on every frame and a rejected frame's features are discarded. Deciding before the
VGG would need a second host sync per frame (read the fraction, then launch or not) and a data-dependent launch,
which rules out one fixed sequence of graph replays; the VGG's cost on a rejected frame (under a millisecond on
the GPUs we target, and rejected frames are the exception while scanning a kidney) is the price of one sync per
frame and CUDA graphs. After the sync, a frame the gate accepted is checked by the scope gate on the host when
the bundle has a scope reference (its mask, probability map and preprocessed image come back for it, the features
are already there): `Graph.check_scope`, the same tests in the same order as `Graph.run`'s, so a frame gets the same
`refused` and `scope` on either path. The booster runs on graded frames only.

Stage times come from CUDA events recorded between the stages on the stream (`preprocess` includes the host-side
work before the upload: the region search, and 16-bit/windowed or colour-without-region frames converted to
uint8 gray on the CPU with `runtime.preprocess.to_gray`, as docs/design.md pins); `booster` and `total` are host
clocks. The CUDA primary context is shared by the kernels, pycuda, onnxruntime (CUDA runtime) and TensorRT.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import time
from pathlib import Path

import numpy as np

from runtime import preprocess as pp
from runtime.backends.base import BackendUnavailable, short
from runtime.backends.cuda import CudaDevice
from runtime.bundle import Bundle, check_runner
from runtime.measure import calibration_note, measure_record
from runtime.graph import Source
from runtime.pipeline import FramePipeline, Laps, scope_record, shown_part
from runtime.record import FrameRecord
from runtime.sources import Frame

# The GPU stages, in order; an event is recorded before the first and after each.
GPU_STAGES = ("preprocess", "unet", "gate", "vgg")


def cuda_parts(backend: str, kernels=None) -> tuple:
    """(the CUDA device class, the GPU kernels class) for the device pipeline on `backend` (ort: onnxruntime's CUDA
    execution provider; trt: TensorRT), checked before anything is opened; BackendUnavailable, one sentence that
    names everything this machine lacks for it (pycuda, the GPU kernels, onnxruntime-gpu or TensorRT).
    `kernels`: a kernels class already chosen (the bench's profiled one), not checked again."""
    missing = []
    if importlib.util.find_spec("pycuda") is None:
        missing.append("pycuda (pip install 'sonoscore[gpu]', built against this machine's CUDA)")
    else:
        try:
            importlib.import_module("pycuda.driver")
        except ImportError as e:
            missing.append(f"a pycuda that imports (this one fails: {short(e)}; rebuild it for this CUDA with "
                           f"device/setup.sh)")
        else:
            if kernels is None:
                try:
                    ok, why = importlib.import_module("runtime.gpu.kernels").available()
                except ImportError as e:
                    ok, why = False, f"runtime.gpu.kernels cannot be imported: {short(e)}"
                if not ok:
                    missing.append(f"the GPU kernels, which cannot run here ({why.rstrip('.')})")
    if backend == "ort":
        import onnxruntime
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            missing.append(f"onnxruntime's CUDA execution provider (this onnxruntime {onnxruntime.__version__} is "
                           f"the CPU build; install onnxruntime-gpu, or the Jetson wheel, in its place)")
    elif importlib.util.find_spec("tensorrt") is None:
        missing.append("TensorRT's Python bindings (python3-libnvinfer from JetPack, or NVIDIA's package index)")
    if missing:
        listed = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
        raise BackendUnavailable(f"the device pipeline needs {listed}, which this machine lacks; use the CPU "
                                 f"pipeline (--device cpu)")
    return CudaDevice, kernels or _load_kernels()


def _load_kernels():
    try:
        module = importlib.import_module("runtime.gpu.kernels")
    except ImportError as e:
        raise BackendUnavailable(f"the GPU kernels (runtime.gpu.kernels) cannot be imported ({short(e)}); use the "
                                 f"CPU pipeline") from None
    ok, why = module.available()
    if not ok:
        raise BackendUnavailable(f"the GPU kernels cannot run here: {why}")
    return module.GpuKernels


class DevicePipeline(FramePipeline):
    """Runs a bundle on frames with the frame resident on the GPU. A context manager, like `Pipeline`.

    backend "ort" (onnxruntime CUDA EP, IO binding on our stream; `cuda_graphs` replays each network as a CUDA
    graph) or "trt" (TensorRT engines, `infer_device` on our stream; no CUDA graphs). precision picks the bundle's
    network files. keep_mask / keep_image / keep_display bring the 224x224 mask, the preprocessed image, or the
    gray frame back for sinks that draw or save them (off: only features and the fraction come back).
    `_device` and `_kernels` replace the CUDA device and the GPU kernels (tests use host-memory stand-ins)."""

    def __init__(self, bundle: Bundle, *, backend: str = "ort", precision: str = "fp32", cuda_graphs: bool = False,
                 booster_backend: str = "auto", cache_dir: Path | None = None, min_mask_fraction: float | None = None,
                 mask_threshold: float | None = None, keep_mask: bool = False, keep_image: bool = False,
                 keep_display: bool = False, scope_open: bool = False, device: int = 0, _device=None,
                 _kernels=None):
        if backend not in ("ort", "trt"):
            raise BackendUnavailable(f"backend '{backend}' is unknown; use ort or trt")
        if cuda_graphs and backend != "ort":
            raise BackendUnavailable("CUDA graphs are implemented for the ort backend (onnxruntime captures them); "
                                     "with --backend trt leave them off")
        if _device is None:   # the real CUDA device: what this machine lacks for it is said now, in one sentence
            _device, _kernels = cuda_parts(backend, _kernels)
        super().__init__(bundle, backend=backend, precision=precision, booster_backend=booster_backend,
                         cache_dir=cache_dir, min_mask_fraction=min_mask_fraction, mask_threshold=mask_threshold,
                         scope_open=scope_open)
        self.cuda_graphs = bool(cuda_graphs)
        self.keep_mask, self.keep_image, self.keep_display = keep_mask, keep_image, keep_display
        self.ordinal = int(device)
        self._device_factory = _device
        self._kernels_factory = _kernels
        self.device = self.kernels = None
        self.timing: dict[str, float] = {}   # the last frame's finer split (host_prep_ms, ...), for the bench

    # -- lifetime --------------------------------------------------------------------------------------------------
    def __enter__(self) -> "DevicePipeline":
        if self.device is not None:
            raise RuntimeError("DevicePipeline is already active; enter it once")
        kernels_cls = self._kernels_factory or _load_kernels()
        self.device = self._device_factory(self.ordinal)
        try:
            with self.device.current():
                self.unet = self._runner(self.unet_file, self.unet_spec).__enter__()
                check_runner("unet", self.unet, self.graph, self.unet_file)
                self.vgg = self._runner(self.vgg_file, self.vgg_spec).__enter__()
                check_runner("vgg", self.vgg, self.graph, self.vgg_file, self.bundle.num_features)
                g = self.graph
                u_in, u_out = self.unet.inputs[g.unet_input], self.unet.outputs[g.unet_output]
                v_in, v_out = self.vgg.inputs[g.vgg_input], self.vgg.outputs[g.vgg_output]
                self.prob_dtype = np.dtype(u_out.dtype)
                self.kernels = kernels_cls(size=g.size, iterations=g.crimmins_iterations, input_dtype=u_in.dtype,
                                           vgg_channels=g.vgg_channels, vgg_dtype=v_in.dtype,
                                           stream=self.device.stream, unet_normalization=g.unet_normalization,
                                           vgg_normalization=g.vgg_normalization)
                self.max_frame = tuple(getattr(self.kernels, "max_frame", (2160, 3840, 3)))
                self.unet_shape = {g.unet_input: (1, 1, g.size, g.size)}
                self.vgg_shape = {g.vgg_input: (1, g.vgg_channels, g.size, g.size)}
                n_features = int(np.prod([d for d in v_out.shape[1:] if isinstance(d, int)] or [1]))
                self.features = self.device.pinned((1, n_features), np.dtype(v_out.dtype))
                self.events = [self.device.event() for _ in range(len(GPU_STAGES) + 2)]
            self.booster = self.load_booster()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        device, self.device = self.device, None
        if device is None:
            return
        try:
            with device.current():
                # Sessions and engines before the kernels' buffers, everything before the stream and the context.
                for r in (self.unet, self.vgg):
                    if r is not None:
                        r.__exit__(None, None, None)
                self.unet = self.vgg = self.kernels = None
                self.features = None
                self.events = []
        finally:
            device.close()

    def _runner(self, path: Path, spec):
        from runtime.backends import make_runner
        if self.backend == "trt":
            return make_runner("trt", path, precision=self.precision, cache_dir=self.cache_dir,
                               device=self.ordinal)
        # Batch 1 for the session's life: shape arithmetic folds away, so every node can sit on the CUDA EP (which
        # CUDA graphs need) and no shape is computed per frame.
        dims = {d: 1 for d in spec.info.get("input", {}).get("shape", []) if isinstance(d, str)}
        return make_runner("ort", path, cuda_graphs=self.cuda_graphs, dims=dims, **self.device.ort_options())

    # -- the graph -------------------------------------------------------------------------------------------------
    def _run(self, frame: Frame, rec: FrameRecord, lap: Laps) -> None:
        if self.device is None:
            raise RuntimeError("DevicePipeline is not active; use it inside `with DevicePipeline(...) as pipe:`")
        dev, k, ev, g, lat = self.device, self.kernels, self.events, self.graph, rec.latency_ms
        with dev.current():
            dev.record(ev[0])
            pixels, order, upload_region, gray, region = self._host_side(frame)
            dev.record(ev[1])
            k.preprocess(pixels, upload_region, order)
            dev.record(ev[2])
            prob = self.unet.infer_device({g.unet_input: k.unet_input}, shapes=self.unet_shape,
                                          stream=dev.stream)[g.unet_output]
            dev.record(ev[3])
            k.gate(prob.ptr, prob_dtype=self.prob_dtype, threshold=g.mask_threshold)
            dev.record(ev[4])
            feats = self.vgg.infer_device({g.vgg_input: k.vgg_input}, shapes=self.vgg_shape,
                                          stream=dev.stream)[g.vgg_output]
            dev.download_async(self.features, feats.ptr)
            dev.record(ev[5])
            dev.synchronize()                              # the one wait of the frame
            rec.mask_fraction = float(k.fraction())
            lat["preprocess"] = dev.elapsed_ms(ev[0], ev[2])
            for i, stage in enumerate(GPU_STAGES[1:], start=2):
                lat[stage] = dev.elapsed_ms(ev[i], ev[i + 1])
            self.timing = {"host_prep_ms": dev.elapsed_ms(ev[0], ev[1]),
                           "upload_preprocess_ms": dev.elapsed_ms(ev[1], ev[2])}
            # as the CPU pipeline sets them: the source frame's size and the region cut from it (--mask-size
            # original, DICOM results), and the region inside what sinks are shown (`shown_part`)
            rec.frame_shape, rec.frame_region = tuple(frame.pixels.shape[:2]), region
            rec.region = shown_region(region, frame.meta)
            # an accepted frame that can be calibrated brings its mask back for the kidney's size (runtime/measure.py),
            # and one the scope gate checks its mask, probability map and image
            gated = g.accepts(rec.mask_fraction)
            scoped = gated and g.scope is not None
            sized = gated and calibration_note(frame.meta) is None
            mask = k.download_mask() if self.keep_mask or sized or scoped else None
            prob_host = (k.download_prob(prob.ptr, self.prob_dtype)         # the outline rules need the map
                         if sized or scoped else None)
            image = k.download_image() if self.keep_image or sized or scoped else None
            if self.keep_mask:
                rec.mask = mask
            if self.keep_image:
                rec.image = image
            if self.keep_display:
                rec.display, rec.region = shown_part(gray, region, frame.meta)
        verdict = None
        if scoped:                                   # the scope gate, on the host: Graph.run's two steps
            lap.t = time.perf_counter()
            verdict = g.check_scope(image, prob_host, mask, self.features, Source(frame.pixels, region))
            lap("scope")
        scope_record(rec, g.refusal(gated, verdict), verdict)
        if rec.accepted:
            lap.t = time.perf_counter()
            rec.probabilities, rec.grade = g.score(self.booster, self.features)
            lap("booster")
            measure_record(rec, mask, region, frame, prob=prob_host, image=image, threshold=g.mask_threshold)

    def _host_side(self, frame: Frame):
        """(pixels to upload, their channel order, the region to crop from them, the gray frame or None, the
        ultrasound region in frame coordinates).

        The frame goes up as it is (uint8 gray or RGB/BGR) unless the CPU must see it first: 16-bit or windowed
        frames and other channel counts are converted with `to_gray` (docs/design.md's pinned definition); a colour
        frame with no known region, or one a sink will display, is converted too, because the region search and
        the display need gray (and a gray upload is a third of the bytes). The region search itself
        (`preprocess.auto_region`, when the source gives no region) runs on the CPU, and so does the scan-sector rule
        for a frame that may carry burned-in text (`preprocess.sector_frame`: the sector goes up, gray, with the
        rest of the frame black; no sector raises FrameError)."""
        px = frame.pixels
        direct = (isinstance(px, np.ndarray) and px.dtype == np.uint8 and px.size > 0
                  and (px.ndim == 2 or (px.ndim == 3 and px.shape[2] in (1, 3))))
        if direct and px.ndim == 3 and px.shape[2] == 1:
            px = px[:, :, 0]
        gray = None
        if not direct or (px.ndim == 3 and (frame.region is None or self.keep_display)):
            gray = px = pp.to_gray(frame.pixels, frame.channel_order, frame.window)
        elif px.ndim == 2:
            gray = px
        region = frame.region
        if pp.may_carry_text(region, frame.meta):
            # no trustworthy region and maybe burned-in text: upload the scan sector only (docs/design.md, crop)
            if gray is None:
                gray = pp.to_gray(frame.pixels, frame.channel_order, frame.window)
            gray, region = pp.sector_frame(gray, region, frame.meta)
            px = gray
        region = (region or pp.auto_region(gray)).clip(px.shape)
        # to_gray's reading of the order: BGR, or else RGB (a gray frame has none)
        order = "BGR" if px.ndim == 3 and str(frame.channel_order).upper() == "BGR" else "RGB"
        h, w = px.shape[:2]
        if h > self.max_frame[0] or w > self.max_frame[1]:
            # Larger than the kernels' staging buffer: send only the region (a strided view, copied once).
            px = px[region.y0:region.y1, region.x0:region.x1]
            if px.shape[0] > self.max_frame[0] or px.shape[1] > self.max_frame[1]:
                raise pp.FrameError(f"the ultrasound region {px.shape[1]}x{px.shape[0]} is larger than the GPU "
                                    f"staging buffer ({self.max_frame[1]}x{self.max_frame[0]})")
            return px, order, pp.Region(0, 0, px.shape[1], px.shape[0]), gray, region
        return px, order, region, gray, region


def shown_region(region: pp.Region, meta: dict) -> pp.Region:
    """The region `shown_part` gives for a frame, without its pixels: the region itself, or, for a frame that may
    carry burned-in text (shown cut to its region), the whole of the cut."""
    if meta.get("burned_in_annotation", False) is False:
        return region
    return pp.Region(0, 0, region.x1 - region.x0, region.y1 - region.y0)


def host_view(ptr: int, shape, dtype) -> np.ndarray:
    """A numpy view of host memory at `ptr` (the host stand-ins of tests bind host addresses as 'device' ones)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(int(ptr)), dtype).reshape(shape)
