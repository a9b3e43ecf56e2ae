"""Build tests/gpu_harness/harness.cpp (the GPU kernels' arithmetic, runtime/gpu/kernels_core.h) with the host C++
compiler into a shared library and call it through ctypes, the way the CUDA grid would run it."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from runtime.gpu import kernels as K

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "harness.cpp"
P, I, D, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_float


def compiler() -> str | None:
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build(out_dir: Path, defines: dict[str, int] | None = None) -> "Harness":
    """Compile the harness (no FMA contraction: cv2's arithmetic is plain IEEE) and load it."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++) on PATH")
    suffix = "".join(f"_{k}{v}" for k, v in sorted((defines or {}).items()))
    lib = Path(out_dir) / f"libsonoharness{suffix}.so"
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           "-I", str(K.HERE), *(f"-D{k}={v}" for k, v in (defines or {}).items()), str(SOURCE), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"harness build failed:\n{' '.join(cmd)}\n{done.stderr}")
    return Harness(ctypes.CDLL(str(lib)))


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


class Harness:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.harness_violations.restype = I
        lib.harness_gray.argtypes = [P, I, I, I, I, P]
        lib.harness_resize.argtypes = [P, I, I, I, I, I, I, D, D, D, D, I, I, P, I, P, P, I]
        lib.harness_crimmins_smem_bytes.argtypes = [I, I, I]
        lib.harness_crimmins_smem_bytes.restype = I
        lib.harness_crimmins.argtypes = [P, P, I, I, I, I, I, P, P, I]
        lib.harness_gate.argtypes = [P, I, F, P, I, P, P, I, P, I]
        lib.harness_gate.restype = ctypes.c_longlong
        lib.harness_half_to_float.argtypes = [P, P, I]
        lib.harness_resize_launch.argtypes = [P, I, I, I, I, I, I, D, D, D, D, I, I, P, I, P, P, I, I, I]
        lib.harness_crimmins_launch.argtypes = [P, P, I, I, I, P, P, I, I, I, I, I]
        lib.harness_gate_launch.argtypes = [P, I, F, P, I, P, P, I, P, I, P, P, I, I]
        lib.harness_crimmins_reach.argtypes = [I, I]
        lib.harness_crimmins_reach.restype = I
        lib.harness_minmax_launch.argtypes = [P, P, I, P, I, P, I, I]
        lib.harness_float_to_half.argtypes = [P, P, ctypes.c_longlong]

    def violations(self) -> int:
        return self.lib.harness_violations()

    def reset(self) -> None:
        self.lib.harness_reset()

    def gray(self, frame: np.ndarray, channel_order: str = "RGB") -> np.ndarray:
        frame = np.ascontiguousarray(frame)
        h, w = frame.shape[:2]
        channels = 1 if frame.ndim == 2 else frame.shape[2]
        out = np.empty((h, w), np.uint8)
        self.lib.harness_gray(_ptr(frame), h, w, channels, 2 if channel_order == "BGR" else 0, _ptr(out))
        return out

    def preprocess_resize(self, frame: np.ndarray, region, size: int = 224, channel_order: str = "RGB", *,
                          staged: bool = True, net_dtype=None):
        """gray -> crop -> resize as sono_resize runs it. staged=True: the crop copied contiguous first (the
        pinned-staging path); False: the whole frame in place, the crop addressed by offset and pitch (the
        zero-copy path). Returns (image, network input or None)."""
        channels, r_index = K.check_frame(frame, (1 << 30, 1 << 30, 4), channel_order)
        r = K.clip_region(region, frame.shape)
        ch, cw = r.y1 - r.y0, r.x1 - r.x0
        if staged:
            src = np.ascontiguousarray(frame[r.y0:r.y1, r.x0:r.x1])
            base, pitch = src.ctypes.data, cw * channels
        else:
            src = np.ascontiguousarray(frame)
            pitch = frame.shape[1] * channels
            base = src.ctypes.data + r.y0 * pitch + r.x0 * channels
        plan = K.resize_plan(ch, cw, size)
        out = np.empty((size, size), np.uint8)
        net, lut = self._net(size, net_dtype)
        self.lib.harness_resize(base, pitch, channels, r_index, cw, ch, plan.mode, plan.scale_x, plan.scale_y,
                                plan.inv_scale_x, plan.inv_scale_y, plan.iscale_x, plan.iscale_y, _ptr(out), size,
                                _ptr(net), _ptr(lut), 0 if lut is None else lut.itemsize)
        return out, net

    @staticmethod
    def _net(size: int, dtype, channels: int = 1, normalization=None):
        if dtype is None:
            return None, None
        return np.full((1, channels, size, size), np.nan, dtype), K.input_table(dtype, channels, normalization)

    def crimmins_smem_bytes(self, h: int, w: int, tile: int) -> int:
        return self.lib.harness_crimmins_smem_bytes(h, w, tile)

    def crimmins(self, img: np.ndarray, iterations: int, tile: int = 32, *, poison: bool = True, net_dtype=None):
        img = np.ascontiguousarray(img, dtype=np.uint8)
        h, w = img.shape
        out = np.empty_like(img)
        net, lut = self._net(0, None) if net_dtype is None else (np.full((1, 1, h, w), np.nan, net_dtype),
                                                                  K.input_table(net_dtype))
        self.lib.harness_crimmins(_ptr(img), _ptr(out), h, w, tile, iterations, int(poison), _ptr(net), _ptr(lut),
                                  0 if lut is None else lut.itemsize)
        return out, net

    def gate(self, prob: np.ndarray, image: np.ndarray, threshold: float = 0.5, channels: int = 1,
             vgg_dtype=np.float32, normalization=None):
        prob = np.ascontiguousarray(prob)
        image = np.ascontiguousarray(image, dtype=np.uint8)
        n = image.size
        mask = np.empty(image.shape, np.uint8)
        vgg, lut = self._net(image.shape[0], vgg_dtype, channels, normalization)
        count = self.lib.harness_gate(_ptr(prob), int(prob.dtype == np.float16), K.threshold_for(prob.dtype, threshold),
                                      _ptr(image), n, _ptr(mask), _ptr(vgg), channels, _ptr(lut), lut.itemsize)
        return mask, int(count), vgg

    def half_to_float(self, bits: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(bits, dtype=np.uint16)
        out = np.empty(bits.shape, np.float32)
        self.lib.harness_half_to_float(_ptr(bits), _ptr(out), bits.size)
        return out

    def crimmins_reach(self, after_pass: int, axis: int) -> int:
        return self.lib.harness_crimmins_reach(after_pass, axis)

    def minmax(self, image: np.ndarray, mask: np.ndarray | None = None, channels: int = 1, dtype=np.float32,
               threads: int = K._MINMAX_BLOCK) -> np.ndarray:
        """sono_minmax of `image` (times the 0/1 `mask` when given) as a [1, C, H, W] network input, one block of
        `threads` threads run phase by phase."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        mask = None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
        out = np.full((1, channels, *image.shape), np.nan, dtype)
        unit = K.input_table(np.float32)
        self.lib.harness_minmax_launch(_ptr(image), _ptr(mask), image.size, _ptr(out), channels, _ptr(unit),
                                       out.itemsize, threads)
        return out

    def float_to_half(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.float32)
        out = np.empty(values.shape, np.uint16)
        self.lib.harness_float_to_half(_ptr(values), _ptr(out), values.size)
        return out
