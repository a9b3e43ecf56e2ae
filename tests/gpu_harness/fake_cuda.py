"""A CPU stand-in for pycuda, just big enough to run runtime.gpu.kernels.GpuKernels unchanged without a GPU.

    fake = FakeCuda(host.build(tmp))             # the g++-built harness: kernels_core.h, the kernels' own code
    k = GpuKernels(cuda=fake, ...)              # the real class: staging, offsets, ping-pong, gate, downloads

What it models, and what it checks as a GPU (or compute-sanitizer) would:
- Device memory: `mem_alloc` hands out host buffers whose addresses are the "device pointers" (ints, pointer
  arithmetic included). Fresh allocations hold garbage (0xA5), as cudaMalloc's do. Every copy and every kernel
  argument range is checked to lie inside one live allocation (host or freed memory passed as a device pointer,
  or a range running past its buffer, raises FakeCudaError).
- Streams run in order and *later*: an async copy or launch is queued and runs when the host waits
  (Stream.synchronize, Event.synchronize up to that event, or a synchronous memcpy), reading host memory when it
  runs, not when it was queued. So a host buffer rewritten before its upload ran shows up as a wrong result.
- Events record the host clock when the stream reaches them; time_since gives milliseconds between two completed
  timing events and refuses, as CUDA does, events made with DISABLE_TIMING or not yet reached.
- SourceModule parses the kernels' signatures in the CUDA source it is given: `prepare` must match them (one
  struct code per parameter), launches must respect __launch_bounds__, the 48 KB dynamic shared memory default
  (or the MAX_DYNAMIC_SHARED_SIZE_BYTES set on the function) and the device's opt-in limit. Arguments are packed
  and unpacked with `struct` as pycuda packs them (a float argument arrives as float32).
- Kernel bodies: each launch runs the kernel's block function from kernels_core.h (sono_resize_block,
  sono_crimmins_block with poisoned shared memory, sono_gate_pixel + sono_gate_block_done, sono_minmax's three
  phases thread by thread) over the grid the
  launch asked for, one block after another, one "thread" per block (as tests/gpu_harness/harness.cpp does);
  SONO_CHECK violations raise. sono_spin waits on the host clock.
Not modelled: concurrency between blocks or streams (blocks run sequentially, so a race shows only where a
kernel reads what another block writes, which the launcher refuses for Crimmins' in-place case), the thread
mapping inside a block, and real GPU time.
"""
from __future__ import annotations

import bisect
import ctypes
import re
import struct
import time
import weakref
from collections import Counter, deque
from types import SimpleNamespace

import numpy as np

GARBAGE = 0xA5
DEFAULT_SHARED = 48 * 1024


class FakeCudaError(RuntimeError):
    """What pycuda.driver.Error would be on a GPU: an illegal address, a bad launch, an invalid event."""


def _addr(ptr) -> int:
    return int(ptr)


# --------------------------------------------------------------------------------------------------- memory


class DeviceAllocation:
    """pycuda.driver.DeviceAllocation: int() is the address; free() (or garbage collection) releases it."""

    def __init__(self, fake: "FakeCuda", nbytes: int):
        if nbytes < 1:
            raise FakeCudaError(f"mem_alloc({nbytes}): CUDA refuses an empty allocation")
        self._fake = fake
        self._buf = np.full(int(nbytes), GARBAGE, np.uint8)
        self.ptr = int(self._buf.ctypes.data)
        self.nbytes = int(nbytes)
        fake._register(self)

    def __int__(self) -> int:
        return self.ptr

    __index__ = __int__

    def free(self) -> None:
        if self._buf is not None:
            self._fake._unregister(self)
            self._buf = None

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


# -------------------------------------------------------------------------------------------- streams, events


class Stream:
    """In-order queue of work that runs when the host waits for it."""

    def __init__(self, fake: "FakeCuda", flags: int = 0):
        self._fake = fake
        self._queue: deque = deque()
        fake._streams.add(self)

    def _enqueue(self, name: str, op) -> None:
        self._queue.append((name, op))

    def _run(self, until=None) -> None:
        """Run queued work in order, up to and including the op `until` (None: all)."""
        while self._queue:
            name, op = self._queue.popleft()
            try:
                op()
            except Exception:
                self._queue.clear()  # a failed kernel poisons the rest of the queue, as a sticky CUDA error does
                raise
            self._fake.executed.append(name)
            if until is not None and op is until:
                return

    def synchronize(self) -> None:
        self._fake.stats["stream_synchronize"] += 1
        self._run()

    def is_done(self) -> bool:
        return not self._queue

    def pending(self) -> int:
        return len(self._queue)


class Event:
    """pycuda.driver.Event: record on a stream, synchronize, query, time_since in milliseconds."""

    def __init__(self, fake: "FakeCuda", flags: int = 0):
        self._fake = fake
        self.flags = int(flags)
        self._stream: Stream | None = None
        self._marker = None
        self._time: float | None = None
        self._done = False

    def record(self, stream: Stream | None = None) -> "Event":
        stream = self._fake._stream(stream)

        def marker():
            if self._marker is marker:  # re-recorded since: only the latest record completes the event
                self._time = time.perf_counter()
                self._done = True

        self._stream, self._marker, self._done = stream, marker, False
        stream._enqueue("event", marker)
        return self

    def synchronize(self) -> "Event":
        self._fake.stats["event_synchronize"] += 1
        if self._marker is not None and not self._done:
            self._stream._run(until=self._marker)
        return self

    def query(self) -> bool:
        return self._marker is None or self._done

    def time_since(self, start: "Event") -> float:
        for ev in (self, start):
            if ev.flags & self._fake.event_flags.DISABLE_TIMING:
                raise FakeCudaError("cuEventElapsedTime failed: invalid resource handle (an event made with "
                                    "DISABLE_TIMING)")
            if ev._marker is None:
                raise FakeCudaError("cuEventElapsedTime failed: invalid resource handle (event never recorded)")
            if not ev._done:
                raise FakeCudaError("cuEventElapsedTime failed: device not ready (event not reached yet)")
        return (self._time - start._time) * 1e3

    def time_till(self, end: "Event") -> float:
        return end.time_since(self)


# ---------------------------------------------------------------------------------------------- the module

_C_TYPES = {"int": "i", "unsigned int": "I", "float": "f", "double": "d", "long long": "q",
            "unsigned long long": "Q", "short": "h", "unsigned short": "H", "char": "b", "unsigned char": "B"}
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*\(([^)]*)\)')


def _param_code(param: str) -> str:
    param = " ".join(param.replace("*", " * ").split())
    if "*" in param:
        return "P"
    words = [w for w in param.split() if w not in ("const", "volatile", "__restrict__")]
    ctype = " ".join(words[:-1])  # drop the parameter name
    if ctype not in _C_TYPES:
        raise FakeCudaError(f"the stand-in does not know the C type {ctype!r} (parameter {param!r})")
    return _C_TYPES[ctype]


def _launch_bound(expr: str | None, defines: dict[str, str]) -> int:
    if not expr:
        return 1024
    for name, value in defines.items():
        expr = re.sub(rf"\b{name}\b", value, expr)
    if not re.fullmatch(r"[\d\s*+()-]+", expr):
        raise FakeCudaError(f"cannot evaluate __launch_bounds__({expr})")
    return min(1024, int(eval(expr, {"__builtins__": {}})))  # digits and arithmetic only (checked above)


class Function:
    """A kernel of a SourceModule: prepare(format), prepared_async_call / prepared_call, set_attribute."""

    def __init__(self, module: "SourceModule", name: str, codes: str, max_threads: int):
        self._fake, self.name = module._fake, name
        self.signature, self.max_threads = codes, max_threads
        self.arg_format: str | None = None
        self.max_dynamic_shared = DEFAULT_SHARED

    def prepare(self, arg_format: str) -> "Function":
        if arg_format != self.signature:
            raise FakeCudaError(f"{self.name}: prepare({arg_format!r}) does not match the kernel's parameters in the "
                                f"CUDA source ({self.signature!r})")
        self.arg_format = arg_format
        return self

    def set_attribute(self, attr, value: int) -> None:
        if attr != self._fake.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES:
            raise FakeCudaError(f"{self.name}: the stand-in models only MAX_DYNAMIC_SHARED_SIZE_BYTES, not {attr}")
        if value > self._fake.max_shared_optin:
            raise FakeCudaError(f"{self.name}: MAX_DYNAMIC_SHARED_SIZE_BYTES={value} exceeds the device's opt-in "
                                f"limit {self._fake.max_shared_optin}")
        self.max_dynamic_shared = int(value)

    def prepared_call(self, grid, block, *args, shared_size: int = 0) -> None:
        self.prepared_async_call(grid, block, None, *args, shared_size=shared_size)
        self._fake._null.synchronize()

    def prepared_async_call(self, grid, block, stream, *args, shared_size: int = 0) -> None:
        if self.arg_format is None:
            raise FakeCudaError(f"{self.name}: prepared call before prepare()")
        grid, block = tuple(int(g) for g in grid), tuple(int(b) for b in block)
        if not 1 <= len(grid) <= 3 or min(grid) < 1 or grid[0] > 2 ** 31 - 1 or max(grid[1:], default=1) > 65535:
            raise FakeCudaError(f"{self.name}: invalid grid {grid}")
        if len(block) != 3 or min(block) < 1 or block[2] > 64 or max(block[:2]) > 1024:
            raise FakeCudaError(f"{self.name}: invalid block {block}")
        threads = block[0] * block[1] * block[2]
        if threads > self.max_threads:
            raise FakeCudaError(f"{self.name}: {threads} threads per block exceed its launch bound "
                                f"{self.max_threads} (too many resources requested for launch)")
        if shared_size > self.max_dynamic_shared:
            raise FakeCudaError(f"{self.name}: {shared_size} bytes of dynamic shared memory exceed the "
                                f"{self.max_dynamic_shared} allowed (set MAX_DYNAMIC_SHARED_SIZE_BYTES first)")
        try:  # as pycuda packs the arguments: wrong count, type or range fails here
            values = struct.unpack("@" + self.arg_format, struct.pack("@" + self.arg_format, *args))
        except struct.error as e:
            raise FakeCudaError(f"{self.name}: arguments {args} do not pack as {self.arg_format!r}: {e}") from None
        body = KERNELS.get(self.name)
        if body is None:
            raise FakeCudaError(f"the stand-in has no CPU body for kernel {self.name}")
        grid3 = grid + (1,) * (3 - len(grid))
        fake = self._fake
        fake.stats[f"launch:{self.name}"] += 1
        fake.launches.append((self.name, grid3, block, int(shared_size), values))
        fake._stream(stream)._enqueue(self.name, lambda: body(fake, values, grid3, block, int(shared_size)))


class SourceModule:
    """pycuda.compiler.SourceModule: finds the extern "C" __global__ kernels of `source` and their parameters."""

    def __init__(self, fake: "FakeCuda", source: str, no_extern_c: bool = False, **_options):
        if not no_extern_c:
            raise FakeCudaError("the kernels declare extern \"C\" themselves: compile with no_extern_c=True")
        self._fake = fake
        defines = dict(re.findall(r"^\s*#define\s+(\w+)\s+(\d+)\s*(?:/\*.*)?$", source, flags=re.M))
        self._kernels = {}
        for bound, name, params in _KERNEL.findall(source):
            codes = "".join(_param_code(p) for p in params.split(",") if p.strip())
            self._kernels[name] = (codes, _launch_bound(bound, defines))
        if not self._kernels:
            raise FakeCudaError("no extern \"C\" __global__ kernels in the source")

    def get_function(self, name: str) -> Function:
        if name not in self._kernels:
            raise FakeCudaError(f"cuModuleGetFunction failed: named symbol not found ({name})")
        return Function(self, name, *self._kernels[name])


class _Device:
    def __init__(self, fake: "FakeCuda"):
        self._fake = fake

    def name(self) -> str:
        return "CPU stand-in (tests/gpu_harness/fake_cuda.py)"

    def compute_capability(self) -> tuple[int, int]:
        return (9, 0)

    def get_attribute(self, attr) -> int:
        try:
            return self._fake.device_attributes[attr]
        except KeyError:
            raise FakeCudaError(f"the stand-in does not model device attribute {attr}") from None


class _Context:
    def __init__(self, fake: "FakeCuda"):
        self._fake = fake

    def get_current(self):
        return self if self._fake.context_current else None

    def get_device(self) -> _Device:
        return self._fake.device

    def synchronize(self) -> None:
        self._fake.synchronize()

    def push(self) -> None:
        self._fake.context_current = True

    def pop(self) -> None:
        self._fake.context_current = False


class FakeCuda:
    """The pycuda.driver names GpuKernels uses, plus SourceModule; `stats`, `launches` and `executed` record
    what ran. `harness` is tests.gpu_harness.host.Harness (the g++-built kernels_core.h)."""

    def __init__(self, harness, *, max_shared_optin: int = 227 * 1024, clock_khz: int = 1_980_000):
        self.harness = harness
        self.max_shared_optin = max_shared_optin
        self.event_flags = SimpleNamespace(DEFAULT=0, BLOCKING_SYNC=1, DISABLE_TIMING=2, INTERPROCESS=4)
        self.device_attribute = SimpleNamespace(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN="max_shared_optin",
                                                MAX_SHARED_MEMORY_PER_BLOCK="max_shared",
                                                MAX_THREADS_PER_BLOCK="max_threads", CLOCK_RATE="clock_rate")
        self.function_attribute = SimpleNamespace(MAX_DYNAMIC_SHARED_SIZE_BYTES="max_dynamic_shared")
        self.device_attributes = {"max_shared_optin": max_shared_optin, "max_shared": DEFAULT_SHARED,
                                  "max_threads": 1024, "clock_rate": clock_khz}
        self.stats: Counter = Counter()
        self.launches: list = []      # (kernel, grid, block, shared bytes, unpacked arguments), in launch order
        self.executed: list[str] = []  # names of the stream operations, in the order they ran
        self.context_current = True
        self.device = _Device(self)
        self.Context = _Context(self)
        self._allocs: dict[int, weakref.ref] = {}  # weak, as pycuda frees an allocation nobody holds
        self._bases: list[int] = []
        self._pinned: dict[int, tuple[int, int]] = {}
        self._streams: weakref.WeakSet = weakref.WeakSet()
        self._null = Stream(self)

    # -- pycuda.driver ---------------------------------------------------------------------------------------

    def init(self) -> None:
        pass

    def Device(self, ordinal: int = 0) -> _Device:  # noqa: N802 (pycuda's name)
        if ordinal != 0:
            raise FakeCudaError(f"invalid device ordinal {ordinal}")
        return self.device

    def Stream(self, flags: int = 0) -> Stream:  # noqa: N802
        return Stream(self, flags)

    def Event(self, flags: int = 0) -> Event:  # noqa: N802
        return Event(self, flags)

    def SourceModule(self, source: str, **kw) -> SourceModule:  # noqa: N802
        return SourceModule(self, source, **kw)

    def mem_alloc(self, nbytes: int) -> DeviceAllocation:
        self.stats["mem_alloc"] += 1
        return DeviceAllocation(self, nbytes)

    def pagelocked_empty(self, shape, dtype, order: str = "C", mem_flags: int = 0) -> np.ndarray:
        a = np.empty(shape, dtype, order=order)
        key = id(a)
        self._pinned[key] = (a.ctypes.data, a.ctypes.data + a.nbytes)
        weakref.finalize(a, self._pinned.pop, key, None)
        return a

    def pagelocked_zeros(self, shape, dtype, order: str = "C", mem_flags: int = 0) -> np.ndarray:
        a = self.pagelocked_empty(shape, dtype, order)
        a[...] = 0
        return a

    def memcpy_htod(self, dest, src) -> None:
        src = self._host(src, "memcpy_htod source")
        self.synchronize()
        self._htod(_addr(dest), src)

    def memcpy_dtoh(self, dest, src) -> None:
        dest = self._host(dest, "memcpy_dtoh destination", writable=True)
        self.synchronize()
        self._dtoh(dest, _addr(src))

    def memcpy_htod_async(self, dest, src, stream: Stream | None = None) -> None:
        src = self._host(src, "memcpy_htod_async source")
        dest = _addr(dest)
        self._async_host(src)
        self.stats["htod_async"] += 1
        self._stream(stream)._enqueue("htod", lambda: self._htod(dest, src))

    def memcpy_dtoh_async(self, dest, src, stream: Stream | None = None) -> None:
        dest = self._host(dest, "memcpy_dtoh_async destination", writable=True)
        src = _addr(src)
        self._async_host(dest)
        self.stats["dtoh_async"] += 1
        self._stream(stream)._enqueue("dtoh", lambda: self._dtoh(dest, src))

    # -- for tests -------------------------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Run everything queued on every stream (what a synchronous copy or cuCtxSynchronize waits for)."""
        for s in list(self._streams):
            s._run()

    def pending(self) -> int:
        """Operations queued and not yet run, all streams together."""
        return sum(s.pending() for s in list(self._streams))

    def device_array(self, array: np.ndarray) -> DeviceAllocation:
        """A device allocation holding `array` (cuda.mem_alloc + memcpy_htod)."""
        array = np.ascontiguousarray(array)
        buf = self.mem_alloc(array.nbytes)
        self.memcpy_htod(buf, array)
        return buf

    def peek(self, ptr, shape, dtype) -> np.ndarray:
        """A copy of device memory as it is now (queued work not run)."""
        out = np.empty(shape, dtype)
        self.check(_addr(ptr), out.nbytes, "peek")
        ctypes.memmove(out.ctypes.data, _addr(ptr), out.nbytes)
        return out

    def allocation(self, ptr) -> DeviceAllocation | None:
        """The live allocation that contains address `ptr`, or None."""
        ptr = _addr(ptr)
        i = bisect.bisect_right(self._bases, ptr) - 1
        if i >= 0:
            a = self._allocs[self._bases[i]]()
            if a is not None and a._buf is not None and ptr < a.ptr + a.nbytes:
                return a
        return None

    def check(self, ptr: int, nbytes: int, what: str) -> None:
        """Raise FakeCudaError unless [ptr, ptr + nbytes) lies inside one live device allocation."""
        a = self.allocation(ptr)
        if a is None:
            raise FakeCudaError(f"{what}: address {ptr:#x} is not in any live device allocation (illegal address)")
        if ptr + nbytes > a.ptr + a.nbytes:
            raise FakeCudaError(f"{what}: {nbytes} bytes at offset {ptr - a.ptr} run {ptr + nbytes - a.ptr - a.nbytes}"
                                f" bytes past the end of a {a.nbytes}-byte allocation (illegal address)")

    def is_pinned(self, array: np.ndarray) -> bool:
        lo, hi = array.ctypes.data, array.ctypes.data + array.nbytes
        return any(a <= lo and hi <= b for a, b in self._pinned.values())

    # -- internals -------------------------------------------------------------------------------------------

    def _register(self, a: DeviceAllocation) -> None:
        if a.ptr in self._allocs:  # a dead allocation's address, reused before its finaliser ran
            self._bases.remove(a.ptr)
        bisect.insort(self._bases, a.ptr)
        self._allocs[a.ptr] = weakref.ref(a)

    def _unregister(self, a: DeviceAllocation) -> None:
        ref = self._allocs.get(a.ptr)
        if ref is not None and ref() in (a, None):
            del self._allocs[a.ptr]
            self._bases.remove(a.ptr)

    def _stream(self, stream) -> Stream:
        if stream is None:
            return self._null
        if not isinstance(stream, Stream) or stream._fake is not self:
            raise FakeCudaError(f"{stream!r} is not a stream of this context")
        return stream

    @staticmethod
    def _host(array, what: str, writable: bool = False) -> np.ndarray:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise FakeCudaError(f"{what} must be a C-contiguous numpy array (pycuda needs a contiguous buffer)")
        if writable and not array.flags.writeable:
            raise FakeCudaError(f"{what} is read-only")
        return array

    def _async_host(self, array: np.ndarray) -> None:
        if not self.is_pinned(array):
            self.stats["pageable_async"] += 1  # legal, but the copy is then not asynchronous on a GPU

    def _htod(self, dest: int, src: np.ndarray) -> None:
        self.check(dest, src.nbytes, "host-to-device copy")
        ctypes.memmove(dest, src.ctypes.data, src.nbytes)
        self.stats["htod_bytes"] += src.nbytes

    def _dtoh(self, dest: np.ndarray, src: int) -> None:
        self.check(src, dest.nbytes, "device-to-host copy")
        ctypes.memmove(dest.ctypes.data, src, dest.nbytes)
        self.stats["dtoh_bytes"] += dest.nbytes


# ------------------------------------------------------------------------------------- kernel bodies (CPU)


def _violations(fake: FakeCuda, name: str, before: int) -> None:
    after = fake.harness.violations()
    if after != before:
        raise FakeCudaError(f"{name}: {after - before} index checks (SONO_CHECK) failed: a read outside the crop "
                            "or the tile")


def _sono_resize(fake: FakeCuda, a, grid, block, shared) -> None:
    (src, pitch, channels, r_index, src_w, src_h, mode, scale_x, scale_y, inv_x, inv_y, iscale_x, iscale_y,
     dst, size, net_out, lut, lut_elem) = a
    if channels not in (1, 3, 4) or r_index not in (0, 2) or src_w < 1 or src_h < 1 or size < 1:
        raise FakeCudaError(f"sono_resize: channels={channels}, r_index={r_index}, crop {src_w}x{src_h}, size {size}")
    if pitch < src_w * channels:
        raise FakeCudaError(f"sono_resize: pitch {pitch} is shorter than a crop row ({src_w} x {channels} bytes)")
    fake.check(src, (src_h - 1) * pitch + src_w * channels, "sono_resize source crop")
    fake.check(dst, size * size, "sono_resize image")
    if net_out:
        fake.check(net_out, size * size * lut_elem, "sono_resize network input")
        fake.check(lut, 256 * lut_elem, "sono_resize input table")
    if grid[2] != 1:
        raise FakeCudaError(f"sono_resize is a 2-D kernel; grid {grid}")
    before = fake.harness.violations()
    fake.harness.lib.harness_resize_launch(src, pitch, channels, r_index, src_w, src_h, mode, scale_x, scale_y, inv_x,
                                           inv_y, iscale_x, iscale_y, dst, size, net_out or None, lut or None,
                                           lut_elem, grid[0], grid[1])
    _violations(fake, "sono_resize", before)


def _sono_crimmins(fake: FakeCuda, a, grid, block, shared) -> None:
    src, dst, h, w, tile, net_out, lut, lut_elem = a
    if h < 1 or w < 1 or tile < 1:
        raise FakeCudaError(f"sono_crimmins: image {h}x{w}, tile {tile}")
    need = fake.harness.crimmins_smem_bytes(h, w, tile)
    if shared < need:
        raise FakeCudaError(f"sono_crimmins: launched with {shared} bytes of shared memory, a tile of {tile} needs "
                            f"{need} (illegal address in shared memory)")
    fake.check(src, h * w, "sono_crimmins source")
    fake.check(dst, h * w, "sono_crimmins destination")
    if src < dst + h * w and dst < src + h * w:
        raise FakeCudaError("sono_crimmins: source and destination overlap; blocks would read pixels other blocks "
                            "already wrote (a race on the GPU)")
    if net_out:
        fake.check(net_out, h * w * lut_elem, "sono_crimmins network input")
        fake.check(lut, 256 * lut_elem, "sono_crimmins input table")
    if grid[2] != 1:
        raise FakeCudaError(f"sono_crimmins is a 2-D kernel; grid {grid}")
    before = fake.harness.violations()
    fake.harness.lib.harness_crimmins_launch(src, dst, h, w, tile, net_out or None, lut or None, lut_elem, grid[0],
                                             grid[1], shared, 1)
    _violations(fake, "sono_crimmins", before)


def _sono_gate(fake: FakeCuda, a, grid, block, shared) -> None:
    prob, prob_half, threshold, image, n, mask, vgg_out, channels, lut, lut_elem, counter, result = a
    if grid[1] != 1 or grid[2] != 1 or block[1] != 1 or block[2] != 1:
        raise FakeCudaError(f"sono_gate is a 1-D kernel (blockIdx.x, threadIdx.x only): grid {grid}, block {block}")
    fake.check(prob, n * (2 if prob_half else 4), "sono_gate probabilities")
    fake.check(image, n, "sono_gate image")
    fake.check(mask, n, "sono_gate mask")
    if vgg_out:   # NULL: a minmax VGG input, written by sono_minmax
        fake.check(vgg_out, n * channels * lut_elem, "sono_gate VGG input")
        fake.check(lut, channels * 256 * lut_elem, "sono_gate input table (one row of 256 per channel)")
    fake.check(counter, 8, "sono_gate counters")
    fake.check(result, 4, "sono_gate result")
    fake.harness.lib.harness_gate_launch(prob, prob_half, threshold, image, n, mask, vgg_out or None, channels, lut,
                                         lut_elem, counter, result, grid[0], block[0])


def _sono_minmax(fake: FakeCuda, a, grid, block, shared) -> None:
    image, mask, n, out, channels, unit, elem = a
    if grid != (1, 1, 1) or block[1] != 1 or block[2] != 1:
        raise FakeCudaError(f"sono_minmax is one 1-D block (its reduction does not cross blocks): grid {grid}, "
                            f"block {block}")
    if n < 1 or channels < 1 or elem not in (2, 4):
        raise FakeCudaError(f"sono_minmax: n={n}, channels={channels}, elem={elem}")
    fake.check(image, n, "sono_minmax image")
    if mask:
        fake.check(mask, n, "sono_minmax mask")
    fake.check(out, n * channels * elem, "sono_minmax network input")
    fake.check(unit, 256 * 4, "sono_minmax unit table")
    fake.harness.lib.harness_minmax_launch(image, mask or None, n, out, channels, unit, elem, block[0])


def _sono_spin(fake: FakeCuda, a, grid, block, shared) -> None:
    (cycles,) = a
    end = time.perf_counter() + cycles / (fake.device_attributes["clock_rate"] * 1e3)
    while time.perf_counter() < end:
        pass


KERNELS = {"sono_resize": _sono_resize, "sono_crimmins": _sono_crimmins, "sono_gate": _sono_gate,
           "sono_minmax": _sono_minmax, "sono_spin": _sono_spin}
