"""How far one run of the per-frame graph is from another, frame by frame, end to end: a lower precision (INT8,
FP16) from FP32 in `calibrate`, this CPU's INT8 kernels from the bundle's simulated reference outputs at run time
(runtime/fidelity.py).

Each run has its own UNet mask, its own gate decision, its own masked image and VGG features, and the bundle's
booster. Compared with the reference:

- mask IoU with the reference mask (over frames where either mask has kidney; 1.0 when both are empty is not
  counted, so frames without a kidney cannot inflate it), and the mask-fraction error;
- gate agreement: the share of frames with the same accept/reject decision;
- feature cosine similarity and grade agreement, over frames both runs accepted;
- probability L1: sum over classes of |p - p_ref|, over the same frames.

`calibration.report` re-exports these; they live in the runtime because `run --precision int8` uses them too
(nothing on the inference path imports `calibration`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np


@dataclass
class Thresholds:
    """Defaults from the INT8 issue; every one can be changed on the command line.

    A check passes only when it was measured and met. A metric that could not be computed on a set (None: no
    frame qualifies, e.g. no frame accepted by both precisions, so no feature or grade to compare) or that is not a
    number fails its check, saying so: a pass must mean the precision was seen to hold the threshold. A threshold
    of 0 (or below) turns its check off, and then an unmeasured metric passes too."""
    min_iou: float = 0.97
    min_gate_agreement: float = 0.97
    min_grade_agreement: float = 0.97
    min_cosine: float = 0.99

    def missed(self, m: dict) -> list[str]:
        out = []
        n = m.get("frames", 0)
        for key, limit, label, flag, qualifies in (
                ("mask_iou_mean", self.min_iou, "mask IoU", "--min-iou",
                 "no frame has kidney in either precision's mask"),
                ("gate_agreement", self.min_gate_agreement, "gate agreement", "--min-gate", "the set has no frame"),
                ("grade_agreement", self.min_grade_agreement, "grade agreement", "--min-grade",
                 "no frame passed the gate in both precisions"),
                ("feature_cosine_mean", self.min_cosine, "feature cosine", "--min-cosine",
                 "no frame passed the gate in both precisions")):
            if not limit > 0:
                continue
            v = m.get(key)
            if v is None:
                out.append(f"{label} not measured over {n} frames ({qualifies}); check on frames that show the "
                           f"kidney, or give {flag} 0 to skip this check")
            elif not math.isfinite(v):
                out.append(f"{label} is {v} over {n} frames (not a number: the precision's outputs are not finite)")
            elif v < limit:
                out.append(f"{label} {v:.4f} < {limit:g} over {n} frames")
        return out


@dataclass
class Outputs:
    """One precision's pipeline outputs on a list of frames (features/probabilities NaN where rejected)."""
    masks: np.ndarray          # [N, H, W] bool
    fractions: np.ndarray      # [N]
    accepted: np.ndarray       # [N] bool
    features: np.ndarray       # [N, F]
    probabilities: np.ndarray  # [N, C]
    prob: np.ndarray | None = None   # [N, H, W] float32: the UNet's kidney probability (kept when asked for)


def graph_outputs(graph, unet, vgg, booster, images: list[np.ndarray], *, num_classes: int,
                  masks_from: Outputs | None = None, keep_prob: bool = False, label: str | None = None,
                  prob: np.ndarray | None = None, features: np.ndarray | None = None) -> Outputs:
    """`Outputs` of the graph (`Graph.run`, frame by frame) on preprocessed images with runners already open.
    Outputs already known replace their stage (the runner may then be None): `masks_from`, an earlier run's masks
    (and, with `keep_prob`, its probabilities); `prob` [N, H, W], stored probability maps the gate thresholds;
    `features` [N, F], stored features (rows of frames the gate rejects are not read). `keep_prob` keeps the
    UNet's probabilities; `label`: a progress line on stderr every quarter."""
    n = len(images)
    masks = np.zeros((n, *images[0].shape), bool) if n else np.zeros((0, 0, 0), bool)
    prob_maps = np.zeros(masks.shape, np.float32) if keep_prob else None
    fractions = np.zeros(n)
    accepted = np.zeros(n, bool)
    feats: np.ndarray | None = None
    probs = np.full((n, num_classes), np.nan)
    step = max(1, n // 4)
    for i, img in enumerate(images):
        given = {}
        if masks_from is not None:
            given["mask"] = masks_from.masks[i].astype(np.uint8)
            if prob_maps is not None:
                if masks_from.prob is None:
                    raise ValueError("keep_prob with masks_from needs the probabilities of that run")
                given["prob"] = masks_from.prob[i]
        elif prob is not None:
            given["prob"] = prob[i]
        if features is not None:
            given["features"] = features[i]
        r = graph.run(img, unet, vgg, booster, **given)
        gate = r.gate
        masks[i], fractions[i], accepted[i] = gate.mask.astype(bool), gate.fraction, gate.accepted
        if prob_maps is not None:
            prob_maps[i] = r.prob
        if gate.accepted:
            f = r.features[0]
            if feats is None:
                feats = np.full((n, f.shape[-1]), np.nan, np.float32)
            feats[i] = f
            probs[i] = r.probabilities
        if label and ((i + 1) % step == 0 or i + 1 == n):
            print(f"  checking {label}: {i + 1}/{n}", file=sys.stderr, flush=True)
    if feats is None:
        feats = np.full((n, 1), np.nan, np.float32)
    return Outputs(masks, fractions, accepted, feats, probs, prob_maps)


# Information beside grade agreement (never a threshold): the agreement on the frames whose FP32 probabilities do not
# nearly tie, the top grade ahead of the second by at least this much. Where FP32 itself is within a few hundredths
# of another grade, any small change of the features (INT8's, another CPU's summation order) can swap the two.
CLEAR_GAP = 0.1


def compare(ref: Outputs, other: Outputs) -> dict:
    """The metrics of `other` against `ref` (FP32). None where no frame qualifies. `grade_agreement_clear` (with
    `frames_clear`): the grade agreement over the frames both accept whose FP32 top-two probability gap is at least
    CLEAR_GAP; information only, the check decides on `grade_agreement`."""
    n = len(ref.fractions)
    inter = (ref.masks & other.masks).reshape(n, -1).sum(1)
    union = (ref.masks | other.masks).reshape(n, -1).sum(1)
    has = union > 0
    iou = inter[has] / union[has]
    both = ref.accepted & other.accepted
    out: dict = {"frames": int(n), "frames_with_kidney": int(has.sum()), "frames_accepted_by_both": int(both.sum()),
                 "mask_iou_mean": _f(iou.mean()) if has.any() else None,
                 "mask_iou_min": _f(iou.min()) if has.any() else None,
                 "mask_fraction_error_mean": _f(np.abs(ref.fractions - other.fractions).mean()) if n else None,
                 "mask_fraction_error_max": _f(np.abs(ref.fractions - other.fractions).max()) if n else None,
                 "gate_agreement": _f((ref.accepted == other.accepted).mean()) if n else None}
    if both.any():
        a, b = ref.features[both].astype(np.float64), other.features[both].astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        pa, pb = ref.probabilities[both], other.probabilities[both]
        l1 = np.abs(pa - pb).sum(1)
        top2 = np.sort(pa, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] >= CLEAR_GAP
        same = pa.argmax(1) == pb.argmax(1)
        out.update({"feature_cosine_mean": _f(cos.mean()), "feature_cosine_min": _f(cos.min()),
                    "grade_agreement": _f(same.mean()),
                    "grade_agreement_clear": _f(same[clear].mean()) if clear.any() else None,
                    "frames_clear": int(clear.sum()),
                    "probability_l1_mean": _f(l1.mean()), "probability_l1_max": _f(l1.max())})
    else:
        out.update({"feature_cosine_mean": None, "feature_cosine_min": None, "grade_agreement": None,
                    "grade_agreement_clear": None, "frames_clear": 0,
                    "probability_l1_mean": None, "probability_l1_max": None})
    return out


def _f(x) -> float:
    return round(float(x), 6)
