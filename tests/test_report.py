"""The study summary's report fields and the one-page HTML report: values against hand-computed ones, the page's
structure read back with html.parser, and the page as Chromium draws it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.record import DROPPED, FrameRecord
from runtime.sinks.report import Timeline
from runtime.sinks.summary import StudySummary

CHROMIUM = "/usr/bin/chromium"
DISCLAIMER = "synthetic demo model - not for clinical use"
SOURCE = "sim://kidney?grade=1&seed=4"
A = (0.7, 0.1, 0.1, 0.1)
B = (0.0, 0.1, 0.1, 0.8)


def scored(frame: int, probs, total: float = 20.0) -> FrameRecord:
    p = list(probs)
    return FrameRecord(frame, SOURCE, 1000.0 + frame / 10, accepted=True, mask_fraction=0.2,
                       grade=int(np.argmax(p)) + 1, probabilities=p,
                       latency_ms={"preprocess": 2.0, "unet": 5.0, "total": total},
                       mask=np.ones((224, 224), np.uint8), display=np.full((240, 320), 90, np.uint8),
                       meta={"patient_id": "sim-4", "PatientName": "DOE^JANE", "name": "DOE_JANE_kidney.png"})


def rejected(frame: int) -> FrameRecord:
    return FrameRecord(frame, SOURCE, 1000.0 + frame / 10, accepted=False, mask_fraction=0.01,
                       latency_ms={"preprocess": 2.0, "unet": 5.0, "total": 8.0}, meta={"PatientName": "DOE^JANE"})


def error(frame: int) -> FrameRecord:
    return FrameRecord(frame, SOURCE, 1000.0 + frame / 10, error=f"frame {frame}: truncated PNG file",
                       latency_ms={"total": 1.0})


def dropped(frame: int) -> FrameRecord:
    return FrameRecord(frame, SOURCE, 1000.0 + frame / 10, error=DROPPED)


def study_records() -> list[FrameRecord]:
    """Accepted A, A, B with a rejected, an error and a dropped frame among them (frames 3..8, 0.1 s apart)."""
    return [scored(3, A, 10.0), rejected(4), scored(5, A, 20.0), error(6), dropped(7), scored(8, B, 30.0)]


class Page(HTMLParser):
    """What the report is made of: every start tag with its attributes, and the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._skip = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._skip += tag == "style"

    def handle_endtag(self, tag):
        self._skip -= tag == "style"

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.text.append(" ".join(data.split()))

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    @property
    def plain(self) -> str:
        return " ".join(self.text)


# -- JSON ------------------------------------------------------------------------------------------------------
def test_summary_reports_raw_and_smoothed_grades_against_hand_computed_values(tmp_path):
    with StudySummary(tmp_path / "s.json", disclaimer=DISCLAIMER, html_path=tmp_path / "s.html",
                      smoothing_half_life=1.0) as study:
        for r in study_records():
            study.write(r)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s == study.summary()
    # The keys StudySummary always had.
    assert (s["frames"], s["accepted"], s["rejected"], s["errors"], s["dropped"]) == (6, 3, 1, 1, 1)
    assert s["grade_counts"] == {"1": 2, "2": 0, "3": 0, "4": 1}
    # Raw: mean of A, A, B = (1.4, 0.3, 0.3, 1.0) / 3 -> grade 1 with 0.4667.
    assert s["mean_probabilities"] == pytest.approx([1.4 / 3, 0.1, 0.1, 1.0 / 3], abs=1e-6)
    assert s["final_grade"] == 1 and s["confidence"] == pytest.approx(1.4 / 3, abs=1e-6)
    assert s["grade_fractions"] == pytest.approx({"1": 2 / 3, "2": 0.0, "3": 0.0, "4": 1 / 3}, abs=1e-6)
    assert s["final_grade_agreement"] == pytest.approx(2 / 3, abs=1e-6)
    # Smoothed, half-life 1 frame (alpha 0.5): A, A, then A + (B - A) / 2 = (0.35, 0.1, 0.1, 0.45) -> grade 4.
    sm = s["smoothing"]
    assert sm["method"] == "ema" and sm["half_life_frames"] == 1.0 and sm["alpha"] == 0.5
    assert sm["probabilities"] == pytest.approx([0.35, 0.1, 0.1, 0.45], abs=1e-6)
    assert sm["final_grade"] == 4 and sm["confidence"] == pytest.approx(0.45, abs=1e-6)
    assert sm["grade_counts"] == {"1": 2, "2": 0, "3": 0, "4": 1}
    # Where and how long; latency over every record that has one (dropped frames have none).
    assert s["source_id"] == SOURCE and s["frame_range"] == [3, 8] and s["duration_s"] == pytest.approx(0.5)
    assert s["latency_ms"]["total"]["p50"] == 10.0 and s["latency_ms"]["total"]["max"] == 30.0
    assert list(s["latency_ms"]) == ["preprocess", "unet", "total"]
    assert s["disclaimer"] == DISCLAIMER
    # No patient identifier from the records' metadata reaches either file.
    for text in ((tmp_path / "s.json").read_text(), (tmp_path / "s.html").read_text()):
        assert "DOE" not in text and "sim-4" not in text and "PatientName" not in text


def test_ema_half_life_halves_a_frames_weight_every_half_life():
    study = StudySummary(smoothing_half_life=3.0)
    study.write(scored(0, (1.0, 0.0, 0.0, 0.0)))
    for n in range(1, 4):
        study.write(scored(n, (0.0, 1.0, 0.0, 0.0)))
    ema = study.summary()["smoothing"]["probabilities"]
    assert ema[0] == pytest.approx(0.5, abs=1e-6) and ema[1] == pytest.approx(0.5, abs=1e-6)


def test_without_smoothing_or_accepted_frames(tmp_path):
    study = StudySummary(html_path=tmp_path / "r.html")
    for r in (rejected(0), error(1), dropped(2)):
        study.write(r)
    study.close()
    s = study.summary()
    assert s["smoothing"] is None and s["final_grade"] is None and s["final_grade_agreement"] is None
    assert s["grade_fractions"] == {"1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0}
    page = Page((tmp_path / "r.html").read_text())
    assert "no grade" in page.plain and "no frame passed the quality gate" in page.plain
    assert not page.find("path", data_series="raw") and DISCLAIMER not in page.plain
    empty = StudySummary().summary()
    assert empty["frame_range"] is None and empty["duration_s"] is None and empty["source_id"] is None
    assert "<svg" in StudySummary().html()


def test_a_half_life_must_be_a_positive_number():
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="half-life"):
            StudySummary(smoothing_half_life=bad)


# -- the timeline ----------------------------------------------------------------------------------------------
def test_timeline_stays_within_its_bins_and_keeps_exact_bin_means():
    tl = Timeline(4, capacity=8, smoothing=False)
    for f in range(100):
        p = np.array([f, 0, 0, 0], np.float64) / 100.0 if f % 10 else None          # every 10th not scored
        tl.add(f, 0 if p is not None else 1, p)
    assert tl.bins <= 8 and tl.width == 16 and tl.records == 100
    assert int(tl.status[:tl.bins].sum()) == 100 and int(tl.status[:tl.bins, 1].sum()) == 10
    assert (tl.first[0], tl.last[0], tl.first[1]) == (0, 15, 16)
    frames, means = tl.mean()
    scored0 = [f for f in range(16) if f % 10]
    assert frames[0] == 7.5 and means[0, 0] == pytest.approx(np.mean(scored0) / 100.0)
    assert tl.last[tl.bins - 1] == 99
    with pytest.raises(ValueError, match="smoothing is off"):
        tl.mean(smoothed=True)


def test_a_long_study_keeps_memory_and_the_report_bounded():
    study = StudySummary(disclaimer=DISCLAIMER, smoothing_half_life=10, timeline_bins=256)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=5000)
    for f in range(5000):
        study.write(rejected(f) if f % 7 == 0 else scored(f, probs[f]))
    assert study.timeline.bins <= 256
    text = study.html()
    page = Page(text)
    for series in ("raw", "smoothed"):
        for d in (p["d"] for p in page.find("path", data_series=series)):
            assert 100 <= d.count(",") <= 256
    assert len(text) < 200_000
    assert "each point: mean of 32 consecutive frames" in page.plain


# -- HTML ------------------------------------------------------------------------------------------------------
def test_html_report_is_self_contained_with_one_line_per_grade_the_grades_and_the_disclaimer(tmp_path):
    html_path = tmp_path / "deep" / "report.html"
    with StudySummary(None, disclaimer=DISCLAIMER, html_path=html_path, smoothing_half_life=1.0) as study:
        for r in study_records():
            study.write(r)
    text = html_path.read_text()
    page = Page(text)
    assert text.startswith("<!doctype html>") and not (html_path.parent / "report.html.tmp").exists()
    plots = page.find("svg", **{"class": "plot"})
    assert len(plots) == 1 and len(page.find("svg", **{"class": "bars"})) == 1
    for series in ("raw", "smoothed"):
        lines = page.find("path", data_series=series)
        assert sorted(p["data-class"] for p in lines) == ["1", "2", "3", "4"], series
    # Three scored frames with the rejected, error and dropped ones between: a break after frame 3 and at 8.
    raw1 = next(p for p in page.find("path", data_series="raw") if p["data-class"] == "1")["d"]
    assert raw1.count("M") == 3 and raw1.count(",") == 3
    assert len(page.find("rect", **{"class": "bar"})) == 2                  # grades 1 and 4 were seen
    assert page.find("polygon", **{"class": "gate-rejected"}) and page.find("polygon", **{"class": "gate-error"})
    plain = page.plain
    assert "Study grade" in plain and "IFTA <25%" in plain and "confidence 0.47" in plain
    assert "Smoothed grade" in plain and "IFTA >=75%" in plain and "confidence 0.45" in plain
    assert DISCLAIMER in plain and plain.index(DISCLAIMER) < plain.index("Study grade")  # before any grade
    assert SOURCE in plain and "frames 3\u20138" in plain
    for stage in ("preprocess", "unet", "total"):
        assert stage in plain
    # Nothing to fetch, nothing to run.
    assert not page.find("script") and not page.find("link") and not page.find("img")
    assert all(not (a.get("src") or a.get("href")) for _, a in page.tags)
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text


def test_lines_break_at_rejected_frames_but_not_at_frames_dropped_by_the_live_policy():
    study = StudySummary()
    for r in (scored(0, A), dropped(1), dropped(2), scored(3, A), rejected(4), scored(5, B)):
        study.write(r)
    page = Page(study.html())
    d = next(p for p in page.find("path", data_series="raw") if p["data-class"] == "1")["d"]
    assert d.count(",") == 3 and d.count("M") == 2 and d.split()[1].startswith("L")
    assert len(page.find("rect", **{"class": "unscored"})) == 1                 # frame 4 only


def test_names_from_the_source_are_escaped():
    study = StudySummary(disclaimer="<b>demo</b> & not for clinical use",
                         class_names=("1: <25%", "2: <script>", "3", "4"))
    study.write(FrameRecord(0, '"><script>alert(1)</script>', 1.0, accepted=True, grade=2,
                            probabilities=[0.1, 0.6, 0.2, 0.1]))
    text = study.html()
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;b&gt;demo&lt;/b&gt; &amp; not" in text
    Page(text)


# -- in the browser --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_chromium_draws_the_report(tmp_path):
    rng = np.random.default_rng(3)
    html_path = tmp_path / "report.html"
    with StudySummary(None, disclaimer=DISCLAIMER, html_path=html_path, smoothing_half_life=8) as study:
        for f in range(400):
            if 120 <= f < 150 or f % 61 == 0:
                study.write(rejected(f))
            elif f % 97 == 5:
                study.write(error(f))
            else:
                logits = np.array([0.2, 1.0, 1.6, 0.3]) + rng.normal(0, 0.5, 4)
                study.write(scored(f, np.exp(logits) / np.exp(logits).sum(), 20 + rng.random() * 10))
    png = tmp_path / "report.png"
    profile = tmp_path / "profile"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=900,1250",
                    f"--screenshot={png}", html_path.as_uri()],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if os.environ.get("SONOSCORE_KEEP_SCREENSHOTS"):
        shutil.copy(png, Path(os.environ["SONOSCORE_KEEP_SCREENSHOTS"]).with_name("report.png"))
    shot = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert shot is not None and shot.shape[:2] == (1250, 900)
    assert shot.std() > 20                                                   # not blank
    def has(bgr, tol=6, min_px=200) -> bool:
        return int((np.abs(shot.astype(int) - bgr).max(axis=2) <= tol).sum()) >= min_px
    assert has((0xcd, 0xf3, 0xff), min_px=5000)                              # the disclaimer box (#fff3cd)
    assert has((0x12, 0x7a, 0xe0))                                           # grade 3's orange (#e07a12)
    assert has((0x40, 0xa0, 0xf0), min_px=100)                               # rejected frames marked (#f0a040)
