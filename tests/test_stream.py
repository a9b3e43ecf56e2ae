"""Streaming policies: `all` is lossless and ordered; `newest` drops stale frames, counts them, and still emits
one record per input frame in input order."""
import threading
import time

import numpy as np
import pytest

from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sources import Frame
from runtime.stream import run_stream


class Collect(Sink):
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass


def frames(n, period_s=0.0):
    for i in range(n):
        if period_s:
            time.sleep(period_s)
        yield Frame(i, "test", time.time(), np.zeros((4, 4), np.uint8))


def slow_process(delay_s):
    def process(frame, t0):
        time.sleep(delay_s)
        return FrameRecord(frame.index, frame.source_id, frame.t_capture, accepted=True)
    return process


def test_policy_all_is_lossless_and_ordered_under_back_pressure():
    sink = Collect()
    stats = run_stream(frames(40), slow_process(0.002), [sink], policy="all")
    assert [r.frame for r in sink.records] == list(range(40))
    assert stats.dropped == 0 and stats.processed == 40 and stats.accepted == 40


def test_policy_newest_drops_stale_frames_but_keeps_one_record_each_in_order():
    sink = Collect()
    # frames every 2 ms, processing takes 10 ms: most frames must be dropped
    stats = run_stream(frames(60, 0.002), slow_process(0.010), [sink], policy="newest")
    assert [r.frame for r in sink.records] == list(range(60))
    dropped = [r for r in sink.records if r.error == DROPPED]
    assert stats.dropped == len(dropped) >= 20
    assert stats.processed + stats.dropped == 60
    assert sink.records[-1].error is None  # the last frame is always processed


def test_a_frame_that_raises_gets_an_error_record_and_the_run_goes_on():
    def process(frame, t0):
        if frame.index == 3:
            raise RuntimeError("boom")
        return FrameRecord(frame.index, frame.source_id, frame.t_capture)
    sink = Collect()
    stats = run_stream(frames(6), process, [sink], policy="all")
    assert len(sink.records) == 6 and stats.errors == 1
    assert "internal error" in sink.records[3].error and "boom" in sink.records[3].error


def test_a_failing_sink_does_not_stop_the_stream():
    class Broken(Sink):
        def write(self, record):
            raise OSError("disk full")
    good = Collect()
    stats = run_stream(frames(5), slow_process(0), [Broken(), good], policy="all")
    assert len(good.records) == 5 and stats.sink_errors and "disk full" in stats.sink_errors[0]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        run_stream(frames(1), slow_process(0), [], policy="sometimes")


def test_stop_event_ends_an_endless_source():
    stop = threading.Event()

    def endless():
        i = 0
        while True:
            yield Frame(i, "t", time.time(), None)
            i += 1

    def process(frame, t0):
        if frame.index == 10:
            stop.set()
        return FrameRecord(frame.index, frame.source_id, frame.t_capture)
    stats = run_stream(endless(), process, [], policy="all", stop=stop)
    assert 10 <= stats.frames <= 20


def test_a_failing_sink_is_told_once_and_handed_no_more_records():
    class Broken(Sink):
        calls = 0

        def write(self, record):
            self.calls += 1
            raise OSError(28, "No space left on device")
    broken, good, heard = Broken(), Collect(), []
    stats = run_stream(frames(5), slow_process(0), [broken, good], policy="all", on_sink_error=heard.append)
    assert broken.calls == 1 and len(good.records) == 5
    assert stats.sink_errors == heard == [broken.failed] and "No space left on device" in heard[0]


def test_a_stop_request_ends_a_stream_waiting_for_a_slow_source():
    from runtime.stream import StopRequest
    stop = StopRequest()

    def slow():
        yield Frame(0, "t", time.time(), None)
        time.sleep(30)                              # a live source with no next frame
        yield Frame(1, "t", time.time(), None)

    def process(frame, t0):
        threading.Timer(0.2, stop.set, args=(15,)).start()
        return FrameRecord(frame.index, frame.source_id, frame.t_capture)
    t0 = time.monotonic()
    stats = run_stream(slow(), process, [], policy="newest", stop=stop)
    assert stats.frames == 1 and time.monotonic() - t0 < 10 and stop.signum == 15
