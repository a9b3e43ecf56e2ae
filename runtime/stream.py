"""Streaming: a capture thread feeds the pipeline worker through a bounded hand-off with a named policy.

`all`    (files): lossless; capture waits when the worker is behind (back-pressure).
`newest` (live):  only the latest frame waits; an older one it replaces is dropped and counted. A dropped frame
                  still gets its record (error "dropped ..."), so results keep one record per input frame, in order;
                  its pixels and meta are let go the moment it is replaced (only index, source id and capture time
                  wait for the worker), so a slow worker never holds more than the newest frame's pixels.

Latency: `process(frame, t0)` is handed the perf_counter at which the worker took the frame from the hand-off. A
record's `latency_ms.wait` ends there (capture -> taken: under `all`, the back-pressure of a source that reads
ahead) and its processing stages and `total` start there (runtime/pipeline.py), so a slow pipeline and a long
queue read apart.

A stop request (`stop`: a `StopRequest`, which a signal handler may set, or a threading.Event) ends the run after
the frame in hand; the sinks then hold every record up to it. A sink whose write raises is told so (`Sink.fail`)
and handed no more records; the others go on.

When the worker is done while the capture thread still runs (a stop request, or a worker that failed), the source
is told to stop: `source.close()`, which every `Source` accepts from another thread and which wakes a read blocked
in it where the source can (a socket, a capture device between grabs, the simulator's pacing). The capture thread
is then given `join_s` (5 s) to end; if it has not, one sentence on stderr says so and the run ends without it
(it is a daemon thread).
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Callable, Iterable

from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sources import Frame, Source

POLICIES = ("newest", "all")
POLL_S = 0.1        # how often a worker waiting for a frame looks at the stop request
JOIN_S = 5.0        # how long the end of a run waits for the capture thread once the source is told to stop


class StopRequest:
    """A request to end a run early, made from a signal handler (runtime/cli/common.py): setting it is one attribute
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


@dataclass(frozen=True)
class Dropped:
    """What is kept of a frame the `newest` policy dropped, for its DROPPED record: no pixels, no meta."""
    index: int
    source_id: str
    t_capture: float
    source_file: str | None = None
    frame_in_file: int | None = None


class _Handoff:
    """The bounded queue between capture and worker, with the policy's semantics."""

    def __init__(self, policy: str, depth: int = 4):
        self.policy = policy
        self.depth = 1 if policy == "newest" else depth
        self.items: collections.deque[Frame] = collections.deque()
        self.dropped: collections.deque[Dropped] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False

    def put(self, frame: Frame) -> None:
        with self.cond:
            if self.policy == "newest":
                while self.items:      # the replaced frame's pixels are freed here, not at the worker's next get
                    old = self.items.popleft()
                    self.dropped.append(Dropped(old.index, old.source_id, old.t_capture, old.source_file,
                                                old.frame_in_file))
                    del old
            else:
                while len(self.items) >= self.depth and not self.closed:
                    self.cond.wait()
            self.items.append(frame)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def get(self, stopped: Callable[[], bool] = lambda: False) -> tuple[list[Dropped], Frame | None]:
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
               on_sink_error: Callable[[str], None] | None = None, join_s: float | None = None,
               record_paths: bool = False) -> StreamStats:
    """Run frames from `source` through `process` into `sinks` until the source ends or `stop` is set (then after
    the frame in hand). A sink whose write raises gets no more records; `on_sink_error` hears its sentence.
    A source still running when the worker is done is closed (`source.close()`, from this thread) and its capture
    thread given `join_s` seconds (default JOIN_S) to end; one sentence on stderr says so if it does not.
    `record_paths` (`run --record-paths`): every record, dropped ones too, carries its frame's `source_file` and
    `frame_in_file`; without it they stay None (and out of the results)."""
    if policy not in POLICIES:
        raise ValueError(f"policy '{policy}' is not one of {', '.join(POLICIES)}")
    halt = threading.Event()            # tells the capture thread to end
    join_s = JOIN_S if join_s is None else join_s

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

    def emit(rec: FrameRecord, origin) -> None:
        if record_paths:
            rec.source_file = getattr(origin, "source_file", None)
            rec.frame_in_file = getattr(origin, "frame_in_file", None)
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
                emit(FrameRecord(d.index, d.source_id, d.t_capture, error=DROPPED), d)
            if frame is None:
                break
            t0 = time.perf_counter()
            try:
                rec = process(frame, t0)
            except Exception as e:  # an internal failure on one frame must not end a live run
                rec = FrameRecord(frame.index, frame.source_id, frame.t_capture,
                                  error=f"frame {frame.index}: internal error ({type(e).__name__}: {e})")
            stats.processed += 1
            emit(rec, frame)
            if stopped():       # the stop request ends the run after the frame in hand
                break
    finally:
        halt.set()
        handoff.close()
        if thread.is_alive():
            _tell_source_to_stop(source)
        thread.join(timeout=join_s)
        if thread.is_alive():
            print(f"sonoscore: the source did not stop within {join_s:g} s of the end of the run (a read in it "
                  f"cannot be interrupted); the run ends without waiting for it", file=sys.stderr, flush=True)
        stats.wall_s = time.perf_counter() - t_begin
    if capture_error:
        raise capture_error[0]
    return stats


def _tell_source_to_stop(source) -> None:
    """`source.close()` for a source object; a bare generator is left alone (closing one that another thread is
    running raises, and it has no read to wake). A close that raises must not hide the run's own outcome."""
    close = getattr(source, "close", None)
    if close is None or isinstance(source, types.GeneratorType):
        return
    try:
        close()
    except Exception as e:  # noqa: BLE001 - reported, the run's records are already safe
        print(f"sonoscore: closing the source at the end of the run failed ({type(e).__name__}: {e})",
              file=sys.stderr, flush=True)
