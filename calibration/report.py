"""How far a lower precision (INT8, FP16) moves the pipeline from FP32, frame by frame, end to end: each precision
runs the whole graph on the same preprocessed frames (`run_precision`), compared with FP32 by
runtime.agreement's metrics (mask IoU, mask-fraction error, gate agreement, feature cosine, grade agreement,
probability L1; re-exported here) against `Thresholds`; `format_table` is the terminal summary.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.agreement import Outputs, Thresholds, compare, graph_outputs

__all__ = ["Outputs", "Thresholds", "compare", "format_table", "graph_outputs", "run_precision"]


def run_precision(bundle, files: dict[str, Path], booster, images: list[np.ndarray], *, label: str = "",
                  quiet: bool = False, masks_from: Outputs | None = None, simulated: bool = False,
                  keep_prob: bool = False) -> Outputs:
    """The bundle's graph from preprocessed image to probabilities with the given network files. `masks_from`:
    the outputs of an earlier run on the same images with the same UNet file, whose masks are taken instead of
    running that UNet again (onnxruntime's CPU provider gives the same output for the same file and input).
    `simulated`: onnxruntime with graph optimisations off (runtime.backends.ort.optimization_level): a Q/DQ file's
    QuantizeLinear/DequantizeLinear run as float ops, no integer kernels, the same figures on every CPU; else this
    CPU's integer kernels, as `sonoscore run` uses them."""
    from contextlib import nullcontext

    from runtime.backends import make_runner

    if masks_from is not None and len(masks_from.masks) != len(images):
        raise ValueError("masks_from holds another set of images")
    opts = {"simulated_quantization": True} if simulated else {}
    with (nullcontext() if masks_from is not None else make_runner("ort", files["unet"], **opts)) as unet, \
            make_runner("ort", files["vgg"], **opts) as vgg:
        return graph_outputs(bundle.graph(), unet, vgg, booster, images, num_classes=bundle.num_classes,
                             masks_from=masks_from, keep_prob=keep_prob,
                             label=None if quiet else label)


def format_table(accuracy: dict[str, dict[str, dict]], thresholds: Thresholds,
                 this_cpu: dict[str, dict[str, dict]] | None = None, cpu_label: str = "this CPU") -> str:
    """The terminal summary: one row per (frame set, precision). With `this_cpu` (the INT8 candidates' figures
    with this CPU's integer kernels, by set and precision), an INT8 row is labelled "(simulated)", the figures that
    decide, and is followed by its "(<cpu_label>)" row, shown for information."""
    this_cpu = this_cpu or {}
    rows = []
    for set_name, per in accuracy.items():
        for p, m in per.items():
            cpu = this_cpu.get(set_name, {}).get(p)
            rows.append((set_name, f"{p} (simulated)" if cpu is not None else p, m,
                         "pass" if m.get("passed") else "FAIL"))
            if cpu is not None:
                rows.append((set_name, f"{p} ({cpu_label})", cpu,
                             "pass (information)" if cpu.get("passed") else "miss (information: not deciding)"))
    w = max([len("precision")] + [len(r[1]) for r in rows])
    head = (f"{'frames':<34s} {'precision':<{w}s} {'n':>5s} {'IoU':>7s} {'frac err':>9s} {'gate':>7s} "
            f"{'cosine':>8s} {'grade':>7s} {'prob L1':>8s}  result")
    lines = [head, "-" * len(head)]
    for set_name, label, m, result in rows:
        lines.append(f"{set_name[:34]:<34s} {label:<{w}s} {m['frames']:>5d} {_s(m['mask_iou_mean'], 4):>7s} "
                     f"{_s(m['mask_fraction_error_mean'], 5):>9s} {_s(m['gate_agreement'], 4):>7s} "
                     f"{_s(m['feature_cosine_mean'], 5):>8s} {_s(m['grade_agreement'], 4):>7s} "
                     f"{_s(m['probability_l1_mean'], 4):>8s}  {result}")
    t = thresholds
    lines.append(f"thresholds: IoU >= {t.min_iou:g}, gate >= {t.min_gate_agreement:g}, grade >= "
                 f"{t.min_grade_agreement:g}, cosine >= {t.min_cosine:g} (n/a: not measured, no frame qualifies; "
                 f"that fails its check unless its threshold is 0)")
    if any(this_cpu.values()):
        lines.append("INT8 is judged on the simulated figures (onnxruntime with graph optimisations off: Q/DQ in "
                     "float, the same on every CPU, what TensorRT computes up to accumulation order); the "
                     f"({cpu_label}) rows are onnxruntime's integer kernels on this CPU, for information")
    return "\n".join(lines)


def _s(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


