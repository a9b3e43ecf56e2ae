"""Scope: a grade only for a kidney the bundle can read.

The gate (runtime.graph) accepts a frame when the UNet's mask covers enough of it; a photograph or a scan of other
anatomy passes that about half the time. This second check, after the gate and before the grade, compares what the
graph already computed for a frame with what the bundle's in-scope training frames looked like, and refuses the
frame with one of four reasons (checked in this order; the first that holds is given):

    not ultrasound                                   the picture: colour over much of the crop, or lit areas
                                                     without speckle (fixed limits, not fitted: see FLAT_LIMIT)
    no kidney                                        the mask's shape: area, fragmentation, solidity, elongation,
                                                     how much of the image border it runs along
    not a kidney view: unlike the training frames    the VGG's Fc2 features: k-th nearest-neighbour distance of the
                                                     L2-normalised vector to the training frames' (Sun et al. 2022)
    kidney outline unsure                            the UNet's confidence at and around the mask's outline

Every test has a score, normalised so that the frame is refused when it is above 1 (scores: `Verdict.scores`, the
raw descriptors: `Verdict.values`). The three fitted tests' limits come from `fit_reference`: set on held-out
in-scope frames (patients not used for the prototypes) so that a stated share of them (default 0.98) is kept, and
recorded with the share actually kept. The fit is stored in one file in the bundle (`scope.npz`, covered by the
manifest's hashes like the networks) with a summary for the manifest's `scope` section. docs/scope.md says why
these descriptors, this score and these limits.

    desc = describe(image, prob, mask, features, threshold=0.5, crop_shape=(h, w), colour=colour_share(...))
    verdict = reference.check(desc)          # Verdict(in_scope, reason, scores, values)

A frame can be checked before its features exist (`features=None`: the view test is left out), so a pipeline may
skip the VGG for a frame already refused; `check` with features then completes it.

Pure numpy + OpenCV: the runtime never imports torch. Non-finite input (a probability map or features with NaN or
inf) is refused, never silently passed.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

# -- the four reasons, in the order they are checked -------------------------------------------------------------
NOT_ULTRASOUND = "not ultrasound"
NO_KIDNEY = "no kidney"
UNLIKE_TRAINING = "not a kidney view: unlike the training frames"
OUTLINE_UNSURE = "kidney outline unsure"
REASONS = (NOT_ULTRASOUND, NO_KIDNEY, UNLIKE_TRAINING, OUTLINE_UNSURE)
# Test names (the keys of Verdict.scores and of the fitted thresholds), in the same order.
TESTS = {"ultrasound": NOT_ULTRASOUND, "kidney": NO_KIDNEY, "view": UNLIKE_TRAINING, "outline": OUTLINE_UNSURE}

FILE = "scope.npz"
FORMAT = "sonoscore-scope"
VERSION = 1
METHOD = "knn"          # k-th nearest-neighbour distance of L2-normalised Fc2 features (Sun et al., ICML 2022)

# -- "not ultrasound": fixed limits (docs/scope.md has the figures) -----------------------------------------------
# B-mode is grey: colour on a scanner's screen is a Doppler box over part of the image, or annotations. A frame whose
# crop is coloured (max - min of its channels above COLOUR_CHROMA, on a 0..255 scale) over more than COLOUR_LIMIT of
# its pixels is a photograph or a screen, not a B-mode image.
COLOUR_CHROMA = 24
COLOUR_LIMIT = 0.40
COLOUR_SAMPLES = 64      # the crop is sampled on a grid of at most 64 x 64 pixels (strided: no colours mixed)
# Tissue in ultrasound is speckle: every lit neighbourhood varies. A lit 5x5 neighbourhood (mean >= FLAT_LIT) whose
# 25 pixels lie within FLAT_RANGE grey levels of each other is flat; a frame in which more than FLAT_LIMIT of the lit
# neighbourhoods are flat (a page, a drawing, a Shepp-Logan phantom, a sky) is not ultrasound. Measured at the
# source's own resolution (a crop smaller than the network input is not measured on its upscaled copy, which
# interpolation smooths). uint8 OpenCV filters only: a few hundredths of a millisecond.
FLAT_WINDOW = 5
FLAT_LIT = 24
FLAT_RANGE = 6
_FLAT_KERNEL = np.ones((FLAT_WINDOW, FLAT_WINDOW), np.uint8)
FLAT_LIMIT = 0.30
FLAT_MIN_LIT = 0.01      # under 1 % of the image lit: too little to judge (flatness 0)

# -- the descriptors -----------------------------------------------------------------------------------------------
# name -> (test, side): the side on which a value is unlike the in-scope frames ("upper": too large, "lower": too
# small, "both").
DESCRIPTORS: dict[str, tuple[str, str]] = {
    "area": ("kidney", "upper"),              # share of the image that is mask (the gate's lower limit is its own)
    "largest": ("kidney", "lower"),           # share of the mask in its largest 8-connected component
    "solidity": ("kidney", "lower"),          # largest component's area / its convex hull's area
    "axis_ratio": ("kidney", "both"),         # minor / major axis of the component's moment ellipse
    "border": ("kidney", "upper"),            # share of the image's outermost pixels that are mask
    "outline_confidence": ("outline", "lower"),   # mean |2p - 1| in a 2-pixel band across the mask's outline
    "uncertain": ("outline", "upper"),        # pixels with 0.2 < p < 0.8, per mask pixel
    "colour": ("ultrasound", "upper"),        # see COLOUR_LIMIT
    "flat": ("ultrasound", "upper"),          # see FLAT_LIMIT
}
FITTED_TESTS = ("kidney", "view", "outline")
# Smallest spread a descriptor's robust z-score divides by (a descriptor nearly constant on in-scope frames, such as
# `largest` at 1.0, would otherwise make any deviation infinitely unusual).
SCALE_FLOOR = {"area": 0.01, "largest": 0.01, "solidity": 0.01, "axis_ratio": 0.02, "border": 0.01,
               "outline_confidence": 0.01, "uncertain": 0.02}
UNCERTAIN_LOW, UNCERTAIN_HIGH = 0.2, 0.8
# The z-score tests' limits are at least this many robust spreads from the reference frames' median, however few
# held-out patients set them: a frame within 6 spreads on every descriptor of a test is never refused by it (the
# held-out quantile, set on a few dozen patients, can fall below what new patients show; the frames these tests are
# for lie tens of spreads away: docs/scope.md).
Z_FLOOR = {"kidney": 6.0, "outline": 6.0}
# Share of the rejection budget (1 - keep) each fitted test may spend on in-scope frames.
DEFAULT_WEIGHTS = {"view": 0.5, "kidney": 0.25, "outline": 0.25}
DEFAULT_KEEP = 0.98
DEFAULT_K = 10
MAX_PROTOTYPES = 2048
MIN_HELD_OUT = 20
MIN_HELD_OUT_GROUPS = 8


class ScopeError(ValueError):
    """A scope reference that cannot be fitted or used; one sentence naming what and what to do."""


@dataclass(frozen=True)
class Descriptors:
    """What the scope check knows of one frame: named scalar descriptors (DESCRIPTORS) and the Fc2 features."""
    values: dict[str, float]
    features: np.ndarray | None = None     # [F] float32, the VGG's ReLU(Fc2); None before the VGG has run


@dataclass(frozen=True)
class Verdict:
    """The scope check's decision on one frame. `scores`: per test (ultrasound, kidney, view, outline), refused
    above 1 (inf for non-finite input; a test not run is absent); `reason` the first refusing test's reason."""
    in_scope: bool
    reason: str | None
    scores: dict[str, float]
    values: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-ready: {"in_scope", "reason", "scores"} with scores rounded to 4 decimals (inf as null)."""
        return {"in_scope": self.in_scope, "reason": self.reason,
                "scores": {k: (round(v, 4) if math.isfinite(v) else None) for k, v in self.scores.items()}}


# -- descriptors of one frame ---------------------------------------------------------------------------------------

def colour_share(pixels: np.ndarray | None, region=None) -> float:
    """Share of the crop's pixels that are coloured (channel max - min > COLOUR_CHROMA on 0..255), sampled on a
    grid of at most COLOUR_SAMPLES x COLOUR_SAMPLES. `pixels`: the source frame as the source gave it (HxW, HxWx1,
    HxWx3, HxWx4; channel order does not matter, alpha is ignored); `region`: the crop (x0, y0, x1, y1 attributes,
    runtime.preprocess.Region) or None for the whole frame. A grey frame is 0."""
    if pixels is None:
        return 0.0
    px = np.asarray(pixels)
    if px.ndim != 3 or px.shape[2] < 3:
        return 0.0
    if region is not None:
        px = px[max(0, region.y0):region.y1, max(0, region.x0):region.x1]
    h, w = px.shape[:2]
    if h == 0 or w == 0:
        return 0.0
    sub = px[::max(1, h // COLOUR_SAMPLES), ::max(1, w // COLOUR_SAMPLES), :3]
    if sub.dtype == np.uint8:
        chroma = sub.max(axis=2).astype(np.int16) - sub.min(axis=2)
        limit = COLOUR_CHROMA
    else:
        sub = sub.astype(np.float64)
        top = float(np.iinfo(px.dtype).max) if px.dtype.kind in "ui" else max(float(np.nanmax(sub)), 1e-12)
        chroma = (sub.max(axis=2) - sub.min(axis=2)) * (255.0 / top)
        if not np.isfinite(chroma).all():
            return math.inf
        limit = COLOUR_CHROMA
    return float(np.count_nonzero(chroma > limit)) / chroma.size


def flat_share(image: np.ndarray, crop_shape: tuple[int, int] | None = None) -> float:
    """Share of the lit 5x5 neighbourhoods of the preprocessed image that are flat (max - min <= FLAT_RANGE; see
    FLAT_LIMIT). `crop_shape`
    (rows, columns of the crop the image was resized from): when smaller than the image on a side, the image is
    first brought back to that size (INTER_AREA), so an upscaled crop is judged at its own resolution."""
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"flat_share needs a 2-D grey image, got shape {img.shape}")
    h, w = img.shape
    if crop_shape is not None:
        ch, cw = int(crop_shape[0]), int(crop_shape[1])
        th, tw = max(FLAT_WINDOW * 2, min(h, ch)), max(FLAT_WINDOW * 2, min(w, cw))
        if (th, tw) != (h, w):
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    img = np.ascontiguousarray(img, dtype=np.uint8)
    lit = cv2.blur(img, (FLAT_WINDOW, FLAT_WINDOW)) >= FLAT_LIT            # uint8 box mean (OpenCV rounds)
    n_lit = int(np.count_nonzero(lit))
    if n_lit < FLAT_MIN_LIT * lit.size:
        return 0.0
    spread = cv2.morphologyEx(img, cv2.MORPH_GRADIENT, _FLAT_KERNEL)        # max - min over the 5x5 window
    return float(np.count_nonzero(lit & (spread <= FLAT_RANGE))) / n_lit


def mask_shape(mask: np.ndarray) -> dict[str, float]:
    """The mask's shape: area (share of the image), largest (share of the mask in its largest 8-connected
    component), solidity (that component's pixels / its convex hull's pixels), axis_ratio (minor / major axis of
    the component's second-moment ellipse, 0 for a line, 1 for a disc) and border (share of the image's
    outermost pixels that are mask). An empty mask is all zeros.

    From the mask's contours (OpenCV, 8-connected; holes as their children), which is several times cheaper than
    labelling its pixels: a component's pixel count is its outline polygon's area plus half its boundary pixels
    plus 1 (Pick's theorem, for a polygon through pixel centres), less its holes' (their area less half their
    boundary plus 1); the hull's likewise with its perimeter for the boundary; the ellipse from the outline
    polygon's moments (holes ignored)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_shape needs a 2-D mask, got shape {m.shape}")
    m = (m > 0).view(np.uint8) if m.dtype == np.bool_ else (m > 0).astype(np.uint8)
    area = int(np.count_nonzero(m))
    if area == 0:
        return {"area": 0.0, "largest": 0.0, "solidity": 0.0, "axis_ratio": 0.0, "border": 0.0}
    h, w = m.shape
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    links = hierarchy[0]                      # per contour: next, previous, first child, parent
    best, best_pixels, total = -1, -1.0, 0.0
    for i, c in enumerate(contours):
        if links[i][3] != -1:                 # a hole: counted with its component
            continue
        pixels = cv2.contourArea(c) + len(c) / 2 + 1
        j = links[i][2]
        while j != -1:
            hole = contours[j]
            pixels -= max(0.0, cv2.contourArea(hole) - len(hole) / 2 + 1)
            j = links[j][0]
        total += pixels
        if pixels > best_pixels:
            best, best_pixels = i, pixels
    outline = contours[best]
    hull = cv2.convexHull(outline)
    hull_pixels = cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1
    mo = cv2.moments(outline)
    if mo["m00"] > 0:
        a, b, c = mo["mu20"] / mo["m00"], mo["mu11"] / mo["m00"], mo["mu02"] / mo["m00"]
        root = math.sqrt(max(0.0, ((a - c) / 2) ** 2 + b * b))
        major, minor = (a + c) / 2 + root, max(0.0, (a + c) / 2 - root)
        ratio = math.sqrt(minor / major) if major > 0 else 0.0
    else:                                     # a line or a dot: no area inside its outline
        ratio = 0.0
    edge = int(np.count_nonzero(m[0])) + int(np.count_nonzero(m[-1])) + int(np.count_nonzero(m[1:-1, 0])) \
        + int(np.count_nonzero(m[1:-1, -1]))
    return {"area": area / m.size, "largest": min(1.0, best_pixels / total),
            "solidity": min(1.0, best_pixels / hull_pixels), "axis_ratio": ratio,
            "border": edge / (2 * (h + w) - 4)}


_BAND_KERNEL = np.ones((3, 3), np.uint8)


def outline_confidence(prob: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The UNet's confidence where it drew the outline: outline_confidence, the mean of |2p - 1| over the 2-pixel
    band across the mask's outline (the outermost mask pixels and the pixels just outside them: 1 for a map that
    jumps from 0 to 1, 0 for one that sits at 0.5); uncertain, the pixels with 0.2 < p < 0.8 anywhere, per mask
    pixel (a hazy probability map, or haze beside the kidney). A probability map with a non-finite value gives
    (0, inf), which the check refuses. An empty mask gives (0, the count of uncertain pixels)."""
    p = np.asarray(prob, dtype=np.float32)
    m = np.asarray(mask)
    if m.dtype != np.uint8 or m.max(initial=0) > 1:       # the gate's masks are 0/1 uint8 already
        m = (m > 0).astype(np.uint8)
    if p.shape != m.shape:
        raise ValueError(f"probability map {p.shape} and mask {m.shape} differ in shape")
    if not np.isfinite(p).all():
        return {"outline_confidence": 0.0, "uncertain": math.inf}
    area = int(np.count_nonzero(m))
    n_uncertain = int(np.count_nonzero((p > UNCERTAIN_LOW) & (p < UNCERTAIN_HIGH)))
    if area == 0:
        return {"outline_confidence": 0.0, "uncertain": float(n_uncertain)}
    band = cv2.morphologyEx(m, cv2.MORPH_GRADIENT, _BAND_KERNEL, borderType=cv2.BORDER_CONSTANT,
                            borderValue=0).view(bool)
    edge = p[band]
    conf = float(np.abs(2.0 * edge - 1.0).mean()) if edge.size else 1.0
    return {"outline_confidence": conf, "uncertain": n_uncertain / area}


def describe(image: np.ndarray, prob: np.ndarray, mask: np.ndarray, features: np.ndarray | None = None, *,
             crop_shape: tuple[int, int] | None = None, colour: float = 0.0) -> Descriptors:
    """One frame's descriptors from what the graph computed: the preprocessed image (uint8 HxW), the UNet's
    probability map, the gate's mask, the VGG's features ([F] or [1, F]; None before the VGG), the crop's shape in
    the source frame (rows, columns; None: the image's own) and `colour_share` of the source frame's crop (0 for a
    grey source)."""
    values: dict[str, float] = {}
    values.update(mask_shape(mask))
    values.update(outline_confidence(prob, mask))
    values["colour"] = float(colour)
    values["flat"] = flat_share(image, crop_shape)
    feats = None
    if features is not None:
        feats = np.asarray(features, dtype=np.float32).reshape(-1)
    return Descriptors(values, feats)


# -- the reference ------------------------------------------------------------------------------------------------

@dataclass
class Reference:
    """What the in-scope training frames looked like, and the limits set on held-out in-scope frames."""
    prototypes: np.ndarray                   # [N, F] float32, rows L2-normalised (stored as float16)
    k: int
    centers: dict[str, float]                # per fitted descriptor: median of the reference frames
    scales: dict[str, float]                 # robust spread of the reference frames (>= SCALE_FLOOR)
    thresholds: dict[str, float]             # kidney, outline: combined z-score; view: k-NN distance
    keep_share: float                        # the share of held-out in-scope frames the limits were set to keep
    kept_share: float                        # the share they keep (measured on those frames)
    frames: dict[str, int]                   # reference, held_out (frames), prototypes
    kept_by_test: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=lambda: {"colour": COLOUR_LIMIT, "flat": FLAT_LIMIT})
    dims: np.ndarray | None = None           # the feature dimensions the prototypes keep (the others are 0 in all)
    num_features: int | None = None          # F, the VGG's feature count

    def __post_init__(self) -> None:
        if self.dims is None:
            self.dims = np.arange(self.prototypes.shape[1], dtype=np.int32)
        if self.num_features is None:
            self.num_features = int(self.prototypes.shape[1])

    # -- the check ---------------------------------------------------------------------------------------------
    def scores(self, desc: Descriptors) -> dict[str, float]:
        """Every test's score (refused above 1); `view` only when the descriptors have features."""
        v = desc.values
        picture = [float(v.get("colour", 0.0)) / self.limits["colour"], float(v.get("flat", 0.0)) / self.limits["flat"]]
        out = {"ultrasound": max(picture) if all(math.isfinite(x) for x in picture) else math.inf}
        for test in ("kidney", "outline"):
            out[test] = _nan_inf(self._z(test, v) / self.thresholds[test])
        if desc.features is not None:
            out["view"] = _nan_inf(self.distance(desc.features) / self.thresholds["view"])
        return {t: out[t] for t in TESTS if t in out}

    def check(self, desc: Descriptors) -> Verdict:
        """The verdict on one frame: refused with the first reason (REASONS order) whose score is above 1."""
        scores = self.scores(desc)
        reason = next((TESTS[t] for t in TESTS if t in scores and not scores[t] <= 1.0), None)
        return Verdict(reason is None, reason, scores, dict(desc.values))

    def distance(self, features: np.ndarray) -> float:
        """The k-th smallest Euclidean distance between the L2-normalised features and the prototypes (in [0, 2];
        all-zero features are at distance 1 from every prototype); inf for non-finite features."""
        f = np.asarray(features, dtype=np.float32).reshape(-1)
        if f.shape[0] != self.num_features:
            raise ScopeError(f"features have {f.shape[0]} values but the scope reference was fitted on "
                             f"{self.num_features}; the bundle's scope.npz does not belong to its VGG")
        if not np.isfinite(f).all():
            return math.inf
        norm = float(np.sqrt(np.dot(f, f)))
        z = f / norm if norm > 0 else f
        # Only the dimensions a prototype uses (the others multiply zeros). numpy's own loop, one thread: a BLAS
        # matrix-vector product of this size may start threads, which on a busy CPU cost more than the product.
        sims = np.einsum("ij,j->i", self.prototypes, z[self.dims])
        k = min(self.k, sims.shape[0])
        s_k = float(np.partition(sims, sims.shape[0] - k)[sims.shape[0] - k])   # k-th largest similarity
        return math.sqrt(max(0.0, float(np.dot(z, z)) + 1.0 - 2.0 * s_k))

    def _z(self, test: str, values: dict[str, float]) -> float:
        """The test's combined robust z-score: the largest, over its descriptors, of how far the value lies on its
        unusual side of the reference frames' median, in units of their spread."""
        worst = -math.inf
        for name, (t, side) in DESCRIPTORS.items():
            if t != test:
                continue
            x = float(values[name])
            if not math.isfinite(x):
                return math.inf
            d = (x - self.centers[name]) / self.scales[name]
            worst = max(worst, d if side == "upper" else -d if side == "lower" else abs(d))
        return worst

    # -- files -------------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "method": METHOD, "k": self.k, "num_features": self.num_features,
                "centers": self.centers, "scales": self.scales, "thresholds": self.thresholds,
                "limits": self.limits, "keep_share": self.keep_share, "kept_share": self.kept_share,
                "kept_by_test": self.kept_by_test, "frames": self.frames}

    def save(self, path: Path | str) -> Path:
        """Write the reference to one .npz file: `prototypes` (float16 [N, F]) and `config` (JSON text)."""
        path = Path(path)
        buf = io.BytesIO()
        np.savez(buf, prototypes=self.prototypes.astype(np.float16), dims=self.dims.astype(np.int32),
                 config=np.array(json.dumps(self.config(), sort_keys=True)))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str, section: dict[str, Any] | None = None) -> "Reference":
        """Read a reference written by `save`; with the manifest's `scope` section, also check that the two agree
        (ScopeError, one sentence, otherwise)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                if names != {"prototypes", "dims", "config"}:
                    raise ScopeError(f"{path} holds {sorted(names)}, not a scope reference (prototypes, dims, "
                                     f"config); re-export the bundle")
                protos, dims = z["prototypes"], z["dims"]
                cfg = json.loads(str(z["config"][()]))
        except (OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
            if isinstance(e, ScopeError):
                raise
            raise ScopeError(f"{path} is not a readable scope reference ({_short(e)}); restore the bundle from its "
                             f"source or re-export it") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version") != VERSION \
                or cfg.get("method") != METHOD:
            raise ScopeError(f"{path} is not a {FORMAT} version {VERSION} file with method {METHOD}; this sonoscore "
                             f"cannot use it: re-export the bundle")
        if protos.ndim != 2 or protos.shape[0] < 1 or protos.dtype != np.float16 or not np.isfinite(protos).all():
            raise ScopeError(f"{path}: its prototypes are not a finite float16 [N, F] array; re-export the bundle")
        n_feat = cfg.get("num_features") if isinstance(cfg, dict) else None
        if (dims.ndim != 1 or dims.dtype.kind not in "iu" or len(dims) != protos.shape[1] or not isinstance(n_feat, int)
                or (len(dims) and (dims.min() < 0 or dims.max() >= n_feat or (np.diff(dims) <= 0).any()))):
            raise ScopeError(f"{path}: its feature dimensions do not match its prototypes; re-export the bundle")
        try:
            ref = cls(prototypes=_from_stored(protos), k=int(cfg["k"]),
                      centers={k: float(v) for k, v in cfg["centers"].items()},
                      scales={k: float(v) for k, v in cfg["scales"].items()},
                      thresholds={k: float(v) for k, v in cfg["thresholds"].items()},
                      keep_share=float(cfg["keep_share"]), kept_share=float(cfg["kept_share"]),
                      frames={k: int(v) for k, v in cfg["frames"].items()},
                      kept_by_test={k: float(v) for k, v in cfg.get("kept_by_test", {}).items()},
                      limits={k: float(v) for k, v in cfg["limits"].items()},
                      dims=dims.astype(np.int32), num_features=int(n_feat))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ScopeError(f"{path}: its configuration is incomplete ({_short(e)}); re-export the bundle") from None
        ref._validate(path)
        if section is not None:
            ref._agrees(section, path)
        return ref

    def _validate(self, path) -> None:
        fitted = [n for n, (t, _) in DESCRIPTORS.items() if t in ("kidney", "outline")]
        numbers = [*self.thresholds.values(), *self.limits.values(), *self.centers.values(), *self.scales.values()]
        if (set(self.thresholds) != set(FITTED_TESTS) or set(self.limits) != {"colour", "flat"}
                or set(self.centers) != set(fitted) or set(self.scales) != set(fitted) or not 1 <= self.k
                or not all(math.isfinite(x) for x in numbers)
                or not all(x > 0 for x in [*self.thresholds.values(), *self.limits.values(), *self.scales.values()])):
            raise ScopeError(f"{path}: its tests, limits or thresholds are not the ones this sonoscore checks "
                             f"(positive and finite); re-export the bundle")

    def manifest_section(self, file: str = FILE) -> dict[str, Any]:
        """The manifest's `scope` section: the file, the method and what the limits were set on."""
        return {"file": file, "method": METHOD, "k": self.k, "features": int(self.num_features),
                "thresholds": {t: round(self.thresholds[t], 6) for t in FITTED_TESTS},
                "limits": dict(self.limits), "keep_share": self.keep_share, "kept_share": round(self.kept_share, 4),
                "kept_by_test": {t: round(v, 4) for t, v in self.kept_by_test.items()}, "frames": dict(self.frames),
                "reasons": list(REASONS)}

    def _agrees(self, section: dict[str, Any], path) -> None:
        want = self.manifest_section(section.get("file", FILE))
        for key in ("method", "k", "features", "thresholds", "limits", "keep_share", "frames"):
            if section.get(key) != want[key]:
                raise ScopeError(f"the manifest's scope.{key} ({_short(section.get(key))}) does not match {path} "
                                 f"({_short(want[key])}); re-export the bundle")


# -- fitting -------------------------------------------------------------------------------------------------------

def fit_reference(reference: Sequence[Descriptors], held_out: Sequence[Descriptors], *, keep: float = DEFAULT_KEEP,
                  held_out_groups: Sequence | None = None, k: int = DEFAULT_K, max_prototypes: int = MAX_PROTOTYPES,
                  weights: dict[str, float] | None = None, seed: int = 0) -> Reference:
    """Fit the scope reference. `reference`: in-scope training frames (accepted by the gate, with a labelled
    kidney): their features become the prototypes (at most `max_prototypes`, drawn at random with `seed`) and their
    descriptors' medians and spreads the z-scores' units. `held_out`: in-scope frames of other patients, on which
    each fitted test's limit is set at the quantile that keeps 1 - weight * (1 - keep) of them (the weights share
    the rejection budget; by the union bound at least `keep` is kept), and the share kept is measured.

    `held_out_groups`: the patient of each held-out frame. Frames of one patient are alike (one kidney, one sweep),
    so a few unusual patients make most of the tail, and a quantile over frames, where one patient's frames are
    the last few per cent, is set by the patients who happened to be held out. With groups, each limit is instead
    the quantile of the patients' largest scores: a new patient has any frame refused by a test with probability
    about its budget share, so at least that share of frames is kept, whatever the patients' sizes (more is kept
    in practice: an unusual patient rarely has every frame refused). Without groups: the quantile over frames."""
    if not 0.5 <= keep < 1.0:
        raise ScopeError(f"keep share {keep} is outside [0.5, 1); give the share of in-scope frames to keep, "
                         f"e.g. 0.98")
    if k < 1:
        raise ScopeError(f"k = {k}; the nearest-neighbour rank must be at least 1")
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    if set(weights) != set(FITTED_TESTS) or any(not (w >= 0) for w in weights.values()) or sum(weights.values()) <= 0:
        raise ScopeError(f"weights {weights} must give each of {', '.join(FITTED_TESTS)} a share >= 0")
    total = sum(weights.values())
    weights = {t: w / total for t, w in weights.items()}
    ref_f = _features(reference, "reference")
    held_f = _features(held_out, "held-out")
    if ref_f.shape[1] != held_f.shape[1]:
        raise ScopeError(f"reference features have {ref_f.shape[1]} values and held-out ones {held_f.shape[1]}; "
                         f"describe both with the same VGG")
    if len(held_out) < MIN_HELD_OUT:
        raise ScopeError(f"{len(held_out)} held-out in-scope frames are too few to set the scope limits on; "
                         f"give at least {MIN_HELD_OUT} (frames of patients not in the reference)")
    for what, rows in (("reference", reference), ("held-out", held_out)):
        for d in rows:
            if not all(math.isfinite(float(d.values[n])) for n in DESCRIPTORS):
                raise ScopeError(f"a {what} frame has a non-finite descriptor; in-scope frames must be finite")
    # prototypes: L2-normalised, at most max_prototypes, rounded to float16 as stored (the limits see what is used)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(ref_f)) if len(ref_f) <= max_prototypes else np.sort(
        rng.choice(len(ref_f), max_prototypes, replace=False))
    unit16 = _unit(ref_f[rows]).astype(np.float16)
    dims = np.flatnonzero((unit16 != 0).any(axis=0)).astype(np.int32)   # a ReLU unit no prototype uses adds 0
    protos = _from_stored(unit16[:, dims])
    fitted = [n for n, (t, _) in DESCRIPTORS.items() if t in ("kidney", "outline")]
    centers, scales = {}, {}
    for name in fitted:
        x = np.array([float(d.values[name]) for d in reference])
        centers[name] = float(np.median(x))
        q05, q95 = np.quantile(x, [0.05, 0.95])
        scales[name] = float(max((q95 - q05) / 3.29, SCALE_FLOOR[name]))   # 3.29: the 5-95 % span of a normal
    ref = Reference(protos, int(k), centers, scales, {t: 1.0 for t in FITTED_TESTS}, float(keep), 1.0,
                    {"reference": len(reference), "held_out": len(held_out), "prototypes": int(len(protos))},
                    dims=dims, num_features=int(ref_f.shape[1]))
    raw = {"kidney": np.array([ref._z("kidney", d.values) for d in held_out]),
           "outline": np.array([ref._z("outline", d.values) for d in held_out]),
           "view": np.array([ref.distance(d.features) for d in held_out])}
    if held_out_groups is not None:
        groups = np.asarray(list(held_out_groups), dtype=object)
        if len(groups) != len(held_out):
            raise ScopeError(f"{len(groups)} held-out groups for {len(held_out)} held-out frames; give one patient "
                             f"per frame")
        names = sorted(set(groups.tolist()), key=str)
        if len(names) < MIN_HELD_OUT_GROUPS:
            raise ScopeError(f"{len(names)} held-out patients are too few to set the scope limits on; give frames "
                             f"of at least {MIN_HELD_OUT_GROUPS} patients not in the reference")
        ref.frames["held_out_patients"] = len(names)
        tails = {t: np.array([raw[t][groups == g].max() for g in names]) for t in FITTED_TESTS}
    else:
        tails = raw
    budget = 1.0 - keep
    for t in FITTED_TESTS:
        ref.thresholds[t] = max(_upper_quantile(tails[t], 1.0 - weights[t] * budget), Z_FLOOR.get(t, 0.0), 1e-6)
    kept = np.ones(len(held_out), bool)
    for t in FITTED_TESTS:
        ok = raw[t] <= ref.thresholds[t]
        ref.kept_by_test[t] = float(ok.mean())
        kept &= ok
    ref.kept_share = float(kept.mean())
    return ref


def _upper_quantile(x: np.ndarray, p: float) -> float:
    """The p-quantile of x by the Weibull plotting position (rank p (n + 1)): an unbiased level for new draws.
    Past the largest value (p (n + 1) > n) it extends the last step linearly, so a tiny budget on few frames still
    gives a limit beyond every frame seen rather than on the largest one."""
    s = np.sort(np.asarray(x, dtype=np.float64))
    n = len(s)
    r = p * (n + 1)
    if r <= 1:
        return float(s[0])
    if r <= n:
        lo = int(math.floor(r))
        return float(s[lo - 1] + (r - lo) * (s[min(lo, n - 1)] - s[lo - 1]))
    step = s[-1] - s[-2] if n > 1 else abs(s[-1]) * 0.1
    return float(s[-1] + (r - n) * max(step, 0.0))


def _features(rows: Sequence[Descriptors], what: str) -> np.ndarray:
    if not rows:
        raise ScopeError(f"no {what} frames to fit the scope reference on")
    if any(d.features is None for d in rows):
        raise ScopeError(f"a {what} frame has no features; describe in-scope frames after the VGG")
    f = np.stack([np.asarray(d.features, np.float32).reshape(-1) for d in rows])
    if not np.isfinite(f).all():
        raise ScopeError(f"a {what} frame has non-finite features; in-scope frames must be finite")
    return f


def _unit(f: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return np.where(n > 0, f / np.where(n > 0, n, 1), 0).astype(np.float32)


def _from_stored(protos16: np.ndarray) -> np.ndarray:
    """The prototypes as used: the stored float16 rows in float32, normalised again to unit length (the same
    arithmetic at fit and at load, so the limits see exactly what the check uses)."""
    return _unit(protos16.astype(np.float32))


def _nan_inf(x: float) -> float:
    return math.inf if not (x == x) else float(x)    # NaN -> inf: refused, never passed


def _short(x, n: int = 120) -> str:
    t = " ".join(str(x).split())
    return t if len(t) <= n else t[:n - 3] + "..."
