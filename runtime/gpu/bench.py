"""`sonoscore bench --device cuda|cpu`: the deployed path against the baseline a research team would ship, in ONE
run, frame by frame.

On `cuda` the configurations are the device-resident pipeline (runtime.gpu.pipeline.DevicePipeline) in every
combination of the asked precisions (fp32, fp16) and CUDA graphs (off, on); on `cpu` they are the CPU pipeline
(runtime.pipeline.Pipeline) per precision. The baseline (the paper's networks in PyTorch eager FP32, frame to
grade; `export.baseline.TorchBaseline`, handed in by the command line because `runtime` never imports torch) runs
on the same device. All of them take turns on every frame, in a rotating order, so a load change on the machine
hits them alike; the quality gate is opened (min mask fraction 0) so every stage runs on every frame.

Timing: a frame's `total` is its host wall clock from frame in host memory to grade; GPU stages are CUDA events on
the pipeline's stream; the baseline's network stages are host clocks that end with the copy back (which waits
for the GPU); the booster is a host clock.
`preprocess` on the device path is "upload + preprocess": host-side preparation (region search, any CPU
conversion), the pinned staging copy, the upload and the kernels; `kernels_p50_ms` adds its part after the host
preparation to the gate (the acceptance figure for the pre- and post-processing kernels).

The JSON has the `bench --json` contract at its top level (frames, fps, stages of the head configuration) and, per
configuration, the same summary as the CPU bench; `speedup` is each configuration's p50 against the baseline's
(total: frame to grade; networks: UNet + VGG stages) and `agreement` how far its outputs are from the baseline's
on the same frames (grades, probabilities, mask fractions).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import UserError

STAGES = ("preprocess", "unet", "gate", "vgg", "booster", "total")
PRECISIONS = ("fp32", "fp16", "int8")
# The acceptance of issue 4 on the lent GPU: FP16 with CUDA graphs, frame in host memory -> grade.
TARGET = "fp16+graphs"
TARGET_P50_MS = 2.0
TARGET_SPEEDUP = 2.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_names(device: str, precisions: list[str], graphs: list[bool]) -> list[tuple[str, str, bool]]:
    """(name, precision, cuda graphs) of every configuration: "fp16+graphs", "fp32", ... (cpu: one per precision)."""
    if device == "cpu":
        return [(p, p, False) for p in precisions]
    return [(p + ("+graphs" if g else ""), p, g) for p in precisions for g in graphs]


def parse_graphs(value: str) -> list[bool]:
    try:
        return {"off": [False], "on": [True], "both": [False, True]}[value]
    except KeyError:
        raise UserError(f"--cuda-graphs {value}: use off, on or both") from None


def bench_device(bundle_path, *, device: str = "cuda", backend: str = "ort", precision: str = "fp32,fp16",
                 cuda_graphs: str = "both", baseline: Callable | None = None, frames: int = 100, warmup: int = 20,
                 json_path=None, plot=None, threads: int | None = None, cache_dir: Path | None = None) -> dict:
    """Bench the deployed path against the baseline on `device`; returns (and writes to `json_path`) the figures.

    `baseline`: a factory `(bundle, device=, min_mask_fraction=, cache_dir=, threads=)` -> a pipeline-like
    context manager with `process(frame, t_start)` and a `name` (export.baseline.TorchBaseline), or None."""
    from runtime.app import bench_frames
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device {device}: use cuda or cpu")
    if frames < 1 or warmup < 0:
        raise UserError("--frames must be at least 1 and --warmup at least 0")
    precisions = [p.strip() for p in str(precision).split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if not precisions or bad:
        raise UserError(f"--precision {precision}: use fp32, fp16 or int8, or several joined by commas")
    bundle = Bundle.load(bundle_path)
    configs = config_names(device, precisions, parse_graphs(cuda_graphs))
    pipes: dict[str, object] = {}
    errors: dict[str, str] = {}
    base_name = None
    try:
        if baseline is not None:
            # Opened first: importing torch before onnxruntime makes a CUDA session use the CUDA and cuDNN
            # libraries torch already loaded (onnxruntime's advice for onnxruntime-gpu beside torch).
            base_name = getattr(baseline, "name", "baseline")
            _open(pipes, errors, base_name, lambda: baseline(bundle, device=device, min_mask_fraction=0.0,
                                                             cache_dir=cache_dir, threads=threads))
        for name, p, g in configs:
            _open(pipes, errors, name, lambda p=p, g=g: _make_pipeline(bundle, device, backend, p, g, threads,
                                                                       cache_dir))
        if base_name in pipes:  # listed (and printed) last
            pipes[base_name] = pipes.pop(base_name)
        if not pipes:
            raise UserError(f"no configuration could start on {device}: {_grouped(errors)}")
        data = bench_frames(frames + warmup)
        _say(f"bench: {frames} frames (+{warmup} warm-up) on {device}, {', '.join(pipes)} taking turns frame by "
             f"frame" + (f"; could not start: {', '.join(errors)}" if errors else ""))
        samples = {n: {s: [] for s in (*STAGES, "host_prep", "upload_preprocess")} for n in pipes}
        outputs = {n: [] for n in pipes}
        walls = {n: 0.0 for n in pipes}
        for k, f in enumerate(data):
            names = list(pipes)
            for name in names[k % len(names):] + names[:k % len(names)]:
                pipe = pipes[name]
                t0 = time.perf_counter()
                f.t_capture = time.time()
                try:
                    rec = pipe.process(f, t0)
                    if rec.error:
                        raise RuntimeError(rec.error)
                except Exception as e:  # a configuration that fails mid-run is reported, the others go on
                    errors[name] = f"frame {k}: {type(e).__name__}: {_short(e)}"
                    _say(f"  {name} failed: {errors[name]}")
                    _close(pipes.pop(name))
                    samples.pop(name), outputs.pop(name), walls.pop(name)
                    continue
                wall = time.perf_counter() - t0
                if k >= warmup:
                    walls[name] += wall
                    for s in STAGES:
                        samples[name][s].append(rec.latency_ms.get(s, 0.0))
                    timing = getattr(pipe, "timing", {})
                    samples[name]["host_prep"].append(timing.get("host_prep_ms", np.nan))
                    samples[name]["upload_preprocess"].append(timing.get("upload_preprocess_ms", np.nan))
                    outputs[name].append((rec.grade, rec.probabilities, rec.mask_fraction))
            if not pipes:
                raise UserError(f"every configuration failed on {device}: {_grouped(errors)}")
            if (k + 1) % max(1, (frames + warmup) // 10) == 0:
                _say(f"  {k + 1}/{frames + warmup} frames")
        device_info = _device_info(device, pipes)
        booster = next((getattr(getattr(p, "booster", None), "backend", None) for p in pipes.values()), None)
    finally:
        for pipe in pipes.values():
            _close(pipe)

    per = {n: _summary(samples[n], walls[n], frames, bundle, configs, n) for n in samples}
    head = _head(device, per, base_name)
    out = {"frames": frames, "fps": per[head]["fps"], "stages": per[head]["stages"], "head": head,
           "device": device, "device_name": device_info.pop("name"), "backend": backend, "booster_backend": booster,
           "configs": per, "baseline": base_name, "errors": errors,
           "versions": _versions(device, device_info),
           "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count()},
           "stage_notes": {"preprocess": "upload + preprocess (device path: host preparation, pinned staging, "
                                         "upload, kernels; CPU paths: gray, crop, resize, Crimmins)",
                           "total": "host wall clock, frame in host memory -> grade",
                           "vgg": "device path: includes the features' copy back to the host"}}
    if base_name in per:
        b = per[base_name]
        out["speedup"] = {n: {"total_p50": b["stages"]["total"]["p50_ms"] / per[n]["stages"]["total"]["p50_ms"],
                              "networks_p50": b["networks_p50_ms"] / max(per[n]["networks_p50_ms"], 1e-9)}
                          for n in per if n != base_name}
        out["agreement"] = {n: _agreement(outputs[n], outputs[base_name]) for n in per if n != base_name}
    if device == "cuda":
        out["acceptance"] = _acceptance(per, out.get("speedup", {}))
    _print(out, per)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
    if plot:
        from runtime.evaluate import latency_png
        latency_png({s: samples[head][s] for s in STAGES}, Path(plot),
                    f"sonoscore bench: {head} on {out['device_name']}, {frames} frames")
    return out


# -- pieces ----------------------------------------------------------------------------------------------------------

def _make_pipeline(bundle, device, backend, precision, graphs, threads, cache_dir):
    if device == "cpu":
        from runtime.pipeline import Pipeline
        return Pipeline(bundle, backend=backend, precision=precision, threads=threads, min_mask_fraction=0.0,
                        cache_dir=cache_dir)
    from runtime.gpu.pipeline import DevicePipeline
    return DevicePipeline(bundle, backend=backend, precision=precision, cuda_graphs=graphs, min_mask_fraction=0.0,
                          cache_dir=cache_dir)


def _open(pipes: dict, errors: dict, name: str, make) -> None:
    try:
        pipes[name] = make().__enter__()
    except UserError:
        raise
    except Exception as e:  # BackendUnavailable, onnxruntime's own errors, a missing bundle file: reported
        errors[name] = f"{type(e).__name__}: {_short(e)}"
        _say(f"  {name} could not start: {errors[name]}")


def _grouped(errors: dict[str, str]) -> str:
    """"fp32, fp16: <reason>; torch-eager-fp32: <other reason>": configurations that failed alike, once."""
    by_reason: dict[str, list[str]] = {}
    for name, err in errors.items():
        by_reason.setdefault(err.rstrip(". "), []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())


def _close(pipe) -> None:
    try:
        pipe.__exit__(None, None, None)
    except Exception as e:  # closing must not hide the figures of the others
        _say(f"  warning: closing a pipeline failed ({_short(e)})")


def _percentiles(values) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def _summary(smp: dict, wall: float, frames: int, bundle: Bundle, configs, name: str) -> dict:
    nets = np.asarray(smp["unet"]) + np.asarray(smp["vgg"])
    precision = next((p for n, p, _ in configs if n == name), "fp32")
    out = {"frames": frames, "fps": frames / max(wall, 1e-9),
           "stages": {s: _percentiles(smp[s]) for s in STAGES},
           "networks_p50_ms": float(np.percentile(nets, 50)),
           "files": {n: bundle.network_file(n, precision).name for n in ("unet", "vgg")}}
    up = np.asarray(smp["upload_preprocess"], np.float64)
    if up.size and np.isfinite(up).all():
        out["host_prep"] = _percentiles(smp["host_prep"])
        out["upload_preprocess"] = _percentiles(up)
        out["kernels_p50_ms"] = float(np.percentile(up + np.asarray(smp["gate"]), 50))
    return out


def _agreement(mine: list, base: list) -> dict:
    n = min(len(mine), len(base))
    grades = [a[0] == b[0] for a, b in zip(mine, base)]
    probs = [float(np.max(np.abs(np.subtract(a[1], b[1])))) for a, b in zip(mine, base)
             if a[1] is not None and b[1] is not None]
    fractions = [abs(a[2] - b[2]) for a, b in zip(mine, base)]
    return {"frames": n, "grade": float(np.mean(grades)) if grades else None,
            "max_abs_probability": max(probs) if probs else None,
            "max_abs_mask_fraction": float(max(fractions)) if fractions else None}


def _head(device: str, per: dict, base: str | None) -> str:
    mine = [n for n in per if n != base]
    if device == "cuda" and TARGET in per:
        return TARGET
    return (mine or list(per))[0]


def _acceptance(per: dict, speedup: dict) -> dict:
    if TARGET not in per:
        return {"target": TARGET, "met": False, "reason": f"{TARGET} did not run"}
    p50 = per[TARGET]["stages"]["total"]["p50_ms"]
    sp = speedup.get(TARGET, {}).get("total_p50")
    out = {"target": TARGET, "total_p50_ms": p50, "total_p50_limit_ms": TARGET_P50_MS,
           "speedup_vs_baseline": sp, "speedup_min": TARGET_SPEEDUP,
           "kernels_p50_ms": per[TARGET].get("kernels_p50_ms"), "kernels_p50_limit_ms": 0.1}
    out["met"] = bool(p50 <= TARGET_P50_MS and sp is not None and sp >= TARGET_SPEEDUP)
    if sp is None:
        out["reason"] = "the baseline did not run, so the speed-up is unknown"
    return out


def _device_info(device: str, pipes: dict) -> dict:
    if device == "cpu":
        return {"name": _cpu_name()}
    for pipe in pipes.values():
        dev = getattr(pipe, "device", None)
        if dev is not None and hasattr(dev, "dev"):
            d = dev.dev
            info = {"name": d.name(), "compute_capability": "%d.%d" % d.compute_capability(),
                    "memory_mb": int(d.total_memory() // (1 << 20))}
            try:
                v = dev.cuda.get_driver_version()
                info["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
            except Exception:  # an old pycuda without the call
                pass
            return info
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return {"name": torch.cuda.get_device_name(0)}
    return {"name": "unknown (no device configuration started)"}


def _versions(device: str, device_info: dict) -> dict:
    import cv2
    import onnxruntime
    v = {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
         "onnxruntime": onnxruntime.__version__, "onnxruntime_providers": onnxruntime.get_available_providers()}
    v.update({k: val for k, val in device_info.items()})
    if device == "cuda":
        try:
            import pycuda
            v["pycuda"] = getattr(pycuda, "VERSION_TEXT", "installed")
        except ImportError:
            v["pycuda"] = "not installed"
    torch = sys.modules.get("torch")   # only when the baseline imported it: the runtime never does
    if torch is not None:
        v["torch"] = torch.__version__
        v["torch_cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        v["torch_tf32"] = {"cudnn_conv": bool(torch.backends.cudnn.allow_tf32),
                           "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    try:
        from importlib.metadata import version
        v["tl2cgen"] = version("tl2cgen")
    except Exception:  # not installed: the booster runs interpreted
        pass
    return v


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print(out: dict, per: dict) -> None:
    _say(f"  device: {out['device_name']} ({out['device']}); head configuration {out['head']}")
    for name, s in per.items():
        base = " (baseline)" if name == out.get("baseline") else ""
        _say(f"  -- {name}{base}: {s['fps']:.1f} frames/s" +
             (f", kernels p50 {s['kernels_p50_ms']:.3f} ms" if "kernels_p50_ms" in s else ""))
        for st in STAGES:
            v = s["stages"][st]
            _say(f"     {st:10s} p50 {v['p50_ms']:8.3f}  p95 {v['p95_ms']:8.3f}  p99 {v['p99_ms']:8.3f}  "
                 f"max {v['max_ms']:8.3f} ms")
    for name, sp in out.get("speedup", {}).items():
        ag = out["agreement"][name]
        _say(f"  {name} vs {out['baseline']}: frame to grade {sp['total_p50']:.2f}x, networks "
             f"{sp['networks_p50']:.2f}x; same grade on {ag['grade']:.0%} of frames, max |dp| "
             f"{ag['max_abs_probability'] if ag['max_abs_probability'] is not None else float('nan'):.2e}")
    acc = out.get("acceptance")
    if acc:
        _say(f"  acceptance ({acc['target']}: p50 <= {TARGET_P50_MS} ms and >= {TARGET_SPEEDUP}x the baseline): "
             f"{'met' if acc['met'] else 'NOT met'}" + (f" ({acc['reason']})" if acc.get("reason") else ""))
    for name, err in out["errors"].items():
        _say(f"  {name}: {err}")


def _short(e, n: int = 300) -> str:
    return " ".join(str(e).split())[:n]
