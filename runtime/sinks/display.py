"""`--display`: the overlay on the device's own screen.

`DisplayWindow` (`sonoscore run --display`) shows the overlay picture (runtime/sinks/overlay.py) in an OpenCV
window, for a screen attached to the device. It needs an OpenCV build with a GUI and a display. The OpenCV that
`pip install` brings here is opencv-python-headless (no GUI): `--display` then refuses in one sentence
(`gui_problem`). On a Jetson the system OpenCV (GTK) has a GUI; elsewhere install opencv-python of the same version
in its place (both provide the `cv2` module, so only one of them may be installed).

The browser viewer (`--view`) is runtime/sinks/viewer.py.
"""
from __future__ import annotations

import collections
import os
import re
import socket
import sys
import time
from typing import Sequence

import cv2

from runtime.errors import UserError
from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sinks.overlay import DEFAULT_CLASS_NAMES, render_overlay

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts")


def gui_backend() -> str:
    """OpenCV's GUI backend as its build information names it ("QT5", "GTK3", "NONE", ...; "" when unknown)."""
    m = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return m.group(1).upper() if m else ""


def _x_server_problem(display: str) -> str | None:
    """None when an X server accepts connections at `display` (DISPLAY's syntax, `[host]:N[.screen]`), else why
    not. OpenCV's Qt backend does not fail when it cannot reach the display: Qt aborts the whole process (SIGABRT,
    no exception), so the run would die with its outputs unfinished. Only the connection is tried here, not the
    X authorisation; a DISPLAY this does not understand is left to OpenCV."""
    m = re.fullmatch(r"(?:[\w.-]+/)?(?P<host>[^:/]*):(?P<n>\d+)(?:\.\d+)?", display.strip())
    if not m:
        return None
    host, n = m.group("host"), int(m.group("n"))
    if host in ("", "unix"):
        path = f"/tmp/.X11-unix/X{n}"
        for address in ("\0" + path, path):          # the abstract socket (Linux), then the file
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(address)
                    return None
            except OSError:
                continue
        where = path
    else:
        try:
            with socket.create_connection((host, 6000 + n), timeout=1.0):
                return None
        except OSError:
            pass
        where = f"{host} port {6000 + n}"
    return (f"no X server answers at DISPLAY={display} (nothing listens on {where}): start the device's desktop "
            f"session or point DISPLAY at it, or use the browser viewer (--view)")


def gui_problem() -> str | None:
    """Why an OpenCV window cannot be shown here (one sentence), or None when it can be tried."""
    if gui_backend() == "NONE":
        return ("this OpenCV is a headless build with no GUI (opencv-python-headless), so it cannot open a window: "
                "install an OpenCV with a GUI (the Jetson's system OpenCV, or opencv-python of the same version "
                "in place of opencv-python-headless), or use the browser viewer (--view)")
    if sys.platform.startswith("linux"):
        display, wayland = os.environ.get("DISPLAY"), os.environ.get("WAYLAND_DISPLAY")
        if not (display or wayland):
            return ("there is no display to open a window on (DISPLAY is not set): run on the device's desktop, "
                    "or use the browser viewer (--view)")
        if display and not wayland:
            return _x_server_problem(display)
    return None


class DisplayWindow(Sink):
    """The overlay picture (runtime/sinks/overlay.py: the frame with the kidney contour, the grade, the probability
    bars, the gate state, frame rate and latency, and the disclaimer) in an OpenCV window on this machine's
    screen, at most `max_fps` pictures a second. The window opens at the picture's own size (one picture pixel
    per screen pixel) and keeps its aspect ratio when resized; it has no toolbar, so there is no button that
    saves a frame to disk. Closing the window (or pressing q / Esc in it) stops the showing, not the run.

    Drawing happens on the thread that calls `write` (the stream's worker, the main thread under `sonoscore
    run`): OpenCV windows must be used from one thread. The window is serviced (`waitKey`) at every picture, so
    between pictures of a slow source it does not repaint.
    """

    def __init__(self, name: str = "sonoscore", disclaimer: str | None = None, model: str | None = None,
                 class_names: Sequence[str] = DEFAULT_CLASS_NAMES, max_fps: float = 15.0):
        problem = gui_problem()
        if problem:
            raise UserError(f"cannot show a window: {problem}")
        self.name, self.disclaimer, self.class_names, self.model = name, disclaimer, class_names, model
        self.period = 1.0 / max_fps if max_fps and max_fps > 0 else 0.0
        self._next = 0.0
        self._done: collections.deque[float] = collections.deque(maxlen=30)
        self.showing = True
        self.shown = 0                          # pictures put on the screen
        self._was_visible = False
        self._sized = False
        if gui_backend().startswith("QT") and not os.environ.get("QT_QPA_FONTDIR"):
            # The opencv-python wheel's Qt looks for fonts inside the wheel, where there are none, and warns on the
            # terminal; the picture's text is drawn by OpenCV, so any system font does for Qt.
            font_dir = next((d for d in FONT_DIRS if os.path.isdir(d)), None)
            if font_dir:
                os.environ["QT_QPA_FONTDIR"] = font_dir
        try:
            cv2.namedWindow(name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as e:
            raise UserError(f"cannot show a window: OpenCV could not open one ({str(e).strip()})") from None

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        if record.error == DROPPED or not self.showing:
            return
        now = time.perf_counter()
        if "total" in record.latency_ms:
            self._done.append(now)
        if now < self._next:
            return
        self._next = now + self.period
        fps = ((len(self._done) - 1) / (self._done[-1] - self._done[0])
               if len(self._done) > 1 and self._done[-1] > self._done[0] else None)
        # The user's keys and the window manager's close come first: imshow would show a closed window again
        # (OpenCV re-creates a window that the user closed).
        if self._user_closed(cv2.waitKey(1)):
            return
        picture = render_overlay(record, fps=fps, disclaimer=self.disclaimer, class_names=self.class_names,
                                 model=self.model)
        if not self._sized:                     # the first picture sets the size; the user's resizing stays
            cv2.resizeWindow(self.name, int(picture.shape[1]), int(picture.shape[0]))
            self._sized = True
        cv2.imshow(self.name, picture)
        self.shown += 1
        self._user_closed(cv2.waitKey(1))

    def _visible(self) -> bool:
        try:
            return cv2.getWindowProperty(self.name, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:                       # some backends raise for a window that no longer exists
            return False

    def _user_closed(self, key: int) -> bool:
        """Stop showing when `key` is q or Esc, or when the window, once seen, is gone; True when stopped."""
        visible = self._visible()
        self._was_visible |= visible            # some backends report the window only once it is drawn
        if (key & 0xFF) in (ord("q"), 27) or (self._was_visible and not visible):
            self.showing = False
            try:
                cv2.destroyWindow(self.name)
                cv2.waitKey(1)                  # let the GUI take the window off the screen now
            except cv2.error:
                pass
            return True
        return False

    def _close(self) -> None:
        if self.showing:
            self.showing = False
            try:
                cv2.destroyWindow(self.name)
                cv2.waitKey(1)
            except cv2.error:
                pass
