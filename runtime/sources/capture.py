"""Capture cards and cameras through OpenCV.

    v4l2:///dev/video0?width=1920&height=1080&fps=30&fourcc=MJPG     (also v4l2://0)   -> cv2.CAP_V4L2
    v4l2:///dev/v4l/by-id/usb-<card>-video-index0                    (a name that survives re-plugging)
    gst://<GStreamer pipeline ending in appsink>                                       -> cv2.CAP_GSTREAMER

Frames come as OpenCV gives them: BGR (`channel_order="BGR"`), or gray when the pipeline delivers GRAY8; live.
`t_capture` is `time.time()` when `grab()` returned, or, for V4L2, the driver's buffer timestamp (read through
CAP_PROP_POS_MSEC, CLOCK_MONOTONIC) moved onto the wall clock when it is plausible (less than 1 s old).

When the device stops giving frames (cable pulled, card reset: `grab()` fails), the source releases it and re-opens
it with back-off (0.5 s doubling to 5 s) until it works again or the run ends; the run goes on. `reconnects`,
`gap_s` and `gap_frames` (gap seconds x nominal frame rate, minus the one normal interval) count what was lost, and
the first frame after a gap carries `meta["gap_s"]`, `meta["gap_frames"]` and `meta["reconnects"]`.

A run ends after `frames=N` frames, `duration=S` seconds, `timeout=S` seconds without a frame (also while
re-opening), or when the source is closed; otherwise it runs until stopped.

`CaptureSource(target, api=...)` takes any OpenCV capture target; the tests use it with CAP_FFMPEG on a named pipe
that a writer feeds in real time, which exercises the very same read / re-open / gap code on this machine.
"""
from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import cv2

from runtime.sources.base import Frame, Source, SourceError, now, opaque_id
from runtime.sources.reconnect import (Backoff, EndOfRun, LinkCounters, LinkStats, RateEstimate, Reconnects, RunEnd,
                                       describe, parse_options, positive_float, positive_int, retry_open)

log = logging.getLogger(__name__)

# OpenCV's own warnings for a failed open ("can't open camera by index") are replaced by our one-sentence errors
# and the reconnect log (runtime.sources.files does the same for decoder warnings).
if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

PLAUSIBLE_AGE_S = 1.0   # a driver timestamp older than this is not on CLOCK_MONOTONIC (or not meaningful)


def _fourcc(value) -> str:
    text = str(value).strip()
    if len(text) != 4 or not text.isprintable():
        raise ValueError("a four-character code such as MJPG or YUYV")
    return text.upper()


OPTIONS = {
    "width": positive_int,
    "height": positive_int,
    "fps": positive_float,
    "fourcc": _fourcc,
    "buffersize": positive_int,
    "frames": positive_int,
    "timeout": positive_float,
    "duration": positive_float,
    "backoff": positive_float,
    "backoff_max": positive_float,
}
LIVE_ONLY = ("frames", "timeout", "duration", "backoff", "backoff_max")   # the options a gst:// source takes


_End = EndOfRun  # closed, or a duration/timeout passed (runtime.sources.reconnect.RunEnd)


def has_backend(api: int) -> bool:
    """Whether this OpenCV can capture through `api` (built in, or as a loadable plugin)."""
    registry = getattr(cv2, "videoio_registry", None)
    if registry is not None and hasattr(registry, "hasBackend"):
        try:
            return bool(registry.hasBackend(api))
        except cv2.error:
            pass
    label = {cv2.CAP_GSTREAMER: "GStreamer", cv2.CAP_V4L2: "v4l/v4l2"}.get(api)
    if label is None:
        return True
    m = re.search(rf"^\s*{re.escape(label)}:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return bool(m) and m.group(1).upper() != "NO"


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class CaptureSource(RunEnd, LinkCounters, Source):
    live = True

    def __init__(self, target: str | int, *, api: int = cv2.CAP_ANY, name: str | None = None,
                 width: int | None = None, height: int | None = None, fps: float | None = None,
                 fourcc: str | None = None, buffersize: int | None = None, frames: int | None = None,
                 timeout: float | None = None, duration: float | None = None, backoff: float = 0.5,
                 backoff_max: float = 5.0, open_error: str | None = None):
        self.target, self.api = target, api
        self.name = name or str(target)
        self.source_id = opaque_id(self.name, "capture")
        self.width, self.height, self.requested_fps = width, height, fps
        self.fourcc, self.buffersize = fourcc, buffersize
        self.total = frames
        self.timeout, self.duration = timeout, duration
        self.backoff, self.backoff_max = float(backoff), max(float(backoff_max), float(backoff))
        self.link = LinkStats()
        self.last_error: str | None = None
        self.size: tuple[int, int] | None = None      # (width, height) the device actually delivers
        self.device_fps = 0.0                         # the rate the device reports (0: unknown)
        self.fps = float(fps or 0.0)
        self._closed = threading.Event()
        self._lock = threading.Lock()                 # held while a capture call runs on the device
        self._last_frame_mono = time.monotonic()
        self._deadline_end: float | None = None
        self._links = Reconnects(self.name, log, Backoff(self.backoff, self.backoff_max))
        self._delay = 0.0                             # wait before the next re-open (the back-off's)
        self.opens = 0                                # successful opens of the device (the first included)
        self._cap = self._open()
        if self._cap is None:
            raise SourceError(open_error or f"{self.name}: OpenCV could not open this capture source; check that "
                                            f"the device is connected and not in use by another program")

    # ---- construction from a source string ----

    @classmethod
    def from_uri(cls, uri: str, realtime: bool | None = None, **opts: Any) -> "CaptureSource":
        """`v4l2:///dev/videoN?width=&height=&fps=&fourcc=MJPG&buffersize=&frames=&timeout=&duration=`,
        `v4l2://N`, or `gst://<pipeline ending in appsink>` (a gst:// pipeline takes no query string: it may
        contain '?' itself; its live options frames/timeout/duration/backoff come as keyword options).
        `realtime` is accepted and ignored (a live feed always runs in real time). Raises SourceError with one
        sentence when the device or the backend is missing."""
        if uri.startswith("gst://"):
            return cls._from_gst(uri, opts)
        if not uri.startswith("v4l2://"):
            raise SourceError(f"{_short(uri)}: not a capture source; write v4l2:///dev/video0 or "
                              f"gst://<pipeline> ! appsink")
        u = urlsplit(uri)
        spec = unquote(u.netloc + u.path)
        if spec.isdigit():
            device = f"/dev/video{int(spec)}"
        elif spec.startswith("/"):
            device = spec
        elif spec:
            device = "/" + spec                       # v4l2://dev/video0
        else:
            raise SourceError(f"{uri}: no device given; write v4l2:///dev/video0 (or v4l2://0)")
        name = f"v4l2://{device}"
        options = parse_options(name, u.query, opts, OPTIONS)
        if not has_backend(cv2.CAP_V4L2):
            raise SourceError(f"{name}: this OpenCV ({cv2.__version__}) was built without V4L2 support; use the "
                              f"opencv-python-headless wheel on Linux or the system OpenCV (python3-opencv)")
        try:
            st = os.stat(device)
        except FileNotFoundError:
            raise SourceError(f"{name}: no such capture device; list devices with `v4l2-ctl --list-devices` "
                              f"(package v4l-utils), check the cable and the card's driver, or give another "
                              f"/dev/videoN") from None
        except OSError as e:
            raise SourceError(f"{name}: the device cannot be examined ({describe(e)}); check its permissions") \
                from None
        if not stat.S_ISCHR(st.st_mode):
            raise SourceError(f"{name}: {device} is not a video device; list devices with "
                              f"`v4l2-ctl --list-devices` and give one of them")
        if not os.access(device, os.R_OK | os.W_OK):
            raise SourceError(f"{name}: no permission to open {device}; add this user to the 'video' group "
                              f"(sudo usermod -aG video $USER, then log in again) or run as a user who has it")
        return cls(device, api=cv2.CAP_V4L2, name=name, **options,
                   open_error=f"{name}: the device exists but OpenCV could not open it (it may be in use by "
                              f"another program, or not a capture device); close other capture programs and "
                              f"check it with `v4l2-ctl -d {device} --all`")

    @classmethod
    def _from_gst(cls, uri: str, opts: dict) -> "CaptureSource":
        pipeline = uri[len("gst://"):].strip()
        name = f"gst://{_short(pipeline)}"
        bad = sorted(k for k, v in opts.items() if v is not None and k not in LIVE_ONLY)
        if bad:
            raise SourceError(f"{name}: option(s) {', '.join(bad)} belong in the pipeline's caps (e.g. "
                              f"video/x-raw,width=1920,height=1080,framerate=30/1), not in the source options")
        options = parse_options(name, "", opts, {k: OPTIONS[k] for k in LIVE_ONLY})
        if not pipeline:
            raise SourceError("gst://: no pipeline given; write gst://<source> ! videoconvert ! "
                              "video/x-raw,format=BGR ! appsink")
        if not has_backend(cv2.CAP_GSTREAMER):
            raise SourceError(f"{name}: this OpenCV ({cv2.__version__}) was built without GStreamer, so gst:// "
                              f"pipelines cannot run; on a Jetson use the system OpenCV (sudo apt install "
                              f"python3-opencv, and pip uninstall opencv-python-headless in this environment), "
                              f"elsewhere use an OpenCV built with GStreamer, or use v4l2:///dev/videoN")
        if not re.search(r"(^|!)\s*appsink\b[^!]*$", pipeline):
            raise SourceError(f"{name}: the pipeline must end in appsink; end it with "
                              f"`! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=2`")
        return cls(pipeline, api=cv2.CAP_GSTREAMER, name=name, **options,
                   open_error=f"{name}: GStreamer could not start this pipeline; try it with `gst-launch-1.0` "
                              f"(with fakesink in place of appsink) and fix the element that fails")

    # ---- public state (reconnects, gap_s, gap_frames: LinkCounters) ----

    def close(self) -> None:
        """Stop iteration (from any thread) and release the device. A capture call in progress in the capture
        thread cannot be interrupted; that thread releases the device as soon as the call returns."""
        self._closed.set()
        if self._lock.acquire(blocking=False):
            try:
                self._release_locked()
            finally:
                self._lock.release()

    # ---- the device ----

    def _open(self) -> "cv2.VideoCapture | None":
        cap = cv2.VideoCapture(self.target, self.api)
        if not cap.isOpened():
            cap.release()
            return None
        self.opens += 1
        if self.fourcc:   # before the size: V4L2 drivers pick sizes per pixel format
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.requested_fps:
            cap.set(cv2.CAP_PROP_FPS, self.requested_fps)
        if self.buffersize:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, self.buffersize)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.size = (w, h) if w > 0 and h > 0 else None
        reported = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.device_fps = reported if 0 < reported <= 1000 else 0.0
        self.fps = self.device_fps or float(self.requested_fps or 0.0)
        return cap

    def _release_locked(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def _release(self) -> None:
        with self._lock:
            self._release_locked()

    @property
    def warnings(self) -> int:
        """Link warnings logged so far (rate-limited: one per back-off step, then a summary line a minute)."""
        return self._links.warnings

    def _reopen(self) -> "cv2.VideoCapture":
        self._wait_backoff()
        result = retry_open(self._open, stop=self._closed, backoff=self._links.backoff,
                            deadline=self._end_deadline(), reset=False,
                            failed=lambda e: self._links.failed(f"the device cannot be opened ({e})"))
        cap = result.resource
        if cap is None:
            self.last_error = result.error or self.last_error
            raise _End
        with self._lock:
            if self._closed.is_set():
                cap.release()
                raise _End
            self._cap = cap
        log.info("%s: device open again after %d attempt(s)", self.name, result.attempts)
        return cap

    def _grab(self, cap) -> tuple[Any, float, float, float]:
        """(image or None, wall time at grab, monotonic time at grab, driver timestamp in ms or 0)."""
        with self._lock:
            if self._closed.is_set() or self._cap is not cap:
                raise _End
            ok = cap.grab()
            t, mono = now(), time.monotonic()
            img, pos_ms = None, 0.0
            if ok:
                ok, img = cap.retrieve()
                if ok and self.api == cv2.CAP_V4L2:
                    pos_ms = float(cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
        if not ok or img is None or img.size == 0:
            return None, t, mono, 0.0
        return img, t, mono, pos_ms

    # ---- iteration (runs in the streamer's capture thread) ----

    def __iter__(self) -> Iterator[Frame]:
        start = time.monotonic()
        self._last_frame_mono = start
        self._deadline_end = start + self.duration if self.duration else None
        try:
            yield from self._frames()
        except _End:
            return
        finally:
            self._release()

    def _frames(self) -> Iterator[Frame]:
        rate = RateEstimate()
        index = 0
        last_t: float | None = None
        lost = fresh = False
        while self.total is None or index < self.total:
            self._check_end()
            cap = self._cap
            if cap is None:
                lost = fresh = True
                rate.break_()
                cap = self._reopen()
            img, t, mono, pos_ms = self._grab(cap)
            if img is None:
                self.last_error = "the device stopped giving frames (cable pulled, signal lost or device reset)"
                self._release()
                self._delay = self._links.failed(self.last_error + "; re-opening it")
                lost = True
                continue
            self._links.good()     # only a frame proves the device works
            if fresh:  # counted once a frame comes: an open that gives no frame is not a reconnect
                self.link.reconnects += 1
                fresh = False
            meta: dict[str, Any] = {"timestamp_source": "grab"}
            if pos_ms > 0:
                age = mono - pos_ms / 1000.0
                if 0 <= age < PLAUSIBLE_AGE_S:
                    t, meta["timestamp_source"] = t - age, "device"
            if index == 0:
                meta["size"] = (img.shape[1], img.shape[0])
                if self.width or self.height:
                    meta["requested_size"] = (self.width, self.height)
            if lost and last_t is not None:
                gap = t - last_t
                meta.update(gap_s=gap, gap_frames=self.link.record_gap(gap, self.fps or rate.fps),
                            reconnects=self.link.reconnects)
            lost = False
            self._last_frame_mono = time.monotonic()
            rate.tick(t)
            last_t = t
            yield Frame(index, self.source_id, t, img, channel_order="BGR", meta=meta)
            index += 1
