"""GPU pre- and post-processing through pycuda: frame -> UNet input, and UNet output -> mask, fraction, VGG input.

The kernels (kernels.cu, arithmetic in kernels_core.h) reproduce runtime.preprocess exactly: cv2's grayscale,
cv2's resize (within one grey level, usually exact), and Crimmins bit for bit. Everything is enqueued on one
stream in the current CUDA context, so the runners that share that context and stream see the buffers in order;
nothing here synchronises except the methods that hand results back to the host.

Per frame: one upload from pinned memory, one resize launch, one Crimmins launch per iteration (the last one
also writes the UNet input); after the UNet, one gate launch and a 4-byte download of the mask count.

Each network input is normalised as the bundle declares it (runtime.normalize; the same float32 operations as
`runtime.normalize.to_input`, bit for bit): unit and meanstd through the per-channel tables the kernels look the
values up in; minmax, which depends on the whole image, by one more launch (sono_minmax: min/max reduction in one
block, then every pixel) after the last Crimmins for the UNet, after the gate for the VGG.

pycuda is imported lazily: this module imports (and `available()` answers) on machines without it.
"""
from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import normalize
from runtime.errors import UserError
from runtime.graph import MASK_THRESHOLD
from runtime.preprocess import Region, to_input

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kernels.cu"
HEADER = HERE / "kernels_core.h"

# Resize modes (kernels_core.h SONO_RESIZE_*).
COPY, AREA_FAST, AREA, LINEAR, LINEAR_AREA = range(5)
CRIMMINS_HALO = 24
_RESIZE_BLOCK = (32, 8, 1)  # kernels_core.h SONO_RESIZE_BX, SONO_RESIZE_BY
_GATE_BLOCK = 256
_MINMAX_BLOCK = 256  # kernels_core.h SONO_MINMAX_THREADS
_DEFAULT_SHARED = 48 * 1024


def kernel_source() -> str:
    """The CUDA source handed to SourceModule: kernels.cu with kernels_core.h inlined (one self-contained text,
    so pycuda's compile cache keys on everything that is compiled)."""
    cu = SOURCE.read_text()
    include = '#include "kernels_core.h"'
    if include not in cu:
        raise RuntimeError(f"{SOURCE} no longer includes kernels_core.h")
    return cu.replace(include, HEADER.read_text(), 1)


def available() -> tuple[bool, str]:
    """(True, device description) when pycuda, a CUDA GPU and nvcc (SourceModule compiles with it) are usable;
    else (False, one sentence saying what is missing)."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return False, "pycuda is not installed (pip install 'sonoscore[gpu]' on a machine with an NVIDIA GPU)."
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda raises its own error types; any of them means no usable driver
        return False, f"the CUDA driver cannot be initialised: {exc}"
    if count == 0:
        return False, "pycuda is installed but no CUDA GPU is visible."
    if shutil.which("nvcc") is None:
        return False, "nvcc is not on PATH; pycuda compiles the kernels with it (add the CUDA toolkit's bin folder)."
    dev = cuda.Device(0)
    major, minor = dev.compute_capability()
    return True, f"{dev.name()} (compute capability {major}.{minor})"


def primary_context(device: int = 0):
    """Make the device's primary context current (the one onnxruntime and TensorRT use) and return it; pop it
    with `ctx.pop()` when done. (runtime.backends.cuda.primary_context, the one CUDA helper.)"""
    from runtime.backends.cuda import primary_context as _primary_context
    return _primary_context(device)


@dataclass(frozen=True)
class ResizePlan:
    """How cv2.resize (as runtime.preprocess.resize calls it) maps a crop of src_h x src_w to size x size."""

    mode: int
    src_h: int
    src_w: int
    scale_x: float
    scale_y: float
    inv_scale_x: float
    inv_scale_y: float
    iscale_x: int
    iscale_y: int


def resize_plan(src_h: int, src_w: int, size: int) -> ResizePlan:
    """cv2's own decision, in cv2's own double arithmetic: INTER_AREA when shrinking (h * w >= size^2, the rule
    of runtime.preprocess.resize) else INTER_LINEAR; an exact 2x2 INTER_LINEAR is INTER_AREA; true area
    averaging only when neither axis grows (integer scales take the fast path), else cv2's bilinear emulation."""
    if src_h < 1 or src_w < 1:
        raise ValueError(f"cannot resize an empty {src_h}x{src_w} crop")
    inv_x, inv_y = size / src_w, size / src_h
    scale_x, scale_y = 1.0 / inv_x, 1.0 / inv_y
    iscale_x, iscale_y = round(scale_x), round(scale_y)  # cvRound: half to even, like Python's round
    fast = abs(scale_x - iscale_x) < sys.float_info.epsilon and abs(scale_y - iscale_y) < sys.float_info.epsilon
    if (src_h, src_w) == (size, size):
        mode = COPY
    else:
        area = src_h * src_w >= size * size
        if not area and fast and iscale_x == 2 and iscale_y == 2:
            area = True
        if area and scale_x >= 1 and scale_y >= 1:
            mode = AREA_FAST if fast else AREA
        else:
            mode = LINEAR_AREA if area else LINEAR
    return ResizePlan(mode, src_h, src_w, scale_x, scale_y, inv_x, inv_y, iscale_x, iscale_y)


def input_table(dtype, channels: int = 1, normalization: dict | None = None) -> np.ndarray:
    """runtime.normalize.to_input of the 256 grey levels, one row per channel ([256] for one channel, [C, 256]
    otherwise), in `dtype`: the device writes network inputs by looking them up here, so its values are the CPU's
    by construction. Unit (None) is runtime.preprocess.to_input's table; minmax depends on the image and has none
    (ValueError)."""
    levels = np.arange(256, dtype=np.uint8)[None, :]
    norm = normalize.check(normalization, channels)
    if norm["kind"] == "minmax":
        raise ValueError("a minmax input depends on the whole image: it has no per-level table (sono_minmax)")
    if norm["kind"] == "unit":
        table = to_input(levels, channels, dtype)
    else:
        table = normalize.to_input(levels, channels, norm).astype(dtype)
    return np.ascontiguousarray(table.reshape(256) if channels == 1 else table.reshape(channels, 256))


def threshold_for(prob_dtype, threshold: float) -> float:
    """The threshold as numpy compares it with a `prob_dtype` array (NEP 50: a Python float takes the array's
    dtype), as the float32 the kernel compares with."""
    return float(np.float32(np.dtype(prob_dtype).type(threshold)))


def clip_region(region: Region | None, shape: tuple[int, ...]) -> Region:
    """The crop runtime.preprocess.preprocess takes: the region clipped to the frame (None = the whole frame)."""
    h, w = shape[:2]
    r = Region(0, 0, w, h) if region is None else region.clip(shape)
    if r.x1 <= r.x0 or r.y1 <= r.y0:
        raise ValueError(f"region {region} leaves nothing of a {h}x{w} frame; give a region inside the frame")
    return r


def frame_channels(shape: tuple[int, ...], max_frame: tuple[int, int, int]) -> int:
    """Channels of a frame of `shape` (HxW = 1), or ValueError when it is not a frame or exceeds max_frame."""
    channels = 1 if len(shape) == 2 else (shape[2] if len(shape) == 3 else 0)
    if channels not in (1, 3, 4) or min(shape) < 1:
        raise ValueError(f"frame shape {tuple(shape)} is not HxW or HxWx(1, 3 or 4)")
    mh, mw, mc = max_frame
    if shape[0] > mh or shape[1] > mw or channels > mc:
        raise ValueError(f"frame {tuple(shape)} is larger than max_frame {tuple(max_frame)} these GPU kernels were "
                         "made for; create GpuKernels with a larger max_frame")
    return channels


def check_frame(pixels, max_frame: tuple[int, int, int], channel_order: str = "RGB") -> tuple[int, int]:
    """(channels, index of red) of a frame preprocess() accepts, or ValueError with one sentence saying why not."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise ValueError(f"the GPU preprocess needs a uint8 numpy frame, got {getattr(pixels, 'dtype', type(pixels))};"
                         " window 16-bit frames to uint8 first (runtime.preprocess.to_gray)")
    order = channel_order.upper() if isinstance(channel_order, str) else channel_order
    if order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', not {channel_order!r}")
    return frame_channels(pixels.shape, max_frame), (2 if order == "BGR" else 0)


def _check_dtype(name: str, dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"{name} must be float32 or float16, not {dt}")
    return dt


class GpuKernels:
    """Pre/post-processing kernels on one pycuda stream in the current CUDA context (the primary context the
    runners share).

    unet_input, vgg_input and image are device addresses owned by this object and fixed for its lifetime (CUDA
    graphs need fixed addresses). `crimmins_tile` is the core each Crimmins block owns (halo 24 around it); a
    tile >= size runs the whole image in one block (100 KB of shared memory at 224, opted in).
    `profile=True` records CUDA events at the stage boundaries; `timings()` reads them.
    `unet_normalization` / `vgg_normalization`: each network's declared input normalization (runtime.normalize;
    None = unit), the Graph's `unet_normalization` / `vgg_normalization`.
    `max_frame` = (height, width, channels) bounds every frame preprocess() takes (it sizes the pinned staging
    buffer and the device frame): an HxWx4 frame needs channels 4, the default (3) refuses it.
    `cuda` replaces pycuda: an object with pycuda.driver's API and pycuda.compiler's `SourceModule` as an
    attribute (tests/gpu_harness/fake_cuda.py runs this class unchanged on the CPU through one); None, in
    production, imports pycuda.
    """

    def __init__(self, *, size: int = 224, iterations: int = 1, input_dtype=np.float32, vgg_channels: int = 1,
                 vgg_dtype=np.float32, max_frame: tuple[int, int, int] = (2160, 3840, 3), stream=None,
                 crimmins_tile: int = 32, profile: bool = False, cuda=None, unet_normalization: dict | None = None,
                 vgg_normalization: dict | None = None):
        if cuda is None:
            ok, why = available()
            if not ok:
                raise RuntimeError(f"GPU kernels unavailable: {why}")
            import pycuda.driver as cuda
            from pycuda.compiler import SourceModule
        else:
            SourceModule = cuda.SourceModule

        if cuda.Context.get_current() is None:
            raise RuntimeError("GpuKernels needs a current CUDA context: push the device's primary context first "
                               "(runtime.gpu.kernels.primary_context()).")
        if size < 1 or iterations < 0 or vgg_channels not in (1, 3) or crimmins_tile < 1:
            raise ValueError(f"bad GpuKernels settings: size={size}, iterations={iterations}, "
                             f"vgg_channels={vgg_channels} (1 or 3), crimmins_tile={crimmins_tile}")
        if len(max_frame) != 3 or min(max_frame) < 1 or max_frame[2] > 4:
            raise ValueError(f"max_frame must be (height, width, channels<=4), got {max_frame}")
        try:
            self.unet_normalization = normalize.check(unet_normalization, 1, "unet_normalization: ")
            self.vgg_normalization = normalize.check(vgg_normalization, vgg_channels, "vgg_normalization: ")
        except UserError as e:
            raise ValueError(f"bad GpuKernels settings: {e}") from None
        self._unet_minmax = self.unet_normalization["kind"] == "minmax"
        self._vgg_minmax = self.vgg_normalization["kind"] == "minmax"
        self._cuda = cuda
        self.size, self.iterations, self.vgg_channels = size, iterations, vgg_channels
        self.input_dtype = _check_dtype("input_dtype", input_dtype)
        self.vgg_dtype = _check_dtype("vgg_dtype", vgg_dtype)
        self.max_frame = tuple(int(v) for v in max_frame)
        self.crimmins_tile = crimmins_tile
        self.stream = stream if stream is not None else cuda.Stream()

        self._module = SourceModule(kernel_source(), no_extern_c=True)
        self._resize = self._module.get_function("sono_resize")
        self._resize.prepare("PiiiiiiddddiiPiPPi")
        self._crimmins = self._module.get_function("sono_crimmins")
        self._crimmins.prepare("PPiiiPPi")
        self._gate = self._module.get_function("sono_gate")
        self._gate.prepare("PifPiPPiPiPP")
        self._minmax = self._module.get_function("sono_minmax")
        self._minmax.prepare("PPiPiPi")
        self._spin = self._module.get_function("sono_spin")
        self._spin.prepare("q")
        self._crimmins_launch = self._plan_crimmins(cuda)

        n = size * size
        self._allocs = []
        frame_bytes = int(np.prod(self.max_frame))
        self._staging = cuda.pagelocked_empty(frame_bytes, np.uint8)
        self._frame = self._alloc(frame_bytes)
        self.image = self._alloc(n)
        self.mask = self._alloc(n)
        self.unet_input = self._alloc(n * self.input_dtype.itemsize)
        self.vgg_input = self._alloc(n * vgg_channels * self.vgg_dtype.itemsize)
        # Crimmins ping-pong: resize output, then up to two scratch images between iterations.
        self._resized = self._alloc(n) if iterations else 0
        self._scratch = [self._alloc(n) for _ in range(min(2, max(0, iterations - 1)))]
        # The tables the kernels look inputs up in (a minmax input is computed from the float32 unit table).
        self._unet_lut = self._upload(input_table(self.input_dtype, 1, None if self._unet_minmax
                                                  else self.unet_normalization))
        self._vgg_lut = self._upload(input_table(self.vgg_dtype, vgg_channels, None if self._vgg_minmax
                                                 else self.vgg_normalization))
        self._unit_lut = self._upload(input_table(np.float32)) if self._unet_minmax or self._vgg_minmax else 0
        self._counter = self._upload(np.zeros(2, np.uint32))
        self._result = self._alloc(4)
        self._count_host = cuda.pagelocked_zeros(1, np.uint32)
        self._host_image = cuda.pagelocked_empty((size, size), np.uint8)  # reused by the per-frame downloads
        self._host_mask = cuda.pagelocked_empty((size, size), np.uint8)
        self._uploaded = cuda.Event(cuda.event_flags.DISABLE_TIMING)
        self._gated = False
        self._events = {k: cuda.Event() for k in ("start", "uploaded", "preprocessed", "gate", "gated")} \
            if profile else None

    # -- set-up ---------------------------------------------------------------------------------------------

    def _alloc(self, nbytes: int) -> int:
        a = self._cuda.mem_alloc(max(1, nbytes))
        self._allocs.append(a)
        return int(a)

    def _upload(self, array: np.ndarray) -> int:
        ptr = self._alloc(array.nbytes)
        self._cuda.memcpy_htod(ptr, np.ascontiguousarray(array))
        return ptr

    def _plan_crimmins(self, cuda):
        s, tile = self.size, self.crimmins_tile
        smem = crimmins_smem_bytes(s, s, tile)
        one_block = tile >= s
        grid = (1, 1) if one_block else (math.ceil(s / tile), math.ceil(s / tile))
        block = (32, 32, 1) if one_block else (32, 8, 1)
        if smem > _DEFAULT_SHARED:
            attr = getattr(cuda.device_attribute, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN", None)
            limit = cuda.Context.get_device().get_attribute(attr) if attr is not None else smem
            if smem > limit:
                raise ValueError(f"crimmins_tile={tile} needs {smem} bytes of shared memory per block; this GPU "
                                 f"allows {limit}: use a smaller tile (32 is the default)")
            self._crimmins.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
        return grid, block, smem

    # -- per frame ------------------------------------------------------------------------------------------

    def frame_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A view of the pinned staging memory shaped like a frame: decode or capture straight into it and pass
        it to preprocess(), which then uploads it without a host copy. Waits until the previous upload is done."""
        frame_channels(tuple(shape), self.max_frame)
        self._uploaded.synchronize()
        return self._staging[:int(np.prod(shape))].reshape(shape)

    def preprocess(self, pixels: np.ndarray, region: Region | None = None, channel_order: str = "RGB") -> None:
        """Copy `pixels` (HxW or HxWx3 uint8; HxWx4, when max_frame allows 4 channels, drops alpha) into pinned
        staging, upload async on `stream`, then gray -> crop(region: Region, or None = whole frame) -> resize ->
        Crimmins -> unet_input. Nothing synchronised (a copy into staging first waits for the previous upload)."""
        cuda, stream = self._cuda, self.stream
        channels, r_index = check_frame(pixels, self.max_frame, channel_order)
        r = clip_region(region, pixels.shape)
        ch, cw = r.y1 - r.y0, r.x1 - r.x0
        ev = self._events
        if ev:
            ev["start"].record(stream)
        zero_copy = (pixels.ctypes.data == self._staging.ctypes.data and pixels.flags.c_contiguous)
        if zero_copy:  # the frame already sits in staging: upload the crop's rows, index the columns on the GPU
            pitch = pixels.shape[1] * channels
            cuda.memcpy_htod_async(self._frame, self._staging[r.y0 * pitch:r.y1 * pitch], stream)
            src = self._frame + r.x0 * channels
        else:  # copy just the crop into staging (after the previous upload has read it) and upload that
            self._uploaded.synchronize()
            pitch = cw * channels
            view = self._staging[:ch * pitch].reshape((ch, cw) if pixels.ndim == 2 else (ch, cw, channels))
            np.copyto(view, pixels[r.y0:r.y1, r.x0:r.x1])
            cuda.memcpy_htod_async(self._frame, view, stream)
            src = self._frame
        self._uploaded.record(stream)
        if ev:
            ev["uploaded"].record(stream)

        plan = resize_plan(ch, cw, self.size)
        unet_out = 0 if self._unet_minmax else self.unet_input   # minmax: written by sono_minmax below
        last = self.iterations == 0
        grid = (math.ceil(self.size / _RESIZE_BLOCK[0]), math.ceil(self.size / _RESIZE_BLOCK[1]))
        self._resize.prepared_async_call(
            grid, _RESIZE_BLOCK, stream, src, pitch, channels, r_index, cw, ch, plan.mode,
            plan.scale_x, plan.scale_y, plan.inv_scale_x, plan.inv_scale_y, plan.iscale_x, plan.iscale_y,
            self.image if last else self._resized, self.size, unet_out if last else 0, self._unet_lut,
            self.input_dtype.itemsize)
        cgrid, cblock, smem = self._crimmins_launch
        src_img = self._resized
        for it in range(self.iterations):
            last = it == self.iterations - 1
            dst = self.image if last else self._scratch[it % 2]
            self._crimmins.prepared_async_call(
                cgrid, cblock, stream, src_img, dst, self.size, self.size, self.crimmins_tile,
                unet_out if last else 0, self._unet_lut, self.input_dtype.itemsize, shared_size=smem)
            src_img = dst
        if self._unet_minmax:
            self._minmax_input(self.image, 0, self.unet_input, 1, self.input_dtype)
        if ev:
            ev["preprocessed"].record(stream)

    def gate(self, prob: int, prob_dtype=np.float32, threshold: float = MASK_THRESHOLD) -> None:
        """From the UNet output at device address `prob` (1x1xSxS): mask, fraction (written into pinned host
        memory by an async copy), masked image -> vgg_input. Nothing synchronised."""
        dt = np.dtype(prob_dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"prob_dtype must be float32 or float16, not {dt}")
        n, stream, ev = self.size * self.size, self.stream, self._events
        if ev:
            ev["gate"].record(stream)
        self._gate.prepared_async_call(
            (math.ceil(n / _GATE_BLOCK), 1), (_GATE_BLOCK, 1, 1), stream, int(prob), int(dt == np.float16),
            threshold_for(dt, threshold), self.image, n, self.mask, 0 if self._vgg_minmax else self.vgg_input,
            self.vgg_channels, self._vgg_lut, self.vgg_dtype.itemsize, self._counter, self._result)
        if self._vgg_minmax:   # of the masked image, which the gate has just defined through its mask
            self._minmax_input(self.image, self.mask, self.vgg_input, self.vgg_channels, self.vgg_dtype)
        self._cuda.memcpy_dtoh_async(self._count_host, self._result, stream)
        if ev:
            ev["gated"].record(stream)
        self._gated = True

    def _minmax_input(self, image: int, mask: int, out: int, channels: int, dtype: np.dtype) -> None:
        """Queue sono_minmax: the minmax-normalised input of `image` (times the 0/1 `mask` unless 0) into `out`."""
        self._minmax.prepared_async_call((1, 1), (_MINMAX_BLOCK, 1, 1), self.stream, image, mask,
                                         self.size * self.size, out, channels, self._unit_lut, dtype.itemsize)

    # -- results --------------------------------------------------------------------------------------------

    def fraction(self) -> float:
        """Synchronises the stream; the mask fraction (mean of the 0/1 mask) of the last gate()."""
        if not self._gated:
            raise RuntimeError("fraction() before any gate(): run gate() on a UNet output first")
        self.stream.synchronize()
        return int(self._count_host[0]) / (self.size * self.size)

    def _download(self, ptr: int, shape, dtype, host: np.ndarray | None = None) -> np.ndarray:
        out = self._cuda.pagelocked_empty(shape, dtype) if host is None else host
        self._cuda.memcpy_dtoh_async(out, ptr, self.stream)
        self.stream.synchronize()
        return np.array(out)

    def download_image(self) -> np.ndarray:
        """Synchronises; the SxS uint8 preprocessed image (for tests and overlays)."""
        return self._download(self.image, (self.size, self.size), np.uint8, self._host_image)

    def download_mask(self) -> np.ndarray:
        """Synchronises; the SxS uint8 0/1 mask of the last gate()."""
        if not self._gated:
            raise RuntimeError("download_mask() before any gate(): run gate() on a UNet output first")
        return self._download(self.mask, (self.size, self.size), np.uint8, self._host_mask)

    def download_prob(self, ptr: int, dtype) -> np.ndarray:
        """Synchronises; the SxS kidney probability at device address `ptr` (the UNet's 1x1xSxS output, `dtype`
        elements) as float32, for the kidney size's outline rule (runtime/measure.py)."""
        return self._download(ptr, (self.size, self.size), np.dtype(dtype)).astype(np.float32)

    def download_unet_input(self) -> np.ndarray:
        """Synchronises; the 1x1xSxS UNet input."""
        return self._download(self.unet_input, (1, 1, self.size, self.size), self.input_dtype)

    def download_vgg_input(self) -> np.ndarray:
        """Synchronises; the 1xCxSxS VGG input of the last gate()."""
        return self._download(self.vgg_input, (1, self.vgg_channels, self.size, self.size), self.vgg_dtype)

    def close(self) -> None:
        """Synchronise and free the device buffers now (else they go with the object); the addresses become
        invalid."""
        if self._allocs:
            self.stream.synchronize()
            for a in self._allocs:
                a.free()
            self._allocs = []
            self.image = self.mask = self.unet_input = self.vgg_input = 0

    def stall(self, microseconds: float) -> None:
        """Keep the stream busy for about `microseconds` (timing: lets the launches queued behind it run back to
        back, so events measure GPU time, not Python's launch rate)."""
        try:
            clock_khz = self._cuda.Context.get_device().get_attribute(self._cuda.device_attribute.CLOCK_RATE)
        except Exception:  # the attribute is deprecated in recent CUDA; a typical clock is close enough for a stall
            clock_khz = 1_500_000
        self._spin.prepared_async_call((1, 1), (1, 1, 1), self.stream, int(microseconds * clock_khz / 1e3))

    def timings(self) -> dict[str, float]:
        """Synchronises; GPU milliseconds of the last frame's stages (profile=True): upload, preprocess (resize
        and Crimmins kernels), gate (kernel and the count download)."""
        ev = self._events
        if not ev:
            raise RuntimeError("timings() needs GpuKernels(profile=True)")
        ev["gated"].synchronize()
        return {"upload": ev["uploaded"].time_since(ev["start"]),
                "preprocess": ev["preprocessed"].time_since(ev["uploaded"]),
                "gate": ev["gated"].time_since(ev["gate"])}


def crimmins_smem_bytes(h: int, w: int, tile: int) -> int:
    """Dynamic shared memory of one sono_crimmins block (kernels_core.h sono_crimmins_smem_bytes)."""
    halo = 0 if (tile >= h and tile >= w) else CRIMMINS_HALO
    return 2 * min(tile + 2 * halo, w) * min(tile + 2 * halo, h)


def time_kernels(kernels: GpuKernels, pixels: np.ndarray, region: Region | None, prob: int, *,
                 frames: int = 200, prob_dtype=np.float32, channel_order: str = "RGB",
                 threshold: float = MASK_THRESHOLD) -> dict[str, float]:
    """Median GPU milliseconds per frame of each stage, with `kernels` made with profile=True. Each frame is
    queued behind a short stall so its launches run back to back; `kernels` (preprocess + gate, the
    acceptance figure) excludes the frame upload, which depends on the frame size and the bus."""
    samples: dict[str, list[float]] = {"upload": [], "preprocess": [], "gate": []}
    for i in range(frames + 5):
        kernels.stall(1000)
        kernels.preprocess(pixels, region, channel_order)
        kernels.gate(prob, prob_dtype, threshold)
        t = kernels.timings()
        if i >= 5:  # warm-up: module load, first-touch of buffers
            for k, v in t.items():
                samples[k].append(v)
    out = {k: float(np.median(v)) for k, v in samples.items()}
    out["kernels"] = float(np.median(np.add(samples["preprocess"], samples["gate"])))
    return out
