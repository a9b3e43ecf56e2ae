"""Who gets in, and how much: the Storage SCP's admission rules, its rejection log and its size cap.

Admission (`Door.admit`, on EVT_REQUESTED: the A-ASSOCIATE-RQ has arrived), in this order:

    called AE title not ours              rejected permanent, user, called AE title not recognised (0x01 0x01 0x07)
    calling AE title not in calling_aes   rejected permanent, user, calling AE title not recognised (0x01 0x01 0x03)
    a shared slot free and the peer under max_per_peer          admitted (shared)
    else a slot reserved for its calling AE title free          admitted (reserved; the per-peer limit does not
                                                                apply: the scanner shares no slot with strangers)
    else                                                        rejected transient, local limit exceeded (0x02 0x03
                                                                0x02): "limit reached" or "per-peer limit reached"

The shared slots are `max_associations` less `reserved_per_calling_ae` for each AE title of `calling_aes`. A
connection counts only once its association request arrives, so bare TCP connections take no slot; each gets
`request_timeout_s` to send it and is then closed (pynetdicom's ACSE timeout). An admitted association silent for
`idle_timeout_s` is aborted (pynetdicom's network timeout), one that stops inside a message after `dimse_timeout_s`.

`RejectLog` says each rejection's true reason once per reason and peer address, then how many more there were,
at most once a minute (`window_s`) for each: a flood of rejections is a handful of lines.

`SizeGuard` counts the data set bytes of each C-STORE as its P-DATA arrive (EVT_DATA_RECV, before they are
decoded); past `max_instance_bytes` the rest is not written (pynetdicom writes a received data set to a file in the
spool's tmp/, `_config.STORE_RECV_CHUNKED_DATASET`, never to memory) and the C-STORE is answered 0xA700.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("sonoscore.dicomnet")

# A-ASSOCIATE-RJ (result, source, diagnostic)
RJ_CALLED_AE = (0x01, 0x01, 0x07)
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_LIMIT = (0x02, 0x03, 0x02)

PENDING_CONNECTIONS = 64   # connections that have not asked for an association yet, held at once (beyond: refused)


@dataclass
class Verdict:
    admitted: bool
    reason: str = ""            # the true reason, in words (rejected only)
    key: str = ""               # the reason's short name (the rejection log groups by it)
    rj: tuple[int, int, int] = RJ_LIMIT
    slot: str = ""              # "shared" or the calling AE title whose reserved slot it takes (admitted only)


class Door:
    """Who may associate now: bookkeeping of the admitted associations by peer address and slot."""

    def __init__(self, ae_title: str, calling_aes, max_associations: int, max_per_peer: int, reserved_per_ae: int):
        self.ae_title = ae_title.strip()
        self.calling_aes = tuple(dict.fromkeys(a.strip() for a in calling_aes))
        self.max_associations = max_associations
        self.max_per_peer = max_per_peer
        self.reserved_per_ae = reserved_per_ae if self.calling_aes else 0
        self.shared = max(0, max_associations - self.reserved_per_ae * len(self.calling_aes))
        self._lock = threading.Lock()
        self._held: dict[int, tuple[str, str]] = {}     # id(assoc) -> (peer address, slot)

    def admit(self, key: int, peer: str, calling: str, called: str) -> Verdict:
        calling, called = calling.strip(), called.strip()
        if called != self.ae_title:
            return Verdict(False, f"called AE title '{_printable(called)}' is not this SCP's ('{self.ae_title}')",
                           "wrong called AE", RJ_CALLED_AE)
        if self.calling_aes and calling not in self.calling_aes:
            return Verdict(False, f"calling AE title '{_printable(calling)}' is not in listen.calling_aes",
                           "unknown calling AE", RJ_CALLING_AE)
        with self._lock:
            held = list(self._held.values())
            shared_used = sum(1 for _, slot in held if slot == "shared")
            from_peer = sum(1 for p, _ in held if p == peer)
            if shared_used < self.shared and from_peer < self.max_per_peer:
                slot = "shared"
            elif calling in self.calling_aes and sum(1 for _, s in held if s == calling) < self.reserved_per_ae:
                slot = calling
            elif shared_used >= self.shared:
                return Verdict(False, f"the limit of {self.max_associations} association(s) at once is reached "
                                      f"(listen.max_associations)", "limit reached")
            else:
                return Verdict(False, f"the per-peer limit of {self.max_per_peer} association(s) at once from one "
                                      f"address is reached (listen.max_per_peer)", "per-peer limit reached")
            self._held[key] = (peer, slot)
        return Verdict(True, slot=slot)

    def leave(self, key: int) -> None:
        with self._lock:
            self._held.pop(key, None)

    def count(self) -> int:
        with self._lock:
            return len(self._held)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:16]


class RejectLog:
    """Rejections said once per (reason, peer), then a count at most once per `window_s` for each."""

    def __init__(self, window_s: float = 60.0, logger: logging.Logger = log):
        self.window_s = window_s
        self.log = logger
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list] = {}    # (key, peer) -> [window start, suppressed count]

    def rejected(self, key: str, peer: str, sentence: str) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get((key, peer))
            if entry is None:
                self._seen[(key, peer)] = [now, 0]
                say = True
            else:
                entry[1] += 1
                say = False
        if say:
            self.log.warning("%s; further rejections from %s for this reason are counted, not each logged",
                             sentence, peer)
        self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Say the counts of the windows that have ended."""
        now = time.monotonic() if now is None else now
        lines = []
        with self._lock:
            for (key, peer), entry in list(self._seen.items()):
                if now - entry[0] < self.window_s:
                    continue
                if entry[1]:
                    lines.append((entry[1], peer, key, now - entry[0]))
                    self._seen[(key, peer)] = [now, 0]
                else:
                    del self._seen[(key, peer)]       # quiet for a whole window: the next one is said again
        for n, peer, key, span in lines:
            self.log.warning("%d more association(s) from %s rejected in the last %.0f s (%s)", n, peer, span, key)


class SizeGuard:
    """EVT_DATA_RECV: the data set bytes of the C-STORE in progress on each association; past the limit the rest
    is thrown away and the association is marked, so the C-STORE handler refuses it (0xA700)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._size: dict[int, int] = {}
        self._over: set[int] = set()

    def on_data(self, event) -> None:
        data = event.data
        if not data or data[0] != 0x04:            # only P-DATA-TF carries messages
            return
        key = id(event.assoc)
        pos, end = 6, len(data)
        while pos + 6 <= end:
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            if length < 2:
                break
            control = data[pos + 5]
            size = length - 2                       # the item less its context ID and control header
            with self._lock:
                if control & 0x01:                  # a command fragment: a new message begins
                    self._size[key] = 0
                    self._over.discard(key)
                else:
                    self._size[key] = self._size.get(key, 0) + size
                    over = self._size[key] > self.max_bytes and key not in self._over
                    if over:
                        self._over.add(key)
            if not control & 0x01 and over:
                _discard_rest(event.assoc)
            pos += 4 + length

    def over(self, assoc) -> int | None:
        """The bytes received of the C-STORE in progress when it went over the limit, else None."""
        with self._lock:
            return self._size.get(id(assoc)) if id(assoc) in self._over else None

    def forget(self, assoc) -> None:
        with self._lock:
            self._size.pop(id(assoc), None)
            self._over.discard(id(assoc))


class _Discard:
    """Stands in for pynetdicom's temporary file of a data set over the limit: nothing more is written."""

    def __init__(self, real):
        self._real = real
        self.name = real.name
        self.file = self

    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._real.close()


def _discard_rest(assoc) -> None:
    """The data set being received on `assoc` is over the limit: empty its file and write nothing more to it.
    Reaches into pynetdicom's DIMSE provider (the message in progress); should that change, the data set is still
    written to disk (never memory) and refused when complete."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    real = getattr(message, "_data_set_file", None)
    if real is None or isinstance(real, _Discard):
        return
    try:
        real.flush()
        os.truncate(real.name, 0)
    except (OSError, ValueError):
        pass
    message._data_set_file = _Discard(real)
