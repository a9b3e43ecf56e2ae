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

Link: at start the source tries for `connect_timeout` seconds (default 10) and then raises one sentence. Once
running, a server that goes away is re-connected with back-off (0.5 s doubling to 5 s) for as long as the run
lasts; `reconnects`, `gap_s` and `gap_frames` count it, and the first frame after a gap carries `meta["gap_s"]`,
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

from runtime.sources import Frame, Source, SourceError, now, opaque_id, spacing_meta
from runtime.sources.reconnect import (Backoff, EndOfRun, LinkCounters, LinkStats, RateEstimate, RunEnd, choice,
                                       describe, flag, non_negative_float, parse_options, positive_float,
                                       positive_int, retry_open)

log = logging.getLogger(__name__)

DEFAULT_PORT = 18944
HEADER = struct.Struct("> H 12s 20s I I Q Q")   # version, type, device, seconds, fraction, body size, CRC64
HEADER_SIZE = HEADER.size                        # 58
MAX_BODY = 1 << 30                               # a larger body is not an image this runtime would take
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
    "crc": flag,
    "timestamps": choice("auto", "message", "arrival"),
}


_End = EndOfRun  # closed, or a duration/timeout passed (runtime.sources.reconnect.RunEnd)


class _ProtocolError(Exception):
    """The bytes on the socket are not an OpenIGTLink message."""


class IgtlSource(RunEnd, LinkCounters, Source):
    live = True

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None, *,
                 connect_timeout: float = 10.0, frames: int | None = None, timeout: float | None = None,
                 duration: float | None = None, fps: float = 0.0, backoff: float = 0.5, backoff_max: float = 5.0,
                 crc: bool = False, timestamps: str = "auto", name: str | None = None, connect: bool = True):
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
        self.crc, self.timestamps = bool(crc), timestamps
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

    def _reconnect(self) -> socket.socket:
        result = retry_open(self._open_socket, stop=self._closed, backoff=Backoff(self.backoff, self.backoff_max),
                            deadline=self._end_deadline())
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
        if version not in (1, 2, 3) or not mtype or not mtype.replace("_", "").isalnum() or size > MAX_BODY:
            raise _ProtocolError
        device = dname.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
        body = self._recv_exact(sock, size)
        fields = {"header_version": version, "message_type": mtype, "device_name": device,
                  "timestamp": sec + frac / 2.0 ** 32, "body_size": size}
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
                self.last_error = "a message with a broken header"
                self._drop(sock)
                continue
            except OSError as e:
                if self._closed.is_set():
                    raise _End from None
                self.last_error = describe(e)
                log.warning("%s: lost the server (%s); reconnecting", self.name, self.last_error)
                self._drop(sock)
                continue
            arrival = now()
            self._valid_seen = True
            if fresh:  # a reconnect counts once a message arrives (a dying server may still accept a connection)
                self.link.reconnects += 1
                fresh = False
            if fields["message_type"] != "IMAGE" or (self.device and fields["device_name"] != self.device):
                self.messages_skipped += 1
                if fields["message_type"] == "IMAGE" and fields["device_name"] not in self.devices_seen:
                    self.devices_seen.add(fields["device_name"])
                    log.warning("%s: skipping IMAGE messages from device '%s'", self.name, fields["device_name"])
                continue
            frame = self._frame(counter[0], fields, body, crc, arrival)
            self._last_frame_mono = time.monotonic()
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

    def _frame(self, index: int, fields: dict[str, Any], body: bytearray, crc: int, arrival: float) -> Frame:
        device = fields["device_name"]
        ts = fields["timestamp"]
        use_message = ts > 0 and (self.timestamps == "message" or (
            self.timestamps == "auto" and arrival - PLAUSIBLE_AGE_S <= ts <= arrival + 0.01))
        meta: dict[str, Any] = {"device": device, "t_message": ts,
                                "timestamp_source": "message" if use_message else "arrival"}
        t = ts if use_message else arrival
        label = f"{self.name}: IMAGE message {index} from '{device}'"
        if self.crc and self._crc64(bytes(body)) != crc:
            return Frame(index, self.source_id, t, None, error=f"{label} failed its CRC check; check the network "
                                                                f"link to the server", meta=meta)
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
            msg.unpack(fields, body)
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
