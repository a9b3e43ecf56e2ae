"""Streaming policies: `all` is lossless and ordered; `newest` drops stale frames, counts them, and still emits
one record per input frame in input order."""
import threading
import time

import numpy as np
import pytest

from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sources import Frame, Source
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


# ---- issue 12 item 7: a frame the `newest` policy drops lets go of its pixels at once ----

def test_newest_frees_a_dropped_frames_pixels_when_it_is_replaced_not_at_the_next_get():
    import weakref
    refs = []                                        # a weak reference to every frame's pixels

    def make(i):
        pixels = np.zeros((1080, 1920, 3), np.uint8)     # 6 MB a frame
        refs.append(weakref.ref(pixels))
        return Frame(i, "big", time.time(), pixels, meta={"mask": np.zeros((1080, 1920), np.uint8)})

    def fast():
        for i in range(400):
            time.sleep(0.0005)
            yield make(i)                            # the generator keeps no reference once it has yielded

    alive_at_end_of_process = []

    def process(frame, t0):
        time.sleep(0.03)                             # slow: dozens of frames are replaced meanwhile
        alive = [i for i, r in enumerate(refs) if r() is not None]
        alive_at_end_of_process.append((frame.index, len(refs), alive))
        return FrameRecord(frame.index, frame.source_id, frame.t_capture)
    sink = Collect()
    stats = run_stream(fast(), process, [sink], policy="newest")
    assert stats.dropped >= 100 and [r.frame for r in sink.records] == list(range(400))
    assert all(r.error == DROPPED and not r.meta for r in sink.records if r.error == DROPPED)
    # before the worker's next get, only the frame in hand, the one waiting in the hand-off and one the capture
    # thread may have just read are alive; everything replaced meanwhile is already freed
    for index, made, alive in alive_at_end_of_process:
        assert index in alive and len(alive) <= 3, (index, made, alive)


# ---- issue 12 item 10: the end of a run tells the source to stop, and says so when it cannot ----

class BlockingSource(Source):
    """A live source whose second frame never comes; close() wakes the wait when `wakes` (a socket shut down from
    another thread), or does not (a read that cannot be interrupted)."""
    live = True

    def __init__(self, wakes=True):
        self.wakes = wakes
        self.closed_by = []
        self._closed = threading.Event()
        self._never = threading.Event()
        self.ended = threading.Event()

    def __iter__(self):
        try:
            yield Frame(0, "blocking", time.time(), np.zeros((4, 4), np.uint8))
            (self._closed if self.wakes else self._never).wait()
        finally:
            self.ended.set()

    def close(self):
        self.closed_by.append(threading.current_thread().name)
        self._closed.set()


def _stop_after_first_frame(stop):
    def process(frame, t0):
        threading.Timer(0.1, stop.set, args=(15,)).start()
        return FrameRecord(frame.index, frame.source_id, frame.t_capture)
    return process


def test_a_stop_request_closes_a_blocked_source_and_its_capture_thread_ends(capsys):
    from runtime.stream import StopRequest
    stop, src = StopRequest(), BlockingSource(wakes=True)
    before = set(threading.enumerate())
    t0 = time.monotonic()
    stats = run_stream(src, _stop_after_first_frame(stop), [], policy="newest", stop=stop)
    took = time.monotonic() - t0
    assert stats.frames == 1 and took < 2, took
    assert src.closed_by == ["MainThread"]            # told to stop from the worker's side, while its read blocked
    assert src.ended.wait(1)                          # the capture thread left the source
    assert not [t for t in set(threading.enumerate()) - before if t.name == "capture"]
    assert "did not stop" not in capsys.readouterr().err


def test_a_source_that_cannot_be_stopped_is_named_in_one_sentence_and_the_run_still_ends(capsys, monkeypatch):
    import runtime.stream
    from runtime.stream import StopRequest
    monkeypatch.setattr(runtime.stream, "JOIN_S", 0.3, raising=False)
    stop, src = StopRequest(), BlockingSource(wakes=False)
    t0 = time.monotonic()
    stats = run_stream(src, _stop_after_first_frame(stop), [], policy="newest", stop=stop)
    took = time.monotonic() - t0
    assert stats.frames == 1 and took < 2, took
    assert src.closed_by == ["MainThread"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source did not stop within 0.3 s" in err[0] and err[0].count(". ") == 0
    src._never.set()                                  # let the test's daemon thread go
    assert src.ended.wait(1)


def test_a_source_that_ends_by_itself_is_not_closed_by_the_stream():
    src = BlockingSource(wakes=True)
    src._closed.set()                                 # its only frame, then the end
    stats = run_stream(src, slow_process(0), [], policy="all")
    assert stats.frames == 1 and src.closed_by == []


def test_the_simulated_probe_stops_pacing_when_closed_from_another_thread():
    from runtime.sources.sim import SimSource
    src = SimSource(fps=0.2, frames=10)               # 5 s between frames
    got = []
    t = threading.Thread(target=lambda: got.extend(f.index for f in src))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    src.close()
    t.join(2)
    assert not t.is_alive() and got == [0] and time.monotonic() - t0 < 1
