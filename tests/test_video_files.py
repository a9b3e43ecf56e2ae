"""Video files that end early, and paths that are not files (issue 12, items 6 and 10), on real files: OpenCV writes
the video, a small MP4 box rewrite moves its index (moov) to the front, as `ffmpeg -movflags +faststart` does, and
the file is cut in the middle of its frame data. A FIFO is a real `os.mkfifo`; the command runs in a subprocess with
a timeout, so a source that blocks on it fails the test instead of hanging it."""
import contextlib
import errno
import json
import os
import struct
import threading

import cv2
import numpy as np
import pytest

from runtime.sources import SourceError, open_source
from runtime.sources import files
from runtime.sources.files import VideoSource
from tests.conftest import sonoscore

W, H, N = 64, 48, 20
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def write_video(path, fourcc="mp4v", n=N):
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (W, H))
    assert out.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(n):
        out.write(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))   # noise: every frame is a sizeable sample
    out.release()
    return path


def top_boxes(b):
    at = 0
    while at + 8 <= len(b):
        size, kind = struct.unpack(">I4s", b[at:at + 8])
        yield kind, at, size
        at += size


def _shift_chunk_offsets(b, start, end, delta):
    """The boxes in b[start:end] with every stco/co64 chunk offset moved by delta."""
    out, at = bytearray(), start
    while at < end:
        size, kind = struct.unpack(">I4s", b[at:at + 8])
        box = bytearray(b[at:at + size])
        if kind in _CONTAINERS:
            box = box[:8] + _shift_chunk_offsets(b, at + 8, at + size, delta)
        elif kind in (b"stco", b"co64"):
            width, fmt = (4, ">I") if kind == b"stco" else (8, ">Q")
            for k in range(struct.unpack(">I", box[12:16])[0]):
                o = 16 + width * k
                box[o:o + width] = struct.pack(fmt, struct.unpack(fmt, box[o:o + width])[0] + delta)
        out += box
        at += size
    return out


def sample_sizes(moov: bytes) -> list[int]:
    i = moov.index(b"stsz")
    uniform, count = struct.unpack(">II", moov[i + 8:i + 16])
    return [uniform] * count if uniform else list(struct.unpack(f">{count}I", moov[i + 16:i + 16 + 4 * count]))


def faststart_mp4(src, dst):
    """OpenCV's MP4 (ftyp, free, mdat, moov) rewritten with moov before mdat; returns (mdat payload offset, the
    samples' sizes) of the new file. OpenCV writes one video track, its samples in order in mdat."""
    b = src.read_bytes()
    boxes = list(top_boxes(b))
    assert [k for k, _, _ in boxes][-2:] == [b"mdat", b"moov"]
    _, m_at, m_size = boxes[-1]
    moov = bytes(_shift_chunk_offsets(b, m_at, m_at + m_size, m_size))
    out = bytearray()
    for kind, at, size in boxes:
        if kind == b"mdat":
            out += moov
            payload = len(out) + 8
        if kind != b"moov":
            out += b[at:at + size]
    dst.write_bytes(bytes(out))
    return payload, sample_sizes(moov)


@pytest.fixture
def faststart(tmp_path):
    path = tmp_path / "clip.mp4"
    payload, sizes = faststart_mp4(write_video(tmp_path / "opencv.mp4"), path)
    assert [k for k, _, _ in top_boxes(path.read_bytes())][:3] == [b"ftyp", b"free", b"moov"]
    assert len(sizes) == N
    return path, payload, sizes


def cut(path, n_bytes, dst):
    dst.write_bytes(path.read_bytes()[:n_bytes])
    return dst


def test_complete_videos_end_without_an_error(faststart, tmp_path):
    path, _, _ = faststart
    for video in (path, tmp_path / "opencv.mp4", write_video(tmp_path / "clip.avi", "MJPG")):
        src = VideoSource(video)
        frames = list(src)
        assert src.total == N and len(frames) == N and src.truncated is None
        assert all(f.error is None and f.pixels.shape == (H, W, 3) for f in frames)
        assert files.container_shortfall(video)[1] == 0


def test_a_faststart_mp4_cut_mid_file_ends_with_one_error_counting_the_missing_frames(faststart, tmp_path):
    path, payload, sizes = faststart
    end13 = payload + sum(sizes[:13])
    video = cut(path, end13 + sizes[13] // 2, tmp_path / "cut.mp4")    # half of frame 14's data is there
    src = open_source(str(video))
    assert isinstance(src, VideoSource) and src.total == N            # the index still declares 20
    frames = list(src)
    good = [f for f in frames if f.error is None]
    assert 12 <= len(good) <= 14                                       # the decoder may conceal a partial frame
    assert all(f.pixels is not None for f in good)
    last = frames[-1]
    assert len(frames) == len(good) + 1 and last.pixels is None and last.index == len(good)
    k = len(good)
    assert last.error == (f"the video ends after {k} of the {N} frames its index declares: the file is truncated "
                          f"({N - k} frames missing); re-copy or re-export the video")
    assert src.truncated == last.error and str(video.name) not in last.error


def test_a_cut_exactly_between_frames_is_still_noticed(faststart, tmp_path):
    path, payload, sizes = faststart
    video = cut(path, payload + sum(sizes[:13]), tmp_path / "cut.mp4")
    frames = list(VideoSource(video))
    assert [f.error is None for f in frames] == [True] * 13 + [False]
    assert frames[-1].error.startswith("the video ends after 13 of the 20 frames its index declares: the file is "
                                       "truncated (7 frames missing)")


def test_a_cut_inside_the_last_frame_is_noticed_even_when_every_frame_decodes(faststart, tmp_path):
    path, _, sizes = faststart
    video = cut(path, len(path.read_bytes()) - sizes[-1] // 3, tmp_path / "cut.mp4")
    assert files.container_shortfall(video) == ("MP4", sizes[-1] // 3)
    frames = list(VideoSource(video))
    assert frames[-1].error is not None and frames[-1].pixels is None
    assert "the file is truncated" in frames[-1].error
    assert all(f.error is None for f in frames[:-1]) and len(frames) - 1 in (N - 1, N)


def test_a_truncated_avi_is_noticed_too(tmp_path):
    whole = write_video(tmp_path / "clip.avi", "MJPG").read_bytes()
    video = cut(tmp_path / "clip.avi", len(whole) * 6 // 10, tmp_path / "cut.avi")
    frames = list(VideoSource(video))
    k = len(frames) - 1
    assert 0 < k < N and all(f.error is None for f in frames[:-1])
    assert frames[-1].error.startswith(f"the video ends after {k} of the {N} frames its index declares: the file "
                                       f"is truncated ({N - k} frames missing)")


def test_run_on_a_truncated_mp4_exits_3_with_the_error_in_the_results(faststart, tmp_path, tiny_bundle):
    path, payload, sizes = faststart
    video = cut(path, payload + sum(sizes[:13]), tmp_path / "cut.mp4")
    res = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", video, "--results", res, "--quiet")
    assert r.returncode == 3, r.stderr
    recs = [json.loads(line) for line in res.read_text().splitlines()]
    assert [x["frame"] for x in recs] == list(range(14))
    assert all(x["error"] is None for x in recs[:13])
    assert recs[13]["error"].startswith("the video ends after 13 of the 20 frames its index declares")


@contextlib.contextmanager
def unblocked_after(fifo, seconds=5.0):
    """If the code under test opens `fifo` for reading (and so blocks until a writer comes), a writer comes after
    `seconds` (and again whenever a reader waits) and closes at once: the reader sees an empty stream and the test
    fails instead of hanging.
    Yields a list that holds True once the writer had to come."""
    came, done = [], threading.Event()

    def writer():
        if done.wait(seconds):
            return
        while not done.is_set():             # every time a reader waits (the code may open it again)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))   # ENXIO while no reader has it open
                came.append(True)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    return
            done.wait(0.05)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        yield came
    finally:
        done.set()
        t.join(5)


@pytest.mark.parametrize("name", ["feed", "feed.mp4", "feed.png"])
def test_a_fifo_is_refused_in_one_sentence_without_being_opened(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with unblocked_after(fifo) as came, pytest.raises(SourceError) as e:
        open_source(str(fifo))                  # would block forever if it opened the pipe for reading
    assert not came
    msg = str(e.value)
    assert msg == (f"source '{fifo}' is a named pipe (FIFO), which this runtime does not read; give an image, a "
                   f"folder of images, a video or DICOM file, or a live feed as v4l2://, gst:// or igtl://")


def test_a_socket_and_a_link_to_a_fifo_are_refused_too(tmp_path):
    import socket
    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(SourceError, match=r"is a socket, which this runtime does not read"):
            open_source(str(sock_path))
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / "link.mp4")
    with unblocked_after(tmp_path / "fifo") as came, \
            pytest.raises(SourceError, match=r"is a named pipe \(FIFO\)"):
        open_source(str(tmp_path / "link.mp4"))
    assert not came


def test_a_character_device_goes_to_the_capture_path():
    """/dev/null is a character device but no capture device: the capture source's own sentence says so (a real
    /dev/videoN opens as v4l2:///dev/videoN)."""
    with pytest.raises(SourceError, match=r"^v4l2:///dev/null: the device exists but OpenCV could not open it"):
        open_source("/dev/null")


def test_run_with_a_fifo_source_exits_2_without_hanging(tmp_path, tiny_bundle):
    fifo = tmp_path / "feed.mp4"
    os.mkfifo(fifo)
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", fifo, "--results", tmp_path / "r.jsonl", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "is a named pipe (FIFO), which this runtime does not read" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r.jsonl").exists()
