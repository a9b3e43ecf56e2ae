"""`--video`: the annotated stream as MP4, one overlay picture (runtime/sinks/overlay.py) per input frame."""
from __future__ import annotations

import errno
import os
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from runtime.errors import UserError
from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink, claim_partial, fsync_path, partial_path, reason, recover_partials, target_path
from runtime.sinks.overlay import DEFAULT_CLASS_NAMES, PANEL_BG, fill, render_overlay


MIN_FREE_BYTES = 256 * 1024        # less than this is a full disk for the video
SUFFIXES = (".mp4", ".m4v")        # the file names the writer takes: it writes MP4 only


def check_path(path: str | Path, label: str = "--video") -> None:
    """Refuse, before anything runs, a video path this sink cannot write (its name, and the file a link at it
    leads to, must end in one of SUFFIXES): UserError, one sentence."""
    for name in (Path(path), target_path(path)):
        if name.suffix.lower() not in SUFFIXES:
            raise UserError(f"{label} {path} cannot be written: the video is MP4 only, so its file name must end in "
                            f"{' or '.join(SUFFIXES)} (e.g. {Path(path).with_suffix('.mp4').name})")


class VideoSink(Sink):
    """MP4 (MPEG-4 Part 2, the codec of OpenCV's 'mp4v'), written with PyAV as a fragmented MP4, played back at
    `fps` (the source's rate).

    Fragmented (`movflags frag_keyframe+empty_moov`, a key frame each second): the muxer writes each second's
    frames with their own small index (a `moof` box) and then forgets them, so an endless run holds no growing
    sample table in memory (a plain MP4 keeps about 70 bytes per frame until it is closed), and a file cut short
    by a crash or SIGKILL still reads up to its last whole second.

    One video frame per record, so the video lasts as long as the stream did. The first picture fixes the video
    size; a later picture of another size is scaled to fit it, aspect kept, and padded. A frame dropped by the
    `newest` policy repeats the last picture rather than flashing a placeholder. The rate printed on the
    pictures is the measured processing rate (records that went through the pipeline, last 30).

    The video is written to `partial` (`o.partial-<time>-<random>.mp4` beside `o.mp4`, `runtime.sinks.partial_path`; an earlier run's left there is
    kept first as `o.recovered-<time>-<random>.mp4`, `recover_partials`) and `close()` flushes the encoder
    (the last fragment is written then), reads the file back and renames it into place: the file at the path is
    the previous run's until this one has finished, and never an unreadable one. A write that fails (a full disk)
    raises; a disk with almost no space left is taken as full before the write (`_check_space`), and a file that
    does not read back at the end is removed and `close()` raises OSError.
    After `fail()` (a picture that could not be made or written), `close()` keeps the frames written before.
    """

    def __init__(self, path: str | Path, fps: float = 30.0, disclaimer: str | None = None,
                 class_names: Sequence[str] = DEFAULT_CLASS_NAMES, model: str | None = None):
        self.path = Path(path)
        self.target = target_path(self.path)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        recover_partials(self.target, self.label)
        self.partial = partial_path(self.target)
        self._lock: int | None = None        # claim_partial's descriptor, from the first picture to the end
        self.fps = float(fps) if fps and fps > 0 else 30.0
        self.disclaimer = disclaimer
        self.class_names = class_names
        self.model = model              # the bundle's "<name> <version>" (Bundle.label), on every picture
        self.size: tuple[int, int] | None = None        # (width, height), fixed by the first picture
        self.frames = 0
        self._writer: _Writer | None = None
        self._open_error: OSError | None = None
        self._disk_full = False
        self._last: np.ndarray | None = None
        self._done: deque[float] = deque(maxlen=30)    # perf_counter() of the latest processed records

    @property
    def label(self) -> str:
        return f"video {self.path}"

    def processing_fps(self) -> float | None:
        if len(self._done) < 2 or self._done[-1] <= self._done[0]:
            return None
        return (len(self._done) - 1) / (self._done[-1] - self._done[0])

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        if self._open_error is not None:
            raise self._open_error
        if self.failed:
            raise ValueError(self.failed)
        if record.error == DROPPED and self._last is not None:
            picture = self._last
        else:
            if "total" in record.latency_ms:
                self._done.append(time.perf_counter())
            picture = render_overlay(record, fps=self.processing_fps(), disclaimer=self.disclaimer,
                                     class_names=self.class_names, model=self.model)
        if self._writer is None:
            self._open(picture.shape[1], picture.shape[0])
        picture = self._fit(picture)
        self._check_space()
        self._writer.write(picture)
        self._last = picture
        self.frames += 1

    def _check_space(self) -> None:
        """OpenCV's writer does not report a failed write; a disk with (almost) no space left is taken as one."""
        try:
            st = os.statvfs(self.partial.parent)
        except OSError:
            return
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        if free < MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.partial))

    def _open(self, width: int, height: int) -> None:
        width, height = width + width % 2, height + height % 2     # 4:2:0 chroma needs even sides; _fit pads
        try:
            self._lock = claim_partial(self.partial)
            writer = _Writer(self.partial, self.fps, width, height)
        except (OSError, ValueError, ImportError) as e:
            self.partial.unlink(missing_ok=True)
            self._open_error = OSError(
                f"cannot write video {self.path}: the MP4 writer (MPEG-4, {width}x{height}, {self.fps:g} fps) did "
                f"not open ({reason(e)}); check that the folder is writable and the file name ends in .mp4")
            raise self._open_error from None
        self._writer, self.size = writer, (width, height)

    def _fit(self, picture: np.ndarray) -> np.ndarray:
        w, h = self.size
        ph, pw = picture.shape[:2]
        if (pw, ph) == (w, h):
            return picture
        s = min(w / pw, h / ph)
        nw, nh = max(1, min(w, int(round(pw * s)))), max(1, min(h, int(round(ph * s))))
        out = np.empty((h, w, 3), np.uint8)
        fill(out, PANEL_BG)
        x, y = (w - nw) // 2, (h - nh) // 2
        out[y:y + nh, x:x + nw] = cv2.resize(picture, (nw, nh), interpolation=cv2.INTER_AREA if s < 1
                                             else cv2.INTER_LINEAR)
        return out

    def _failure(self, error: BaseException) -> str:
        self._disk_full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        if error is self._open_error:
            return str(error)
        return (f"video {self.path} could not be written after {self.frames} frames ({reason(error)}); it takes "
                f"no more, and is kept only if what was written reads back")

    def _close(self) -> None:
        try:
            self._finish()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _finish(self) -> None:
        if self._writer is None:
            if self._lock is not None:
                self.partial.unlink(missing_ok=True)
            return                      # nothing was written: the file at the path stays as it was
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except OSError:
            if not self._disk_full and not self.failed:
                self.partial.unlink(missing_ok=True)
                raise
        if self._disk_full:             # said in fail()'s sentence; what was written cannot be whole
            self.partial.unlink(missing_ok=True)
            return
        readable = _readable_frames(self.partial)
        if readable != self.frames or self.frames == 0:
            self.partial.unlink(missing_ok=True)
            if self.failed:             # already said in fail()'s sentence
                return
            raise OSError(f"video {self.path} could not be written: of its {self.frames} frames {readable} read "
                          f"back (is the disk full?), so it was removed")
        fsync_path(self.partial)
        os.replace(self.partial, self.target)

    def _discard(self) -> None:
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None
        if self._lock is not None:
            self.partial.unlink(missing_ok=True)
        self._release()


class _Writer:
    """A fragmented MP4 (MPEG-4 Part 2, yuv420p, a key frame each second) written through PyAV (FFmpeg)."""

    MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"

    def __init__(self, path: Path, fps: float, width: int, height: int):
        import av
        from fractions import Fraction
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError("it writes MP4 only, and the name does not end in .mp4")
        self._av = av
        rate = Fraction(fps).limit_denominator(1001)
        self.container = av.open(str(path), mode="w", format="mp4", options={"movflags": self.MOVFLAGS})
        try:
            stream = self.container.add_stream("mpeg4", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = max(1, int(round(fps)))
            stream.bit_rate = int(min(fps * width * height, 1 << 30))   # OpenCV's rate for 'mp4v': sharp overlays
            stream.time_base = Fraction(1, 1) / rate
        except BaseException:
            self.container.close()
            raise
        self.stream = stream
        self.frames = 0

    def write(self, bgr: np.ndarray) -> None:
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(bgr), format="bgr24")
        frame.pts = self.frames
        self.frames += 1
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        """Flush the encoder and the last fragment; raises OSError when the file cannot take them."""
        try:
            self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()

    def abandon(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 -- the file is removed next; nothing to report
            pass


def _readable_frames(path: Path) -> int:
    """How many frames the file's index holds, 0 when it does not open or its last frame does not decode."""
    if not path.is_file():
        return 0
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return 0
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n <= 0:
            return 0
        cap.set(cv2.CAP_PROP_POS_FRAMES, n - 1)
        ok, _ = cap.read()
        return n if ok else 0
    finally:
        cap.release()
