"""Soak benchmark (issue 12): stream the simulated probe through `sonoscore run` for M minutes with every output on
(--results, --video, --study-summary, --study-report, --view on 127.0.0.1) and watch the run from outside.

    .venv/bin/python scripts/soak.py --bundle out/demo/bundle --minutes 60 [--fps 30] [--out out/soak]

Every --every seconds (default 5) it reads the run's resident memory (/proc/<pid>/status VmRSS) and the records
the run has written so far (the results file, read while it is still the partial file), and asks the viewer for
its page. At the end it writes DIR/soak.json:
  rss_mb            [[seconds since start, MB], ...]
  rss_plateau_mb    median RSS over the second half of the first minute (after start-up)
  rss_end_mb        median RSS over the last 30 s; rss_growth_pct = (end - plateau) / plateau x 100
  dropped_records   records whose error is the `newest` policy's "dropped"; dropped_policy: the summary's count
  latency_per_minute  [{minute, frames, p50_ms, p99_ms}] of the processed frames' total latency, by capture time
and DIR/soak.png (RSS and latency over time, drawn with OpenCV). Not a test: it takes as long as it is asked to.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.evaluate import GREY, GRID, INK, WHITE, _write_png  # noqa: E402
from runtime.record import DROPPED  # noqa: E402
from runtime.sinks.overlay import draw_text, fill  # noqa: E402

BLUE, ORANGE, RED = (181, 113, 33), (14, 127, 255), (40, 39, 214)   # BGR


def rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024.0 if m else None


class Tail:
    """Reads the JSONL lines appended to a file since the last read (whole lines only)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.offset = 0
        self.rest = b""

    def read(self, path: Path | None) -> list[dict]:
        if path is None:
            return []
        if path != self.path:
            self.path, self.offset, self.rest = path, 0, b""
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--out", default="out/soak")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--sonoscore", default=str(Path(sys.executable).with_name("sonoscore")),
                    help="the sonoscore command (default: the one beside this Python)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = int(math.ceil(args.minutes * 60 * args.fps))
    source = f"sim://kidney?fps={args.fps:g}&frames={frames}"
    results = out / "results.jsonl"
    cmd = [args.sonoscore, "run", "--bundle", args.bundle, "--source", source, "--quiet",
           "--results", str(results), "--video", str(out / "overlay.mp4"),
           "--study-summary", str(out / "summary.json"), "--study-report", str(out / "report.html"),
           "--view", "--view-host", "127.0.0.1", "--view-port", "0"]
    print("soak:", " ".join(cmd), flush=True)
    log = open(out / "run.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    partial = results.with_name(f"{results.stem}.partial-{proc.pid}{results.suffix}")
    tail = Tail()
    rss: list[list[float]] = []
    records: list[dict] = []
    lat_windows: list[list[float]] = []          # [t, p50, p99, frames] of the records read at each sample
    viewer_url, viewer_ok, viewer_failed = None, 0, 0
    while True:
        done = proc.poll() is not None
        t = time.monotonic() - t0
        m = None if done else rss_mb(proc.pid)
        if m is not None:
            rss.append([round(t, 2), round(m, 2)])
        new = tail.read(partial if partial.exists() else None)
        records += new
        totals = [r["latency_ms"]["total"] for r in new if r.get("error") is None and r["latency_ms"].get("total")]
        if totals:
            lat_windows.append([round(t, 2), pct(totals, 50), pct(totals, 99), len(totals)])
        if viewer_url is None:
            found = re.search(rb"live viewer: (http://\S+)", (out / "run.log").read_bytes())
            viewer_url = found.group(1).decode() if found else None
        if viewer_url and not done:
            try:
                with urllib.request.urlopen(viewer_url, timeout=2) as r:
                    r.read(65536)
                viewer_ok += 1
            except OSError:
                viewer_failed += 1
        if done:
            break
        time.sleep(max(0.0, args.every - (time.monotonic() - t0 - t)))
    rc = proc.returncode
    log.close()
    # the finished results file holds every record; what was read live is only for the over-time view
    if results.exists():
        records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}

    def median_rss(lo: float, hi: float) -> float | None:
        vals = [m for t, m in rss if lo <= t <= hi]
        return round(float(np.median(vals)), 2) if vals else None
    end_t = rss[-1][0] if rss else 0.0
    plateau = median_rss(30.0, 60.0)
    end = median_rss(end_t - 30.0, end_t)
    growth = round((end - plateau) / plateau * 100, 2) if plateau and end else None
    start_capture = min((r["t_capture"] for r in records), default=0.0)
    per_minute: dict[int, list[float]] = {}
    for r in records:
        if r.get("error") is None and r["latency_ms"].get("total"):
            per_minute.setdefault(int((r["t_capture"] - start_capture) // 60), []).append(r["latency_ms"]["total"])
    minutes = [{"minute": k, "frames": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)}
               for k, v in sorted(per_minute.items())]
    dropped_records = sum(1 for r in records if r.get("error") == DROPPED)
    report = {
        "command": cmd, "exit_code": rc, "minutes": args.minutes, "fps": args.fps, "frames_asked": frames,
        "records": len(records), "wall_s": round(time.monotonic() - t0, 1),
        "rss_mb": rss, "rss_plateau_mb": plateau, "rss_end_mb": end, "rss_growth_pct": growth,
        "rss_max_mb": max((m for _, m in rss), default=None),
        "dropped_records": dropped_records, "dropped_policy": summary.get("dropped"),
        "dropped_agree": dropped_records == summary.get("dropped"),
        "latency_per_minute": minutes, "latency_windows": lat_windows,
        "summary_latency_total_ms": summary.get("latency_ms", {}).get("total"),
        "viewer_fetches_ok": viewer_ok, "viewer_fetches_failed": viewer_failed,
    }
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    soak_png(report, out / "soak.png")
    print(f"soak: exit {rc}; {len(records)} records, {dropped_records} dropped (policy says "
          f"{summary.get('dropped')}); RSS {plateau} MB after the first minute, {end} MB at the end "
          f"({growth}%); wrote {out / 'soak.json'} and {out / 'soak.png'}", flush=True)
    return 0 if rc == 0 else 1


def soak_png(report: dict, path: Path) -> Path:
    """Two panels over run time: RSS (MB), and total latency p50/p99 per sampling window (ms)."""
    W, left, right, plot_h = 1000, 90, 30, 260
    tops = [100, 100 + plot_h + 90]
    H = tops[1] + plot_h + 70
    img = np.empty((H, W, 3), np.uint8)
    fill(img, WHITE)
    title = (f"Soak: {report['minutes']:g} min at {report['fps']:g} fps, all outputs on; "
             f"RSS growth {report['rss_growth_pct']}% after the first minute")
    draw_text(img, title, (W / 2, 36), 20, INK, 700, align="center")
    draw_text(img, f"{report['records']} records, {report['dropped_records']} dropped (policy count "
                   f"{report['dropped_policy']}), exit {report['exit_code']}", (W / 2, 64), 14, GREY, align="center")
    t_max = max([t for t, _ in report["rss_mb"]] + [w[0] for w in report["latency_windows"]] + [1.0])
    plot_w = W - left - right

    def panel(top: int, label: str, series: list[tuple[list[tuple[float, float]], tuple, str]]) -> None:
        vals = [v for pts, _, _ in series for _, v in pts if v is not None]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        pad = max((hi - lo) * 0.15, abs(hi) * 0.02, 1e-3)
        lo, hi = max(0.0, lo - pad), hi + pad
        def xy(t, v):
            return (int(round(left + t / t_max * plot_w)), int(round(top + plot_h - (v - lo) / (hi - lo) * plot_h)))
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            y = xy(0, v)[1]
            cv2.line(img, (left, y), (left + plot_w, y), GRID, 1)
            draw_text(img, f"{v:.1f}", (left - 8, y + 5), 12, GREY, align="right")
        for k in range(7):
            t = t_max * k / 6
            x = xy(t, lo)[0]
            cv2.line(img, (x, top), (x, top + plot_h), GRID, 1)
            draw_text(img, f"{t / 60:.1f}", (x, top + plot_h + 18), 12, GREY, align="center")
        cv2.rectangle(img, (left, top), (left + plot_w, top + plot_h), GREY, 1)
        draw_text(img, label, (left, top - 12), 15, INK, 700)
        draw_text(img, "minutes", (left + plot_w / 2, top + plot_h + 38), 12, GREY, align="center")
        x_legend = left + plot_w
        for pts, color, name in reversed(series):
            pts = [(t, v) for t, v in pts if v is not None]
            if len(pts) > 1:
                cv2.polylines(img, [np.array([xy(t, v) for t, v in pts], np.int32)], False, color, 2, cv2.LINE_AA)
            for t, v in pts if len(pts) < 200 else []:
                cv2.circle(img, xy(t, v), 2, color, -1, cv2.LINE_AA)
            draw_text(img, name, (x_legend, top - 12), 14, color, 700, align="right")
            x_legend -= 90

    panel(tops[0], "Resident memory of the run (MB, VmRSS)", [([(t, m) for t, m in report["rss_mb"]], BLUE, "RSS")])
    w = report["latency_windows"]
    panel(tops[1], f"Total latency per {int(round(w[1][0] - w[0][0])) if len(w) > 1 else ''} s window (ms)",
          [([(x[0], x[1]) for x in w], BLUE, "p50"), ([(x[0], x[2]) for x in w], RED, "p99")])
    return _write_png(img, path)


if __name__ == "__main__":
    sys.exit(main())
