"""The model card and the disclaimer where the user sees them: `sonoscore info`, the study report, the overlay
(video) and the live viewer show the bundle's own name and version; the synthetic-data warning appears only for a
bundle whose manifest carries DEMO_DISCLAIMER (the phantom-trained demo), another disclaimer is shown as it is
written, and a bundle without one shows none."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.bundle import CLASS_NAMES, DEMO_DISCLAIMER, Bundle, BundleError, card_label, write_manifest
from runtime.graph import Graph
from runtime.preprocess import Region
from runtime.record import FrameRecord
from runtime.sinks.overlay import PANEL_BG, render_overlay
from runtime.sinks.summary import StudySummary
from runtime.sinks.video import VideoSink
from runtime.sinks.viewer import LiveViewer
from tests.conftest import ROOT, sonoscore

SYNTHETIC = "trained on synthetic images"
CARD = {"name": "acme-kidney-ifta", "version": "2.1.0", "description": "IFTA grade from kidney ultrasound",
        "changelog": {"2.1.0": "retrained on site B", "2.0.0": "first release"},
        "authors": ["A. Author", "B. Author"], "license": "CC-BY-4.0",
        "intended_use": "research on de-identified kidney ultrasound; not for diagnosis",
        "data_source": "site A and B, 2019-2021", "references": ["doi:10.1101/2020.08.17.20176958"]}
OWN_DISCLAIMER = "research model - validated at site A only"


def with_card(src: Path, dst: Path, *, card=CARD, disclaimer=OWN_DISCLAIMER, normalization=None) -> Path:
    """A copy of a bundle whose manifest carries `card` and `disclaimer` (written by write_manifest, so the
    manifest's checksum is right)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["disclaimer"] = disclaimer
    if card is None:
        m.pop("card", None)
    else:
        m["card"] = card
    if normalization:
        m["networks"]["vgg"]["input"]["normalization"] = normalization
    write_manifest(dst, m)
    return dst


@pytest.fixture
def plain(tmp_path):
    """Placeholder files and a real manifest: enough for Bundle.load and `info`, not for running."""
    b = tmp_path / "plain"
    b.mkdir()
    for f in ("unet.onnx", "vgg.onnx", "booster.ubj"):
        (b / f).write_bytes(b"x")
    net = lambda name, out, shape, ch: {"files": {"fp32": f"{name}.onnx"}, "architecture": f"{name}-arch",  # noqa
                                        "input": {"name": "image", "shape": ["N", ch, 224, 224], "dtype": "float32"},
                                        "output": {"name": out, "shape": shape}, "channels": ch}
    write_manifest(b, {"name": "plain-bundle", "classes": CLASS_NAMES, **Graph(vgg_channels=3).manifest_sections(),
                       "networks": {"unet": net("unet", "mask", ["N", 1, 224, 224], 1),
                                    "vgg": net("vgg", "features", ["N", 8], 3)},
                       "booster": {"file": "booster.ubj", "format": "xgboost-ubj", "num_class": 4,
                                   "num_features": 8, "objective": "multi:softprob"}})
    return b


# -- the card in the bundle -------------------------------------------------------------------------------------

def test_a_bundle_without_a_card_gets_one_from_its_name(plain):
    b = Bundle.load(plain)
    assert b.card == {"name": "plain-bundle", "version": "unversioned"}
    assert b.label == "plain-bundle unversioned" and card_label(None) is None


def test_the_card_is_read_from_the_manifest_and_checked(plain, tmp_path):
    b = with_card(plain, tmp_path / "carded")
    assert Bundle.load(b).card == CARD and Bundle.load(b).label == "acme-kidney-ifta 2.1.0"
    bad = with_card(plain, tmp_path / "bad", card={"name": "no version"})
    with pytest.raises(BundleError, match=r"card.*version"):
        Bundle.load(bad)


def test_info_prints_the_card_networks_booster_signature_and_disclaimer(plain, tmp_path):
    b = with_card(plain, tmp_path / "b", normalization={"kind": "meanstd", "mean": [0.485, 0.456, 0.406],
                                                       "std": [0.229, 0.224, 0.225]})
    r = sonoscore("info", b)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ("acme-kidney-ifta", "2.1.0", "A. Author, B. Author", "CC-BY-4.0", "intended use",
                 CARD["intended_use"], "data source", CARD["data_source"], "doi:10.1101/2020.08.17.20176958",
                 "2.1.0: retrained on site B", "2.0.0: first release", OWN_DISCLAIMER,
                 "unet-arch", "vgg-arch", "input 'image' Nx3x224x224", "imagenet", "normalization unit",
                 "booster.ubj (xgboost-ubj), 4 classes, 8 features, multi:softprob", "signature", "not signed"):
        assert text in out, (text, out)
    assert SYNTHETIC not in out
    info = json.loads(sonoscore("info", b, "--json").stdout)
    assert info["card"] == CARD and info["disclaimer"] == OWN_DISCLAIMER and info["signature"] == "not signed"
    assert info["networks"]["vgg"]["input"]["normalization"]["kind"] == "meanstd"
    assert info["manifest_sha256"] == Bundle.load(b).manifest_sha256
    # Signed: the status says so, and with --trust it is verified (or refused)
    assert sonoscore("keygen", "--out", tmp_path / "k").returncode == 0
    assert sonoscore("sign", b, "--key", tmp_path / "k.key").returncode == 0
    assert "signed (model.sig" in sonoscore("info", b).stdout
    r = sonoscore("info", b, "--trust", tmp_path / "k.pub")
    assert r.returncode == 0 and "verified with" in r.stdout, r.stderr
    assert sonoscore("keygen", "--out", tmp_path / "other").returncode == 0
    assert sonoscore("info", b, "--trust", tmp_path / "other.pub").returncode == 2


def test_no_sink_assumes_the_demo_disclaimer():
    """Every sink takes the bundle's disclaimer; none defaults to the synthetic one."""
    for path in (ROOT / "runtime" / "sinks").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"disclaimer[^=\n]*=\s*DEMO_DISCLAIMER", text), path


# -- the study report ---------------------------------------------------------------------------------------------

def _record(i: int) -> FrameRecord:
    return FrameRecord(i, "sim://kidney", 100.0 + i, accepted=True, mask_fraction=0.3, grade=2,
                       probabilities=[0.1, 0.6, 0.2, 0.1], latency_ms={"total": 5.0},
                       mask=np.ones((224, 224), np.uint8), display=np.full((240, 320), 90, np.uint8),
                       region=Region(0, 0, 320, 240))


@pytest.mark.parametrize("disclaimer", [DEMO_DISCLAIMER, OWN_DISCLAIMER, None])
def test_the_report_names_the_model_and_shows_only_its_own_disclaimer(disclaimer, tmp_path):
    with StudySummary(tmp_path / "s.json", disclaimer=disclaimer, html_path=tmp_path / "r.html", card=CARD) as s:
        for i in range(3):
            s.write(_record(i))
    page = (tmp_path / "r.html").read_text()
    for text in ("acme-kidney-ifta 2.1.0", "A. Author, B. Author", CARD["intended_use"], CARD["references"][0]):
        assert text in page, text
    assert (SYNTHETIC in page) == (disclaimer == DEMO_DISCLAIMER)
    assert (OWN_DISCLAIMER in page) == (disclaimer == OWN_DISCLAIMER)
    assert ('class="disclaimer"' in page) == (disclaimer is not None)
    assert json.loads((tmp_path / "s.json").read_text())["model"] == CARD


def test_run_writes_the_bundles_card_and_disclaimer_into_report_video_and_summary(tiny_bundle, tmp_path):
    """End to end: `run` passes the bundle's card and disclaimer to every sink; the demo bundle (trained on the
    phantom) keeps the synthetic warning, a bundle with its own disclaimer does not get it."""
    own = with_card(tiny_bundle, tmp_path / "own")
    out = tmp_path / "out"
    r = sonoscore("run", "--bundle", own, "--source", "sim://kidney?frames=2&fps=0", "--quiet",
                  "--study-report", out / "r.html", "--study-summary", out / "s.json", "--video", out / "o.mp4")
    assert r.returncode == 0, r.stderr[-2000:]
    page = (out / "r.html").read_text()
    assert "acme-kidney-ifta 2.1.0" in page and OWN_DISCLAIMER in page and SYNTHETIC not in page
    assert json.loads((out / "s.json").read_text())["model"]["version"] == "2.1.0"
    assert _label_band_ink(_first_video_frame(out / "o.mp4")) > 0.01          # the model line is on the video

    demo = tmp_path / "demo-out"
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?frames=2&fps=0", "--quiet",
                  "--study-report", demo / "r.html")
    assert r.returncode == 0, r.stderr[-2000:]
    page = (demo / "r.html").read_text()
    assert Bundle.load(tiny_bundle).disclaimer == DEMO_DISCLAIMER
    assert DEMO_DISCLAIMER in page and SYNTHETIC in page and Bundle.load(tiny_bundle).label in page


# -- the overlay (video) --------------------------------------------------------------------------------------

BAND_ROWS = slice(480 - 128 - 28, 480 - 128 - 4)     # a 480-row overlay: the strip just above the gate state


def _label_band(img: np.ndarray) -> np.ndarray:
    """Where the model line goes: that strip across the panel (the rightmost 300 columns, margins left out)."""
    return img[BAND_ROWS, img.shape[1] - 300 + 18:img.shape[1] - 18]


def _label_band_ink(img: np.ndarray) -> float:
    """Fraction of the label band that is not the panel's background."""
    band = _label_band(img).astype(int)
    return float((np.abs(band - np.array(PANEL_BG)).max(axis=2) > 40).mean())


def _first_video_frame(path: Path) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    ok, img = cap.read()
    cap.release()
    assert ok
    return img


def test_the_overlay_shows_the_model_name_and_version_and_no_banner_unless_given():
    rec = _record(0)
    plain = render_overlay(rec)
    a = render_overlay(rec, model="acme-kidney-ifta 2.1.0")
    b = render_overlay(rec, model="other-model 0.3")
    assert plain.shape == a.shape == b.shape and plain.shape[0] == 480          # no disclaimer: no banner
    assert _label_band_ink(plain) == 0 and _label_band_ink(a) > 0.02
    assert not np.array_equal(_label_band(a), _label_band(b))                    # it is the name that is drawn
    outside = np.ones(a.shape[:2], bool)
    outside[BAND_ROWS, a.shape[1] - 300 + 18:a.shape[1] - 18] = False
    assert np.array_equal(a[outside], plain[outside])                            # and nothing else moved
    banner = render_overlay(rec, model="acme-kidney-ifta 2.1.0", disclaimer=OWN_DISCLAIMER)
    assert banner.shape[0] > 480


def test_the_video_sink_draws_the_model_line(tmp_path):
    for name, model in (("with.mp4", "acme-kidney-ifta 2.1.0"), ("without.mp4", None)):
        with VideoSink(tmp_path / name, fps=5, model=model) as sink:
            sink.write(_record(0))
    assert _label_band_ink(_first_video_frame(tmp_path / "with.mp4")) > 0.01
    assert _label_band_ink(_first_video_frame(tmp_path / "without.mp4")) < 0.002


# -- the live viewer over HTTP --------------------------------------------------------------------------------

def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_the_viewer_page_and_state_carry_the_model_and_only_the_given_disclaimer():
    with LiveViewer(model="acme-kidney-ifta <2.1.0>") as v:
        page = _get(f"http://127.0.0.1:{v.port}/").decode()
        state = json.loads(_get(f"http://127.0.0.1:{v.port}/state.json"))
    assert 'id="model"' in page and "acme-kidney-ifta &lt;2.1.0&gt;</span>" in page
    assert state["model"] == "acme-kidney-ifta <2.1.0>" and state["disclaimer"] is None
    assert '<div id="disclaimer" hidden></div>' in page and DEMO_DISCLAIMER not in page
    with LiveViewer(model="demo 1", disclaimer=DEMO_DISCLAIMER) as v:
        page = _get(f"http://127.0.0.1:{v.port}/").decode()
    assert f"&#9888; {DEMO_DISCLAIMER}</div>" in page


def test_run_view_serves_the_bundles_card_and_disclaimer(tiny_bundle, tmp_path):
    """`run --view`: the page the viewer serves names the bundle's model and shows its own disclaimer."""
    own = with_card(tiny_bundle, tmp_path / "own")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", "--bundle", own, "--source",
                             "sim://kidney?frames=2&fps=0", "--quiet", "--view", "--view-port", "0", "--view-keep"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = None, time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"live viewer: (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "the run printed no viewer URL"
        page = _get(url).decode()
        state = json.loads(_get(url.rstrip("/") + "/state.json"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert "acme-kidney-ifta 2.1.0</span>" in page and OWN_DISCLAIMER in page and DEMO_DISCLAIMER not in page
    assert state["model"] == "acme-kidney-ifta 2.1.0" and state["disclaimer"] == OWN_DISCLAIMER
