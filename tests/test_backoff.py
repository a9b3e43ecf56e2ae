"""runtime/backoff.py: the one back-off, as the live sources and the DICOM outbox take it."""
import pytest

from runtime.backoff import Backoff, delay
from runtime.dicomnet.config import Retry


def test_delays_double_from_the_first_up_to_the_maximum():
    assert [delay(n, 0.5, 5.0) for n in range(0, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert delay(10_000, 5.0, 300.0) == 300.0                  # no overflow however long the outage


def test_the_stateful_backoff_counts_failures_and_resets():
    b = Backoff(0.5, 5.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    b.reset()
    assert b.next_delay() == 0.5
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)


def test_the_outbox_retry_is_the_same_backoff():
    r = Retry(first_s=5.0, max_s=300.0, factor=2.0)
    assert [r.delay(n) for n in range(0, 9)] == [delay(n, 5.0, 300.0) for n in range(0, 9)]
    assert [r.delay(n) for n in (1, 2, 7)] == [5.0, 10.0, 300.0]
