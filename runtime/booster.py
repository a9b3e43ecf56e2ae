"""The XGBoost booster (multi:softprob), compiled for this machine by TL2cgen, or interpreted by treelite's GTIL.

The compiled library is built on the target on first use and cached (docs/design.md, "Caching rule") under a key of
(model sha256, tl2cgen version, treelite version, CPU arch/platform, compiler identity). An entry is used only when
its metadata matches the key and the library's own sha256 matches the one recorded when it was built; anything
else is rebuilt, never loaded. Writes are atomic (temp file + rename, metadata last) and builds of one key are
serialised by a file lock, so processes that start together neither corrupt the cache nor compile twice.

Per-frame latency is the point of compiling, so predict() calls the library's `predict` entry point directly
through ctypes on preallocated buffers: tl2cgen's Predictor + DMatrix cost about 120 us a call on their own.
In the pipeline the booster runs once per frame right after the VGG, which has evicted this code and the Python
around it from the CPU caches, so the per-frame path (predict_one) is one ctypes call into a small C function
compiled into the same library (_SHIM): it checks the row for NaN, prefetches the library's machine code with
independent loads (hundreds of cache lines fetched in parallel instead of one miss per tree branch), runs
`predict` and returns the grade. It is called through a tiny CPython extension (runtime/rowcall.py) where one can
be built, since a cold ctypes call alone costs more than the trees; otherwise through ctypes.

Missing values: NaN is "missing" and follows each split's learned default direction, exactly as XGBoost does.
+-inf are ordinary values (they compare like +-FLT_MAX), as in XGBoost's inplace_predict.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from runtime.bundle import sha256_file
from runtime.files import file_lock, not_private, private_folder

BACKENDS = ("auto", "tl2cgen", "gtil")
_F32 = np.dtype(np.float32)
# Smaller code over faster code: per frame the trees run from cold caches, where every cache line of machine code
# counts (on the bench machine -Os cut the library's code by a quarter and the in-pipeline call with it).
_CFLAGS = ["-Os"]
_FORMAT = 2  # bump when the layout of a cache entry or the build recipe changes


class BoosterError(RuntimeError):
    """The booster cannot be loaded, compiled or run; the message names the file and what to do."""


def default_cache_dir() -> Path:
    """$SONOSCORE_CACHE, else ~/.cache/sonoscore (compiled boosters live in its `booster/` subfolder)."""
    env = os.environ.get("SONOSCORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sonoscore"


class Booster:
    """A loaded booster: `predict(features [N, F] or [F]) -> probabilities [N, num_class]` (float32)."""

    backend: str              # "tl2cgen" (compiled library) or "gtil" (treelite's interpreter)
    row_call: str             # how predict_one reaches it: "extension" (runtime.rowcall), "ctypes" or "numpy"
    num_features: int
    num_class: int
    model_path: Path
    library: Path | None      # the compiled library in use (tl2cgen backend)
    built: bool               # True when this load compiled the library (a cache miss)

    def __init__(self, model_path: Path, backend: str, num_features: int, num_class: int, predict_rows,
                 library: Path | None = None, built: bool = False):
        self.model_path, self.backend, self.num_features, self.num_class = model_path, backend, num_features, num_class
        self.library, self.built = library, built
        self._predict_rows = predict_rows
        # predict_one's path: the extension's row() (runtime.rowcall), else the ctypes shim, else predict()
        fast = getattr(predict_rows, "fast", None)
        self._row = fast.row if fast is not None else getattr(predict_rows, "row", None)
        self.row_call = "extension" if fast is not None else "ctypes" if self._row is not None else "numpy"

    @classmethod
    def load(cls, model_path: Path, *, num_class: int = 4, cache_dir: Path | None = None, backend: str = "auto",
             progress: bool = True) -> "Booster":
        """Load an XGBoost .ubj/.json booster. "auto": compiled (from the cache, or built now), else GTIL with a
        warning when no C compiler works; "tl2cgen": compiled or BoosterError; "gtil": interpreted."""
        model_path = Path(model_path)
        if backend not in BACKENDS:
            raise BoosterError(f"booster backend '{backend}' is unknown; use one of {', '.join(BACKENDS)}")
        if not model_path.is_file():
            raise BoosterError(f"booster model '{model_path}' does not exist; give an XGBoost .ubj or .json file")
        if backend == "gtil":
            booster = cls._load_gtil(model_path, num_class)
        else:
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            try:
                booster = cls._load_compiled(model_path, num_class, cache / "booster", progress)
            except _CannotCompile as e:
                reason, fix = e.args
                if backend == "tl2cgen":
                    raise BoosterError(f"{reason}; {fix}") from None
                warnings.warn(f"{reason}; falling back to treelite GTIL (same probabilities, slower per frame): "
                              f"{fix}", RuntimeWarning, stacklevel=2)
                booster = cls._load_gtil(model_path, num_class)
        booster._check_softmax()
        return booster

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N, F] or [F] features (cast to float32) -> [N, num_class] float32 probabilities; rows sum to 1."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise BoosterError(f"booster '{self.model_path.name}' takes {self.num_features} features per row, "
                               f"got an array of shape {np.shape(features)}; pass [N, {self.num_features}] or "
                               f"[{self.num_features}]")
        if len(x) == 0:
            return np.empty((0, self.num_class), np.float32)
        return self._predict_rows(x)

    def predict_one(self, features: np.ndarray) -> tuple[list[float], int]:
        """One frame's features ([F] or [1, F]) -> (probabilities as a list, grade = argmax + 1, first on ties).

        The per-frame call: a float32 C-contiguous writable array (what onnxruntime returns) goes to the compiled
        library without any numpy call; anything else takes predict()'s checked path. Same numbers either way."""
        fast = self._row
        if fast is not None:
            done = fast(features)
            if done is not None:
                return done
        probs = self.predict(features)
        if len(probs) != 1:
            raise BoosterError(f"predict_one takes the features of one frame, got {len(probs)} rows")
        p = probs[0].tolist()
        return p, p.index(max(p)) + 1

    def __repr__(self) -> str:
        where = f", library={str(self.library)!r}" if self.library else ""
        return (f"Booster({self.model_path.name!r}, backend={self.backend!r}, num_features={self.num_features}, "
                f"num_class={self.num_class}{where})")

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def _load_gtil(cls, model_path: Path, num_class: int) -> "Booster":
        import treelite

        model = _read_treelite(model_path, num_class)
        dtype = np.dtype(model.input_type)

        def predict_rows(x: np.ndarray) -> np.ndarray:
            # One thread for a frame: GTIL's thread pool costs more than it saves on a single row.
            out = treelite.gtil.predict(model, x.astype(dtype, copy=False), nthread=1 if len(x) < 64 else -1)
            return np.ascontiguousarray(out.reshape(len(x), num_class), dtype=np.float32)

        return cls(model_path, "gtil", int(model.num_feature), num_class, predict_rows)

    @classmethod
    def _load_compiled(cls, model_path: Path, num_class: int, root: Path, progress: bool) -> "Booster":
        compiler = find_compiler()
        if compiler is None:
            raise _CannotCompile(f"no working C compiler (${{CC}}, cc, gcc or clang on PATH) to compile booster "
                                 f"'{model_path}'", "install gcc (or set CC) to get the compiled booster")
        key = _cache_key(model_path, compiler)
        entry = root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        try:
            private_folder(root)
        except OSError as e:
            raise _CannotCompile(f"the booster cache '{root}' is not writable ({e})",
                                 "set SONOSCORE_CACHE to a writable folder") from None
        unsafe = not_private(root)
        if unsafe is not None:   # someone else could have planted a library and its hash: never load from it
            print(f"booster: not using the cache {root} ({unsafe}), so a library there may not be this user's; "
                  f"compiling afresh into a private folder for this run only (make {root} this user's own, mode "
                  f"0700, to cache again)", file=sys.stderr, flush=True)
            return cls._load_fresh(model_path, num_class, key, compiler, root, progress)
        foreign = not_private(entry, contents=True)
        if foreign is not None:  # made or changed by someone else (the cache is ours): rebuilt, never loaded
            print(f"booster: rebuilding the cache entry {entry}: {foreign}", file=sys.stderr, flush=True)
            try:
                stale = root / f".stale-{os.getpid()}-{time.monotonic_ns()}"
                os.rename(entry, stale)               # out of the way at once, then removed
                shutil.rmtree(stale)
            except OSError as e:
                raise _CannotCompile(f"the booster cache entry '{entry}' cannot be replaced ({e})",
                                     "remove it, or set SONOSCORE_CACHE to a folder of this user's own") from None
        hit = _open_entry(entry, key, num_class)
        built = False
        if hit is None:
            try:
                entry.mkdir(mode=0o700, exist_ok=True)
                with file_lock(entry / ".lock"):
                    hit = _open_entry(entry, key, num_class)  # another process may have built it while we waited
                    if hit is None:
                        digest = _build(model_path, num_class, entry, key, compiler, progress)
                        built = True
                        hit = _open_entry(entry, key, num_class, expect_sha256=digest)
            except OSError as e:
                raise _CannotCompile(f"the booster cache '{entry}' is not writable ({e})",
                                     "set SONOSCORE_CACHE to a writable folder") from None
            if hit is None:
                raise _CannotCompile(f"the library compiled from booster '{model_path}' with {compiler.command} "
                                     f"does not load or does not match the model",
                                     f"check that the compiler targets this machine ({platform.machine()})")
        return cls._bound(model_path, num_class, hit, root, compiler, built)

    @classmethod
    def _bound(cls, model_path: Path, num_class: int, hit, root: Path, compiler, built: bool) -> "Booster":
        library, compiled = hit
        if compiled.row is not None:
            from runtime import rowcall
            address = ctypes.cast(compiled._shim, ctypes.c_void_p).value
            compiled.fast = rowcall.bind(address, compiled.num_features, compiled.num_class, compiled.warm, root.parent,
                                         compiler)
        return cls(model_path, "tl2cgen", compiled.num_features, num_class, compiled, library=library, built=built)

    @classmethod
    def _load_fresh(cls, model_path: Path, num_class: int, key: dict, compiler, root: Path,
                    progress: bool) -> "Booster":
        """Compile into a new private temporary folder (mkdtemp: 0700, this user's), load the library from there
        and remove the folder (the loaded library stays mapped): nothing is read from, or left in, the cache."""
        tmp = Path(tempfile.mkdtemp(prefix="sonoscore-booster-"))
        try:
            digest = _build(model_path, num_class, tmp, key, compiler, progress)
            hit = _open_entry(tmp, key, num_class, expect_sha256=digest)
            if hit is None:
                raise _CannotCompile(f"the library compiled from booster '{model_path}' with {compiler.command} "
                                     f"does not load or does not match the model",
                                     f"check that the compiler targets this machine ({platform.machine()})")
            return cls._bound(model_path, num_class, hit, root, compiler, True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_softmax(self) -> None:
        p = self._predict_rows(np.zeros((1, self.num_features), np.float32))
        if not (np.all(p >= 0) and abs(float(p.sum()) - 1.0) < 1e-4):
            raise BoosterError(f"booster '{self.model_path}' does not output class probabilities (rows sum to "
                               f"{float(p.sum()):.4g}); train it with objective multi:softprob")


class _CannotCompile(Exception):
    """Why the compiled backend is unavailable, and what would fix it: args (reason, fix), no trailing periods."""


class _Compiled:
    """The compiled `predict(union Entry* data, int pred_margin, <leaf type>* result)` of a TL2cgen library.

    `union Entry {int missing; <threshold type> fvalue; int qvalue;}`: a row is an array of entries where a missing
    feature has `missing == -1`; `result` (num_class values) is accumulated into, so it is zeroed before each call.
    Not re-entrant (shared buffers), hence the lock.
    """

    _TYPES = {"float32": np.float32, "float64": np.float64}

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib  # keeps the library mapped
        for name, res in (("get_num_feature", ctypes.c_int32), ("get_num_target", ctypes.c_int32),
                          ("get_threshold_type", ctypes.c_char_p), ("get_leaf_output_type", ctypes.c_char_p)):
            getattr(lib, name).restype, getattr(lib, name).argtypes = res, []
        self.num_features = int(lib.get_num_feature())
        self.num_target = int(lib.get_num_target())
        n_class = np.zeros(max(1, self.num_target), np.int32)
        lib.get_num_class.restype, lib.get_num_class.argtypes = None, [ctypes.c_void_p]
        lib.get_num_class(n_class.ctypes.data)
        self.num_class = int(n_class[0])
        threshold, leaf = lib.get_threshold_type().decode(), lib.get_leaf_output_type().decode()
        if threshold not in self._TYPES or leaf not in self._TYPES:
            raise OSError(f"unsupported threshold/leaf types {threshold}/{leaf}")
        self._row = np.zeros(self.num_features, self._TYPES[threshold])
        # `missing` is the first 4 bytes of each entry whatever the width of fvalue.
        self._missing = self._row.view(np.int32).reshape(self.num_features, -1)[:, 0]
        self._nan = np.zeros(self.num_features, bool)
        self._out = np.zeros(self.num_class, self._TYPES[leaf])
        self._fn = lib.predict
        self._fn.restype, self._fn.argtypes = None, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self._row_ptr, self._out_ptr = self._row.ctypes.data, self._out.ctypes.data
        self._out_bytes = self._out.nbytes
        self._direct = threshold == "float32"  # entries are 4 bytes: the row can be passed as it is
        self._lock = threading.Lock()
        self.warm = 1
        self.fast = None  # the RowCall of runtime.rowcall, when bound
        try:
            shim = lib.sonoscore_predict_row
        except AttributeError:  # a library built without the shim (not by _build): predict_one takes predict()
            self.row = None
        else:
            shim.restype = ctypes.c_int
            shim.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int]
            self._shim = shim
            self._probs = (ctypes.c_float * self.num_class)()
            self._probs_ptr = ctypes.addressof(self._probs)
            lib.sonoscore_text_bytes.restype, lib.sonoscore_text_bytes.argtypes = ctypes.c_long, []
            self.text_bytes = int(lib.sonoscore_text_bytes())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 1 and self._direct and x.flags.c_contiguous and not np.isnan(x).any():
            return self._one(x)
        result = np.empty((len(x), self.num_class), np.float32)
        row, missing, nan, out, fn = self._row, self._missing, self._nan, self._out, self._fn
        with self._lock:
            for i in range(len(x)):
                np.copyto(row, x[i])
                np.isnan(x[i], out=nan)
                if nan.any():
                    missing[nan] = -1
                out.fill(0)
                fn(self._row_ptr, 0, self._out_ptr)
                result[i] = out
        return result

    def row(self, x: np.ndarray) -> tuple[list[float], int] | None:
        """The per-frame path of Booster.predict_one: None when `x` is not one C-contiguous writable float32 row of
        num_features values or holds a NaN (the caller then takes the general path, which marks missing values).
        Only C-level calls here: c_float.from_buffer takes the array's address without numpy's Python-level
        `.ctypes` machinery, which costs tens of microseconds when cold."""
        if (type(x) is not np.ndarray or x.dtype is not _F32 or x.size != self.num_features
                or not x.flags.c_contiguous or not x.flags.writeable):
            return None
        with self._lock:
            grade = self._shim(ctypes.byref(ctypes.c_float.from_buffer(x)), self._probs_ptr, self.warm)
            if grade == 0:
                return None
            return self._probs[:], grade

    def _one(self, x: np.ndarray) -> np.ndarray:
        """One float32 row without NaN: a float32 array already is an array of `union Entry` (4-byte entries,
        none with the missing pattern), so the library reads the caller's buffer directly. This path runs once
        per frame right after the VGG, when the CPU caches hold the VGG's data rather than this code: every
        Python and numpy call skipped here is a cache-cold call saved (bench measures it)."""
        with self._lock:
            ctypes.memset(self._out_ptr, 0, self._out_bytes)
            self._fn(x.ctypes.data, 0, self._out_ptr)
            return self._out[None].astype(np.float32)


# -- compiler and cache --------------------------------------------------------------------------------------------
class Compiler:
    """A C compiler that answered `--version`: the command tl2cgen runs and what identifies its output."""

    def __init__(self, command: str, path: str, version: str, target: str):
        self.command, self.path, self.version, self.target = command, path, version, target

    @property
    def identity(self) -> str:
        return f"{self.path} | {self.version} | {self.target}"

    def __repr__(self) -> str:
        return f"Compiler({self.command!r}, {self.version!r}, target={self.target!r})"


def find_compiler() -> Compiler | None:
    """$CC when set (and only it, as make does), else the first of cc, gcc, clang on PATH that runs."""
    cc = os.environ.get("CC", "").strip()
    for command in [cc] if cc else ["cc", "gcc", "clang"]:
        argv = shlex.split(command)
        path = shutil.which(argv[0]) if argv else None
        if not path:
            continue
        try:
            ver = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30)
            tgt = subprocess.run([*argv, "-dumpmachine"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if ver.returncode == 0 and ver.stdout.strip():
            return Compiler(command, os.path.realpath(path), ver.stdout.strip().splitlines()[0],
                            tgt.stdout.strip() if tgt.returncode == 0 else "unknown")
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cache_key(model_path: Path, compiler: Compiler) -> dict:
    return {"format": _FORMAT, "model_sha256": sha256_file(model_path), "tl2cgen": _version("tl2cgen"),
            "treelite": _version("treelite"), "machine": platform.machine(), "platform": sys.platform,
            "compiler": compiler.identity}


def _open_entry(entry: Path, key: dict, num_class: int,
                expect_sha256: str | None = None) -> tuple[Path, _Compiled] | None:
    """The entry's library, loaded, if its metadata matches the key and its bytes the recorded hash (and, right
    after this process built it, the hash this process computed then); else None. The caller has checked that
    the entry is private to this user (`runtime.files.not_private`): only this user can have written the hash in meta.json."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        name = meta["library"]
        if meta.get("key") != key or not isinstance(name, str) or Path(name).name != name:
            return None
        library = entry / name
        digest = sha256_file(library)
        if digest != meta["library_sha256"] or (expect_sha256 is not None and digest != expect_sha256):
            return None
        compiled = _Compiled(ctypes.CDLL(str(library)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if compiled.num_target != 1 or compiled.num_class != num_class:
        return None
    return library, compiled


def _build(model_path: Path, num_class: int, entry: Path, key: dict, compiler: Compiler, progress: bool) -> str:
    """Compile the model into `entry`: library under a content-addressed name, then meta.json, both by rename.
    Returns the library's sha256 as this process computed it."""
    try:
        import tl2cgen
    except ImportError as e:
        raise _CannotCompile(f"tl2cgen is not importable ({e}) to compile booster '{model_path}'",
                             "install it with: pip install tl2cgen") from None
    model = _read_treelite(model_path, num_class)
    units = min(64, max(os.cpu_count() or 1, math.ceil(model.num_tree / 50)))  # small units compile faster
    if progress:
        print(f"booster: compiling {model_path.name} ({model.num_tree} trees, {model.num_feature} features) with "
              f"{compiler.version} into {units} units, once per model and machine...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=entry))
    try:
        try:
            src = tmp / "src"
            tl2cgen.generate_c_code(model, dirpath=src, params={"parallel_comp": units})
            _add_shim(src)
            built = Path(tl2cgen.create_shared(compiler.command, src, nthread=os.cpu_count(), options=_CFLAGS))
            os.replace(built, tmp / "predictor.so")
        except Exception as e:  # tl2cgen raises TL2cgenError/ValueError/OSError; all mean "no library"
            detail = " ".join(str(e).split())[-300:]
            raise _CannotCompile(f"compiling booster '{model_path}' with {compiler.command} failed ({detail})",
                                 "check that it can build shared libraries, or set CC to another compiler") from None
        os.chmod(tmp / "predictor.so", 0o755)   # whatever the umask: writable by this user only (not_private)
        digest = sha256_file(tmp / "predictor.so")
        name = f"predictor-{digest[:16]}.so"
        os.replace(tmp / "predictor.so", entry / name)
        meta = {"key": key, "library": name, "library_sha256": digest, "model": model_path.name,
                "num_tree": model.num_tree, "compile_s": round(time.perf_counter() - t0, 2), "built_at": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp / "meta.json", 0o644)
        os.replace(tmp / "meta.json", entry / "meta.json")
        for old in entry.glob("predictor-*.so"):  # superseded builds (we hold the lock)
            if old.name != name:
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"booster: compiled in {time.perf_counter() - t0:.1f} s -> {entry / name}", file=sys.stderr,
              flush=True)
    return digest


# The per-frame entry point compiled into every library beside TL2cgen's generated code (see the module docstring).
_SHIM = r"""
#define _GNU_SOURCE
#include "header.h"
#if defined(__linux__)
#include <link.h>
#endif

static const char *text_lo, *text_hi;
volatile unsigned sonoscore_sink;

#if defined(__linux__)
/* The loaded executable segment holding predict(): TL2cgen's trees are code, so their thresholds and leaves
   live there too. */
static int find_text(struct dl_phdr_info *info, size_t size, void *unused) {
  (void)size; (void)unused;
  const char *target = (const char *)(uintptr_t)&predict;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type == PT_LOAD && (ph->p_flags & PF_X)) {
      const char *lo = (const char *)(info->dlpi_addr + ph->p_vaddr);
      if (target >= lo && target < lo + ph->p_memsz) { text_lo = lo; text_hi = lo + ph->p_memsz; return 1; }
    }
  }
  return 0;
}
#endif

long sonoscore_text_bytes(void) {
#if defined(__linux__)
  if (!text_lo) dl_iterate_phdr(find_text, 0);
#endif
  return (long)(text_hi - text_lo);
}

/* One row of float32 features (no NaN) -> out[num_class] probabilities; returns argmax + 1 (first on ties), or 0
   when the row holds a NaN: the caller then marks missing values itself. A float32 array is an array of
   union Entry (4-byte entries), and no finite or infinite float has the bit pattern of missing (-1).
   `warm`: first read every cache line of the library's code, so the trees run from cache: after the VGG they are
   cold, and fetching them a branch at a time costs one memory latency per tree. */
int sonoscore_predict_row(const float *x, float *out, int warm) {
  const int n = get_num_feature();
  int nan = 0;
  for (int i = 0; i < n; ++i) nan |= (x[i] != x[i]);
  if (nan) return 0;
  if (warm) {
    /* Ordinary loads, not prefetch instructions: on the bench machine prefetches of code pages whose TLB
       entries the VGG evicted were dropped, while loads (independent, so many in flight) were not. */
    if (!text_lo) sonoscore_text_bytes();
    unsigned acc = 0;
    for (const char *p = text_lo; p < text_hi; p += 64) acc |= *(const volatile unsigned char *)p;
    sonoscore_sink = acc;
  }
  for (int k = 0; k < MAX_N_CLASS; ++k) out[k] = 0;
  predict((union Entry *)x, 0, out);
  int best = 0;
  for (int k = 1; k < MAX_N_CLASS; ++k) if (out[k] > out[best]) best = k;
  return best + 1;
}
"""


def _add_shim(src: Path) -> None:
    """Add _SHIM to TL2cgen's generated sources (and its recipe) when rows can be passed as they are: float32
    thresholds, one target."""
    header = (src / "header.h").read_text()
    if "float fvalue;" not in header or "#define N_TARGET 1" not in header:
        return
    (src / "sonoscore_shim.c").write_text(_SHIM)
    recipe = json.loads((src / "recipe.json").read_text())
    recipe["sources"].append({"name": "sonoscore_shim", "length": _SHIM.count("\n")})
    (src / "recipe.json").write_text(json.dumps(recipe))


def _read_treelite(model_path: Path, num_class: int):
    import treelite

    try:
        model = treelite.frontend.load_xgboost_model(str(model_path))
    except Exception as e:  # treelite raises TreeliteError (and others) on a file it cannot parse
        raise BoosterError(f"booster model '{model_path}' could not be read as an XGBoost model "
                           f"({' '.join(str(e).split())[:200]}); give a .ubj or .json saved by xgboost") from None
    header = model.get_header_accessor()
    classes, targets = header.get_field("num_class"), header.get_field("num_target")
    if int(targets[0]) != 1 or int(classes[0]) != num_class:
        raise BoosterError(f"booster model '{model_path}' has {int(classes[0])} class(es) but {num_class} are "
                           f"expected; check num_class in the bundle manifest or retrain with num_class={num_class}")
    if header.get_field("postprocessor") != "softmax":
        raise BoosterError(f"booster model '{model_path}' does not output class probabilities (its output transform "
                           f"is {header.get_field('postprocessor')!r}); train it with objective multi:softprob")
    return model


