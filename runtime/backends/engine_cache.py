"""The TensorRT engine cache: everything about engines that does not need TensorRT, so it is tested on any machine.

An engine is built on the target, on first use, from the bundle's ONNX file (docs/design.md, "caching rule"), and kept
under `$SONOSCORE_CACHE/engines/<digest>/` where the digest is a hash of the key

    (cache format, ONNX sha256, TensorRT version, GPU name, compute capability, CPU arch, precision,
     optimisation-profile spec, DLA core)

The profile *spec* (batch min/opt/max and any pinned symbolic dims) is what the key holds: together with the ONNX
sha256 it fixes the profile shapes exactly (`profile_shapes()` derives them from the parsed network), and it can be
known before the network is parsed, which is what lets a cache hit skip parsing altogether. The derived shapes are
recorded in the entry's metadata for the record.

An entry is loaded only when its `meta.json` carries exactly this key and the engine file's size and sha256 match
the ones recorded when it was written; anything else (another TensorRT, another GPU, a truncated or edited file,
metadata from an older layout) is rebuilt, never loaded. Writes are atomic (temp file + fsync + rename, metadata
last) and builds of one key are serialised by a file lock, so processes that start together (two pipelines, the
service and a self-test) neither corrupt the cache nor build twice: the second waits, then loads what the first
built. A TensorRT timing cache per (GPU, TensorRT version) lives beside the entries so later builds on that device
(other networks, other precisions) reuse the kernel timings.

Nothing here imports tensorrt or pycuda: the build module (`runtime.backends.trt_build`) and the runner
(`runtime.backends.trt`) call these functions with plain values (version strings, GPU name and compute capability,
bytes).
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from runtime import logs
from runtime.backends.base import TensorMeta
from runtime.bundle import sha256_file  # noqa: F401  (one sha256 for bundles, boosters and engines)
from runtime.files import atomic_write, file_lock  # noqa: F401  (one build lock for boosters and engines)

log = logs.get("trt")

FORMAT = 2                      # bump when the entry layout or the build recipe (flags, profile rule) changes
                                # 2: TF32 cleared; DLA profiles pinned to one batch size
ENGINE_DIR = "engines"          # under the sonoscore cache root (runtime.booster.default_cache_dir())
_ENGINE_GLOB = "engine-*.plan"

# TensorRT DataType member names (tensorrt.DataType.<NAME>.name) -> numpy. The same names in 10.x and 11.x; those
# with no numpy equivalent (BF16, FP8, INT4, FP4, E8M0) map to None and the runner refuses them at its I/O.
TRT_DTYPES: dict[str, np.dtype | None] = {
    "FLOAT": np.dtype(np.float32), "HALF": np.dtype(np.float16), "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "BF16": None, "FP8": None, "INT4": None, "FP4": None, "E8M0": None,
}


@dataclass(frozen=True)
class GpuInfo:
    """What identifies the GPU an engine was built for: TensorRT engines are specific to the GPU model."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def slug(self) -> str:
        """File-name-safe identity, e.g. 'orin-sm87'."""
        return f"{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-') or 'gpu'}-{self.sm}"


@dataclass(frozen=True)
class CacheEntry:
    """An engine in the cache, verified: `path` holds exactly the bytes that were written for `key`."""

    directory: Path
    path: Path
    meta: dict[str, Any]
    built: bool                 # True when this call built it (a miss); False for a hit
    seconds: float              # build time when built, else the time it took to find and verify it


BuildResult = Union[bytes, "tuple[bytes, dict[str, Any]]"]


# -- dtypes, shapes, profiles --------------------------------------------------------------------------------------
def trt_dtype_to_numpy(name: str) -> np.dtype | None:
    """numpy dtype of a TensorRT DataType, given by name ("FLOAT", "DataType.HALF"); None if numpy has none.

    By name, not by the enum object, so it is testable without TensorRT; unknown names raise ValueError."""
    key = str(name).rsplit(".", 1)[-1].upper()
    if key not in TRT_DTYPES:
        raise ValueError(f"TensorRT data type '{name}' is unknown to sonoscore; known: {', '.join(TRT_DTYPES)}")
    return TRT_DTYPES[key]


def dims_to_shape(dims) -> tuple[int | None, ...]:
    """TensorRT Dims (an iterable of ints, -1 where dynamic) -> TensorMeta shape (None where dynamic)."""
    return tuple(None if int(d) < 0 else int(d) for d in dims)


def check_batch(batch) -> tuple[int, int, int]:
    """(min, opt, max) batch sizes, each >= 1 and min <= opt <= max; an int n means (n, n, n)."""
    b = (batch, batch, batch) if isinstance(batch, int) else tuple(batch)
    if len(b) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in b) or not b[0] <= b[1] <= b[2]:
        raise ValueError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch!r}")
    return int(b[0]), int(b[1]), int(b[2])


def profile_batch(batch, dla_core: int | None = None) -> tuple[int, int, int]:
    """The (min, opt, max) batch an engine is built for: `batch` (checked) on the GPU; (opt, opt, opt) on a DLA core.

    DLA does not support dynamic dimensions: "the profile's min, max, and opt values must be equal for wildcard
    dimensions" (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html);
    with GPU fallback a range is not refused, its layers silently run on the GPU. opt is the batch the runner is
    told to expect, so the DLA engine takes exactly that one."""
    lo, opt, hi = check_batch(batch)
    return (opt, opt, opt) if dla_core is not None else (lo, opt, hi)


def profile_shapes(inputs: dict[str, TensorMeta], batch=(1, 1, 1), dims: dict[str, int] | None = None,
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The optimisation profile (min, opt, max shape per input) for a network's inputs.

    A free leading dim (None, -1 or a symbol such as "N") is the batch and takes `batch` (min, opt, max). A free dim
    elsewhere must be pinned by name in `dims` ({"H": 224}), since an engine for a range of image sizes is slower
    and the pipeline always feeds one size; fixed dims stay as they are. Inputs with no free dim get min = opt = max
    (TensorRT accepts that, and it keeps one code path)."""
    lo, opt, hi = check_batch(batch)
    dims = dict(dims or {})
    out = {}
    for name, meta in inputs.items():
        shapes: list[list[int]] = [[], [], []]
        for axis, d in enumerate(meta.shape):
            free = d is None or isinstance(d, str) or (isinstance(d, (int, np.integer)) and d < 0)
            if not free:
                for s in shapes:
                    s.append(int(d))
            elif isinstance(d, str) and d in dims:
                for s in shapes:
                    s.append(int(dims[d]))
            elif axis == 0:
                for s, v in zip(shapes, (lo, opt, hi)):
                    s.append(v)
            else:
                label = f"'{d}'" if isinstance(d, str) else "unnamed"
                raise ValueError(f"input '{name}' {meta} has a free dim ({label}, axis {axis}) that is not the batch; "
                                 f"export the model with a fixed size or pin it with dims={{'<name>': size}}")
        out[name] = (tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2]))
    return out


def guess_precision(model_path: Path) -> str:
    """Precision named by a bundle file ('unet.fp16.onnx' -> 'fp16', 'vgg.int8.onnx' -> 'int8', else 'fp32').

    Only a label in the cache key: the ONNX sha256 already pins the content, so a wrong guess cannot load a
    wrong engine; pass precision= to the runner to say it outright."""
    tokens = re.split(r"[._\-]+", Path(model_path).name.lower())
    if "int8" in tokens or "qdq" in tokens:
        return "int8"
    if "fp16" in tokens or "half" in tokens:
        return "fp16"
    return "fp32"


# -- key and entries -----------------------------------------------------------------------------------------------
def engine_key(*, onnx_sha256: str, trt_version: str, gpu: GpuInfo, precision: str, batch=(1, 1, 1),
               dims: dict[str, int] | None = None, dla_core: int | None = None,
               machine: str | None = None) -> dict[str, Any]:
    """The cache key of an engine: every input that changes what TensorRT builds. JSON-able, compared exactly."""
    if not re.fullmatch(r"[0-9a-f]{64}", onnx_sha256 or ""):
        raise ValueError(f"onnx_sha256 must be 64 lowercase hex digits, got {onnx_sha256!r}")
    return {"format": FORMAT, "onnx_sha256": onnx_sha256, "tensorrt": str(trt_version), "gpu": gpu.name,
            "compute_capability": f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
            "machine": machine or platform.machine(), "precision": precision,
            "profile": {"batch": list(check_batch(batch)),
                        "dims": {k: int(v) for k, v in sorted((dims or {}).items())}},
            "dla_core": None if dla_core is None else int(dla_core)}


def key_digest(key: dict[str, Any]) -> str:
    """32 hex digits naming the entry folder: sha256 of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def engines_root(cache_dir: Path | None = None) -> Path:
    """`<cache>/engines`, where <cache> is `cache_dir` or $SONOSCORE_CACHE or ~/.cache/sonoscore."""
    if cache_dir is None:
        from runtime.booster import default_cache_dir
        cache_dir = default_cache_dir()
    return Path(cache_dir) / ENGINE_DIR


def entry_dir(root: Path, key: dict[str, Any]) -> Path:
    return Path(root) / key_digest(key)


def open_entry(entry: Path, key: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """(engine path, metadata) if the entry holds a verified engine for exactly `key`; None means (re)build.

    Rejected: no or unreadable meta.json; a key that differs in any field (stale: other TensorRT, GPU, profile,
    format); an engine name that is not a plain file name; a missing engine; a size or sha256 that differs from
    the recorded one (truncated by a crash, edited, bit rot)."""
    try:
        meta = json.loads((Path(entry) / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        name = meta["engine"]
        if not isinstance(name, str) or Path(name).name != name or not name.startswith("engine-"):
            return None
        path = Path(entry) / name
        if path.stat().st_size != int(meta["engine_bytes"]) or sha256_file(path) != meta["engine_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path, meta


def write_entry(entry: Path, key: dict[str, Any], engine: bytes, info: dict[str, Any] | None = None) -> Path:
    """Store `engine` for `key` in `entry` atomically: the engine under a content-addressed name first, meta.json
    last, both by rename of a synced temp file, so a reader sees the old entry, nothing, or the whole new one.
    Callers hold the entry's lock."""
    if not engine:
        raise ValueError("refusing to cache an empty engine")
    entry = Path(entry)
    entry.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(engine).hexdigest()
    name = f"engine-{digest[:16]}.plan"
    atomic_write(entry / name, engine)
    meta = {"key": key, "engine": name, "engine_bytes": len(engine), "engine_sha256": digest,
            "written_at": time.time(), "python": platform.python_version(), **(info or {})}
    atomic_write(entry / "meta.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    for old in entry.glob(_ENGINE_GLOB):  # superseded builds of this key (we hold the lock)
        if old.name != name:
            old.unlink(missing_ok=True)
    return entry / name


def invalidate(entry: Path) -> None:
    """Drop an entry's metadata so the next get_or_build rebuilds it (used when TensorRT refuses to deserialize a
    file that passed verification, e.g. after a driver/JetPack update that kept the TensorRT version)."""
    (Path(entry) / "meta.json").unlink(missing_ok=True)




def get_or_build(root: Path, key: dict[str, Any], build: Callable[[], BuildResult], *, label: str = "engine",
                 progress: bool = True) -> CacheEntry:
    """The verified cache entry for `key`, calling `build()` (once across processes) when there is none.

    `build` returns the serialized engine (bytes), or (bytes, info) where info is JSON-able and is recorded in
    meta.json (e.g. the profile shapes and the TensorRT build log summary). Progress lines go to stderr: that it
    builds and why it takes long, how long it took, or that it waits for another process."""
    t0 = time.perf_counter()
    say = log.info if progress else log.debug
    entry = entry_dir(root, key)
    hit = open_entry(entry, key)
    if hit is not None:
        return CacheEntry(entry, hit[0], hit[1], built=False, seconds=time.perf_counter() - t0)
    entry.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        say(f"trt: another process is building the {label} engine; waiting for it ({entry})")

    with file_lock(entry / ".lock", on_wait=waiting):
        hit = open_entry(entry, key)  # built by another process while we waited
        if hit is not None:
            return CacheEntry(entry, hit[0], hit[1], built=False, seconds=time.perf_counter() - t0)
        say(f"trt: building the {label} engine (TensorRT {key['tensorrt']}, {key['gpu']} "
            f"sm{key['compute_capability'].replace('.', '')}, {key['precision']}, batch "
            f"{'/'.join(map(str, key['profile']['batch']))}"
            f"{', DLA core %d' % key['dla_core'] if key['dla_core'] is not None else ''}); "
            f"once per model and device, it can take minutes on a Jetson...")
        tb = time.perf_counter()
        result = build()
        engine, info = result if isinstance(result, tuple) else (result, {})
        seconds = time.perf_counter() - tb
        write_entry(entry, key, bytes(engine), {**info, "build_s": round(seconds, 2)})
        hit = open_entry(entry, key)
        if hit is None:  # only if the file system lies to us; never hand out an unverified engine
            raise OSError(f"the engine just written to {entry} does not read back intact; check the disk and "
                          f"SONOSCORE_CACHE")
    say(f"trt: built the {label} engine in {seconds:.1f} s -> {hit[0]}")
    return CacheEntry(entry, hit[0], hit[1], built=True, seconds=seconds)


# -- timing cache --------------------------------------------------------------------------------------------------
def timing_cache_path(root: Path, gpu: GpuInfo, trt_version: str) -> Path:
    """One TensorRT timing cache per (GPU model, TensorRT version), beside the engine entries."""
    return Path(root) / f"timing-{gpu.slug}-trt{re.sub(r'[^0-9A-Za-z.]+', '_', str(trt_version))}.cache"


def read_timing_cache(path: Path) -> bytes:
    """The timing cache's bytes, or b"" (TensorRT then starts an empty one) when there is none or it is unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def write_timing_cache(path: Path, data: bytes) -> None:
    """Replace the timing cache atomically under its own lock. Concurrent builds of different engines each write
    the cache they started from plus their own timings; the last writer wins, which only costs a re-timing."""
    if not data:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        atomic_write(path, bytes(data))


