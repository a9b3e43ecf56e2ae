"""OpenIGTLink IMAGE stream: `igtl://host:18944/DeviceName` (a PLUS server, or a scanner's own OpenIGTLink server).

The source is a TCP client. It reads every message the server sends, in order (lossless: no message is replaced
by a newer one on this side; with policy `newest` the streamer, not the source, drops stale frames), keeps the
IMAGE messages of the named device (any device when no name is given) and decodes them with `pyigtl`'s message
classes (header v1/v2/v3, IMAGE header: scalar type, dimensions, matrix).

Pixels: uint8 and uint16 as sent; int8 and int16 are shifted by 128 / 32768 into uint8 / uint16 (order preserved);
16-bit frames carry no window, so the runtime min-max windows them. 1 component = gray, 3 = RGB, 4 = RGBA (alpha
dropped). 2-D images, i.e. volumes of one slice. Anything else becomes a frame with an `error`, so the run goes on
and keeps one record per received IMAGE message.

Time: `t_capture` is the message's timestamp when it is plausible on this machine's clock (at most 2 s old, not in
the future), else the arrival time (`timestamps=auto`; `message` or `arrival` force one).

Integrity and limits: the header's CRC64 (over the whole body) is checked whenever it is set (`crc=auto`, the
default; `crc=1` always, `crc=0` never); a frame that fails it is an error, never graded. A header declaring a body
over MAX_BODY is refused before a byte of it is read, and an IMAGE declaring more than the pixel budget before it is
decoded: one error, and the connection is dropped and re-made with the back-off.

Link: at start the source tries for `connect_timeout` seconds (default 10) and then raises one sentence. Once
running, a server that goes away is re-connected with back-off (0.5 s doubling to 5 s; kept across a connection
that closes before a valid frame, reset only by one; one warning per step) for as long as the run lasts; `reconnects`, `gap_s` and `gap_frames` count it, and the first frame after a gap carries `meta["gap_s"]`,
`meta["gap_frames"]` (estimated from the frame rate: the `fps` option, else the rate measured before the gap) and
`meta["reconnects"]`. A run ends after `frames=N` frames, `duration=S` seconds, `timeout=S` seconds without a frame
(a clean end, not an error), or when the source is closed; otherwise it runs until stopped, like a scanner feed.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import numpy as np

from runtime.sources.base import MAX_PIXELS, Frame, Source, SourceError, now, opaque_id, spacing_meta
from runtime.sources.reconnect import (Backoff, EndOfRun, LinkCounters, LinkStats, RateEstimate, Reconnects, RunEnd,
                                       choice, describe, flag, non_negative_float, parse_options, positive_float,
                                       positive_int, retry_open)

log = logging.getLogger(__name__)

DEFAULT_PORT = 18944
HEADER = struct.Struct("> H 12s 20s I I Q Q")   # version, type, device, seconds, fraction, body size, CRC64
HEADER_SIZE = HEADER.size                        # 58
MAX_BODY = 4 * MAX_PIXELS + (1 << 20)           # the pixel budget at 4 bytes a pixel, + 1 MiB of headers/metadata
IMAGE_HEAD = struct.Struct("> H B B B B 3H 12f 3H 3H")   # the IMAGE message's own header (72 bytes)
_SCALAR_BYTES = {2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 4, 10: 4, 11: 8}
POLL_S = 0.2                                     # how often a blocked receive looks at close()/timeouts
PLAUSIBLE_AGE_S = 2.0                            # message timestamps older than this are someone else's clock

OPTIONS = {
    "connect_timeout": non_negative_float,
    "frames": positive_int,
    "timeout": positive_float,
    "duration": positive_float,
    "fps": non_negative_float,
    "backoff": positive_float,
    "backoff_max": positive_float,
    "crc": lambda v: "auto" if str(v).strip().lower() == "auto" else flag(v),
    "timestamps": choice("auto", "message", "arrival"),
}


_End = EndOfRun  # closed, or a duration/timeout passed (runtime.sources.reconnect.RunEnd)


class _ProtocolError(Exception):
    """The bytes on the socket are not an OpenIGTLink message."""


class _TooLarge(Exception):
    """A valid header whose body is over the budget; args: (fields, one phrase). The body is never read."""


class _Body:
    """A received body as pyigtl's unpack sees it: small slices as bytes (struct, text), large ones as views into
    the one buffer, so decoding an IMAGE copies its pixels once (our copy), not three times."""

    def __init__(self, buf):
        self._view = memoryview(buf)

    def __len__(self) -> int:
        return len(self._view)

    def __getitem__(self, key):
        part = self._view[key]
        return part.tobytes() if len(part) <= 65536 else part


class IgtlSource(RunEnd, LinkCounters, Source):
    live = True

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None, *,
                 connect_timeout: float = 10.0, frames: int | None = None, timeout: float | None = None,
                 duration: float | None = None, fps: float = 0.0, backoff: float = 0.5, backoff_max: float = 5.0,
                 crc: bool | str = "auto", timestamps: str = "auto", name: str | None = None,
                 connect: bool = True):
        try:
            from pyigtl.messages import CRC64, ImageMessage
        except ImportError:
            raise SourceError(f"{name or 'igtl://'}: the OpenIGTLink source needs the pyigtl package; "
                              f"install it with `pip install pyigtl`") from None
        self._ImageMessage, self._crc64 = ImageMessage, CRC64
        self.host, self.port, self.device = host, int(port), device or None
        self.name = name or f"igtl://{host}:{self.port}" + (f"/{device}" if device else "")
        self.source_id = opaque_id(self.name, "igtl")
        self.connect_timeout = float(connect_timeout)
        self.total = frames
        self.timeout, self.duration = timeout, duration
        self.fps = float(fps)
        self.backoff, self.backoff_max = float(backoff), max(float(backoff_max), float(backoff))
        self.crc = "auto" if crc == "auto" else bool(crc)   # auto: checked whenever the header carries one
        self.timestamps = timestamps
        self.crc_failures = 0
        self._links = Reconnects(self.name, log, Backoff(self.backoff, self.backoff_max))
        self._delay = 0.0                  # wait before the next reconnect (the back-off's, after a failure)
        self.link = LinkStats()
        self.messages_skipped = 0          # messages that were not IMAGE from the device asked for
        self.devices_seen: set[str] = set()
        self.last_error: str | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._valid_seen = False
        self._deadline_end: float | None = None
        self._last_frame_mono = time.monotonic()
        if connect:
            self._connect_at_start()

    # ---- construction from a source string ----

    @classmethod
    def from_uri(cls, uri: str, realtime: bool | None = None, **opts: Any) -> "IgtlSource":
        """`igtl://host:port/DeviceName?connect_timeout=10&frames=N&timeout=S&duration=S&fps=F` (port 18944 by
        default; no device name: any IMAGE device). Keyword options override the query string;
        `realtime` is accepted and ignored (a live feed always runs in real time)."""
        try:
            u = urlsplit(uri)
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise SourceError(f"{uri}: the port is not a number from 1 to 65535; "
                              f"write igtl://host:18944/DeviceName") from None
        if u.scheme != "igtl":
            raise SourceError(f"{uri}: not an igtl:// source; write igtl://host:18944/DeviceName")
        host = u.hostname or "127.0.0.1"
        device = unquote(u.path.strip("/")) or None
        if device is not None and (len(device.encode()) > 20 or "/" in device):
            raise SourceError(f"{uri}: '{device}' is not an OpenIGTLink device name (at most 20 characters, "
                              f"no '/'); write igtl://host:18944/DeviceName")
        shown = f"[{host}]" if ":" in host else host
        name = f"igtl://{shown}:{port}" + (f"/{device}" if device else "")
        options = parse_options(name, u.query, opts, OPTIONS)
        return cls(host, port, device, name=name, **options)

    # ---- public state (reconnects, gap_s, gap_frames: LinkCounters) ----

    def close(self) -> None:
        """Stop iteration (from any thread) and release the socket."""
        self._closed.set()
        self._drop(self._sock)

    # ---- the link ----

    def _open_socket(self, deadline: float | None = None) -> socket.socket:
        limit = 2.0 if deadline is None else max(0.05, min(2.0, deadline - time.monotonic()))
        sock = socket.create_connection((self.host, self.port), timeout=limit)
        try:
            sock.settimeout(POLL_S)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):  # a pulled cable (no FIN) is noticed in ~5 s
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        except OSError:
            sock.close()
            raise
        with self._lock:
            if self._closed.is_set():
                sock.close()
                return None
            self._sock = sock
        return sock

    def _drop(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self._sock is sock:
                self._sock = None
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a receive blocked in another thread
        except OSError:
            pass
        sock.close()

    def _connect_at_start(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        result = retry_open(lambda: self._open_socket(deadline), stop=self._closed,
                            backoff=Backoff(min(self.backoff, 0.25), max(min(self.backoff_max, 1.0), 0.25)),
                            deadline=deadline)
        if result.resource is None and not self._closed.is_set():
            raise SourceError(f"{self.name}: no OpenIGTLink server answered within {self.connect_timeout:g} s "
                              f"({result.error}); start PLUS or the scanner's OpenIGTLink server, or check the "
                              f"host and port")

    @property
    def warnings(self) -> int:
        """Link warnings logged so far (rate-limited: one per back-off step, then a summary line a minute)."""
        return self._links.warnings

    def _lost(self, sock: socket.socket | None, reason: str) -> None:
        """The link failed before or after frames: drop it; the next reconnect waits the back-off's delay."""
        self.last_error = reason
        self._drop(sock)
        self._delay = self._links.failed(reason)

    def _reconnect(self) -> socket.socket:
        self._wait_backoff()
        result = retry_open(self._open_socket, stop=self._closed, backoff=self._links.backoff,
                            deadline=self._end_deadline(), reset=False,
                            failed=lambda e: self._links.failed(f"cannot reach the server ({e})"))
        if result.resource is None:
            self.last_error = result.error or self.last_error
            raise _End
        log.info("%s: connected again after %d attempt(s)", self.name, result.attempts)
        return result.resource

    def _recv_exact(self, sock: socket.socket, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = sock.recv_into(view[got:], min(n - got, 1 << 22))
            except socket.timeout:
                self._check_end()
                continue
            if k == 0:
                raise ConnectionError("the server closed the connection")
            got += k
        return buf

    def _read_message(self, sock: socket.socket) -> tuple[dict[str, Any], bytearray, int]:
        head = self._recv_exact(sock, HEADER_SIZE)
        version, mtype, dname, sec, frac, size, crc = HEADER.unpack(head)
        try:
            mtype = mtype.split(b"\0", 1)[0].decode("ascii").strip()
        except UnicodeDecodeError:
            mtype = ""
        if version not in (1, 2, 3) or not mtype or not mtype.replace("_", "").isalnum():
            raise _ProtocolError
        device = dname.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
        fields = {"header_version": version, "message_type": mtype, "device_name": device,
                  "timestamp": sec + frac / 2.0 ** 32, "body_size": size}
        if size > MAX_BODY:   # refused before a byte of it is read or allocated
            raise _TooLarge(fields, f"declares a body of {size} bytes, more than this runtime reads ({MAX_BODY}: "
                                    f"{MAX_PIXELS // 1_000_000} megapixels at 4 bytes each)")
        body = self._recv_exact(sock, size)
        return fields, body, crc

    # ---- iteration (runs in the streamer's capture thread) ----

    def __iter__(self) -> Iterator[Frame]:
        start = time.monotonic()
        self._last_frame_mono = start
        self._deadline_end = start + self.duration if self.duration else None
        counter = [0]  # frames yielded so far
        try:
            yield from self._frames(counter)
        except _End:
            if counter[0] == 0 and self.device and self.devices_seen and not self._closed.is_set():
                raise SourceError(f"{self.name}: no IMAGE message from device '{self.device}' arrived; the server "
                                  f"sends IMAGE from {', '.join(sorted(self.devices_seen))}, so name one of those "
                                  f"(igtl://{self.host}:{self.port}/<device>) or leave the name out") from None
        finally:
            self._drop(self._sock)

    def _frames(self, counter: list[int]) -> Iterator[Frame]:
        rate = RateEstimate()
        last_arrival: float | None = None
        link_was_lost = fresh = False
        while self.total is None or counter[0] < self.total:
            self._check_end()
            sock = self._sock
            if sock is None:
                link_was_lost = fresh = True
                rate.break_()
                sock = self._reconnect()
            try:
                fields, body, crc = self._read_message(sock)
            except _ProtocolError:
                if not self._valid_seen:
                    raise SourceError(f"{self.name}: the server there does not speak OpenIGTLink (its first bytes "
                                      f"are not an OpenIGTLink header); check the port (PLUS uses "
                                      f"{DEFAULT_PORT})") from None
                self._lost(sock, "the server sent a message with a broken OpenIGTLink header (the stream lost its "
                                 "framing); dropped the connection")
                continue
            except _TooLarge as e:
                fields, phrase = e.args
                self._lost(sock, f"the server sent a {fields['message_type']} message that {phrase}; dropped the "
                                 f"connection")
                if self._wanted(fields):
                    frame = self._refused(counter[0], fields, phrase)
                    counter[0] += 1
                    yield frame
                continue
            except OSError as e:
                if self._closed.is_set():
                    raise _End from None
                self._lost(sock, ("lost the server" if self._valid_seen else "the server closed the link before "
                                  "a frame") + f" ({describe(e)})")
                continue
            arrival = now()
            self._valid_seen = True
            if fresh:  # a reconnect counts once a message arrives (a dying server may still accept a connection)
                self.link.reconnects += 1
                fresh = False
            if not self._wanted(fields):
                self.messages_skipped += 1
                if fields["message_type"] == "IMAGE" and fields["device_name"] not in self.devices_seen:
                    self.devices_seen.add(fields["device_name"])
                    log.warning("%s: skipping IMAGE messages from device '%s'", self.name, fields["device_name"])
                continue
            too_big = _image_too_big(fields, body)
            if too_big:
                self._lost(sock, f"the server sent an IMAGE that {too_big}; dropped the connection")
                frame = self._refused(counter[0], fields, too_big)
                counter[0] += 1
                yield frame
                continue
            frame = self._frame(counter[0], fields, body, crc, arrival)
            del body
            self._last_frame_mono = time.monotonic()
            if frame.error is None:
                self._links.good()     # only a valid frame proves the link works
            if link_was_lost and last_arrival is not None:
                gap = arrival - last_arrival
                frame.meta.update(gap_s=gap, gap_frames=self.link.record_gap(gap, self.fps or rate.fps),
                                  reconnects=self.link.reconnects)
            link_was_lost = False
            rate.tick(arrival)
            last_arrival = arrival
            counter[0] += 1
            yield frame

    # ---- decoding ----

    def _wanted(self, fields: dict[str, Any]) -> bool:
        return fields["message_type"] == "IMAGE" and (not self.device or fields["device_name"] == self.device)

    def _refused(self, index: int, fields: dict[str, Any], phrase: str) -> Frame:
        return Frame(index, self.source_id, now(), None, meta={"device": fields["device_name"]},
                     error=f"{self.name}: IMAGE message {index} from '{fields['device_name']}' {phrase}; configure "
                           f"the server to send smaller images")

    def _frame(self, index: int, fields: dict[str, Any], body: bytearray, crc: int, arrival: float) -> Frame:
        device = fields["device_name"]
        ts = fields["timestamp"]
        use_message = ts > 0 and (self.timestamps == "message" or (
            self.timestamps == "auto" and arrival - PLAUSIBLE_AGE_S <= ts <= arrival + 0.01))
        meta: dict[str, Any] = {"device": device, "t_message": ts,
                                "timestamp_source": "message" if use_message else "arrival"}
        t = ts if use_message else arrival
        label = f"{self.name}: IMAGE message {index} from '{device}'"
        # The header's CRC64 covers the whole body. Every OpenIGTLink library fills it in; `auto` checks it whenever
        # it is there (non-zero), `crc=1` always, `crc=0` never.
        if (crc != 0 if self.crc == "auto" else self.crc) and self._crc64(body) != crc:
            self.crc_failures += 1
            return Frame(index, self.source_id, t, None, error=f"{label} failed its CRC check (its bytes were "
                                                                f"damaged on the way); check the network link to "
                                                                f"the server", meta=meta)
        pixels, spacing, error = self._decode(fields, body)
        if error:
            return Frame(index, self.source_id, t, None, error=f"{label} {error}", meta=meta)
        if spacing is not None:
            meta.update(spacing_meta(*spacing))
        return Frame(index, self.source_id, t, pixels, channel_order="RGB", meta=meta)

    def _decode(self, fields: dict[str, Any], body: bytearray):
        """(pixels, (row mm, col mm) or None, None) or (None, None, 'what is wrong; what to do')."""
        msg = self._ImageMessage()
        try:
            msg.unpack(fields, _Body(body))
        except NotImplementedError:
            return None, None, "is a sub-volume; configure the server to send whole images"
        except KeyError:
            return None, None, "has a scalar type this runtime does not know; send 8- or 16-bit images"
        except Exception as e:  # noqa: BLE001 - malformed content from the network
            return None, None, f"could not be decoded ({describe(e)}); check the server's IMAGE output"
        img = msg.image
        if img.ndim == 3:
            img = img[..., None]
        if img.ndim != 4:
            return None, None, f"has an unexpected shape {img.shape}; send 2-D images"
        k, j, i, c = img.shape
        m = np.asarray(msg.ijk_to_world_matrix, dtype=np.float64)[:3, :3]
        sizes = [float(np.linalg.norm(m[:, a])) for a in range(3)]
        if k == 1:
            img, spacing = img[0], (sizes[1], sizes[0])
        elif i == 1:                       # pyigtl's layout of a plain 2-D array: k rows, j columns
            img, spacing = img[:, :, 0], (sizes[2], sizes[1])
        else:
            return None, None, f"is a 3-D volume of {k} slices; send 2-D images (one slice)"
        if np.allclose(m, np.eye(3)) or min(spacing) <= 0:
            spacing = None                 # the protocol's default matrix: no spacing was given
        if c == 4:
            img = img[..., :3]
        elif c not in (1, 3):
            return None, None, f"has {c} components per pixel; send gray (1) or RGB (3) images"
        if c == 1:
            img = img[..., 0]
        if img.dtype.byteorder not in ("=", "|"):
            img = img.astype(img.dtype.newbyteorder("="))
        if img.dtype == np.uint8 or img.dtype == np.uint16:
            pixels = np.array(img, order="C", copy=True)
        elif img.dtype == np.int8:
            pixels = np.ascontiguousarray(img).view(np.uint8) ^ np.uint8(0x80)
        elif img.dtype == np.int16:
            pixels = np.ascontiguousarray(img).view(np.uint16) ^ np.uint16(0x8000)
        else:
            return None, None, f"has scalar type {img.dtype}; send 8- or 16-bit images (uint8/int8/uint16/int16)"
        return pixels, None if spacing is None else (round(spacing[0], 6), round(spacing[1], 6)), None


def _image_too_big(fields: dict[str, Any], body) -> str | None:
    """A phrase when an IMAGE's own header declares more pixels than the budget (checked before pyigtl decodes it),
    else None (a malformed header is left to the decoder's own error)."""
    at = 0
    if fields["header_version"] > 1:
        if len(body) < 2:
            return None
        at = int.from_bytes(bytes(body[:2]), "big")
    if len(body) < at + IMAGE_HEAD.size:
        return None
    values = IMAGE_HEAD.unpack_from(body, at)
    components, scalar = values[1], values[2]
    i, j, k = values[5:8]
    pixels = i * j * k
    if pixels > MAX_PIXELS:
        return (f"declares {i}x{j}x{k} pixels, more than this runtime decodes ({MAX_PIXELS // 1_000_000} "
                f"megapixels)")
    if pixels * max(1, components) * _SCALAR_BYTES.get(scalar, 1) > MAX_BODY:
        return f"declares {i}x{j}x{k} pixels of {components} components, more than this runtime decodes"
    return None
