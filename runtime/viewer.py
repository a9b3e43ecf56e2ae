"""`--view`: the live stream in a web browser, and on the device's own screen.

`LiveViewer` is a sink that serves one page over HTTP (the standard library's ThreadingHTTPServer, in daemon
threads). The page shows the latest frame with the kidney contour, and beside it, as HTML, the grade with its
probabilities, the gate state, the frame number, the processing rate and the latency:

    GET /                    the page
    GET /state.json?after=N  the latest state as JSON; with `after`, waits (up to a second) for a newer one
    GET /frame.jpg?n=N       the picture of state N (the latest if N is gone), JPEG

The page long-polls the state and, when it changes, loads that state's picture and then shows picture and numbers
together, so they always agree. The stream's worker only hands the record over (`write` stores a reference,
under a lock held for microseconds): the picture is drawn and encoded on the viewer's own thread, at most
`max_fps` times a second and only while a page has asked in the last few seconds. A slow or absent browser
therefore never slows the pipeline; it just skips frames.

Access: bound to 127.0.0.1 by default, where only requests that name a loopback host are served (a web page
elsewhere cannot reach the viewer by DNS rebinding). Binding any other address requires a token: one is
generated when none is given, and `url` carries it (`?token=...`). With a token, every request without it gets
403. The server speaks plain HTTP: beyond this machine, use it on a trusted network or through a tunnel
(`ssh -L 8765:127.0.0.1:8765 device`), since the token and the pictures travel unencrypted. Pictures and state
carry no patient identifier, only the source's opaque id.

`DisplayWindow` (`sonoscore run --display`) shows the overlay picture (runtime/overlay.py) in an OpenCV window, for
a screen attached to the device. It needs an OpenCV build with a GUI and a display. The OpenCV that `pip install`
brings here is opencv-python-headless (no GUI): `--display` then refuses in one sentence. On a Jetson the system
OpenCV (GTK) has a GUI; elsewhere install opencv-python of the same version in its place (both provide the
`cv2` module, so only one of them may be installed).
"""
from __future__ import annotations

import collections
import hmac
import html
import ipaddress
import json
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from runtime.errors import UserError
from runtime.overlay import (CONTOUR, DEFAULT_CLASS_NAMES, DEFAULT_DISCLAIMER, GRADE_COLOURS, _display_bgr,
                             _draw_contour, frame_scale, mask_to_frame, render_overlay)
from runtime.preprocess import Region
from runtime.record import FrameRecord
from runtime.sinks import Sink
from runtime.stream import DROPPED

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
POLL_WAIT_S = 1.0          # how long /state.json?after=N waits for a newer state
CLIENT_IDLE_S = 3.0        # no request for this long: stop drawing pictures
KEEP_PICTURES = 4          # pictures kept by state number, so a page gets the one that matches its numbers


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _reachable_host(host: str) -> str:
    """The host name to print in the URL: the bound address, or for a wildcard bind this machine's address on
    its default route (no packet is sent), else its host name."""
    if host not in ("", "0.0.0.0", "::"):
        return f"[{host}]" if ":" in host else host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))              # TEST-NET-1: only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def _hex(bgr: Sequence[int]) -> str:
    b, g, r = (int(c) for c in bgr)
    return f"#{r:02x}{g:02x}{b:02x}"


def render_frame(record: FrameRecord) -> np.ndarray | None:
    """The viewer's picture: the display frame with the kidney contour, scaled as the overlay scales it (small
    frames enlarged so the line is crisp), without the overlay's text panel (the page shows those numbers as
    HTML). None for a record without a frame."""
    display = record.display
    if display is None or getattr(display, "ndim", 0) not in (2, 3) or not display.size:
        return None
    scale = frame_scale(display.shape)
    h, w = display.shape[:2]
    H, W = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    img = _display_bgr(display)
    if (H, W) != (h, w):
        img = cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    elif np.shares_memory(img, display):          # never draw on the record's own frame
        img = img.copy()
    mask = record.mask
    if mask is not None and getattr(mask, "ndim", 0) == 2 and mask.size and mask.any():
        r = (record.region or Region(0, 0, w, h)).clip(display.shape)
        block = max((r.x1 - r.x0) / mask.shape[1], (r.y1 - r.y0) / mask.shape[0])
        _draw_contour(img, mask_to_frame(mask, record.region, display.shape), scale,
                      max(2, int(round(2 * H / 480))), block)
    return img


class LiveViewer(Sink):
    """The browser viewer (see the module docstring). `url` is the address to open, token included; `port` the
    port actually bound (`port=0` picks a free one).

    `host` 127.0.0.1 (default) or another loopback name serves this machine only; any other address (0.0.0.0 for
    every interface) requires `token`, generated when not given. `disclaimer` is shown on the page above
    everything else (it must be, whenever the bundle has one). `max_fps` caps how often a picture is drawn and
    encoded; `jpeg_quality` is OpenCV's JPEG quality.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 disclaimer: str | None = DEFAULT_DISCLAIMER, class_names: Sequence[str] = DEFAULT_CLASS_NAMES, *,
                 max_fps: float = 15.0, jpeg_quality: int = 80, title: str = "sonoscore live"):
        self.host = host
        self.loopback = _is_loopback(host)
        self.token: str | None = token or (None if self.loopback else secrets.token_urlsafe(18))
        self.disclaimer = disclaimer or None
        self.class_names = [str(n) for n in class_names]
        self.max_fps = float(max_fps) if max_fps and max_fps > 0 else 15.0
        self.jpeg_quality = int(jpeg_quality)
        self.title = title
        self.received = self.dropped = self.rendered = 0

        self._cond = threading.Condition()
        self._stopping = False
        self._seq = 0                                        # records taken for display (not dropped)
        self._pending: tuple[int, FrameRecord, float | None] | None = None
        self._state: dict[str, Any] | None = None            # the state of the latest picture drawn
        self._pictures: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._last_client = -math.inf                        # time.monotonic() of the latest request
        self._done: collections.deque[float] = collections.deque(maxlen=30)
        self.page_html = self._make_page()

        self._server = _make_server(host, port, self)
        self.port: int = self._server.server_address[1]
        query = f"?token={self.token}" if self.token else ""
        self.url = f"http://{_reachable_host(host)}:{self.port}/{query}"
        self._threads = [threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                          name="viewer-http", daemon=True),
                         threading.Thread(target=self._draw_loop, name="viewer-draw", daemon=True)]
        for t in self._threads:
            t.start()

    # -- the sink (the stream's worker thread) -----------------------------------------------------------------
    def write(self, record: FrameRecord) -> None:
        self._check_open()
        with self._cond:
            self.received += 1
            if record.error == DROPPED:                     # keep showing the last processed frame
                self.dropped += 1
                return
            if "total" in record.latency_ms:
                self._done.append(time.perf_counter())
            self._seq += 1
            self._pending = (self._seq, record, self.processing_fps())
            self._cond.notify_all()

    def processing_fps(self) -> float | None:
        """Records through the pipeline per second, over the last 30."""
        if len(self._done) < 2 or self._done[-1] <= self._done[0]:
            return None
        return (len(self._done) - 1) / (self._done[-1] - self._done[0])

    def _close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    # -- drawing (the viewer's own thread) ---------------------------------------------------------------------
    def _client_recent(self) -> bool:
        return time.monotonic() - self._last_client < CLIENT_IDLE_S

    def _draw_loop(self) -> None:
        period = 1.0 / self.max_fps
        while True:
            with self._cond:
                while not self._stopping and (self._pending is None or not self._client_recent()):
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
                seq, record, fps = self._pending
                self._pending = None
            t0 = time.monotonic()
            try:
                picture = render_frame(record)
                jpeg = None
                if picture is not None:
                    ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
                    jpeg = buf.tobytes() if ok else None
                state = self._record_state(seq, record, fps, picture, jpeg)
            except Exception as e:  # a strange record must not stop the viewer
                state = self._record_state(seq, FrameRecord(record.frame, record.source_id, record.t_capture,
                                                            error=f"viewer: cannot draw this frame ({e})"),
                                           fps, None, None)
                jpeg = None
            with self._cond:
                if jpeg is not None:
                    self._pictures[seq] = jpeg
                    while len(self._pictures) > KEEP_PICTURES:
                        self._pictures.popitem(last=False)
                self._state = state
                self.rendered += 1
                self._cond.notify_all()
                # At most max_fps pictures a second; close() ends the wait.
                deadline = t0 + period
                while not self._stopping and time.monotonic() < deadline:
                    self._cond.wait(timeout=deadline - time.monotonic())

    def _record_state(self, seq: int, rec: FrameRecord, fps: float | None, picture: np.ndarray | None,
                      jpeg: bytes | None) -> dict[str, Any]:
        scored = rec.error is None and rec.accepted and rec.grade is not None and rec.probabilities is not None
        total = rec.latency_ms.get("total")
        return {
            "seq": seq,
            "frame": rec.frame,
            "source_id": rec.source_id,
            "accepted": bool(rec.accepted) and rec.error is None,
            "grade": int(rec.grade) if scored else None,
            "probabilities": [round(float(p), 4) for p in rec.probabilities] if scored else None,
            "mask_fraction": round(float(rec.mask_fraction), 4),
            "fps": None if fps is None else round(fps, 2),
            "latency_ms": None if total is None else round(float(total), 2),
            "error": rec.error,
            "has_image": jpeg is not None,
            "image_size": None if picture is None else [int(picture.shape[1]), int(picture.shape[0])],
        }

    # -- serving (HTTP threads) --------------------------------------------------------------------------------
    def state(self, after: int | None = None, wait_s: float = POLL_WAIT_S) -> dict[str, Any]:
        """The state a page sees. Counts as a client's request (pictures are drawn while pages ask). With `after`,
        waits up to `wait_s` for a state newer than `after`; without, waits (as long) only for the latest record
        handed over to be drawn."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._last_client = time.monotonic()
            self._cond.notify_all()
            while not self._stopping:
                have = self._state["seq"] if self._state else 0
                want = after + 1 if after is not None else self._seq
                left = deadline - time.monotonic()
                if have >= want or left <= 0:
                    break
                self._cond.wait(timeout=left)
            out = dict(self._state) if self._state else {
                "seq": 0, "frame": None, "source_id": None, "accepted": False, "grade": None, "probabilities": None,
                "mask_fraction": 0.0, "fps": None, "latency_ms": None, "error": None, "has_image": False,
                "image_size": None}
            out.update(received=self.received, dropped=self.dropped, disclaimer=self.disclaimer,
                       class_names=self.class_names, stopping=self._stopping)
            return out

    def picture(self, n: int | None = None) -> tuple[int, bytes] | None:
        """(state number, JPEG) of state `n`, or of the latest picture when `n` is gone or not given."""
        with self._cond:
            self._last_client = time.monotonic()
            if not self._pictures:
                return None
            if n is not None and n in self._pictures:
                return n, self._pictures[n]
            return next(reversed(self._pictures.items()))

    def authorised(self, query: dict[str, list[str]], host_header: str | None) -> bool:
        """With a token: the request must carry it. Without (loopback only): the request must name a loopback
        host, so that a page from elsewhere cannot reach the viewer through a DNS name pointing at 127.0.0.1."""
        if self.token:
            given = (query.get("token") or [""])[0]
            return hmac.compare_digest(given.encode(), self.token.encode())
        name = (host_header or "").strip()
        m = re.fullmatch(r"\[([^\]]+)\](?::\d+)?|([^:]+)(?::\d+)?", name)
        hostname = (m.group(1) or m.group(2)) if m else ""
        return hostname.lower() in LOOPBACK_NAMES

    def _make_page(self) -> bytes:
        colours = json.dumps([_hex(c) for c in GRADE_COLOURS])
        banner = (f'<div id="disclaimer" class="banner" role="alert">&#9888; {html.escape(self.disclaimer)}</div>'
                  if self.disclaimer else '<div id="disclaimer" hidden></div>')
        page = (_PAGE.replace("__TITLE__", html.escape(self.title)).replace("__BANNER__", banner)
                .replace("__COLOURS__", colours).replace("__CONTOUR__", _hex(CONTOUR)))
        return page.encode("utf-8")


# -- HTTP ------------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "sonoscore-viewer"
    sys_version = ""
    protocol_version = "HTTP/1.0"        # one request per connection: nothing lingers after close()

    @property
    def viewer(self) -> LiveViewer:
        return self.server.viewer  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self.viewer.authorised(query, self.headers.get("Host")):
            self._send(403, b"forbidden: this viewer needs its token (open the URL that sonoscore printed)\n",
                       "text/plain; charset=utf-8")
            return
        if url.path in ("/", "/index.html"):
            self._send(200, self.viewer.page_html, "text/html; charset=utf-8")
        elif url.path == "/state.json":
            after = _int(query, "after")
            body = json.dumps(self.viewer.state(after)).encode()
            self._send(200, body, "application/json")
        elif url.path == "/frame.jpg":
            got = self.viewer.picture(_int(query, "n"))
            if got is None:
                self._send(404, b"no picture yet\n", "text/plain; charset=utf-8")
            else:
                self._send(200, got[1], "image/jpeg", {"X-Frame-Seq": str(got[0])})
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Security-Policy", "default-src 'none'; img-src 'self'; connect-src 'self'; "
                                                        "script-src 'unsafe-inline'; style-src 'unsafe-inline'")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):   # the page went away mid-answer
            pass


def _int(query: dict[str, list[str]], key: str) -> int | None:
    try:
        return int(query[key][0])
    except (KeyError, IndexError, ValueError):
        return None


def _make_server(host: str, port: int, viewer: LiveViewer) -> ThreadingHTTPServer:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        server = Server((host.strip("[]"), int(port)), _Handler)
    except OSError as e:
        raise UserError(f"the live viewer cannot listen on {host}:{port} ({e.strerror or e}); "
                        f"choose another port or host") from None
    server.viewer = viewer  # type: ignore[attr-defined]
    return server


# -- the device's own screen -----------------------------------------------------------------------------------
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
    """The overlay picture (runtime/overlay.py: the frame with the kidney contour, the grade, the probability
    bars, the gate state, frame rate and latency, and the disclaimer) in an OpenCV window on this machine's
    screen, at most `max_fps` pictures a second. The window opens at the picture's own size (one picture pixel
    per screen pixel) and keeps its aspect ratio when resized; it has no toolbar, so there is no button that
    saves a frame to disk. Closing the window (or pressing q / Esc in it) stops the showing, not the run.

    Drawing happens on the thread that calls `write` (the stream's worker, the main thread under `sonoscore
    run`): OpenCV windows must be used from one thread. The window is serviced (`waitKey`) at every picture, so
    between pictures of a slow source it does not repaint.
    """

    def __init__(self, name: str = "sonoscore", disclaimer: str | None = DEFAULT_DISCLAIMER,
                 class_names: Sequence[str] = DEFAULT_CLASS_NAMES, max_fps: float = 15.0):
        problem = gui_problem()
        if problem:
            raise UserError(f"cannot show a window: {problem}")
        self.name, self.disclaimer, self.class_names = name, disclaimer, class_names
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
        picture = render_overlay(record, fps=fps, disclaimer=self.disclaimer, class_names=self.class_names)
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


# -- the page --------------------------------------------------------------------------------------------------
_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --bg:#1c1e22; --panel:#24272c; --rule:#3a3e45; --text:#f0f0f0; --muted:#a5a8ad; --contour:__CONTOUR__;
          --ok:#28a546; --rej:#d67600; --err:#d73c3c; --banner:#ffbe00; }
  * { box-sizing: border-box; }
  html, body { margin:0; height:100%; background:var(--bg); color:var(--text);
               font: 15px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
  body { display:flex; flex-direction:column; }
  header { display:flex; align-items:center; gap:14px; padding:8px 16px; background:#15171a;
           border-bottom:1px solid var(--rule); }
  header h1 { font-size:16px; margin:0; font-weight:700; letter-spacing:.02em; }
  header .src { color:var(--muted); font-size:13px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
  header .conn { margin-left:auto; font-size:13px; color:var(--muted); display:flex; align-items:center; gap:6px; }
  header .dot { width:10px; height:10px; border-radius:50%; background:#777; }
  header .conn.live .dot { background:var(--ok); }
  header .conn.down .dot { background:var(--err); }
  .banner { background:var(--banner); color:#141414; font-weight:700; text-align:center; padding:7px 12px;
            font-size:15px; letter-spacing:.01em; }
  main { flex:1; display:flex; min-height:0; }
  .view { flex:1; min-width:0; min-height:320px; position:relative; }
  .view img { position:absolute; inset:12px; width:calc(100% - 24px); height:calc(100% - 24px);
              object-fit:contain; object-position:center top; }
  .view.stale img { opacity:.35; }
  .view .note { position:absolute; top:40%; left:0; right:0; text-align:center; font-size:18px; font-weight:600;
                padding:0 24px; pointer-events:none; }
  aside { width:330px; flex:none; background:var(--panel); border-left:1px solid var(--rule); padding:16px 18px;
          display:flex; flex-direction:column; gap:14px; overflow:auto; }
  .label { color:var(--muted); font-size:12px; font-weight:700; letter-spacing:.08em; text-transform:uppercase; }
  .grade { display:flex; align-items:center; gap:14px; min-height:96px; }
  .grade .digit { font-size:84px; font-weight:800; line-height:1; min-width:.65em; }
  .grade .name { font-size:22px; font-weight:700; }
  .grade .p { color:var(--muted); }
  .grade .caveat { color:var(--banner); font-size:12px; margin-top:4px; }
  .probs { display:grid; grid-template-columns:auto 1fr 3.2em; gap:7px 10px; align-items:center; }
  .probs .bar { height:13px; background:#3e3a38; border-radius:3px; overflow:hidden; }
  .probs .bar i { display:block; height:100%; width:0; background:#8c9196; transition:width .12s linear; }
  .probs .v { text-align:right; color:var(--muted); font-variant-numeric:tabular-nums; }
  .probs .best { color:var(--text); font-weight:700; }
  .pill { border-radius:8px; padding:9px 12px; color:#fff; background:#555; }
  .pill b { display:block; font-size:17px; letter-spacing:.04em; }
  .pill span { font-size:13px; }
  .pill.ok { background:var(--ok); } .pill.rej { background:var(--rej); } .pill.err { background:var(--err); }
  .stats { display:grid; grid-template-columns:1fr auto; gap:4px 10px; border-top:1px solid var(--rule);
           padding-top:12px; font-variant-numeric:tabular-nums; }
  .stats dt { color:var(--muted); } .stats dd { margin:0; text-align:right; font-weight:600; }
  .error { color:#ff9c9c; font-size:13px; word-break:break-word; }
  @media (max-width: 820px) { main { flex-direction:column; } aside { width:auto; border-left:0; } }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1><span class="src" id="source"></span>
  <span class="conn" id="conn"><span class="dot"></span><span id="conn-text">connecting</span></span>
</header>
__BANNER__
<main>
  <div class="view" id="view">
    <img id="frame" alt="live ultrasound frame with the kidney contour">
    <div class="note" id="note">waiting for frames</div>
  </div>
  <aside>
    <div>
      <div class="label">IFTA grade</div>
      <div class="grade">
        <div class="digit" id="grade">&ndash;</div>
        <div><div class="name" id="grade-name">not scored</div><div class="p" id="grade-p"></div>
             <div class="caveat" id="grade-caveat" hidden></div></div>
      </div>
    </div>
    <div>
      <div class="label">Probabilities</div>
      <div class="probs" id="probs"></div>
    </div>
    <div class="pill" id="gate"><b id="gate-state">WAITING</b><span id="gate-detail">no frame yet</span></div>
    <div class="error" id="error" hidden></div>
    <dl class="stats">
      <dt>frame</dt><dd id="frame-no">&ndash;</dd>
      <dt>processing rate</dt><dd id="fps">&ndash;</dd>
      <dt>latency (capture to result)</dt><dd id="latency">&ndash;</dd>
      <dt>kidney in scan area</dt><dd id="mask">&ndash;</dd>
      <dt>frames received / dropped</dt><dd id="counts">&ndash;</dd>
    </dl>
  </aside>
</main>
<script>
"use strict";
const COLOURS = __COLOURS__;
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
function query(params) {
  const p = new URLSearchParams(params);
  if (token) p.set("token", token);
  return "?" + p.toString();
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let built = 0;
function buildProbs(names) {
  if (built === names.length) return;
  const box = $("probs");
  box.textContent = "";
  names.forEach((n, i) => {
    const l = document.createElement("span"); l.textContent = n; l.id = "pn" + i;
    const b = document.createElement("span"); b.className = "bar"; b.appendChild(document.createElement("i"));
    b.id = "pb" + i;
    const v = document.createElement("span"); v.className = "v"; v.id = "pv" + i; v.textContent = "\u2013";
    box.append(l, b, v);
  });
  built = names.length;
}
function loadPicture(n) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => { img.id = "frame"; img.alt = $("frame").alt; $("frame").replaceWith(img); resolve(true); };
    img.onerror = () => resolve(false);
    img.src = "frame.jpg" + query({ n: n });
  });
}
function show(s) {
  buildProbs(s.class_names);
  $("source").textContent = s.source_id || "";
  const scored = s.grade !== null && s.probabilities !== null;
  $("grade").textContent = scored ? String(s.grade) : "\u2013";
  $("grade").style.color = scored ? COLOURS[(s.grade - 1) % COLOURS.length] : "var(--muted)";
  const name = scored ? (s.class_names[s.grade - 1] || ("grade " + s.grade)) : (s.error ? "no result" : "not scored");
  $("grade-name").textContent = scored && name.includes(":") ? name.split(":").slice(1).join(":").trim() : name;
  $("grade-p").textContent = scored ? "p = " + s.probabilities[s.grade - 1].toFixed(2)
                                    : (s.error ? "" : (s.frame === null ? "" : "too little kidney in view"));
  $("grade-caveat").hidden = !(scored && s.disclaimer);
  $("grade-caveat").textContent = s.disclaimer || "";
  s.class_names.forEach((_, i) => {
    const p = scored ? s.probabilities[i] : null;
    const best = scored && i === s.grade - 1;
    const bar = $("pb" + i).firstChild;
    bar.style.width = p === null ? "0" : (Math.max(0, Math.min(1, p)) * 100).toFixed(1) + "%";
    bar.style.background = best ? COLOURS[i % COLOURS.length] : "#8c9196";
    $("pv" + i).textContent = p === null ? "\u2013" : p.toFixed(2);
    $("pv" + i).className = best ? "v best" : "v";
  });
  const gate = $("gate");
  if (s.frame === null) {
    gate.className = "pill"; $("gate-state").textContent = "WAITING"; $("gate-detail").textContent = "no frame yet";
  } else if (s.error) {
    gate.className = "pill err"; $("gate-state").textContent = "NOT PROCESSED";
    $("gate-detail").textContent = "see the error below";
  } else if (s.accepted) {
    gate.className = "pill ok"; $("gate-state").textContent = "ACCEPTED";
    $("gate-detail").textContent = "kidney " + (100 * s.mask_fraction).toFixed(1) + "% of scan area";
  } else {
    gate.className = "pill rej"; $("gate-state").textContent = "REJECTED";
    $("gate-detail").textContent = "kidney " + (100 * s.mask_fraction).toFixed(1) + "%: below the gate";
  }
  $("error").hidden = !s.error;
  $("error").textContent = s.error || "";
  $("frame-no").textContent = s.frame === null ? "\u2013" : String(s.frame);
  $("fps").textContent = s.fps === null ? "\u2013" : s.fps.toFixed(1) + " fps";
  $("latency").textContent = s.latency_ms === null ? "\u2013" : s.latency_ms.toFixed(1) + " ms";
  $("mask").textContent = s.frame === null ? "\u2013" : (100 * s.mask_fraction).toFixed(1) + " %";
  counts(s);
  const view = $("view");
  view.classList.toggle("stale", !s.has_image);
  $("note").hidden = s.has_image;
  $("note").textContent = s.frame === null ? "waiting for frames" : (s.error ? "no image: " + s.error : "no image");
}
function counts(s) { $("counts").textContent = s.received + " / " + s.dropped; }
function connection(ok, text) {
  $("conn").className = "conn " + (ok ? "live" : "down");
  $("conn-text").textContent = text;
}
async function run() {
  let seq = -1;
  for (;;) {
    try {
      const r = await fetch("state.json" + query(seq < 0 ? {} : { after: seq }), { cache: "no-store" });
      if (!r.ok) throw new Error(r.status === 403 ? "forbidden: open the URL with its token" : "HTTP " + r.status);
      const s = await r.json();
      connection(true, s.stopping ? "stream ended" : "live");
      if (s.seq !== seq) {
        if (s.has_image) await loadPicture(s.seq);
        show(s);
        seq = s.seq;
      } else {
        counts(s);
      }
      if (s.stopping) return;
    } catch (e) {
      connection(false, "disconnected (" + e.message + ")");
      await sleep(1000);
    }
  }
}
run();
</script>
</body>
</html>
"""
