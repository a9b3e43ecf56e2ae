"""Streaming: a capture thread feeds the pipeline worker through a bounded hand-off with a named policy.

`all`    (files): lossless; capture waits when the worker is behind (back-pressure).
`newest` (live):  only the latest frame waits; an older one it replaces is dropped and counted. A dropped frame
                  still gets its record (error "dropped ..."), so results keep one record per input frame, in order.

A stop request (`stop`: a `StopRequest`, which a signal handler may set, or a threading.Event) ends the run after
the frame in hand; the sinks then hold every record up to it. A sink whose write raises is told so (`Sink.fail`)
and handed no more records; the others go on.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sources import Frame, Source

POLICIES = ("newest", "all")
POLL_S = 0.1        # how often a worker waiting for a frame looks at the stop request


class StopRequest:
    """A request to end a run early, made from a signal handler (runtime/cli.py): setting it is one attribute
    write, no lock, so it is safe at any moment. `signum` is the signal that asked (None: not asked). `phase` is
    the run's, which the handler reads: "starting" (nothing to finish yet), "streaming" (the stream ends after the
    frame in hand and the outputs are finished), "finishing" (the outputs are being finished)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase = "starting"

    def set(self, signum: int | None = 0) -> None:
        if self.signum is None:
            self.signum = signum

    def is_set(self) -> bool:
        return self.signum is not None


@dataclass
class StreamStats:
    frames: int = 0
    processed: int = 0
    accepted: int = 0
    errors: int = 0
    dropped: int = 0
    wall_s: float = 0.0
    sink_errors: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0


class _Handoff:
    """The bounded queue between capture and worker, with the policy's semantics."""

    def __init__(self, policy: str, depth: int = 4):
        self.policy = policy
        self.depth = 1 if policy == "newest" else depth
        self.items: collections.deque[Frame] = collections.deque()
        self.dropped: collections.deque[Frame] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False

    def put(self, frame: Frame) -> None:
        with self.cond:
            if self.policy == "newest":
                while self.items:
                    self.dropped.append(self.items.popleft())
            else:
                while len(self.items) >= self.depth and not self.closed:
                    self.cond.wait()
            self.items.append(frame)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def get(self, stopped: Callable[[], bool] = lambda: False) -> tuple[list[Frame], Frame | None]:
        """(frames dropped before the next one, the next frame or None at the end or when `stopped()`)."""
        with self.cond:
            while not self.items and not self.closed and not stopped():
                self.cond.wait(POLL_S)
            dropped = list(self.dropped)
            self.dropped.clear()
            frame = self.items.popleft() if self.items else None
            self.cond.notify_all()
            return dropped, frame


def run_stream(source: Source | Iterable[Frame], process: Callable[[Frame, float], FrameRecord],
               sinks: list[Sink], *, policy: str = "all",
               on_record: Callable[[FrameRecord, StreamStats], None] | None = None,
               stop: StopRequest | threading.Event | None = None,
               on_sink_error: Callable[[str], None] | None = None) -> StreamStats:
    """Run frames from `source` through `process` into `sinks` until the source ends or `stop` is set (then after
    the frame in hand). A sink whose write raises gets no more records; `on_sink_error` hears its sentence."""
    if policy not in POLICIES:
        raise ValueError(f"policy '{policy}' is not one of {', '.join(POLICIES)}")
    halt = threading.Event()            # tells the capture thread to end

    def stopped() -> bool:
        return halt.is_set() or (stop is not None and stop.is_set())

    failed: set[int] = set()
    handoff = _Handoff(policy)
    stats = StreamStats()
    capture_error: list[BaseException] = []

    def capture() -> None:
        try:
            for frame in source:
                if stopped():
                    break
                handoff.put(frame)
        except BaseException as e:  # reported after the worker drains what it has
            capture_error.append(e)
        finally:
            handoff.close()

    def emit(rec: FrameRecord) -> None:
        stats.frames += 1
        stats.accepted += rec.accepted
        stats.errors += rec.error is not None and rec.error != DROPPED
        for i, sink in enumerate(sinks):
            if i in failed:
                continue
            try:
                sink.write(rec)
            except Exception as e:  # a full disk must not stop the scoring of live frames, nor the other outputs
                failed.add(i)
                msg = sink.fail(e) if hasattr(sink, "fail") else f"{type(sink).__name__}: {e}"
                stats.sink_errors.append(msg)
                if on_sink_error:
                    on_sink_error(msg)
        if on_record:
            on_record(rec, stats)

    t_begin = time.perf_counter()
    thread = threading.Thread(target=capture, name="capture", daemon=True)
    thread.start()
    try:
        while True:
            dropped, frame = handoff.get(stopped)
            for d in dropped:
                stats.dropped += 1
                emit(FrameRecord(d.index, d.source_id, d.t_capture, error=DROPPED))
            if frame is None:
                break
            t0 = time.perf_counter()
            try:
                rec = process(frame, t0)
            except Exception as e:  # an internal failure on one frame must not end a live run
                rec = FrameRecord(frame.index, frame.source_id, frame.t_capture,
                                  error=f"frame {frame.index}: internal error ({type(e).__name__}: {e})")
            stats.processed += 1
            emit(rec)
            if stopped():       # the stop request ends the run after the frame in hand
                break
    finally:
        halt.set()
        handoff.close()
        thread.join(timeout=5)
        stats.wall_s = time.perf_counter() - t_begin
    if capture_error:
        raise capture_error[0]
    return stats
