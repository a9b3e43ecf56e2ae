"""Sinks and the overlay picture: what each output holds, checked by reading it back."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.preprocess import Region
from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sinks.jsonl import JsonlSink
from runtime.sinks.masks import MaskSink
from runtime.sinks.overlay import (BANNER_BG, PLACEHOLDER_BG, frame_scale, mask_to_frame, render_overlay,
                                   text_width, wrap_text)
from runtime.sinks.summary import StudySummary
from runtime.sinks.video import VideoSink

GREY = 100


def rect_mask(y0=50, y1=150, x0=60, x1=180) -> np.ndarray:
    m = np.zeros((224, 224), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def scored(frame=0, *, shape=(240, 320), region=Region(40, 8, 264, 232), grade=3,
           probs=(0.1, 0.2, 0.6, 0.1), total=10.0) -> FrameRecord:
    """A scored record on a flat grey frame whose 224x224 region sits at (40, 8)."""
    return FrameRecord(frame, "test", 100.0 + frame, accepted=True, mask_fraction=0.24, grade=grade,
                       probabilities=list(probs), latency_ms={"preprocess": 1.0, "unet": 2.0, "total": total},
                       mask=rect_mask(), display=np.full(shape, GREY, np.uint8), region=region)


def rejected(frame=0, total=40.0) -> FrameRecord:
    return FrameRecord(frame, "test", 100.0 + frame, accepted=False, mask_fraction=0.01,
                       latency_ms={"preprocess": 1.0, "unet": 2.0, "total": total}, mask=np.zeros((224, 224), np.uint8),
                       display=np.full((240, 320), GREY, np.uint8), region=None)


def error(frame=0, total=50.0) -> FrameRecord:
    return FrameRecord(frame, "test", 100.0 + frame, error=f"frame {frame}: truncated PNG file",
                       latency_ms={"total": total})


def dropped(frame=0) -> FrameRecord:
    return FrameRecord(frame, "test", 100.0 + frame, error=DROPPED)


# -- the protocol ----------------------------------------------------------------------------------------------
class Counting(Sink):
    def __init__(self):
        self.closes = 0

    def write(self, record):
        self._check_open()

    def _close(self):
        self.closes += 1


def test_sink_close_is_idempotent_and_the_context_manager_closes_once():
    with Counting() as s:
        s.write(scored())
    assert s.closed and s.closes == 1
    s.close()
    s.close()
    assert s.closes == 1
    with pytest.raises(ValueError, match="closed"):
        s.write(scored())


# -- JSONL -----------------------------------------------------------------------------------------------------
def test_jsonl_round_trips_each_record_as_one_line_flushed_as_it_goes(tmp_path):
    path = tmp_path / "deep" / "er" / "r.jsonl"
    recs = [scored(0), rejected(1), error(2), dropped(3)]
    path.parent.mkdir(parents=True)
    path.write_text("the previous run\n")
    sink = JsonlSink(path)
    sink.write(recs[0])
    sink.write(recs[1])
    assert sink.partial.parent == path.parent and sink.partial.name.startswith("r.partial-")
    assert len(sink.partial.read_text().splitlines()) == 2    # readable before close: flushed per line
    assert path.read_text() == "the previous run\n"           # the previous file until the run has finished
    sink.write(recs[2])
    sink.write(recs[3])
    sink.close()
    sink.close()
    assert not sink.partial.exists()
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [r.to_json() for r in recs]
    back = json.loads(lines[0])
    assert back["grade"] == 3 and back["probabilities"] == [0.1, 0.2, 0.6, 0.1] and back["latency_ms"]["total"] == 10
    assert json.loads(lines[2])["error"] == "frame 2: truncated PNG file" and json.loads(lines[2])["grade"] is None


# -- masks -----------------------------------------------------------------------------------------------------
def test_masks_are_written_as_0_255_pngs_named_by_frame_and_error_frames_write_none(tmp_path):
    folder = tmp_path / "m"
    with MaskSink(folder) as sink:
        for r in (scored(0), rejected(1), error(2), dropped(3), scored(17)):
            sink.write(r)
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "17.png"]
    m = cv2.imread(str(folder / "17.png"), cv2.IMREAD_UNCHANGED)
    assert m.dtype == np.uint8 and m.shape == (224, 224)
    assert np.array_equal(m, rect_mask() * 255)
    assert set(np.unique(m)) == {0, 255} and int((m == 255).sum()) == 100 * 120
    assert not cv2.imread(str(folder / "1.png"), cv2.IMREAD_UNCHANGED).any()


# -- overlay ---------------------------------------------------------------------------------------------------
def is_green(px) -> bool:
    b, g, r = (int(v) for v in px)
    return g >= 170 and g - r >= 100 and g - b >= 100


def test_mask_to_frame_maps_the_mask_back_into_its_region():
    m = np.zeros((224, 224), np.uint8)
    m[:112, :] = 1                                              # top half
    full = mask_to_frame(m, Region(10, 20, 122, 132), (200, 300))
    expected = np.zeros((200, 300), np.uint8)
    expected[20:76, 10:122] = 1
    assert np.array_equal(full, expected)
    assert np.array_equal(mask_to_frame(m, None, (224, 224)), m)


def test_overlay_enlarges_small_frames_and_has_an_even_size():
    img = render_overlay(scored())
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert frame_scale((240, 320)) == 2.0 and img.shape[0] >= 480 and img.shape[1] > 640
    assert img.shape[0] % 2 == 0 and img.shape[1] % 2 == 0
    assert render_overlay(scored(shape=(600, 800), region=Region(0, 0, 800, 600))).shape[0] >= 600


def test_overlay_contour_is_green_on_the_mask_border_and_the_frame_is_untouched_elsewhere():
    img = render_overlay(scored())                              # frame 240x320 shown at 2x from the top-left
    s = 2
    # The mask border in frame pixels: rows 8+50..8+149, columns 40+60..40+179.
    top, bottom, left, right = 58, 157, 100, 219
    for x in range(left + 2, right - 1):
        cx = (x + 0.5) * s - 0.5
        assert is_green(img[int((top + 0.5) * s - 0.5), int(cx)]), x       # top edge
        assert is_green(img[int((bottom + 0.5) * s), int(cx)]), x          # bottom edge
    for y in range(top + 2, bottom - 1):
        assert is_green(img[int((y + 0.5) * s), int((left + 0.5) * s - 0.5)]), y
        assert is_green(img[int((y + 0.5) * s), int((right + 0.5) * s)]), y
    # Inside and outside the kidney, away from the line: the grey frame as it was.
    for y, x in ((215, 320), (60, 60), (400, 600), (220, 150)):
        assert tuple(img[y, x]) == (GREY, GREY, GREY), (y, x)
    # Nothing green anywhere in the frame area except around the border.
    green = np.array([[is_green(p) for p in row] for row in img[:480:4, :640:4]])
    ys, xs = np.nonzero(green)
    assert ys.size and ys.min() * 4 >= top * s - 3 and ys.max() * 4 <= (bottom + 1) * s + 2
    assert xs.min() * 4 >= left * s - 3 and xs.max() * 4 <= (right + 1) * s + 2


def test_overlay_without_region_maps_the_mask_to_the_whole_frame():
    rec = scored(shape=(224, 224), region=None)
    img = render_overlay(rec)
    s = frame_scale((224, 224))
    assert is_green(img[int(round((50 + 0.5) * s - 0.5)), int(round((120 + 0.5) * s - 0.5))])


def test_overlay_disclaimer_banner_is_drawn_when_given_and_only_then():
    with_banner = render_overlay(scored(), disclaimer="synthetic demo model - not for clinical use")
    without = render_overlay(scored(), disclaimer=None)
    assert with_banner.shape[0] > without.shape[0] >= 480
    assert tuple(with_banner[-3, 3]) == BANNER_BG
    assert not np.array_equal(without[-3, 3], BANNER_BG)


def test_overlay_never_crashes_on_records_without_a_frame_or_mask():
    for rec in (error(), dropped(), FrameRecord(0, "x", 0.0), rejected()):
        img = render_overlay(rec, fps=None)
        assert img.dtype == np.uint8 and img.shape[0] >= 480 and img.shape[0] % 2 == 0
    img = render_overlay(error())
    assert tuple(img[5, 5]) == PLACEHOLDER_BG                    # the grey placeholder
    long_error = FrameRecord(3, "x", 0.0, error="x" * 400 + " word " * 200)
    assert render_overlay(long_error).shape[0] >= 480
    odd = scored(shape=(100, 131))
    odd.display = (np.arange(100 * 131, dtype=np.uint16).reshape(100, 131) * 3)    # 16-bit display frame
    odd.region = Region(5, 5, 126, 95)
    assert render_overlay(odd, disclaimer=None).shape[0] == 480


def test_wrapped_text_lines_fit_their_width():
    lines = wrap_text("frame 5: truncated PNG file c_truncated.png could not be decoded " + "z" * 80, 15, 200)
    assert len(lines) >= 3 and all(text_width(ln, 15) <= 200 for ln in lines)


# -- video -----------------------------------------------------------------------------------------------------
def read_video(path):
    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    fps = cap.get(cv2.CAP_PROP_FPS)
    decoded = 0
    while cap.read()[0]:
        decoded += 1
    cap.release()
    return n, decoded, size, fps


def test_video_has_one_frame_per_record_at_the_size_of_the_first_picture(tmp_path):
    path = tmp_path / "out" / "o.mp4"
    recs = [scored(0), scored(1), rejected(2), error(3), dropped(4),
            scored(5, shape=(500, 900), region=Region(100, 50, 600, 450)), scored(6)]
    with VideoSink(path, fps=12.0) as sink:
        for r in recs:
            sink.write(r)
    first = render_overlay(recs[0])
    n, decoded, size, fps = read_video(path)
    assert n == decoded == len(recs) == sink.frames
    assert size == (first.shape[1], first.shape[0]) == sink.size
    assert fps == pytest.approx(12.0)


def test_video_writer_that_cannot_open_names_the_path(tmp_path):
    path = tmp_path / "taken.xyz"                               # no container OpenCV knows
    sink = VideoSink(path)
    with pytest.raises(OSError, match="taken.xyz"):
        sink.write(scored())
    with pytest.raises(OSError, match="taken.xyz") as e:        # and it keeps saying so, cheaply
        sink.write(scored())
    assert sink.fail(e.value).startswith("cannot write video") and "taken.xyz" in sink.failed
    sink.close()
    assert list(tmp_path.iterdir()) == []                       # nothing left behind


def test_video_is_a_fragmented_mp4_with_one_fragment_per_second(tmp_path):
    """One `moof` box per second of video (a key frame each second): no per-frame index grows in memory over an
    endless run, and a crash leaves the whole seconds readable."""
    path = tmp_path / "o.mp4"
    with VideoSink(path, fps=5.0) as sink:
        for i in range(23):
            sink.write(scored(i))
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and data.count(b"moof") == 5          # frames 0-4, 5-9, ..., 20-22
    assert read_video(path)[:2] == (23, 23)


def test_video_appears_at_its_path_only_when_finished_and_readable(tmp_path):
    path = tmp_path / "o.mp4"
    path.write_bytes(b"the previous run")
    sink = VideoSink(path, fps=10)
    for i in range(3):
        sink.write(scored(i))
    assert path.read_bytes() == b"the previous run" and sink.partial.exists()
    sink.close()
    assert read_video(path)[:2] == (3, 3) and not sink.partial.exists()
    discarded = VideoSink(path, fps=10)                         # a run that did not start
    discarded.write(scored(0))
    discarded.discard()
    discarded.close()
    assert read_video(path)[:2] == (3, 3) and sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


def test_a_video_on_a_full_disk_stops_in_one_sentence_and_leaves_no_unreadable_file(tmp_path, monkeypatch):
    import runtime.sinks.video as video
    path = tmp_path / "o.mp4"
    sink = VideoSink(path, fps=10)
    sink.write(scored(0))
    monkeypatch.setattr(video, "MIN_FREE_BYTES", 1 << 62)      # every disk is full now
    with pytest.raises(OSError) as e:
        sink.write(scored(1))
    msg = sink.fail(e.value)
    assert msg.startswith(f"video {path} could not be written after 1 frames (No space left on device)")
    sink.close()
    assert list(tmp_path.iterdir()) == []


def test_results_on_a_failing_disk_keep_every_complete_record_and_say_so_once(tmp_path):
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path)
    sink.write(scored(0))
    sink.write(scored(1))

    class Full:                                   # a raw file that takes half a line, then reports a full disk
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 1:
                return self.f.write(data[:len(data) // 2])
            raise OSError(28, "No space left on device")

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
    sink._file = Full(sink._file)
    with pytest.raises(OSError) as e:
        sink.write(scored(2))
    msg = sink.fail(e.value)
    assert msg == (f"results {path} could not be written after 2 records (No space left on device); it keeps "
                   f"those 2 records and takes no more") == sink.fail(OSError("again"))
    with pytest.raises(ValueError):
        sink.write(scored(3))
    sink.close()
    assert [json.loads(x)["frame"] for x in path.read_text().splitlines()] == [0, 1]   # the torn line cut off


def test_masks_on_a_failing_disk_keep_the_whole_pngs_written(tmp_path):
    """A real failing write: after the first mask the process may write no file over 16 bytes (RLIMIT_FSIZE), so
    the second PNG fails part way (EFBIG). The first stays whole, nothing half-written is left, and the sink says
    what it kept."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sinks import scored
        from runtime.sinks.masks import MaskSink
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        sink = MaskSink({str(tmp_path / "m")!r})
        sink.write(scored(0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
        try:
            sink.write(scored(1))
        except OSError as e:
            print(sink.fail(e))
            sink.close()
            sys.exit(0)
        sys.exit("the second mask was written")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"masks {tmp_path / 'm'} could not be written after 1 masks")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["0.png"]
    assert cv2.imread(str(tmp_path / "m" / "0.png"), cv2.IMREAD_GRAYSCALE) is not None     # whole


def test_output_paths_that_cannot_work_are_refused_before_anything_is_written(tmp_path):
    from runtime.errors import UserError
    from runtime.sinks.outputs import check_outputs
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {
        "are the same path": ([("--results", tmp_path / "a"), ("--video", tmp_path / "." / "a")], []),
        "is a folder": ([("--results", tmp_path / "dir")], []),
        "is a file, not a folder": ([("--video", tmp_path / "file" / "o.mp4")], []),
        "is a file: give a folder": ([], [("--save-masks", tmp_path / "file")]),
        "is not a regular file": ([("--video", "/dev/null")], []),
    }
    for phrase, (files, folders) in cases.items():
        with pytest.raises(UserError, match=phrase):
            check_outputs(files, folders)
    with pytest.raises(UserError, match="is the source being read"):
        check_outputs([("--video", tmp_path / "file")], inputs=[tmp_path / "file"])
    check_outputs([("--results", "/dev/null"), ("--video", tmp_path / "new" / "deeper" / "o.mp4")],
                  [("--save-masks", tmp_path / "m")], stream_ok=("--results",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]        # nothing was made


# -- study summary ---------------------------------------------------------------------------------------------
def test_study_summary_counts_grades_and_latency_percentiles_from_known_records(tmp_path):
    path = tmp_path / "s" / "study.json"
    recs = [scored(0, grade=3, probs=(0.1, 0.2, 0.6, 0.1), total=10.0),
            scored(1, grade=2, probs=(0.1, 0.5, 0.3, 0.1), total=20.0),
            scored(2, grade=3, probs=(0.0, 0.2, 0.7, 0.1), total=30.0),
            rejected(3, total=40.0), error(4, total=50.0), dropped(5)]
    with StudySummary(path, disclaimer="synthetic demo model - not for clinical use") as study:
        for r in recs:
            study.write(r)
    s = study.summary()
    assert (s["frames"], s["accepted"], s["rejected"], s["errors"], s["dropped"]) == (6, 3, 1, 1, 1)
    assert s["grade_counts"] == {"1": 0, "2": 1, "3": 2, "4": 0}
    assert s["mean_probabilities"] == pytest.approx([0.2 / 3, 0.9 / 3, 1.6 / 3, 0.3 / 3], abs=1e-6)
    assert s["final_grade"] == 3 and s["confidence"] == pytest.approx(1.6 / 3, abs=1e-6)
    # total over [10, 20, 30, 40, 50], linear interpolation: p95 = 40 + 0.8 * 10, p99 = 40 + 0.96 * 10
    assert s["latency_ms"]["total"] == {"p50": 30.0, "p95": 48.0, "p99": 49.6, "max": 50.0}
    assert s["latency_ms"]["preprocess"] == {"p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0}
    assert list(s["latency_ms"]) == ["preprocess", "unet", "total"]
    assert s["disclaimer"] == "synthetic demo model - not for clinical use"
    assert json.loads(path.read_text()) == s


def test_study_summary_without_accepted_frames_has_no_grade():
    study = StudySummary()
    for r in (rejected(0), error(1)):
        study.write(r)
    study.close()
    s = study.summary()
    assert s["final_grade"] is None and s["confidence"] is None and s["mean_probabilities"] is None
    assert s["grade_counts"] == {"1": 0, "2": 0, "3": 0, "4": 0} and "disclaimer" not in s
    assert StudySummary().summary()["latency_ms"] == {}


def _endless(study, n, rng):
    """Feed `n` scored records with lognormal stage latencies (one record object, mutated: only the summary's own
    memory is measured); returns the latencies fed, per stage."""
    stages = ("queue", "preprocess", "unet", "gate", "vgg", "booster", "total")
    lat = {s: rng.lognormal(1.0 + i / 3, 0.5, n) for i, s in enumerate(stages)}
    lat["gate"][: n // 100] = 0.0                       # some zero times, as a stage that did nothing reports
    rec = FrameRecord(0, "test", 100.0, accepted=True, mask_fraction=0.24, grade=3, probabilities=[0.1, 0.2, 0.6, 0.1])
    cols = {s: v.tolist() for s, v in lat.items()}
    for i in range(n):
        rec.frame, rec.t_capture = i, 100.0 + i / 30
        rec.latency_ms = {s: cols[s][i] for s in stages}
        study.write(rec)
    return lat


def test_study_summary_memory_is_bounded_and_its_percentiles_within_the_stated_error():
    """An endless run (issue 12, item 7): the summary's memory does not grow with the frame count (old: 8 bytes
    per frame and stage, 11 MB here), and its latency percentiles stay within LatencySketch.RELATIVE_ERROR (0.5 %)
    of numpy's on the same values; max exact."""
    import copy
    import tracemalloc

    from runtime.stats import LatencySketch
    rng = np.random.default_rng(12)
    held = {}
    for n in (5_000, 200_000):
        study = StudySummary(smoothing_half_life=10)
        lat = _endless(study, n, rng)
        tracemalloc.start()                  # what the summary holds: the bytes a deep copy of it allocates
        twin = copy.deepcopy(study)
        held[n] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert twin.summary() == study.summary()
        s = study.summary()
        assert s["frames"] == s["accepted"] == n
        for stage, values in lat.items():
            want = np.percentile(values, [50, 95, 99])
            got = s["latency_ms"][stage]
            for q, w in zip(("p50", "p95", "p99"), want):
                assert got[q] == pytest.approx(w, rel=LatencySketch.RELATIVE_ERROR, abs=1e-4), (stage, q)
            assert got["max"] == round(float(values.max()), 4)
        assert set(s["latency_ms"]["total"]) == {"p50", "p95", "p99", "max"}
    assert held[200_000] < 1_000_000, held                     # the summary, all of it, under 1 MB (~260 kB)
    assert held[200_000] < held[5_000] + 50_000, held          # and no more for 40x the frames


def test_overlay_falls_back_to_hershey_fonts_where_opencv_has_no_truetype(monkeypatch):
    import runtime.drawing as drawing
    monkeypatch.setattr(drawing, "_FACE", [None])               # as on OpenCV 4.x
    img = render_overlay(scored(), disclaimer="synthetic demo model \u2014 not for clinical use")
    assert img.shape == render_overlay(scored(), disclaimer="synthetic demo model - not for clinical use").shape
    assert is_green(img[int((58 + 0.5) * 2 - 0.5), 2 * 150])


def test_every_sink_gets_one_record_per_input_frame_through_the_stream(tmp_path):
    from runtime.sources import Frame
    from runtime.stream import run_stream

    def process(frame, t0):
        if frame.index == 4:
            return error(4)
        return scored(frame.index) if frame.index % 3 else rejected(frame.index)

    frames = (Frame(i, "test", 0.0, np.zeros((8, 8), np.uint8)) for i in range(10))
    sinks = [JsonlSink(tmp_path / "r.jsonl"), MaskSink(tmp_path / "m"), VideoSink(tmp_path / "o.mp4", fps=10),
             StudySummary(tmp_path / "s.json")]
    stats = run_stream(frames, process, sinks, policy="all")
    for s in sinks:
        s.close()
    assert stats.sink_errors == []
    assert [json.loads(x)["frame"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == list(range(10))
    assert len(list((tmp_path / "m").glob("*.png"))) == 9
    assert read_video(tmp_path / "o.mp4")[:2] == (10, 10)
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["frames"], s["accepted"], s["rejected"], s["errors"]) == (10, 5, 4, 1)


def test_a_video_name_the_sink_cannot_write_is_refused_by_the_start_up_check(tmp_path):
    """Issue 27 item 15: the video sink's own rule (runtime.sinks.video.SUFFIXES), in check_outputs."""
    from runtime.errors import UserError
    from runtime.sinks.outputs import check_outputs
    from runtime.sinks.video import SUFFIXES
    assert SUFFIXES == (".mp4", ".m4v")
    for name in ("o.avi", "o.mkv", "o", "o.mp4.part"):
        with pytest.raises(UserError, match=r"must end in \.mp4 or \.m4v"):
            check_outputs([("--video", tmp_path / name)])
    check_outputs([("--video", tmp_path / "o.MP4"), ("--results", tmp_path / "r.avi")])   # results: any name
    assert not list(tmp_path.iterdir())


def test_partial_names_are_new_each_time_and_never_reopened(tmp_path):
    """Issue 27 item 4: the partial name is not the process id (a restarted container's PID 1 again) but the time
    and 8 random hex digits; `claim_partial` creates it exclusively."""
    import os
    import re
    from runtime.sinks import claim_partial, partial_path
    names = {partial_path(tmp_path / "r.jsonl").name for _ in range(50)}
    assert len(names) == 50 and all(re.fullmatch(r"r\.partial-\d{8}T\d{6}Z-[0-9a-f]{8}\.jsonl", n) for n in names)
    p = partial_path(tmp_path / "r.jsonl")
    os.close(claim_partial(p))
    with pytest.raises(FileExistsError):
        claim_partial(p)


def test_an_earlier_partial_beside_the_results_is_kept_as_recovered(tmp_path, capsys):
    from runtime.sinks.jsonl import JsonlSink
    old = tmp_path / "r.partial-1.jsonl"              # what a run of an earlier version (PID 1) left
    old.write_bytes(b'{"frame": 0}\n{"frame": 1}\n')
    (tmp_path / "r.partial-20240101T000000Z-00000000.jsonl").write_bytes(b"")   # empty: nothing to keep
    (tmp_path / "q.partial-1.jsonl").write_bytes(b"another output's\n")         # not this output's
    sink = JsonlSink(tmp_path / "r.jsonl")
    err = capsys.readouterr().err.strip().splitlines()
    [rec] = tmp_path.glob("r.recovered-*.jsonl")
    assert rec.read_bytes() == b'{"frame": 0}\n{"frame": 1}\n' and not old.exists()
    assert len(err) == 1 and rec.name in err[0] and str(tmp_path / "r.jsonl") in err[0]
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q.partial-1.jsonl", rec.name, "r.jsonl"])
