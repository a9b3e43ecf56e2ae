"""The IFTA per-frame graph, defined once. Every path that runs the two networks runs them through this module:
the CPU pipeline, the device pipeline's host side, INT8 calibration and its accuracy check, training (the booster's
features) and the PyTorch baseline. Its constants come from the bundle's manifest, never from the caller's code.

    gray frame --preprocess--> image 224x224 uint8       crop, resize, Crimmins           (runtime.preprocess)
    image      --segment-----> prob  224x224 float       UNet, sigmoid inside the network
    prob       --gate--------> Gate(mask, fraction, accepted)   prob > mask_threshold; fraction >= min_mask_fraction
    image,mask --features----> [1, F] float              image * mask (uint8), VGG-19-BN up to Fc2
    features   --score-------> probabilities [C], grade  the booster's softmax, grade = argmax + 1

Each network's input is the uint8 image * (1/255) then the normalization its manifest `input` declares
(runtime.normalize: unit, minmax per image, or meanstd per channel; `unet_feeds` / `vgg_feeds`).

`Graph.run` is that dataflow in one function, and the only place the steps are put together: the CPU pipeline,
the PyTorch baseline, INT8 calibration and its accuracy check (runtime.agreement), the run-time INT8 check
(runtime.fidelity), the booster's training features (export.recipe) and the bench all call it
(tests/test_one_composition.py reads every module to hold them to that). A caller supplies the runners (anything
with `infer(feeds, outputs) -> {name: array}`), the booster (`predict_one(features) -> (probabilities, grade)`) and
a `lap(stage)` clock for its stage latencies (the masked image is made within `gate`, as the device pipeline's gate
kernel makes it, so `vgg` times the network alone); an output it already has is given instead of computed (`prob`,
`mask`, `features`), and `until` names the last stage to run. The device pipeline runs the same steps as CUDA
kernels (runtime.gpu.kernels) with the threshold and minimum fraction read from here, and decides acceptance with
`Graph.accepts`.

The scope gate (runtime.scope, docs/scope.md) is the graph's second gate, after the mask gate and before the grade:
a graph with a reference (`Graph.scope`, from the bundle's `scope` section) checks every frame the mask gate accepts
that `run` takes to the grade (`until="booster"`): the picture, mask and outline tests before the VGG (a frame they
refuse stops there: no VGG, no grade), the view test on the features after it (refused: no grade). `Result.scope`
holds the verdict and `Result.refused` the reason a frame got no grade (`no kidney` for the mask gate too). The
device pipeline, whose networks run as kernels, checks on the host after its sync with `check_scope`, the same
two steps (`refusal` is the one rule for the reason).

Also defined here, once: the source preparation every path shares (`prepare_source`: gray with the source's
window, the burned-in-text scan-sector rule, crop, resize, Crimmins) and the rule for which labelled frames count
as kidney (`is_kidney`, `kidney_frames`). A future kind of graph (a classifier, a series of frames) is another
stage sequence in this module, with its `run` and its `Result`; callers go on calling `run`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from runtime import normalize as norm
from runtime import preprocess as pp
from runtime import scope as sc

# The stages of `Graph.run`, in order: the values of its `until`, and (with "preprocess" before them and "scope", the
# scope gate's checks, after "gate") the record's `latency_ms` keys.
STAGES = ("unet", "gate", "vgg", "booster")
SCOPE_STAGE = "scope"

# The gate and preprocessing a new bundle gets (docs/design.md, "The per-frame graph"). A bundle's manifest may
# set others; every path reads them from the manifest through `Graph.from_manifest`.
MASK_THRESHOLD = 0.5
MIN_MASK_FRACTION = 0.05
SIZE = 224


@dataclass(frozen=True)
class Gate:
    """The quality gate's verdict on one frame."""
    mask: np.ndarray        # HxW uint8, 1 = kidney
    fraction: float         # share of the mask that is kidney
    accepted: bool          # fraction >= the minimum: the frame is scored


@dataclass(frozen=True)
class Source:
    """What the scope check needs of the source frame, beside the graph's own outputs: its pixels as the source gave
    them (the colour test reads them before any gray conversion) and the region the image was cut from in them (the
    crop's shape: the flatness test's resolution). `Source()` (nothing known: a preprocessed image given alone) is a
    gray frame at the image's own size."""
    pixels: np.ndarray | None = None
    region: pp.Region | None = None

    @property
    def crop_shape(self) -> tuple[int, int] | None:
        r = self.region
        return None if r is None else (max(1, r.y1 - r.y0), max(1, r.x1 - r.x0))

    def colour(self) -> float:
        return sc.colour_share(self.pixels, self.region)


@dataclass
class Result:
    """What the graph computed for one preprocessed image (the VGG's input, features and scores only when the gate
    accepted it, and only as far as `Graph.run` was asked to go)."""
    gate: Gate
    prob: np.ndarray | None = None           # the UNet's kidney probability (HxW) the gate thresholded (or given)
    vgg_feeds: dict[str, np.ndarray] | None = None   # the VGG's input: the image under the mask, normalized
    features: np.ndarray | None = None       # [1, F]
    probabilities: list[float] | None = None
    grade: int | None = None
    scope: sc.Verdict | None = None          # the scope gate's verdict (None: not checked: no reference, the mask
                                             # gate refused, or `until` stopped before the grade)
    refused: str | None = None               # why the frame gets no grade: `no kidney` (the mask gate) or the scope
                                             # verdict's reason; None for a frame that may be graded


@dataclass(frozen=True)
class Graph:
    """The per-frame graph's pinned definitions: preprocessing, the networks' tensor names, the gate."""
    size: int = SIZE
    crimmins_iterations: int = 1
    unet_input: str = "image"
    unet_output: str = "mask"
    vgg_input: str = "image"
    vgg_output: str = "features"
    vgg_channels: int = 1
    mask_threshold: float = MASK_THRESHOLD
    min_mask_fraction: float = MIN_MASK_FRACTION
    # What each network receives after uint8/255 (runtime.normalize; a manifest without one: unit).
    unet_normalization: dict[str, Any] = field(default_factory=lambda: dict(norm.UNIT), hash=False)
    vgg_normalization: dict[str, Any] = field(default_factory=lambda: dict(norm.UNIT), hash=False)
    # The scope gate's reference (runtime.scope.Reference, the bundle's `scope` section; None: no scope gate).
    # `scope_open`: the check runs and its verdict is kept, but refuses nothing (the bench opens both gates).
    scope: sc.Reference | None = field(default=None, hash=False, compare=False, repr=False)
    scope_open: bool = False

    def __post_init__(self) -> None:   # canonical, and checked against the channel counts (UserError if not)
        object.__setattr__(self, "unet_normalization", norm.check(self.unet_normalization, 1, "UNet input: "))
        object.__setattr__(self, "vgg_normalization",
                           norm.check(self.vgg_normalization, self.vgg_channels, "VGG input: "))

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], *, mask_threshold: float | None = None,
                      min_mask_fraction: float | None = None, scope: sc.Reference | None = None,
                      scope_open: bool = False) -> "Graph":
        """The graph a manifest describes; `mask_threshold` / `min_mask_fraction` override its gate (e.g. the
        bench opens the gate with 0). The networks' input normalization comes from
        `networks.<unet|vgg>.input.normalization` (absent: unit, uint8/255 as every bundle before it). `scope`: the
        scope reference the bundle loaded from its `scope` section (`Bundle.graph()` gives it)."""
        pre, gate, nets = manifest.get("preprocess", {}), manifest.get("gate", {}), manifest["networks"]
        unet, vgg = nets["unet"], nets["vgg"]
        return cls(size=int(pre.get("size", SIZE)),
                   unet_normalization=norm.of_input(unet["input"]),
                   vgg_normalization=norm.of_input(vgg["input"]),
                   crimmins_iterations=int(pre.get("crimmins_iterations", 1)),
                   unet_input=unet["input"]["name"], unet_output=unet["output"]["name"],
                   vgg_input=vgg["input"]["name"], vgg_output=vgg["output"]["name"],
                   vgg_channels=int(vgg.get("channels", 1)),
                   mask_threshold=float(gate.get("mask_threshold", MASK_THRESHOLD)
                                        if mask_threshold is None else mask_threshold),
                   min_mask_fraction=float(gate.get("min_mask_fraction", MIN_MASK_FRACTION)
                                           if min_mask_fraction is None else min_mask_fraction),
                   scope=scope, scope_open=bool(scope_open))

    def manifest_sections(self) -> dict[str, dict[str, Any]]:
        """The manifest's `preprocess` and `gate` sections for this graph (what `from_manifest` reads back)."""
        return {"preprocess": {"size": self.size, "crimmins_iterations": self.crimmins_iterations, "crop": "auto",
                               "gray": "bt601", "input_scale": "uint8/255"},
                "gate": {"mask_threshold": self.mask_threshold, "min_mask_fraction": self.min_mask_fraction}}

    def input_sections(self) -> dict[str, dict[str, Any]]:
        """The manifest's `networks.unet.input` and `networks.vgg.input` objects for this graph (name, shape, dtype,
        num_channels, value_range, normalization: what `from_manifest` reads back)."""
        return {"unet": norm.input_section(self.unet_input, 1, self.size, self.unet_normalization),
                "vgg": norm.input_section(self.vgg_input, self.vgg_channels, self.size, self.vgg_normalization)}

    # -- the steps ---------------------------------------------------------------------------------------------
    def preprocess(self, gray: np.ndarray, region: pp.Region | None = None) -> tuple[np.ndarray, pp.Region]:
        """uint8 gray frame -> (size x size uint8 image after Crimmins, the region it was cut from)."""
        return pp.preprocess(gray, region, size=self.size, crimmins_iterations=self.crimmins_iterations)

    def prepare_source(self, frame) -> tuple[np.ndarray, np.ndarray, pp.Region]:
        """A source's frame (runtime.sources.Frame: pixels, channel_order, window, region, meta) -> (gray frame,
        preprocessed image, the region it was cut from in the SOURCE frame's pixel coordinates). The one source
        preparation of every path (the pipelines, bench, calibration, evaluation, the training data): `to_gray`
        with the source's window, the burned-in-text rule (a frame that may carry text and has no region: its scan
        sector only, or FrameError: not scored or shown), then `preprocess` (crop, resize, Crimmins)."""
        gray = pp.to_gray(frame.pixels, frame.channel_order, frame.window)
        gray, region = pp.sector_frame(gray, frame.region, frame.meta)
        image, region = self.preprocess(gray, region)
        return gray, image, region

    def is_kidney(self, mask: np.ndarray) -> bool:
        """Whether a frame whose kidney is known (a labelled, truth mask on the preprocessed image) counts as
        showing the kidney: the mask passes the gate (its kidney share >= min_mask_fraction), as a network's mask
        must for the frame to be scored. Evaluation's gate agreement, the VGG's and the booster's training frames
        and QAT's all use this rule."""
        return self.accepts(float((np.asarray(mask) > 0).mean()))

    def kidney_frames(self, masks, grades=None) -> np.ndarray:
        """`is_kidney` of each labelled mask, as a bool array; with `grades` (0 or None: unknown), only the graded
        ones (the frames the VGG learns from and a grade is checked on)."""
        out = np.array([self.is_kidney(m) for m in masks], bool)
        if grades is not None:
            out &= np.array([g is not None and g > 0 for g in grades], bool)
        return out

    def segment(self, unet, image: np.ndarray) -> np.ndarray:
        """The UNet's kidney probability (HxW) for a preprocessed image."""
        return unet.infer(self.unet_feeds(image), [self.unet_output])[self.unet_output][0, 0]

    def unet_feeds(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The UNet's input: the preprocessed image as [1, 1, H, W] float32, uint8 / 255 then the UNet's declared
        normalization (runtime.normalize.to_input)."""
        return {self.unet_input: norm.to_input(image, 1, self.unet_normalization)}

    def gate(self, prob: np.ndarray) -> Gate:
        """Threshold the probability into a 0/1 mask; accept the frame when enough of it is kidney."""
        return self.gate_mask((prob > self.mask_threshold).astype(np.uint8))

    def gate_mask(self, mask: np.ndarray) -> Gate:
        """The gate's verdict on a 0/1 uint8 mask already made (an earlier run's, or a labelled one)."""
        fraction = float(mask.mean())
        return Gate(mask, fraction, self.accepts(fraction))

    def accepts(self, fraction: float) -> bool:
        """The gate's decision for a mask (or labelled mask) covering `fraction` of the image."""
        return fraction >= self.min_mask_fraction

    def vgg_feeds(self, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The VGG's input: the image under the 0/1 mask (cv2.multiply: uint8, saturating), uint8 / 255 then the
        VGG's declared normalization (minmax: of the masked image)."""
        return {self.vgg_input: norm.to_input(masked(image, mask), self.vgg_channels, self.vgg_normalization)}

    def features(self, vgg, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The VGG's Fc2 features ([1, F]) of the image under the mask."""
        return self.infer_features(vgg, self.vgg_feeds(image, mask))

    def infer_features(self, vgg, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return vgg.infer(feeds, [self.vgg_output])[self.vgg_output]

    @staticmethod
    def score(booster, features: np.ndarray) -> tuple[list[float], int]:
        """(class probabilities, grade 1..C) from the booster."""
        return booster.predict_one(features)

    # -- the scope gate ----------------------------------------------------------------------------------------
    def scope_before_vgg(self, image: np.ndarray, prob: np.ndarray | None, mask: np.ndarray,
                         source: Source | None = None) -> tuple[sc.Descriptors, sc.Verdict]:
        """The scope tests that need no features (picture, mask shape, outline): (the frame's descriptors, the
        verdict). Without a probability map (a mask given alone) the mask stands in for it: its outline is then
        sure."""
        src = source or Source()
        p = mask.astype(np.float32) if prob is None else prob
        desc = sc.describe(image, p, mask, None, crop_shape=src.crop_shape, colour=src.colour())
        return desc, self.scope.check(desc)

    def scope_after_vgg(self, desc: sc.Descriptors, features: np.ndarray) -> sc.Verdict:
        """Every test, the view test on the VGG's features included, for a frame `scope_before_vgg` passed."""
        return self.scope.check(sc.Descriptors(desc.values, np.asarray(features, np.float32).reshape(-1)))

    def check_scope(self, image: np.ndarray, prob: np.ndarray | None, mask: np.ndarray,
                    features: np.ndarray | None, source: Source | None = None) -> sc.Verdict:
        """The scope verdict on a frame the mask gate accepted, as `run` reaches it: the tests before the VGG, and
        when they pass and there are features, all of them. The device pipeline (whose VGG has already run) calls
        this after its sync, so its verdicts are `run`'s. (Under `scope_open`, every test runs on every frame.)"""
        desc, verdict = self.scope_before_vgg(image, prob, mask, source)
        if (not verdict.in_scope and not self.scope_open) or features is None:
            return verdict
        return self.scope_after_vgg(desc, features)

    def refusal(self, gate_accepted: bool, verdict: sc.Verdict | None) -> str | None:
        """Why a frame gets no grade: `no kidney` when the mask gate rejects it, the scope verdict's reason when the
        scope gate refuses it (not while `scope_open`), else None. The one rule the pipelines' records follow."""
        if not gate_accepted:
            return sc.NO_KIDNEY
        if verdict is not None and not verdict.in_scope and not self.scope_open:
            return verdict.reason
        return None

    # -- the whole graph ---------------------------------------------------------------------------------------
    def run(self, image: np.ndarray, unet=None, vgg=None, booster=None, lap: Callable[[str], None] | None = None,
            *, prob: np.ndarray | None = None, mask: np.ndarray | None = None, features: np.ndarray | None = None,
            until: str = "booster", source: Source | None = None) -> Result:
        """segment -> gate -> [scope] -> features -> [scope] -> score on one preprocessed image: the graph's one
        composition.

        `lap(stage)` is called as each stage that ran ends (the pipelines time their stages with it). An output the
        caller already has replaces its stage (the runner it would need may then be None):
          prob      the UNet's probability map (a stored reference's): no UNet; the gate thresholds it.
          mask      a 0/1 uint8 mask (an earlier run's, a labelled one): no UNet, no threshold; the gate judges it
                    (`gate_mask`). With `prob` too, that map is only carried in the result.
          features  the VGG's features ([1, F] or [F]): no VGG; the booster scores them if the gate accepts.
        `until`: the last stage to run, one of STAGES: "gate" stops with the verdict and, for an accepted frame,
        the VGG's input (`vgg_feeds`: what calibrating the VGG needs); "vgg" with the features; "booster" (the
        default) with the grade, or with the features when no booster is given. A frame the gate rejects stops at
        the gate: no VGG input, features or grade (`refused` "no kidney").

        The scope gate, when the graph has a reference and `until` is "booster": after the mask gate, the tests that
        need no features (`scope_before_vgg`; `source`: the source frame's pixels and crop, `Source`) stop a refused
        frame before the VGG; after it, the view test (`scope_after_vgg`) refuses a frame its grade. Both are timed
        as the stage "scope" (`lap("scope")` after each). `Result.scope` holds the verdict and `refused` its reason;
        a refused frame has no grade (under `scope_open` the verdict is kept and the frame graded)."""
        if until not in STAGES:
            raise ValueError(f"until={until!r}: the graph's stages are {', '.join(STAGES)}")
        last = STAGES.index(until)
        lap = lap or _no_lap
        if mask is None and prob is None:
            prob = self.segment(_needed(unet, "UNet"), image)
            lap("unet")
        g = self.gate(prob) if mask is None else self.gate_mask(mask)
        result = Result(g, prob)
        if not g.accepted:
            result.refused = self.refusal(False, None)
            lap("gate")
            return result
        if features is None:
            result.vgg_feeds = self.vgg_feeds(image, g.mask)      # masking is the gate's work
        lap("gate")
        if last < STAGES.index("vgg"):
            return result
        scoped = self.scope is not None and last == STAGES.index("booster")
        if scoped:
            desc, result.scope = self.scope_before_vgg(image, prob, g.mask, source)
            lap(SCOPE_STAGE)
            result.refused = self.refusal(True, result.scope)
            if result.refused is not None:
                result.vgg_feeds = None
                return result
        if features is None:
            result.features = self.infer_features(_needed(vgg, "VGG"), result.vgg_feeds)
            lap("vgg")
        else:
            result.features = np.asarray(features).reshape(1, -1)
        if scoped and (result.scope.in_scope or self.scope_open):
            result.scope = self.scope_after_vgg(desc, result.features)
            lap(SCOPE_STAGE)
            result.refused = self.refusal(True, result.scope)
            if result.refused is not None:
                return result
        if booster is None or last < STAGES.index("booster"):
            return result
        result.probabilities, result.grade = self.score(booster, result.features)
        lap("booster")
        return result


def masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image under a 0/1 uint8 mask, with cv2.multiply's semantics (what the VGG sees)."""
    return cv2.multiply(image, mask)


def _no_lap(stage: str) -> None:
    pass


def _needed(runner, what: str):
    if runner is None:
        raise ValueError(f"Graph.run needs the {what} runner here (or give its output instead)")
    return runner
