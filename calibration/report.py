"""How far a lower precision (INT8, FP16) moves what reaches the patient from FP32, end to end: each precision runs
the whole graph on the same preprocessed frames (`run_precision`), compared with FP32 by runtime.agreement
(`Reference` and `against`: study grades, per-frame grade agreement beside FP32's own noise floor, gate agreement,
mask IoU (accepted frames), accuracy against labels; re-exported here) and judged by `Criteria`; `format_table` is
the terminal summary.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.agreement import Criteria, Outputs, Reference, against, compare, describe, graph_outputs, with_noise

__all__ = ["Criteria", "Outputs", "Reference", "against", "compare", "format_table", "graph_outputs",
           "run_precision", "with_noise"]


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


def format_table(accuracy: dict[str, dict[str, dict]], criteria: Criteria,
                 this_cpu: dict[str, dict[str, dict]] | None = None, cpu_label: str = "this CPU") -> str:
    """The terminal summary: one row per (frame set, precision), each failed check named under its row with its
    figure, limit and shortfall. With `this_cpu` (the INT8 candidates' figures with this CPU's integer kernels, by
    set and precision), an INT8 row is labelled "(simulated)", the figures that decide, and is followed by its
    "(<cpu_label>)" row, shown for information."""
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
    head = (f"{'frames':<30s} {'precision':<{w}s} {'n':>5s} {'studies':>8s} {'grade':>7s} {'floor':>7s} "
            f"{'ties':>6s} {'gate':>7s} {'IoU acc':>7s} {'IoU all':>7s} {'cosine':>7s} {'acc':>7s} {'fp32':>7s}  "
            f"result")
    lines = [head, "-" * len(head)]
    for set_name, label, m, result in rows:
        studies = (f"{m['studies'] - m['studies_differing_count']}/{m['studies']}"
                   if m.get("studies") is not None and "studies_differing_count" in m else "n/a")
        lines.append(f"{set_name[:30]:<30s} {label:<{w}s} {m['frames']:>5d} {studies:>8s} "
                     f"{_s(m.get('grade_agreement'), 4):>7s} {_s(m.get('grade_floor'), 4):>7s} "
                     f"{_s(m.get('near_tie_share'), 3):>6s} {_s(m.get('gate_agreement'), 4):>7s} "
                     f"{_s(m.get('mask_iou_accepted_mean'), 4):>7s} {_s(m.get('mask_iou_mean'), 4):>7s} "
                     f"{_s(m.get('feature_cosine_mean'), 4):>7s} {_s(m.get('accuracy'), 4):>7s} "
                     f"{_s(m.get('accuracy_reference'), 4):>7s}  {result}")
        for row in m.get("criteria", []):
            if not row["passed"]:
                lines.append(f"{'':<30s}   missed: {describe(row, m)}")
    c = criteria
    grade = (f"grade >= FP32's own under {c.grade_noise} grey level{'s' if c.grade_noise != 1 else ''} of noise "
             f"(floor)" if c.min_grade is None and c.grade_noise > 0 else
             f"grade >= {c.min_grade:g}" if c.min_grade else "grade: off")
    parts = [f"study grade same in >= {c.min_study:g} of studies" if c.min_study > 0 else "studies: off", grade,
             f"gate >= {c.min_gate:g}" if c.min_gate > 0 else "gate: off",
             f"IoU where FP32 accepts >= {c.min_iou:g}" if c.min_iou > 0 else "IoU: off",
             f"accuracy (acc; fp32: FP32's) at most {c.max_accuracy_drop:g} below FP32's where labels exist"
             if c.max_accuracy_drop < 1 else "accuracy: off"]
    if c.min_cosine > 0:
        parts.append(f"cosine >= {c.min_cosine:g}")
    lines.append("criteria: " + "; ".join(parts) + ". ties: FP32's near-tie share (top two within "
                 "0.1); IoU all and cosine: information. n/a: not measured (no frame qualifies), which fails its "
                 "check unless the check is off")
    if any(this_cpu.values()):
        lines.append("INT8 is judged on the simulated figures (onnxruntime with graph optimisations off: Q/DQ in "
                     "float, the same on every CPU, what TensorRT computes up to accumulation order); the "
                     f"({cpu_label}) rows are onnxruntime's integer kernels on this CPU, for information")
    return "\n".join(lines)


def _s(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
