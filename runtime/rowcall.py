"""A one-frame call into the compiled booster without ctypes: a tiny CPython extension, built on the target.

The booster runs once per frame right after the VGG, which has pushed the interpreter's ctypes and libffi code out
of every CPU cache. On the 2-core bench machine a ctypes call costs about 50 us there, four times the work it
calls. A builtin method taking the feature array (buffer protocol, no numpy call) costs a fraction of that, so
`bind(address)` wraps the library's `sonoscore_predict_row` in one. The extension does not depend on the model: it
is compiled once per interpreter and compiler and cached like the boosters (a key, a content hash, a build lock,
atomic renames). Where it cannot be built (no Python headers, no compiler), `bind` returns None and the booster
keeps its ctypes path: same numbers, slower.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from runtime.bundle import sha256_file
from runtime.files import file_lock, not_private, private_folder

_NAME = "_sonoscore_rowcall"
_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef int (*row_fn)(const float *x, float *out, int warm);

typedef struct {
  PyObject_HEAD
  row_fn fn;
  Py_ssize_t num_features;
  int num_class;
  int warm;
  float out[64];
} RowCall;

/* row(x) -> (probabilities list, grade), or None when x is not a C-contiguous float32 buffer of num_features
   values or holds a NaN (the caller then takes its general path). */
static PyObject *RowCall_row(RowCall *self, PyObject *x) {
  Py_buffer view;
  if (PyObject_GetBuffer(x, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  PyObject *result = NULL;
  const char *f = view.format ? view.format : "B";
  if (view.itemsize == 4 && view.len == self->num_features * 4 && (!strcmp(f, "f") || !strcmp(f, "=f") ||
      (!strcmp(f, "<f") && PY_LITTLE_ENDIAN))) {
    int grade = self->fn((const float *)view.buf, self->out, self->warm);
    if (grade > 0) {
      PyObject *probs = PyList_New(self->num_class);
      if (probs) {
        for (int k = 0; k < self->num_class; ++k) PyList_SET_ITEM(probs, k, PyFloat_FromDouble(self->out[k]));
        result = Py_BuildValue("(Ni)", probs, grade);
      }
    }
  }
  PyBuffer_Release(&view);
  if (result == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
  return result;
}

static PyObject *RowCall_set_warm(RowCall *self, PyObject *arg) {
  long v = PyLong_AsLong(arg);
  if (v == -1 && PyErr_Occurred()) return NULL;
  self->warm = (int)v;
  Py_RETURN_NONE;
}

static PyMethodDef RowCall_methods[] = {
  {"row", (PyCFunction)RowCall_row, METH_O, "row(x) -> (probabilities, grade) or None"},
  {"set_warm", (PyCFunction)RowCall_set_warm, METH_O, "set_warm(0|1)"},
  {NULL, NULL, 0, NULL}
};

static PyTypeObject RowCallType = {
  PyVarObject_HEAD_INIT(NULL, 0)
  .tp_name = "_sonoscore_rowcall.RowCall",
  .tp_basicsize = sizeof(RowCall),
  .tp_flags = Py_TPFLAGS_DEFAULT,
  .tp_methods = RowCall_methods,
};

/* bind(address, num_features, num_class, warm) -> RowCall calling the C function at `address`. */
static PyObject *bind(PyObject *module, PyObject *args) {
  unsigned long long address;
  Py_ssize_t n;
  int k, warm;
  (void)module;
  if (!PyArg_ParseTuple(args, "Knii", &address, &n, &k, &warm)) return NULL;
  if (!address || n <= 0 || k <= 0 || k > 64) {
    PyErr_SetString(PyExc_ValueError, "bind: bad address, feature count or class count");
    return NULL;
  }
  RowCall *self = PyObject_New(RowCall, &RowCallType);
  if (!self) return NULL;
  self->fn = (row_fn)(uintptr_t)address;
  self->num_features = n;
  self->num_class = k;
  self->warm = warm;
  return (PyObject *)self;
}

static PyMethodDef module_methods[] = {
  {"bind", bind, METH_VARARGS, "bind(address, num_features, num_class, warm) -> RowCall"},
  {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_sonoscore_rowcall", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__sonoscore_rowcall(void) {
  if (PyType_Ready(&RowCallType) < 0) return NULL;
  return PyModule_Create(&module_def);
}
"""

_lock = threading.Lock()
_module = None      # the loaded extension, once
_why_not: str | None = None


def bind(address: int, num_features: int, num_class: int, warm: int, cache_root: Path, compiler) -> object | None:
    """A RowCall for the C function at `address`, or None (see why_not()) where the extension cannot be had."""
    module = _load(cache_root, compiler)
    return None if module is None else module.bind(address, num_features, num_class, warm)


def why_not() -> str | None:
    """Why the last bind() returned None, in one sentence; None when it did not."""
    return _why_not


def _key(compiler) -> dict:
    return {"format": 1, "source_sha256": hashlib.sha256(_SOURCE.encode()).hexdigest(),
            "python": sys.version.split()[0], "cache_tag": sys.implementation.cache_tag,
            "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "compiler": compiler.identity}


def _load(cache_root: Path, compiler):
    global _module, _why_not
    with _lock:
        if _module is not None:
            return _module
        include = sysconfig.get_paths().get("include") or ""
        if not (Path(include) / "Python.h").is_file():
            _why_not = (f"the Python headers (Python.h under '{include}') are not installed; install the python3-dev "
                        f"package for a faster booster call")
            return None
        key = _key(compiler)
        root = Path(cache_root) / "rowcall"
        entry = root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        try:
            private_folder(root)
            unsafe = not_private(root)
            if unsafe is not None:   # someone else could have planted an extension and its hash: never load it
                print(f"booster: not using the cache {root} ({unsafe}); compiling the call extension afresh into a "
                      f"private folder for this run only (make {root} this user's own, mode 0700, to cache again)",
                      file=sys.stderr, flush=True)
                tmp = Path(tempfile.mkdtemp(prefix="sonoscore-rowcall-"))
                try:
                    module = _open(tmp, key, _build(tmp, key, compiler, include))
                finally:
                    import shutil
                    shutil.rmtree(tmp, ignore_errors=True)
            else:
                foreign = not_private(entry, contents=True)
                if foreign is not None:   # made or changed by someone else: rebuilt, never loaded
                    print(f"booster: rebuilding the cache entry {entry}: {foreign}", file=sys.stderr, flush=True)
                    import shutil
                    stale = root / f".stale-{os.getpid()}-{id(entry)}"
                    os.rename(entry, stale)
                    shutil.rmtree(stale)
                module = _open(entry, key)
                if module is None:
                    entry.mkdir(mode=0o700, exist_ok=True)
                    with file_lock(entry / ".lock"):
                        module = _open(entry, key)
                        if module is None:
                            module = _open(entry, key, _build(entry, key, compiler, include))
        except (OSError, subprocess.SubprocessError) as e:
            _why_not = f"the booster's call extension could not be built in '{entry}' ({' '.join(str(e).split())[:200]})"
            return None
        if module is None:
            _why_not = f"the booster's call extension built in '{entry}' does not load"
            return None
        _module, _why_not = module, None
        return module


def _open(entry: Path, key: dict, expect_sha256: str | None = None):
    """The entry's extension, loaded, if its meta.json holds the key and its bytes the recorded hash (and, right
    after this process built it, the hash computed then); else None. The caller has checked that the entry is
    this user's own (`runtime.files.not_private`)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        name = meta["library"]
        if meta.get("key") != key or Path(name).name != name:
            return None
        path = entry / name
        digest = sha256_file(path)
        if digest != meta["library_sha256"] or (expect_sha256 is not None and digest != expect_sha256):
            return None
        loader = importlib.machinery.ExtensionFileLoader(_NAME, str(path))
        spec = importlib.util.spec_from_file_location(_NAME, str(path), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None


def _build(entry: Path, key: dict, compiler, include: str) -> str:
    """Compile the extension into `entry` (library, then meta.json, by rename); returns its sha256."""
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=entry))
    try:
        (tmp / "rowcall.c").write_text(_SOURCE)
        out = tmp / f"{_NAME}{key['ext_suffix'] or '.so'}"
        argv = [*shlex.split(compiler.command), "-shared", "-fPIC", "-O2", f"-I{include}", str(tmp / "rowcall.c"),
                "-o", str(out)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler.command} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        os.chmod(out, 0o755)       # whatever the umask: writable by this user only (runtime.files.not_private)
        digest = sha256_file(out)
        name = f"{_NAME}-{digest[:16]}{key['ext_suffix'] or '.so'}"
        os.replace(out, entry / name)
        (tmp / "meta.json").write_text(json.dumps({"key": key, "library": name, "library_sha256": digest}) + "\n")
        os.chmod(tmp / "meta.json", 0o644)
        os.replace(tmp / "meta.json", entry / "meta.json")
        return digest
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
