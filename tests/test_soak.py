"""`sonoscore bench --soak MINUTES` (runtime/soak.py): a short real soak on the tiny bundle (the real `run` in a child
process, every output on, the viewer fetched), its report's fields against the run's own outputs, the figures from
known samples, and the options it refuses."""
import json
import re

import cv2
import pytest

from runtime.record import DROPPED
from runtime.soak import sample_period, summarize
from tests.conftest import sonoscore


@pytest.fixture(scope="module")
def soaked(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("soak")
    r = sonoscore("bench", "--bundle", tiny_bundle, "--soak", 0.1, "--json", d / "soak.json", "--plot",
                  d / "soak.png", "--soak-out", d / "run", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d, r, json.loads((d / "soak.json").read_text())


def test_a_short_soak_streams_every_frame_with_every_output_on(soaked):
    d, r, rep = soaked
    assert rep["exit_code"] == 0 and rep["frames_asked"] == 180 == rep["records"]      # 0.1 min at 30 frames/s
    cmd = rep["command"]
    for opt in ("--results", "--video", "--study-summary", "--study-report", "--view"):
        assert opt in cmd, opt
    assert "sim://kidney?fps=30&frames=180" in cmd
    for name in ("results.jsonl", "overlay.mp4", "summary.json", "report.html", "run.log"):
        assert (d / "run" / name).stat().st_size > 0, name
    assert rep["viewer_fetches_ok"] >= 1 and rep["viewer_fetches_failed"] == 0
    assert "soak: 0.1 min at 30 frames/s, exit 0, 180 records for 180 frames" in r.stdout


def test_the_soak_report_holds_rss_samples_and_figures_that_follow_the_runs_outputs(soaked):
    d, _, rep = soaked
    rss = rep["rss_mb"]
    assert len(rss) >= 5 and all(m > 0 for _, m in rss) and rep["rss_max_mb"] > 20   # Python with onnxruntime
    assert [t for t, _ in rss] == sorted(t for t, _ in rss)
    assert rep["rss_max_mb"] == max(m for _, m in rss)
    assert rep["rss_plateau_mb"] and rep["rss_end_mb"]
    assert rep["rss_growth_pct"] == pytest.approx((rep["rss_end_mb"] - rep["rss_plateau_mb"])
                                                  / rep["rss_plateau_mb"] * 100, abs=0.01)
    records = [json.loads(line) for line in (d / "run" / "results.jsonl").read_text().splitlines()]
    summary = json.loads((d / "run" / "summary.json").read_text())
    dropped = sum(1 for x in records if x["error"] == DROPPED)
    assert rep["dropped_records"] == dropped == summary["dropped"] == rep["dropped_policy"] and rep["dropped_agree"]
    processed = [x for x in records if x["error"] is None]
    assert sum(m["frames"] for m in rep["latency_per_minute"]) == len(processed) > 0
    assert [m["minute"] for m in rep["latency_per_minute"]] == [0]
    assert rep["summary_latency_total_ms"] == summary["latency_ms"]["total"]
    assert rep["latency_windows"] and sum(w[3] for w in rep["latency_windows"]) <= len(processed)
    img = cv2.imread(str(d / "soak.png"))
    assert img is not None and img.shape[1] == 1000


def test_the_rss_figures_from_known_samples():
    """Plateau: the median over the second half of the warm-up (the first minute); end: the last 30 s."""
    rss = [[float(t), 100.0 if t < 30 else (200.0 if t < 120 else 210.0)] for t in range(0, 301, 5)]
    rep = summarize(rss, [], {}, [])
    assert rep["rss_plateau_mb"] == 200.0 and rep["rss_end_mb"] == 210.0 and rep["rss_growth_pct"] == 5.0
    assert rep["rss_max_mb"] == 210.0 and rep["records"] == 0
    short = [[t / 10, 50.0 + t] for t in range(0, 61)]                  # 6 s: warm-up the first 3 s, end the last 1
    rep = summarize(short, [], {}, [])
    assert rep["rss_plateau_mb"] == 72.5 and rep["rss_end_mb"] == 105.0
    recs = [{"t_capture": 10.0 + i, "error": None, "latency_ms": {"total": float(i)}} for i in range(100)]
    recs += [{"t_capture": 11.0, "error": DROPPED, "latency_ms": {}}]
    rep = summarize([], recs, {"dropped": 1}, [])
    assert [(m["minute"], m["frames"]) for m in rep["latency_per_minute"]] == [(0, 60), (1, 40)]
    assert rep["latency_per_minute"][1]["p50_ms"] == 79.5 and rep["dropped_agree"]
    assert sample_period(3600) == 5.0 and sample_period(6) == 0.2


@pytest.mark.parametrize("args, said", [
    (["--soak", "0"], "--soak 0.0: give the minutes"),
    (["--soak", "1", "--profile"], "two separate measurements"),
    (["--soak", "1", "--precision", "fp32,int8"], "one precision"),
    (["--soak", "1", "--device", "cpu"], "--device does not apply"),
    (["--soak-out", "x"], "--soak-out belongs to --soak"),
])
def test_soak_options_it_refuses_in_one_sentence(tiny_bundle, args, said):
    r = sonoscore("bench", "--bundle", tiny_bundle, *args)
    assert r.returncode == 2 and said in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(re.findall(r"^sonoscore", r.stderr, re.MULTILINE)) == 1
