"""`sonoscore bench --soak MINUTES`: a long run watched from outside.

The simulated probe (`sim://kidney?fps=30&frames=MINUTES x 60 x 30`) streams through the real `sonoscore run` in a
child process, with every output on: `--results`, `--video`, `--study-summary`, `--study-report` and the live
viewer (`--view` on 127.0.0.1, a free port), policy `newest` (the simulated probe is live). Every few seconds the
soak reads the child's resident memory (/proc/PID/status VmRSS), the records the child has written so far (its
results file while it is still the partial file), and asks the viewer for its page. At the end it writes the
report (JSON) and a picture of RSS and latency over time (PNG).

The report's fields:
  exit_code, records, frames_asked    the run's exit status; its records against the frames asked for
  rss_mb                              [[seconds since start, MB], ...], one sample a period
  rss_plateau_mb                      median RSS over the second half of the warm-up (the first minute, or the
                                      first half of a run under two minutes): the size after start-up
  rss_end_mb, rss_growth_pct          median RSS over the last 30 s (a sixth of a shorter run); growth against the
                                      plateau in %
  rss_max_mb
  dropped_records, dropped_policy     records whose error is the `newest` policy's "dropped", and the summary's
                                      count of the same (they agree: dropped_agree)
  latency_per_minute                  [{minute, frames, p50_ms, p99_ms}] of the processed frames' total latency,
                                      by capture time
  latency_windows                     [[seconds, p50_ms, p99_ms, frames], ...] of the records read at each sample
  summary_latency_total_ms            the study summary's latency percentiles (capture to result)
  viewer_fetches_ok / _failed         viewer page fetches answered / not answered (one not answered while the run
                                      is ending is not counted)

Linux only (the RSS comes from /proc). The run's outputs go to a temporary folder removed at the end, unless a
folder is given to keep them in (an hour's video at 30 frames/s is several GB).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from runtime.errors import UserError

FPS = 30.0                      # the simulated probe's rate
WHITE, INK, GREY, GRID = (255, 255, 255), (40, 40, 40), (120, 120, 120), (225, 225, 225)
BLUE, RED = (181, 113, 33), (40, 39, 214)   # BGR


def rss_mb(pid: int) -> float | None:
    """The process's resident memory in MB (VmRSS), None when it is gone or still being started (under 1 MB while
    the kernel execs it)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024.0 if m and int(m.group(1)) >= 1024 else None


class Tail:
    """The JSONL lines appended to a file since the last read (whole lines only)."""

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


def _pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def sample_period(seconds: float) -> float:
    """Seconds between samples: 5, or less on a short run so that it still gets about 30 samples."""
    return min(5.0, max(0.2, seconds / 30.0))


def run_command(bundle, source: str, out: Path, *, backend: str = "ort", precision: str = "fp32",
                threads: int | None = None, trust: str | None = None) -> list[str]:
    """The `sonoscore run` command line the soak watches: every output on, the viewer on a free local port."""
    cmd = [sys.executable, "-m", "runtime.cli", "run", "--bundle", str(bundle), "--source", source, "--quiet",
           "--backend", backend, "--precision", precision,
           "--results", str(out / "results.jsonl"), "--video", str(out / "overlay.mp4"),
           "--study-summary", str(out / "summary.json"), "--study-report", str(out / "report.html"),
           "--view", "--view-host", "127.0.0.1", "--view-port", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    if trust:
        cmd += ["--trust", str(trust)]
    return cmd


def soak(bundle, minutes: float, *, json_path=None, plot=None, keep: str | Path | None = None,
         backend: str = "ort", precision: str = "fp32", threads: int | None = None, trust: str | None = None,
         quiet: bool = False) -> dict:
    """Run the soak for `minutes` and return its report (written to `json_path`, its picture to `plot`); the run's
    outputs stay in `keep` when given."""
    if not minutes > 0 or not math.isfinite(minutes):
        raise UserError(f"--soak {minutes}: give the minutes to run, a number above 0")
    if not Path("/proc/self/status").is_file():
        raise UserError("bench --soak reads the run's memory from /proc, which this system does not have (Linux "
                        "only)")
    if keep is not None:
        Path(keep).mkdir(parents=True, exist_ok=True)
    work = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="sonoscore-soak-"))
    try:
        return _soak(bundle, minutes, work, json_path=json_path, plot=plot, backend=backend, precision=precision,
                     threads=threads, trust=trust, quiet=quiet)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _soak(bundle, minutes: float, out: Path, *, json_path, plot, backend, precision, threads, trust,
          quiet) -> dict:
    frames = int(math.ceil(minutes * 60 * FPS))
    source = f"sim://kidney?fps={FPS:g}&frames={frames}"
    every = sample_period(minutes * 60)
    results = out / "results.jsonl"
    cmd = run_command(bundle, source, out, backend=backend, precision=precision, threads=threads, trust=trust)
    if not quiet:
        print(f"soak: {minutes:g} min, a sample every {every:g} s: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    log_path = out / "run.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        # the results sink writes r.partial-<time>-<random>.jsonl beside r.jsonl until the run ends
        # (runtime.sinks.partial_path); found once it exists
        partial = None
        tail = Tail()
        rss: list[list[float]] = []
        windows: list[list] = []
        viewer_url, viewer_ok, viewer_failed = None, 0, 0
        next_report = 60.0
        try:
            while True:
                done = proc.poll() is not None
                t = time.monotonic() - t0
                m = None if done else rss_mb(proc.pid)
                if m is not None:
                    rss.append([round(t, 2), round(m, 2)])
                partial = partial or next(results.parent.glob(f"{results.stem}.partial-*{results.suffix}"), None)
                new = tail.read(partial if partial is not None and partial.exists() else None)
                totals = [r["latency_ms"]["total"] for r in new
                          if r.get("error") is None and (r.get("latency_ms") or {}).get("total") is not None]
                if totals:
                    windows.append([round(t, 2), _pct(totals, 50), _pct(totals, 99), len(totals)])
                if viewer_url is None:
                    found = re.search(rb"live viewer: (http://\S+)", log_path.read_bytes())
                    viewer_url = found.group(1).decode() if found else None
                if viewer_url and not done:
                    try:
                        with urllib.request.urlopen(viewer_url, timeout=2) as r:
                            r.read(65536)
                        viewer_ok += 1
                    except OSError:
                        try:              # the run closing its viewer as it ends is not a failure
                            proc.wait(timeout=2.0)
                        except subprocess.TimeoutExpired:
                            viewer_failed += 1
                if not quiet and t >= next_report and rss:
                    print(f"soak: {t / 60:.0f} min, RSS {rss[-1][1]:.1f} MB", file=sys.stderr, flush=True)
                    next_report += 60.0
                if done:
                    break
                time.sleep(max(0.0, every - (time.monotonic() - t0 - t)))
        except BaseException:
            proc.terminate()
            proc.wait(timeout=30)
            raise
    rc = proc.returncode
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] \
        if results.exists() else []
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    report = summarize(rss, records, summary, windows)
    report.update({"command": cmd, "exit_code": rc, "minutes": minutes, "fps": FPS, "frames_asked": frames,
                   "sample_period_s": every, "wall_s": round(time.monotonic() - t0, 1),
                   "viewer_fetches_ok": viewer_ok, "viewer_fetches_failed": viewer_failed})
    if rc != 0:
        report["run_log_tail"] = log_path.read_text(errors="replace")[-2000:]
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if plot:
        soak_png(report, plot)
    return report


def summarize(rss: list[list[float]], records: list[dict], summary: dict, windows: list[list]) -> dict:
    """The report's figures from the RSS samples, the finished results and the study summary."""
    from runtime.record import DROPPED

    def median_rss(lo: float, hi: float) -> float | None:
        vals = [m for t, m in rss if lo <= t <= hi]
        return round(float(np.median(vals)), 2) if vals else None
    end_t = rss[-1][0] if rss else 0.0
    warm = min(60.0, end_t / 2)
    tail_s = min(30.0, end_t / 6)
    plateau = median_rss(warm / 2, warm)
    end = median_rss(end_t - tail_s, end_t)
    growth = round((end - plateau) / plateau * 100, 2) if plateau and end else None
    start = min((r["t_capture"] for r in records if r.get("t_capture") is not None), default=0.0)
    per_minute: dict[int, list[float]] = {}
    for r in records:
        total = (r.get("latency_ms") or {}).get("total")
        if r.get("error") is None and total is not None:
            per_minute.setdefault(int((r["t_capture"] - start) // 60), []).append(total)
    dropped = sum(1 for r in records if r.get("error") == DROPPED)
    return {"records": len(records), "rss_mb": rss, "rss_plateau_mb": plateau, "rss_end_mb": end,
            "rss_growth_pct": growth, "rss_max_mb": max((m for _, m in rss), default=None),
            "dropped_records": dropped, "dropped_policy": summary.get("dropped"),
            "dropped_agree": dropped == summary.get("dropped"),
            "latency_per_minute": [{"minute": k, "frames": len(v), "p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99)}
                                   for k, v in sorted(per_minute.items())],
            "latency_windows": windows,
            "summary_latency_total_ms": (summary.get("latency_ms") or {}).get("total")}


def format_report(report: dict) -> str:
    lat = report.get("summary_latency_total_ms") or {}
    lat_text = ", ".join(f"{k} {v:.1f}" for k, v in lat.items() if isinstance(v, (int, float))
                         and k in ("p50", "p95", "p99", "max"))
    return "\n".join([
        f"soak: {report['minutes']:g} min at {report['fps']:g} frames/s, exit {report['exit_code']}, "
        f"{report['records']} records for {report['frames_asked']} frames",
        f"  RSS after start-up {report['rss_plateau_mb']} MB, at the end {report['rss_end_mb']} MB "
        f"({report['rss_growth_pct']} %), max {report['rss_max_mb']} MB, {len(report['rss_mb'])} samples",
        f"  dropped frames: {report['dropped_records']} records, the policy's count {report['dropped_policy']}",
        f"  latency capture to result (ms): {lat_text or 'none'}",
        f"  viewer page fetches: {report['viewer_fetches_ok']} answered, {report['viewer_fetches_failed']} not"])


def soak_png(report: dict, path) -> Path:
    """Two panels over run time: RSS (MB), and total latency p50/p99 per sampling window (ms)."""
    import cv2

    from runtime.drawing import draw_text, fill

    W, left, right, plot_h = 1000, 90, 30, 260
    tops = [100, 100 + plot_h + 90]
    H = tops[1] + plot_h + 70
    img = np.empty((H, W, 3), np.uint8)
    fill(img, WHITE)
    draw_text(img, f"Soak: {report['minutes']:g} min at {report['fps']:g} fps, all outputs on; RSS growth "
                   f"{report['rss_growth_pct']}% after start-up", (W / 2, 36), 20, INK, 700, align="center")
    draw_text(img, f"{report['records']} records, {report['dropped_records']} dropped (policy count "
                   f"{report['dropped_policy']}), exit {report['exit_code']}", (W / 2, 64), 14, GREY, align="center")
    t_max = max([t for t, _ in report["rss_mb"]] + [w[0] for w in report["latency_windows"]] + [1.0])
    plot_w = W - left - right

    def panel(top: int, label: str, series) -> None:
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
    panel(tops[1], f"Total latency per {report['sample_period_s']:g} s window (ms)",
          [([(x[0], x[1]) for x in w], BLUE, "p50"), ([(x[0], x[2]) for x in w], RED, "p99")])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise UserError(f"could not write the picture {path}: check that the folder is writable and the name ends "
                        f"in .png")
    return path
