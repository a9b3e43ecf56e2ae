"""`--view`: the live stream in a web browser.

`LiveViewer` is a sink that serves one page over HTTP (the standard library's ThreadingHTTPServer, in daemon
threads). The page shows the latest frame with the kidney contour, and beside it, as HTML, the grade with its
probabilities, the gate state, the frame number, the processing rate and the latency:

    GET /                    the page
    GET /state.json?after=N  the latest state as JSON; with `after`, waits (up to a second) for a newer one
    GET /frame.jpg?n=N       the picture of state N (the latest if N is gone), JPEG

The page is an asset beside this module, viewer_page.html (HTML, CSS and its script inline, since the page is
served alone), read when the first viewer starts. Its five placeholders are filled per viewer: __TITLE__ (the
title, escaped), __MODEL__ (the bundle's "<name> <version>", escaped, or nothing), __BANNER__ (the bundle's
disclaimer banner, or a hidden empty one), __COLOURS__ (the grade colours as a JSON list of CSS colours) and
__CONTOUR__ (the contour's CSS colour).

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

The device's own screen (`--display`) is runtime/sinks/display.py.
"""
from __future__ import annotations

import collections
import functools
import hmac
import html
import importlib.resources
import ipaddress
import json
import math
import re
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from runtime.errors import UserError
from runtime.preprocess import Region
from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sinks.overlay import (CONTOUR, DEFAULT_CLASS_NAMES, GRADE_COLOURS, _display_bgr, _draw_contour,
                                   frame_scale, mask_to_frame)

PAGE_ASSET = "viewer_page.html"   # beside this module; pyproject.toml's package-data ships it

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MIN_TOKEN_CHARS = 16       # a token given for a network address (the generated ones have 24) ...
MIN_TOKEN_BITS = 40        # ... and at least this many bits by `token_bits` (a generated one: about 100)
MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(18))'"
POLL_WAIT_S = 1.0          # how long /state.json?after=N waits for a newer state
CLIENT_IDLE_S = 3.0        # no request for this long: stop drawing pictures
KEEP_PICTURES = 4          # pictures kept by state number, so a page gets the one that matches its numbers


def token_bits(token: str) -> float:
    """A conservative estimate of the bits of randomness in a token typed by a person: a token that repeats a
    shorter unit ("abcabcabc...") counts that unit once; a character that continues a run of equal steps ("aaaa",
    "1234", "abcd", "9753") counts nothing; what is left counts its empirical Shannon entropy per character times
    its length (16 characters of one symbol: 0 bits; 16 random base64 characters: about 60)."""
    n = len(token)
    unit = next((token[:p] for p in range(1, n) if n % p == 0 and token[:p] * (n // p) == token), token)
    codes = [ord(c) for c in unit]
    kept = [c for i, c in enumerate(codes) if i < 2 or c - codes[i - 1] != codes[i - 1] - codes[i - 2]]
    counts = {c: kept.count(c) for c in set(kept)}
    m = len(kept)
    return max(0.0, -sum(k * math.log2(k / m) for k in counts.values())) if m else 0.0


def check_token(token: str, host: str) -> None:
    """Refuse a token too short or too easy to guess for a viewer on a network address: UserError, one sentence
    saying how to make a good one."""
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"--view-token must have at least {MIN_TOKEN_CHARS} characters when the viewer listens on "
                        f"{host} (a network address); make one with `{MAKE_TOKEN}`, or leave --view-token out and "
                        f"one is generated")
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise UserError(f"--view-token is too easy to guess for a viewer that listens on {host} (a network "
                        f"address): about {bits:.0f} bits of randomness where {MIN_TOKEN_BITS} are needed (repeated "
                        f"or sequential characters count for little); make one with `{MAKE_TOKEN}`, or leave "
                        f"--view-token out and one is generated")


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
    every interface) requires `token`, generated when not given. `disclaimer` (the bundle's; none by default) is
    shown on the page above everything else (it must be, whenever the bundle has one); `model` (the bundle's
    "<name> <version>", `Bundle.label`) in the page's header and in the state. `max_fps` caps how often a picture
    is drawn and encoded; `jpeg_quality` is OpenCV's JPEG quality.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 disclaimer: str | None = None, class_names: Sequence[str] = DEFAULT_CLASS_NAMES, *,
                 max_fps: float = 15.0, jpeg_quality: int = 80, title: str = "sonoscore live",
                 model: str | None = None):
        self.host = host
        self.loopback = _is_loopback(host)
        if token is not None and not self.loopback:
            check_token(token, host)
        self.token: str | None = token or (None if self.loopback else secrets.token_urlsafe(18))
        self.disclaimer = disclaimer or None
        self.model = model or None
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
            "refused": rec.refused if rec.error is None and not rec.accepted else None,
            "scope_refused": rec.error is None and not rec.accepted and rec.scope is not None
            and rec.refused is not None,
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
                "mask_fraction": 0.0, "fps": None, "latency_ms": None, "error": None, "refused": None,
                "scope_refused": False, "has_image": False,
                "image_size": None}
            out.update(received=self.received, dropped=self.dropped, disclaimer=self.disclaimer,
                       model=self.model, class_names=self.class_names, stopping=self._stopping)
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
        page = (_page_template().replace("__TITLE__", html.escape(self.title))
                .replace("__MODEL__", html.escape(self.model or "")).replace("__BANNER__", banner)
                .replace("__COLOURS__", colours).replace("__CONTOUR__", _hex(CONTOUR)))
        return page.encode("utf-8")


@functools.cache
def _page_template() -> str:
    """The page (viewer_page.html) with its placeholders, read once."""
    return importlib.resources.files(__package__).joinpath(PAGE_ASSET).read_text(encoding="utf-8")


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
