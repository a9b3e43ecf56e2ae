"""How far one run of the per-frame graph is from another, frame by frame and study by study, end to end: a lower
precision (INT8, FP16) from FP32 in `calibrate`, this CPU's INT8 kernels from the bundle's simulated reference
outputs at run time (runtime/fidelity.py).

Each run has its own UNet mask, its own gate decision, its own masked image and VGG features, and the bundle's
booster. `compare` measures one run against the reference frame by frame:

- mask IoU with the reference mask over the frames the reference's gate accepts (the masks that reach the VGG:
  `mask_iou_accepted_mean`), and, for information, over every frame where either mask has kidney (1.0 when both are
  empty is not counted, so frames without a kidney cannot inflate it), and the mask-fraction error;
- gate agreement: the share of frames with the same accept/reject decision;
- feature cosine similarity and grade agreement, over frames both runs accepted;
- probability L1: sum over classes of |p - p_ref|, over the same frames.

`Reference` holds what the reference run itself gives on a set (its study grades, its own per-frame grade agreement
under one grey level of seeded input noise, its near-tie share, its accuracy against the labels), and `against`
adds the comparisons that need it: study grades (`study_grade`, the study summary's own definition), the noise
floor, accuracy. `Criteria` is what `calibrate` decides on (docs/design.md "Precision policy"), in one place.

`calibration.report` re-exports these; they live in the runtime because `run --precision int8` uses them too
(nothing on the inference path imports `calibration`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

# The per-frame grade's noise floor: uniform integer noise in [-levels, levels] grey levels, drawn from this seed,
# added to the preprocessed uint8 images (clipped to 0..255).
NOISE_SEED = 0

# The near-tie gap: a frame whose FP32 top grade leads the second by less than this in probability is a near tie.
# Where FP32 itself is within a few hundredths of another grade, any small change of the features (INT8's, another
# CPU's summation order, a grey level of noise) can swap the two.
CLEAR_GAP = 0.1


@dataclass
class Criteria:
    """What a lower precision must hold against FP32 on every checked set (docs/design.md "Precision policy"):

    - study grade: the share of studies (patients where the set has them, else the whole set) whose study grade
      (argmax of the mean probabilities over accepted frames, runtime.sinks.summary) is FP32's, >= `min_study`
      (1.0: every one);
    - grade agreement: the per-frame grade agreement with FP32 (frames both accept) >= `min_grade`, which by
      default (None) is FP32's own agreement with itself under `grade_noise` grey levels of seeded input noise,
      measured in the same run on the same frames;
    - gate agreement >= `min_gate`;
    - mask IoU over the frames FP32's gate accepts >= `min_iou`;
    - accuracy against the labels (frames with a label the precision's gate accepts) at most `max_accuracy_drop`
      below FP32's, where the set has labels;
    - feature cosine >= `min_cosine` (0 by default: reported, not decided on).

    A check passes only when it was measured and met: a figure that could not be computed (None: no frame
    qualifies) or is not a number fails its check, saying so. A minimum of 0 (or below), a `max_accuracy_drop` of 1
    (or more) and `grade_noise` 0 with no fixed `min_grade` turn a check off, and then an unmeasured figure passes.
    Accuracy is not applicable (passes, and says so) where no labelled frame is accepted by FP32."""
    min_study: float = 1.0
    min_grade: float | None = None
    grade_noise: int = 1
    min_gate: float = 0.98
    min_iou: float = 0.98
    max_accuracy_drop: float = 0.01
    min_cosine: float = 0.0

    @classmethod
    def off(cls, **on) -> "Criteria":
        """Every check off but those given (tests and timing: the wiring without a verdict)."""
        return cls(**{"min_study": 0.0, "min_grade": 0.0, "grade_noise": 0, "min_gate": 0.0, "min_iou": 0.0,
                      "max_accuracy_drop": 1.0, "min_cosine": 0.0, **on})

    def __post_init__(self) -> None:
        if int(self.grade_noise) != self.grade_noise or not 0 <= self.grade_noise <= 255:
            raise ValueError(f"grade_noise is a whole number of grey levels from 0 to 255, got {self.grade_noise}")
        self.grade_noise = int(self.grade_noise)

    def judge(self, m: dict, *, unmeasured_fails: bool = True) -> list[dict]:
        """Each check that is on, on a set's figures (`against`'s dict): {"criterion", "figure", "limit",
        "margin" (figure - limit for a minimum, limit - figure for the accuracy drop: >= 0 passes), "passed",
        "flag", "note" (why it failed or is not applicable, else None)}. `unmeasured_fails=False`: a figure that
        could not be measured passes (the run-time check on a few reference frames says nothing then)."""
        n = m.get("frames", 0)
        out = []

        def add(name, figure, limit, flag, qualifies, *, drop=False, note=None, limit_is="fixed"):
            row = {"criterion": name, "figure": figure, "limit": limit, "limit_is": limit_is, "margin": None,
                   "passed": False, "flag": flag, "note": note}
            if figure is None or limit is None:
                row["passed"] = not unmeasured_fails
                row["note"] = note or (f"not measured over {n} frames ({qualifies}); check on frames that show "
                                       f"the kidney, or turn the check off ({flag})")
            elif not (math.isfinite(figure) and math.isfinite(limit)):
                row["note"] = f"{figure} is not a number: the precision's outputs are not finite"
            else:
                row["margin"] = _f(limit - figure if drop else figure - limit)
                row["passed"] = row["margin"] >= 0
            out.append(row)

        if self.min_study > 0:
            add("study grade", m.get("study_agreement"), float(self.min_study), "--min-study 0",
                "the set has no frame")
        floor = m.get("grade_floor") if self.min_grade is None else float(self.min_grade)
        if (self.min_grade is None and self.grade_noise > 0) or (self.min_grade is not None and self.min_grade > 0):
            levels = m.get("grade_noise") or self.grade_noise
            add("grade agreement", m.get("grade_agreement"), floor, "--min-grade 0",
                "no frame passed the gate in both precisions" if m.get("grade_agreement") is None else
                "no frame passed the gate in both FP32 runs, clean and with noise",
                limit_is=(f"FP32's own agreement under {levels} grey level{'s' if levels != 1 else ''} of noise"
                          if self.min_grade is None else "fixed"))
        if self.min_gate > 0:
            add("gate agreement", m.get("gate_agreement"), float(self.min_gate), "--min-gate 0",
                "the set has no frame")
        if self.min_iou > 0:
            add("mask IoU (accepted frames)", m.get("mask_iou_accepted_mean"), float(self.min_iou),
                "--min-iou 0", "FP32's gate accepts no frame")
        if self.max_accuracy_drop < 1:
            ref, acc = m.get("accuracy_reference"), m.get("accuracy")
            if ref is None:
                out.append({"criterion": "accuracy drop", "figure": None, "limit": float(self.max_accuracy_drop),
                            "limit_is": "fixed", "margin": None, "passed": True, "flag": "--max-accuracy-drop 1",
                            "note": "not applicable: no labelled frame that FP32's gate accepts"})
            else:
                add("accuracy drop", None if acc is None else _f(ref - acc), float(self.max_accuracy_drop),
                    "--max-accuracy-drop 1", "the precision's gate accepts no labelled frame", drop=True)
        if self.min_cosine > 0:
            add("feature cosine", m.get("feature_cosine_mean"), float(self.min_cosine), "--min-cosine 0",
                "no frame passed the gate in both precisions")
        return out

    def missed(self, m: dict, *, unmeasured_fails: bool = True) -> list[str]:
        """One sentence per check that failed (`judge`): the criterion, its figure, its limit and by how much."""
        return [describe(row, m) for row in self.judge(m, unmeasured_fails=unmeasured_fails) if not row["passed"]]


def describe(row: dict, m: dict) -> str:
    """One failed check (`Criteria.judge`'s row) in a sentence."""
    name, fig, lim, margin = row["criterion"], row["figure"], row["limit"], row["margin"]
    n = m.get("frames", 0)
    if margin is None:
        return f"{name}: {row['note']}"
    if name == "study grade":
        return (f"study grade differs from FP32's in {m.get('studies_differing_count', '?')} of "
                f"{m.get('studies', '?')} studies: agreement {fig:.4f} < {lim:g} (short by {-margin:.4f})")
    if name == "accuracy drop":
        return (f"accuracy {m['accuracy']:.4f} is {fig:.4f} below FP32's {m['accuracy_reference']:.4f}, more than "
                f"{lim:g} (by {-margin:.4f}) over {m.get('frames_labelled', '?')} labelled frames")
    what = "" if row.get("limit_is", "fixed") == "fixed" else f", {row['limit_is']}"
    return f"{name} {fig:.4f} < {lim:.4f}{what} (short by {-margin:.4f}) over {n} frames"


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
            if prob_maps is not None and masks_from.prob is None:
                raise ValueError("keep_prob with masks_from needs the probabilities of that run")
            if masks_from.prob is not None:        # carried: the scope gate's outline test reads it
                given["prob"] = masks_from.prob[i]
        elif prob is not None:
            given["prob"] = prob[i]
        if features is not None:
            given["features"] = features[i]
        r = graph.run(img, unet, vgg, booster, **given)
        gate = r.gate
        # accepted: graded, both gates passed (a frame the scope gate refuses counts as not accepted)
        masks[i], fractions[i], accepted[i] = gate.mask.astype(bool), gate.fraction, r.refused is None
        if prob_maps is not None:
            prob_maps[i] = r.prob
        if r.features is not None:
            f = r.features[0]
            if feats is None:
                feats = np.full((n, f.shape[-1]), np.nan, np.float32)
            feats[i] = f
        if accepted[i]:
            probs[i] = r.probabilities
        if label and ((i + 1) % step == 0 or i + 1 == n):
            print(f"  checking {label}: {i + 1}/{n}", file=sys.stderr, flush=True)
    if feats is None:
        feats = np.full((n, 1), np.nan, np.float32)
    return Outputs(masks, fractions, accepted, feats, probs, prob_maps)


def with_noise(images: list[np.ndarray], levels: int, seed: int = NOISE_SEED) -> list[np.ndarray]:
    """The preprocessed uint8 images with seeded integer noise: each pixel plus a uniform integer in [-levels,
    levels] (drawn from `seed`, image after image), clipped to 0..255. The noise floor's input."""
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        noise = rng.integers(-levels, levels + 1, size=img.shape, dtype=np.int16)
        out.append(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return out


def study_grade(out: Outputs, frames, num_classes: int) -> int | None:
    """The study grade of the given frames of one run, as the study summary computes it (runtime.sinks.summary:
    the argmax of the probabilities averaged over the accepted frames, + 1); None when it accepts none of them."""
    from runtime.record import FrameRecord
    from runtime.sinks.summary import StudySummary
    s = StudySummary(n_classes=num_classes)
    for i in frames:
        if out.accepted[i]:
            p = [float(x) for x in out.probabilities[i]]
            s.write(FrameRecord(frame=int(i), source_id="study", t_capture=0.0, accepted=True, probabilities=p,
                                grade=int(np.argmax(p)) + 1))
    return s.summary()["final_grade"]


def accuracy(out: Outputs, labels: np.ndarray | None) -> tuple[float | None, int]:
    """(the share of the labelled frames the run's gate accepts whose grade is the label, how many such frames);
    labels [N] grade 1..C, 0 unknown. (None, 0) without such a frame."""
    if labels is None:
        return None, 0
    labels = np.asarray(labels)
    use = out.accepted & (labels > 0)
    if not use.any():
        return None, 0
    return _f((out.probabilities[use].argmax(1) + 1 == labels[use]).mean()), int(use.sum())


def compare(ref: Outputs, other: Outputs) -> dict:
    """The per-frame metrics of `other` against `ref` (FP32). None where no frame qualifies.
    `mask_iou_accepted_mean`: over the frames `ref`'s gate accepts (the masks that reach the VGG);
    `mask_iou_mean`: over the frames where either mask has kidney. `grade_agreement_clear` (with `frames_clear`):
    the grade agreement over the frames both accept whose reference top-two probability gap is at least CLEAR_GAP
    (information)."""
    n = len(ref.fractions)
    inter = (ref.masks & other.masks).reshape(n, -1).sum(1)
    union = (ref.masks | other.masks).reshape(n, -1).sum(1)
    has = union > 0
    iou = np.where(has, inter / np.maximum(union, 1), 1.0)
    acc = ref.accepted & has      # an accepted mask has kidney; `has` only guards a gate opened to 0
    both = ref.accepted & other.accepted
    out: dict = {"frames": int(n), "frames_with_kidney": int(has.sum()),
                 "frames_accepted_by_reference": int(ref.accepted.sum()),
                 "frames_accepted_by_both": int(both.sum()),
                 "mask_iou_accepted_mean": _f(iou[acc].mean()) if acc.any() else None,
                 "mask_iou_accepted_min": _f(iou[acc].min()) if acc.any() else None,
                 "mask_iou_mean": _f(iou[has].mean()) if has.any() else None,
                 "mask_iou_min": _f(iou[has].min()) if has.any() else None,
                 "mask_fraction_error_mean": _f(np.abs(ref.fractions - other.fractions).mean()) if n else None,
                 "mask_fraction_error_max": _f(np.abs(ref.fractions - other.fractions).max()) if n else None,
                 "gate_agreement": _f((ref.accepted == other.accepted).mean()) if n else None}
    if both.any():
        a, b = ref.features[both].astype(np.float64), other.features[both].astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        pa, pb = ref.probabilities[both], other.probabilities[both]
        l1 = np.abs(pa - pb).sum(1)
        clear = ~near_ties(pa)
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


def near_ties(probabilities: np.ndarray) -> np.ndarray:
    """[N] bool: the rows whose top probability leads the second by less than CLEAR_GAP."""
    top2 = np.sort(np.asarray(probabilities), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] < CLEAR_GAP


@dataclass
class Reference:
    """The reference run (FP32) on one set, and what it gives by itself: the studies (`studies`: a key per frame,
    the patient where the set has them; None: the set is one study), the labels ([N] grade 1..C, 0 unknown; None:
    none), and `noisy`, the same graph on the same frames with seeded noise (`with_noise`, `noise_levels` grey
    levels), whose grade agreement with the clean run is the per-frame grade's noise floor."""
    outputs: Outputs
    num_classes: int
    studies: list | None = None
    labels: np.ndarray | None = None
    noisy: Outputs | None = None
    noise_levels: int = 0
    study_index: np.ndarray = field(init=False, repr=False)
    study_grades: list = field(init=False, repr=False)
    figures: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.outputs.accepted)
        keys = list(self.studies) if self.studies is not None else [""] * n
        if len(keys) != n or (self.labels is not None and len(self.labels) != n):
            raise ValueError("studies and labels must give one entry per frame")
        order = {k: i for i, k in enumerate(dict.fromkeys(keys))}          # studies in order of first frame
        self.study_index = np.array([order[k] for k in keys], int)
        self.study_grades = [study_grade(self.outputs, np.flatnonzero(self.study_index == s), self.num_classes)
                             for s in range(len(order))]
        acc = self.outputs.accepted
        ties = near_ties(self.outputs.probabilities[acc]) if acc.any() else np.zeros(0, bool)
        floor = compare(self.outputs, self.noisy) if self.noisy is not None else {}
        ref_acc, labelled = accuracy(self.outputs, self.labels)
        self.figures = {"studies": len(order),
                        "grade_floor": floor.get("grade_agreement"), "grade_noise": self.noise_levels,
                        "grade_floor_frames": floor.get("frames_accepted_by_both", 0),
                        "near_tie_share": _f(ties.mean()) if ties.size else None, "frames_near_tie": int(ties.sum()),
                        "accuracy_reference": ref_acc, "frames_labelled_reference": labelled}


def against(ref: Reference, other: Outputs) -> dict:
    """`other` against the reference on its set: `compare`'s per-frame figures, the reference's own (`Reference`:
    the noise floor, the near-tie share, its accuracy) and the study grades (`study_agreement`: the share of studies
    whose grade is the reference's, a study without an accepted frame in both agreeing; `studies_differing`: each
    study that differs, by its number in the set, never a patient id) and `accuracy` (with `frames_labelled`)."""
    m = compare(ref.outputs, other)
    m.update(ref.figures)
    differing = []
    for s, g_ref in enumerate(ref.study_grades):
        frames = np.flatnonzero(ref.study_index == s)
        g = study_grade(other, frames, ref.num_classes)
        if g != g_ref:
            differing.append({"study": s + 1, "frames": int(frames.size), "reference": g_ref, "grade": g})
    n_studies = len(ref.study_grades)
    m["study_agreement"] = _f(1 - len(differing) / n_studies) if n_studies else None
    m["studies_differing_count"] = len(differing)
    m["studies_differing"] = differing
    m["accuracy"], m["frames_labelled"] = accuracy(other, ref.labels)
    return m


def _f(x) -> float:
    return round(float(x), 6)
