"""INT8 fidelity: the bundle's reference frames, and the quick check that this CPU's integer kernels compute what
`calibrate` validated (docs/design.md "INT8 fidelity: simulated and this CPU").

`calibrate` judges an INT8 set on simulated quantization: onnxruntime with graph optimisations off, so the Q/DQ
file's QuantizeLinear/DequantizeLinear run as float ops (runtime.backends.ort.optimization_level). That gives the
same figures on every x86 CPU, and TensorRT computes the same up to accumulation order. onnxruntime's default
session instead fuses the pairs into this CPU's integer kernels (VNNI, AVX2, AMX, ...), whose rounding differs from
CPU to CPU. When it installs an INT8 set, `calibrate` stores a few held-out frames with the set's simulated
outputs in the bundle (`REFERENCE_FILE`, named in the manifest's `int8_reference` and hashed with the other files):

    images    [K, S, S] uint8    preprocessed frames, as the runtime feeds them (no metadata, no identifier)
    prob      [K, S, S] float32  the UNet's kidney probability (simulated INT8, or the FP32 UNet in a mixed set)
    features  [K, F] float32     the VGG's features of the frames the gate accepted (NaN rows elsewhere)

`check_here` runs those frames through the INT8 runners a pipeline just opened (this CPU's kernels), compares
with the stored outputs as `calibrate` compares (runtime.agreement: the frames' study grade, grade agreement with
the bundle's booster against this CPU's own agreement under the same grey level(s) of seeded noise, gate agreement,
mask IoU where the reference accepts) by the criteria the bundle was calibrated with, and prints one warning line
when a measured figure misses. The verdict is cached under the sonoscore cache (`fidelity/`, keyed by the manifest's
sha256, onnxruntime's version and the CPU's instruction sets), so a later run reads it instead of computing; a
cache that cannot be read or written only means the check runs again. The check never stops a run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import platform
import time
from pathlib import Path

import numpy as np

from runtime.files import atomic_write

log = logging.getLogger("sonoscore.fidelity")

REFERENCE_FILE = "int8_reference.npz"
REFERENCE_FRAMES = 16
CACHE_DIR = "fidelity"             # under the sonoscore cache (runtime.booster.default_cache_dir())
_FORMAT = 1                         # of a cache entry
# The instruction sets that choose onnxruntime's integer kernels on x86 (MLAS) and ARM, strongest first.
_X86_INT8 = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2", "sse4_1")
_ARM_INT8 = ("i8mm", "asimddp", "sve", "asimd")
_VERDICTS: dict[str, dict] = {}     # this process's verdicts by cache key: a bench's several pipelines check once


# -- this CPU -------------------------------------------------------------------------------------------------------

def cpu_flags() -> tuple[str, ...]:
    """The INT8-relevant instruction sets this CPU reports (Linux /proc/cpuinfo), strongest first; () elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ()
    have: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            have.update(value.split())
            break
    return tuple(f for f in (*_X86_INT8, *_ARM_INT8) if f in have)


def cpu_summary() -> str:
    """This CPU's INT8 kernels in a word or two: "avx512_vnni", "avx2", "aarch64 asimddp" (the strongest set)."""
    flags = cpu_flags()
    machine = platform.machine() or "unknown CPU"
    if not flags:
        return machine
    return flags[0] if flags[0] in _X86_INT8 else f"{machine} {flags[0]}"


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
        return onnxruntime.__version__
    except ImportError:
        return "unknown"


# -- the reference set (written by calibrate) -------------------------------------------------------------------------

def pick_frames(accepted: np.ndarray, k: int = REFERENCE_FRAMES) -> list[int]:
    """Up to k frame indices spread over the set, frames the gate accepted first (they give features and grades to
    compare), then rejected ones; sorted."""
    acc = [i for i, a in enumerate(accepted) if a]
    rej = [i for i, a in enumerate(accepted) if not a]
    chosen = [acc[j] for j in _spread(len(acc), k)]
    chosen += [rej[j] for j in _spread(len(rej), k - len(chosen))]
    return sorted(chosen)


def _spread(n: int, k: int) -> list[int]:
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({int(math.floor(i * n / k + n / (2 * k))) for i in range(k)})


def write_reference(path: Path, images: list[np.ndarray], prob: np.ndarray, features: np.ndarray) -> Path:
    """The reference file (compressed npz), written atomically."""
    path = Path(path)
    arrays = {"images": np.stack(images).astype(np.uint8), "prob": np.asarray(prob, np.float32),
              "features": np.asarray(features, np.float32)}
    if not (len(arrays["images"]) == len(arrays["prob"]) == len(arrays["features"])):
        raise ValueError("the reference's images, probabilities and features must have one row per frame")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())
    return path


def read_reference(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        ref = {k: z[k] for k in ("images", "prob", "features")}
    n = len(ref["images"])
    if ref["images"].ndim != 3 or ref["prob"].shape != ref["images"].shape or len(ref["features"]) != n:
        raise ValueError(f"{path.name} holds arrays of mismatched shapes")
    return ref


# -- the run-time check ----------------------------------------------------------------------------------------------

def cache_key(bundle) -> str:
    text = "|".join((bundle.manifest_sha256, _onnxruntime_version(), platform.machine(), ",".join(cpu_flags())))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_path(key: str, cache_dir: Path | None = None) -> Path:
    if cache_dir is None:
        from runtime.booster import default_cache_dir
        cache_dir = default_cache_dir()
    return Path(cache_dir) / CACHE_DIR / f"{key}.json"


def check_here(bundle, unet, vgg, booster, *, cache_dir: Path | None = None, say=None) -> dict | None:
    """The INT8 set's check on this CPU, with the runners (this CPU's kernels) and booster a pipeline opened:
    None when the bundle has no reference set (calibrated before there was one, or timing only); else the verdict
    {"missed": [...], "metrics": {...}, ...}, computed or read from the cache. One warning line (through `say`,
    default stderr) when a figure misses. Never raises for a cache it cannot use or a check it cannot run."""
    entry = bundle.manifest.get("int8_reference")
    if not isinstance(entry, dict) or not entry.get("file"):
        return None
    try:
        key = cache_key(bundle)
        verdict = _VERDICTS.get(key)
        if verdict is not None:
            return verdict              # said once already in this process
        path = cache_path(key, cache_dir)
        verdict = _read_cache(path, key)
        if verdict is None:
            t0 = time.perf_counter()
            verdict = _compute(bundle, entry, unet, vgg, booster)
            verdict["key"] = key
            log.debug("int8 fidelity: checked %d reference frames in %.2f s", verdict["frames"],
                      time.perf_counter() - t0)
            _write_cache(path, verdict)
        else:
            log.debug("int8 fidelity: verdict read from %s", path)
    except Exception as e:   # a reference that cannot be used must not stop a run
        log.debug("int8 fidelity: not checked (%s: %s)", type(e).__name__, e)
        return None
    _VERDICTS[key] = verdict
    if verdict["missed"]:
        (say or log.warning)(warning(verdict))
    return verdict


def warning(verdict: dict) -> str:
    """The one warning line for a CPU whose integer kernels miss the bundle's criteria."""
    return (f"Warning: on this CPU ({verdict['cpu']}, onnxruntime {verdict['onnxruntime']}) the INT8 networks' "
            f"integer kernels move the outputs from the INT8 outputs `calibrate` validated (simulated quantization) "
            f"beyond the criteria the bundle was calibrated with: {'; '.join(verdict['missed'])}; the calibrated "
            f"accuracy holds where the simulated figures are computed (a GPU/TensorRT target), not with these "
            f"kernels: use --precision fp32 here for it")


def _compute(bundle, entry: dict, unet, vgg, booster) -> dict:
    from runtime.agreement import Criteria, Reference, against, graph_outputs, with_noise

    ref = read_reference(bundle.root / entry["file"])
    graph = bundle.graph()          # the manifest's gate, not a pipeline's override (the bench opens the gate)
    images = list(ref["images"])
    # the stored outputs through the same graph: its gate on the stored probabilities, the booster on the stored
    # features of the frames it accepts
    reference = graph_outputs(graph, None, None, booster, images, num_classes=bundle.num_classes,
                              prob=ref["prob"], features=ref["features"].astype(np.float32))
    if not np.isfinite(reference.features[reference.accepted]).all():
        raise ValueError("the reference has no features for a frame its gate accepts")
    here = graph_outputs(graph, unet, vgg, booster, images, num_classes=bundle.num_classes)
    criteria = _criteria(bundle.manifest)
    criteria.max_accuracy_drop = 1.0        # the reference frames carry no labels
    # the per-frame grade's floor here: this CPU's own agreement with itself under the same noise
    noisy = (graph_outputs(graph, unet, vgg, booster, with_noise(images, criteria.grade_noise),
                           num_classes=bundle.num_classes) if criteria.grade_noise > 0 else None)
    floor = Reference(here, bundle.num_classes, noisy=noisy, noise_levels=criteria.grade_noise).figures
    metrics = against(Reference(reference, bundle.num_classes), here)    # the frames are one study
    metrics.update({k: floor[k] for k in ("grade_floor", "grade_floor_frames", "grade_noise")})
    # a figure not measurable on these frames (e.g. no kidney anywhere): nothing to say
    return {"format": _FORMAT, "missed": criteria.missed(metrics, unmeasured_fails=False), "metrics": metrics,
            "frames": len(images), "cpu": cpu_summary(), "cpu_flags": list(cpu_flags()),
            "onnxruntime": _onnxruntime_version(), "manifest_sha256": bundle.manifest_sha256}


def _criteria(manifest: dict):
    """The criteria the bundle was calibrated with (the manifest's `calibration.criteria`; a bundle calibrated
    before them records `thresholds`, whose mask IoU and gate limits carry over; the rest are the defaults)."""
    from dataclasses import fields

    from runtime.agreement import Criteria
    cal = manifest.get("calibration") or {}
    given = cal.get("criteria")
    if not isinstance(given, dict):
        old = cal.get("thresholds") or {}
        given = {"min_iou": old.get("min_iou"), "min_gate": old.get("min_gate_agreement")}
    names = {f.name for f in fields(Criteria)}
    return Criteria(**{k: v for k, v in given.items() if k in names and v is not None})


def _read_cache(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.debug("int8 fidelity: cache entry %s not readable (%s); checking again", path, e)
        return None
    ok = (isinstance(data, dict) and data.get("format") == _FORMAT and data.get("key") == key
          and isinstance(data.get("missed"), list) and all(isinstance(m, str) for m in data["missed"])
          and all(isinstance(data.get(k), str) for k in ("cpu", "onnxruntime")))
    if not ok:
        log.debug("int8 fidelity: cache entry %s is not a verdict; checking again", path)
        return None
    return data


def _write_cache(path: Path, verdict: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(verdict).encode())
    except OSError as e:
        log.debug("int8 fidelity: verdict not cached (%s)", e)

