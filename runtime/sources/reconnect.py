"""Reconnect with back-off, shared by the live sources (OpenIGTLink servers, capture cards and cameras).

A live feed goes away (the scanner's server restarts, the HDMI cable is pulled) and comes back; the run goes on.
`retry_open(open_fn, ...)` calls `open_fn()` until it gives a resource, waiting 0.5 s, 1 s, 2 s, 4 s, 5 s, 5 s ...
between attempts (interruptible by a stop event, bounded by a deadline). `LinkStats` counts the reconnects and the
frames the gap cost (estimated: gap seconds x frame rate), so a run's report can say what was lost.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from runtime.backoff import Backoff

T = TypeVar("T")



@dataclass
class OpenResult(Generic[T]):
    resource: T | None          # None: gave up (stopped, or the deadline passed)
    attempts: int               # calls of open_fn
    error: str | None           # the last failure, as one short phrase


def retry_open(open_fn: Callable[[], T | None], *, stop: threading.Event, backoff: Backoff,
               deadline: float | None = None, wait: Callable[[float], object] | None = None,
               reset: bool = True, failed: "Callable[[str], float] | None" = None) -> OpenResult[T]:
    """Call `open_fn` until it returns something other than None (an exception counts as a failure).

    Between attempts wait the back-off's next delay (never past `deadline`, a `time.monotonic()` value), through
    `wait(seconds)` (default: `stop.wait`, so setting `stop` ends the wait at once). Gives up, returning a result
    with resource None, when `stop` is set or the deadline has passed after a failed attempt. `reset=False` keeps
    the back-off where it is after a success (a live source resets it only once the link gave a frame: an open
    that then closes is not a working link); `failed(error)`, when given, is told of each failed attempt and
    returns the delay (`Reconnects.failed`, which also rate-limits the warnings).
    """
    wait = wait or stop.wait
    attempts, error = 0, None
    while not stop.is_set():
        attempts += 1
        try:
            resource = open_fn()
        except Exception as e:  # noqa: BLE001 - any failure to open is a failed attempt
            resource, error = None, describe(e)
        else:
            if resource is None:
                error = "could not be opened"
        if resource is not None:
            if reset:
                backoff.reset()
            return OpenResult(resource, attempts, None)
        delay = failed(error or "could not be opened") if failed is not None else backoff.next_delay()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            delay = min(delay, left)
        wait(delay)
    return OpenResult(None, attempts, error)


class Reconnects:
    """The one back-off of a live source, kept across reconnects, and its warnings.

    A link that opens and then closes (a server that accepts and hangs up; an ssh tunnel or docker proxy with
    nothing behind it; a device that opens but gives no frame) is a failed attempt like a refused one: the delay
    grows 0.5 s, 1 s, 2 s, 4 s, 5 s, ... and is reset only when the link delivered a valid frame (`good()`).
    Warnings: one per back-off step (the first names the cause), then, at the longest delay, one summary line per
    `summary_s` seconds; `warnings` counts them.
    """

    def __init__(self, name: str, logger, backoff: Backoff, summary_s: float = 60.0):
        self.name, self.log, self.backoff, self.summary_s = name, logger, backoff, summary_s
        self.failures = 0             # failed attempts since the last valid frame
        self.warnings = 0
        self._warned: set[float] = set()
        self._since: float | None = None
        self._last_warning = 0.0

    def good(self) -> None:
        """The link delivered a valid frame: the back-off starts again from its shortest delay."""
        if self.failures:
            self.log.info("%s: frames again after %d failed attempt(s)", self.name, self.failures)
        self.backoff.reset()
        self.failures = 0
        self._warned.clear()
        self._since = None

    def failed(self, reason: str) -> float:
        """One failed attempt (an open that failed, or a link that closed or broke before a valid frame); returns
        the delay before the next attempt."""
        delay = self.backoff.next_delay()
        self.failures += 1
        t = time.monotonic()
        if self._since is None:
            self._since = t
        if delay not in self._warned:
            self._warned.add(delay)
            self._warn(f"{self.name}: {reason}; trying again in {delay:g} s"
                       + (f" ({self.failures} failed attempts since the last frame)" if self.failures > 1 else ""), t)
        elif t - self._last_warning >= self.summary_s:
            self._warn(f"{self.name}: still no frame after {self.failures} attempts in {t - self._since:.0f} s "
                       f"(last: {reason}); trying every {delay:g} s", t)
        return delay

    def _warn(self, text: str, t: float) -> None:
        self.warnings += 1
        self._last_warning = t
        self.log.warning("%s", text)


def describe(e: BaseException) -> str:
    """An OS error as a short lower-case phrase ("connection refused"), anything else as its message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    text = str(e).strip()
    return text or type(e).__name__


def gap_frames(gap_s: float, fps: float) -> int:
    """Frames a live feed produced while nobody received them: the gap between the last frame before and the first
    frame after, minus the one normal frame interval. 0 when the rate is unknown."""
    if fps <= 0 or gap_s <= 0:
        return 0
    return max(0, int(round(gap_s * fps)) - 1)


@dataclass
class EndOfRun(Exception):
    """Internal to a reconnecting source: it was closed, or its duration or frame timeout passed."""


class RunEnd:
    """Mixin for a reconnecting source with `_closed` (an Event), `_deadline_end` (monotonic end of --duration, or
    None), `_last_frame_mono`, `timeout` (seconds without a frame that end the run; 0 or None: never) and `_delay`
    (the back-off's wait before the next re-open)."""

    def _end_deadline(self) -> float | None:
        """When the run ends if no frame comes (timeout) or at all (duration), as a monotonic time."""
        ends = [t for t in (self._deadline_end,
                            self._last_frame_mono + self.timeout if self.timeout else None) if t is not None]
        return min(ends) if ends else None

    def _check_end(self) -> None:
        """Raise EndOfRun when the source was closed or a deadline passed."""
        if self._closed.is_set():
            raise EndOfRun
        deadline = self._end_deadline()
        if deadline is not None and time.monotonic() >= deadline:
            raise EndOfRun

    def _wait_backoff(self) -> None:
        """Wait out the back-off's current delay (`_delay`, also after an open or connect that gave no frame: the
        back-off survives it), no longer than the run's end; EndOfRun when the run ended meanwhile."""
        if self._delay > 0:
            deadline = self._end_deadline()
            wait = self._delay if deadline is None else max(0.0, min(self._delay, deadline - time.monotonic()))
            self._closed.wait(wait)
            self._check_end()


class LinkCounters:
    """Mixin for a reconnecting source with a `link: LinkStats`: its totals as attributes of the source."""

    link: "LinkStats"

    @property
    def reconnects(self) -> int:
        return self.link.reconnects

    @property
    def gap_s(self) -> float:
        return self.link.gap_s

    @property
    def gap_frames(self) -> int:
        return self.link.gap_frames


class LinkStats:
    """What reconnecting cost a run: how often, how long, how many frames (estimated)."""

    reconnects: int = 0       # successful re-opens after the feed was lost
    gap_s: float = 0.0        # seconds between the last frame before and the first frame after, summed
    gap_frames: int = 0       # frames estimated lost in those gaps, summed

    def record_gap(self, gap_s: float, fps: float) -> int:
        """Account one gap (call with the first frame after it); returns its estimated lost frames."""
        n = gap_frames(gap_s, fps)
        self.gap_s += max(0.0, gap_s)
        self.gap_frames += n
        return n


class RateEstimate:
    """Frame rate from arrival intervals (exponential average), for feeds that do not announce one."""

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self.interval: float | None = None
        self._last: float | None = None

    def tick(self, t: float) -> None:
        if self._last is not None:
            dt = t - self._last
            if dt > 0:
                self.interval = dt if self.interval is None else (1 - self.alpha) * self.interval + self.alpha * dt
        self._last = t

    def break_(self) -> None:
        """The link went down: the next interval is a gap, not a frame interval."""
        self._last = None

    @property
    def fps(self) -> float:
        return 1.0 / self.interval if self.interval else 0.0


# ---- options of live sources (query string of the source URI, or keyword arguments) ----

def _number(kind, minimum: float, strict: bool, phrase: str):
    def convert(value):
        if isinstance(value, bool):
            raise ValueError(phrase)
        try:
            x = kind(value) if kind is float else int(str(value).strip())
        except (TypeError, ValueError):
            raise ValueError(phrase) from None
        if x != x or (x <= minimum if strict else x < minimum):
            raise ValueError(phrase)
        return x
    return convert


positive_int = _number(int, 0, True, "a whole number >= 1")
non_negative_int = _number(int, 0, False, "a whole number >= 0")
positive_float = _number(float, 0.0, True, "a number > 0 (seconds or frames per second)")
non_negative_float = _number(float, 0.0, False, "a number >= 0")


def flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("1 or 0 (true or false)")


def choice(*names: str):
    def convert(value):
        text = str(value).strip().lower()
        if text not in names:
            raise ValueError("one of " + ", ".join(names))
        return text
    return convert


def parse_options(name: str, query: str, opts: dict, spec: dict[str, Callable]) -> dict:
    """Options from a URI query string, overridden by keyword arguments (None = not given), checked against
    `spec` (option -> converter raising ValueError("what it must be")). Raises SourceError with one sentence."""
    from urllib.parse import parse_qs

    from runtime.sources.base import SourceError
    given = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    given.update({k: v for k, v in opts.items() if v is not None})
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise SourceError(f"{name}: unknown option(s) {', '.join(unknown)}; the options are {', '.join(spec)}")
    out = {}
    for key, value in given.items():
        try:
            out[key] = spec[key](value)
        except ValueError as e:
            raise SourceError(f"{name}: option {key}={value} must be {e}") from None
    return out
