"""The scope gate in the one graph (issue 26, items 2 and 4): after the mask gate and before the grade, on every path.

The bundle is the known-function one (tests/known_bundle.py: identity UNet, so the mask is the image's bright part;
mean-brightness VGG), with a scope reference fitted here by `runtime.scope.fit_reference` on its own frames
(speckled bright discs on a dim speckled background). Figures that depend on the fit are not asserted: each case
whose verdict a test checks is made to be known, by the picture (a colour photograph, a flat drawing: `not
ultrasound`, fixed limits) or by a reference whose centre a frame cannot reach (every frame refused for the reason
that centre belongs to)."""
from __future__ import annotations

import copy
import json
import shutil

import cv2
import numpy as np
import pytest

from runtime import scope as sc
from runtime.bundle import Bundle, write_manifest
from runtime.pipeline import Pipeline
from runtime.record import FrameRecord
from runtime.sinks.summary import StudySummary
from runtime.sources import Frame

from tests.conftest import sonoscore
from tests.known_bundle import write_known_bundle

H, W = 240, 320


def speckled_disc(seed: int, r: int = 60, cx: int = 170, cy: int = 120) -> np.ndarray:
    """A gray frame: dim speckle (10..60) with a bright speckled disc (180..255): ultrasound-like, a kidney mask."""
    rng = np.random.default_rng(seed)
    img = rng.integers(10, 60, (H, W)).astype(np.uint8)
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[disc] = rng.integers(180, 256, int(disc.sum())).astype(np.uint8)
    return img


def colour_photo(seed: int = 1) -> np.ndarray:
    """A photograph-like BGR frame: saturated colours everywhere, a bright blob the identity UNet takes as kidney."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = rng.integers(0, 80, (H, W))
    img[..., 1] = rng.integers(120, 256, (H, W))
    img[..., 2] = rng.integers(0, 80, (H, W))
    cv2.circle(img, (170, 120), 70, (40, 255, 255), -1)
    return img


def flat_drawing() -> np.ndarray:
    """A drawing: a uniform bright disc on a uniform dark ground (lit but no speckle)."""
    img = np.full((H, W), 30, np.uint8)
    cv2.circle(img, (170, 120), 70, 230, -1)
    return img


def frame(i: int, pixels: np.ndarray) -> Frame:
    return Frame(i, "scope-test", 0.0, pixels, channel_order="BGR" if pixels.ndim == 3 else None)


def fit_on_own_frames(bundle_dir) -> sc.Reference:
    """A reference fitted on the known bundle's own in-scope frames (30 reference, 30 held out)."""
    with Pipeline(Bundle.load(bundle_dir)) as pipe:
        rows = []
        for i in range(60):
            f = frame(i, speckled_disc(100 + i, r=45 + i % 30, cx=140 + i % 40))
            _, image, region = pipe.prepare_source(f)
            r = pipe.graph.run(image, pipe.unet, pipe.vgg, until="vgg")
            assert r.gate.accepted
            rows.append(sc.describe(image, r.prob, r.gate.mask, r.features,
                                    crop_shape=(region.y1 - region.y0, region.x1 - region.x0),
                                    colour=sc.colour_share(f.pixels, region)))
    return sc.fit_reference(rows[:30], rows[30:], keep=0.98)


def with_reference(src, dst, ref: sc.Reference):
    """A copy of the bundle at `src` with `ref` as its scope reference (scope.npz, hashed, the manifest's section)."""
    shutil.copytree(src, dst)
    ref.save(dst / sc.FILE)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["scope"] = ref.manifest_section()
    write_manifest(dst, manifest)
    return dst


def lenient(ref: sc.Reference) -> sc.Reference:
    """The fitted reference with its fitted tests opened wide: only the picture test (fixed limits) refuses."""
    r = copy.deepcopy(ref)
    r.thresholds = {t: 1e6 for t in r.thresholds}
    return r


def unreachable(ref: sc.Reference, descriptor: str) -> sc.Reference:
    """`lenient`, but with `descriptor`'s centre where no frame's value can be (10: shares and ratios are <= 1), its
    test's limit back to a small one: every frame passing the picture test is refused by that test."""
    r = lenient(ref)
    r.centers = {**r.centers, descriptor: 10.0}
    r.thresholds[sc.DESCRIPTORS[descriptor][0]] = 6.0
    return r


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    return write_known_bundle(tmp_path_factory.mktemp("scope") / "kb", np.linspace(0, 1, 8)[:, None],
                              np.arange(8) % 4)


@pytest.fixture(scope="module")
def fitted(known):
    return fit_on_own_frames(known)


@pytest.fixture
def bundle_with(known, tmp_path):
    n = iter(range(100))
    return lambda ref: Bundle.load(with_reference(known, tmp_path / f"b{next(n)}", ref))


FRAMES = {"kidney": lambda: speckled_disc(7), "photo": colour_photo, "drawing": flat_drawing,
          "empty": lambda: np.random.default_rng(3).integers(10, 60, (H, W)).astype(np.uint8)}


def records(bundle: Bundle, names=tuple(FRAMES)) -> dict[str, FrameRecord]:
    with Pipeline(bundle) as pipe:
        return {n: pipe.process(frame(i, FRAMES[n]())) for i, n in enumerate(names)}


# -- the graph and the records ------------------------------------------------------------------------------------

def test_the_bundle_exposes_its_reference_and_the_graph_gets_it(known, fitted, bundle_with):
    b = bundle_with(fitted)
    assert isinstance(b.scope, sc.Reference) and b.graph().scope is b.scope and b.scope_warning is None
    assert sc.FILE in b.manifest["files"]                       # hashed like the networks
    plain = Bundle.load(known)
    assert plain.scope is None and plain.graph().scope is None and "no scope reference" in plain.scope_warning


def test_refused_frames_get_no_grade_and_their_reason_and_scores_in_the_jsonl(bundle_with, fitted):
    recs = records(bundle_with(lenient(fitted)))
    ok, photo, drawing, empty = (recs[n] for n in ("kidney", "photo", "drawing", "empty"))
    assert ok.accepted and ok.grade is not None and ok.refused is None and ok.scope["in_scope"]
    assert set(ok.scope["scores"]) == {"ultrasound", "kidney", "view", "outline"} and "scope" in ok.latency_ms
    for rec in (photo, drawing):                  # passed the mask gate, refused by the picture: before the VGG
        j = rec.to_json()
        assert j["accepted"] is False and j["grade"] is None and j["probabilities"] is None
        assert j["refused"] == sc.NOT_ULTRASOUND == j["scope"]["reason"] and j["scope"]["in_scope"] is False
        assert j["scope"]["scores"]["ultrasound"] > 1 and "view" not in j["scope"]["scores"]
        assert "vgg" not in j["latency_ms"] and "scope" in j["latency_ms"] and j["mask_fraction"] > 0.05
        assert j["kidney_length_mm"] is None
    assert photo.scope["scores"]["ultrasound"] == pytest.approx(sc.colour_share(colour_photo()) / sc.COLOUR_LIMIT,
                                                                abs=0.2)
    j = empty.to_json()                           # the mask gate: no kidney, no scope verdict
    assert j["refused"] == sc.NO_KIDNEY and j["scope"] is None and j["accepted"] is False


@pytest.mark.parametrize("descriptor, reason", [("largest", sc.NO_KIDNEY), ("outline_confidence",
                                                                                      sc.OUTLINE_UNSURE)])
def test_a_reference_no_frame_can_meet_refuses_every_frame_for_its_reason(bundle_with, fitted, descriptor, reason):
    rec = records(bundle_with(unreachable(fitted, descriptor)), ("kidney",))["kidney"]
    assert rec.refused == reason and rec.grade is None and not rec.accepted and rec.scope["scores"][
        sc.DESCRIPTORS[descriptor][0]] > 1


def test_the_view_test_refuses_after_the_vgg(bundle_with, fitted):
    r = lenient(fitted)
    r.prototypes = -np.ones_like(r.prototypes) / np.sqrt(r.prototypes.shape[1])   # the opposite of every feature
    r.thresholds["view"] = 0.5
    rec = records(bundle_with(r), ("kidney",))["kidney"]
    assert rec.refused == sc.UNLIKE_TRAINING and rec.grade is None and "vgg" in rec.latency_ms
    assert rec.scope["scores"]["view"] > 1


def test_until_and_given_outputs_keep_working_without_the_scope_gate(bundle_with, fitted):
    b = bundle_with(lenient(fitted))
    with Pipeline(b) as pipe:
        _, image, _ = pipe.prepare_source(frame(0, flat_drawing()))
        r = pipe.graph.run(image, pipe.unet, pipe.vgg, until="vgg")      # not to the grade: no scope gate
        assert r.scope is None and r.features is not None and r.refused is None
        full = pipe.graph.run(image, pipe.unet, pipe.vgg, pipe.booster)
        assert full.refused == sc.NOT_ULTRASOUND and full.features is None and full.grade is None


# -- the sinks --------------------------------------------------------------------------------------------------

def test_the_summary_counts_frames_per_reason_and_gives_no_grade_with_the_reason(bundle_with, fitted):
    recs = records(bundle_with(lenient(fitted)), ("photo", "drawing", "empty"))
    s = StudySummary(n_classes=4)
    for r in recs.values():
        s.write(r)
    out = s.summary()
    assert out["refused_counts"][sc.NOT_ULTRASOUND] == 2 and out["refused_counts"][sc.NO_KIDNEY] == 1
    assert out["accepted"] == 0 and out["rejected"] == 3 and out["final_grade"] is None
    assert out["no_grade_reason"] == "no frame in scope: 2 not ultrasound, 1 no kidney"
    assert "no frame in scope: 2 not ultrasound, 1 no kidney" in s.html()
    s.write(records(bundle_with(lenient(fitted)), ("kidney",))["kidney"])
    assert s.summary()["final_grade"] is not None and s.summary()["no_grade_reason"] is None


def test_the_overlay_and_viewer_say_not_graded_with_the_reason(bundle_with, fitted):
    from runtime.sinks import overlay
    from runtime.sinks.viewer import LiveViewer, _page_template
    recs = records(bundle_with(lenient(fitted)))
    assert overlay.gate_state(recs["photo"]) == ("NOT GRADED", sc.NOT_ULTRASOUND)
    assert overlay.not_graded_text(recs["photo"]) == ("NOT GRADED", sc.NOT_ULTRASOUND)
    assert overlay.gate_state(recs["empty"])[0] == "REJECTED"
    assert overlay.gate_state(recs["kidney"])[0] == "ACCEPTED"
    assert overlay.render_overlay(recs["photo"]).shape[2] == 3
    v = LiveViewer.__new__(LiveViewer)
    state = v._record_state(1, recs["photo"], None, None, None)
    assert state["refused"] == sc.NOT_ULTRASOUND and state["scope_refused"] and state["grade"] is None
    assert not v._record_state(2, recs["empty"], None, None, None)["scope_refused"]
    assert "NOT GRADED" in _page_template() and "s.refused" in _page_template()


def test_the_sr_carries_counts_per_reason_and_no_grade_with_the_reason(tmp_path, bundle_with, fitted):
    pytest.importorskip("highdicom")
    from tests.test_dicom_out import BUNDLE, MULTI, make, multi_records, source
    import highdicom as hd
    recs = records(bundle_with(lenient(fitted)), ("photo", "drawing", "empty"))
    s = StudySummary(n_classes=4)
    for r in recs.values():
        s.write(r)
    summary = s.summary()
    rows = multi_records(3, accepted=lambda i: False)
    _, paths = make([source(MULTI)], rows, summary, tmp_path)
    sr = hd.sr.srread(paths[0])
    (study,) = sr.content.get_image_measurement_groups()
    assert study.get_qualitative_evaluations() == []                        # no grade
    measured = {m.name.value: m.value for m in study.get_measurements()}
    assert measured["REFUSED-NOT-US"] == 2 and measured["REFUSED-NOKIDNEY"] == 1
    assert measured["REFUSED-VIEW"] == 0 and measured["REFUSED-OUTLINE"] == 0 and measured["FRAMES-ACCEPTED"] == 0

    def texts(item):
        for c in item.get("ContentSequence") or ():
            if c.ValueType == "TEXT":
                yield c.ConceptNameCodeSequence[0].CodeValue, c.TextValue
            yield from texts(c)
    assert dict(texts(sr))["NO-GRADE-REASON"] == summary["no_grade_reason"] == \
        "no frame in scope: 2 not ultrasound, 1 no kidney"
    assert BUNDLE


# -- the device path --------------------------------------------------------------------------------------------

def test_the_device_path_gives_the_cpu_paths_refusals_and_verdicts(monkeypatch, bundle_with, fitted):
    from runtime.gpu import pipeline as gpu_pipeline
    from runtime.pipelines import open_pipeline
    from tests.gpu_harness.stand_ins import HostDevice, HostKernels
    monkeypatch.setattr(gpu_pipeline, "cuda_parts", lambda backend, kernels=None: (HostDevice, kernels or HostKernels))
    extra = {f"disc{r}": (lambda r=r: speckled_disc(20 + r, r=r)) for r in (30, 50, 95, 110)}
    frames = {**FRAMES, **extra}
    for ref in (fitted, lenient(fitted), unreachable(fitted, "outline_confidence")):
        b = bundle_with(ref)
        got = {}
        for device in ("cpu", "cuda"):
            with open_pipeline(b, device=device) as pipe:
                got[device] = {n: pipe.process(frame(i, f())) for i, (n, f) in enumerate(frames.items())}
        for n in frames:
            c, d = got["cpu"][n], got["cuda"][n]
            assert (c.accepted, c.refused, c.grade) == (d.accepted, d.refused, d.grade), n
            assert (c.scope is None) == (d.scope is None), n
            if c.scope is not None:
                assert c.scope["in_scope"] == d.scope["in_scope"] and c.scope["reason"] == d.scope["reason"], n
                assert c.scope["scores"].keys() == d.scope["scores"].keys(), n
                for t, v in c.scope["scores"].items():
                    assert d.scope["scores"][t] == pytest.approx(v, abs=1e-3), (n, t)
    assert {r.refused for r in got["cpu"].values()} >= {sc.NO_KIDNEY, sc.OUTLINE_UNSURE}


# -- the warning, bench ---------------------------------------------------------------------------------------------

def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "has no scope reference (no `scope` section)" in line]


def test_a_bundle_without_a_reference_is_said_once_at_every_start(known, bundle_with, fitted, tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), speckled_disc(1))
    for args in (("run", "--bundle", known, "--source", src, "--quiet", "--results", tmp_path / "r.jsonl"),
                 ("bench", "--bundle", known, "--frames", 2, "--warmup", 0)):
        r = sonoscore(*args)
        assert r.returncode == 0, r.stderr
        (line,) = _warnings(r.stderr)
        assert str(known) in line and "--reference-frames" in line and "\n" not in line
    scoped = bundle_with(fitted).root
    r = sonoscore("run", "--bundle", scoped, "--source", src, "--quiet", "--results", tmp_path / "s.jsonl")
    assert r.returncode == 0, r.stderr
    assert _warnings(r.stderr) == []
    rec = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert "refused" in rec and rec["scope"] is not None


def test_bench_reports_the_scope_stage_and_its_share_of_frame_to_grade(bundle_with, fitted, tmp_path):
    from runtime.bench import SCOPE_SHARE_LIMIT, bench_bundle
    out = bench_bundle(bundle_with(fitted).root, frames=3, warmup=1, json_path=tmp_path / "b.json")
    saved = json.loads((tmp_path / "b.json").read_text())
    for o in (out, saved):
        assert "scope" in o["stages"] and o["scope"]["checked"] is True
        assert o["scope"]["p50_ms"] == o["stages"]["scope"]["p50_ms"] > 0
        assert o["scope"]["share_of_total_p50"] == pytest.approx(o["stages"]["scope"]["p50_ms"]
                                                                 / o["stages"]["total"]["p50_ms"])
        assert o["scope"]["limit_share"] == SCOPE_SHARE_LIMIT


def test_the_listener_says_it_once_at_its_start(known, bundle_with, fitted, caplog):
    pytest.importorskip("pynetdicom")
    from runtime.dicomnet.listen import _load_bundle
    with caplog.at_level("WARNING", logger="sonoscore.dicomnet"):
        _load_bundle(known, None)
    assert len(_warnings(caplog.text)) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="sonoscore.dicomnet"):
        _load_bundle(bundle_with(fitted).root, None)
    assert _warnings(caplog.text) == []
