"""The recent-activity rings behind GET /api/v1/stats: per-second counts over a window, keyed by
the monotonic second, that need no timer (old buckets read as zero), and latency percentiles of
a bounded ring of recent samples."""

from __future__ import annotations

from collections import Counter

import pytest

from message_broker.ledger import Reason, Status, TaskType
from message_broker.stats import Activity, LatencyRing, PerSecond, percentile


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_per_second_counts_land_in_their_second_oldest_first() -> None:
    ring = PerSecond(window=5)
    ring.add(100, 2)
    ring.add(100)
    ring.add(102, 4)
    assert ring.series(102) == [0, 0, 3, 0, 4]
    assert ring.series(104) == [3, 0, 4, 0, 0]


def test_buckets_from_an_earlier_lap_read_as_zero_and_are_started_afresh() -> None:
    ring = PerSecond(window=5)
    ring.add(100, 7)
    assert ring.series(105) == [0, 0, 0, 0, 0]  # 100 fell out of the window; its bucket is 105's
    ring.add(105, 1)  # same bucket as 100: starts afresh, not 7 + 1
    assert ring.series(105) == [0, 0, 0, 0, 1]
    assert ring.series(10_000) == [0] * 5  # idle for hours: nothing to clear, all zero


def test_percentile_is_nearest_rank() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None


def test_latency_ring_keeps_the_most_recent_samples_of_the_window() -> None:
    ring = LatencyRing(size=4)
    ring.add(10, [9.0, 9.0])
    ring.add(20, [1.0, 2.0, 3.0])
    assert ring.percentiles(0, (0.5, 0.99)) == [2.0, 9.0]  # one 9.0 was pushed out
    assert ring.percentiles(15, (0.5, 0.99)) == [2.0, 3.0]  # the window leaves the old one out
    assert ring.percentiles(21, (0.5,)) == [None]


def _outcomes(**counts: int) -> Counter[tuple[TaskType, Status, Reason | None]]:
    keys = {
        "done": (TaskType.REPLENISHMENT, Status.DONE, None),
        "done_w": (TaskType.WRITE_OFF, Status.DONE, None),
        "short": (TaskType.WRITE_OFF, Status.CANCELLED, Reason.INSUFFICIENT_FUNDS),
        "over": (TaskType.REPLENISHMENT, Status.CANCELLED, Reason.BALANCE_OVERFLOW),
    }
    return Counter({keys[name]: count for name, count in counts.items()})


def test_activity_series_and_latencies_follow_what_was_recorded() -> None:
    clock = Clock(1000.4)
    activity = Activity(window=300, latency_samples=2048, clock=clock)
    activity.record_stored([object(), None, object()])  # None: a request that stored nothing
    activity.record_applied(_outcomes(done=2, done_w=1, short=1, over=1), [0.001, 0.002, 0.003, 0.004, 0.100])
    clock.now = 1002.9
    activity.record_stored([object()])
    snapshot = activity.snapshot()
    assert len(snapshot.series["accepted"]) == 300
    assert snapshot.series["accepted"][-3:] == [2, 0, 1]
    assert snapshot.series["applied"][-3:] == [3, 0, 0]
    assert snapshot.series["cancelled"][-3:] == [2, 0, 0]
    assert sum(snapshot.series["accepted"]) == 3
    assert snapshot.p50_ms == 3.0
    assert snapshot.p99_ms == 100.0

    clock.now = 1000.4 + 300  # the window has moved past every count and sample
    later = activity.snapshot()
    assert later.series["accepted"][-1] == 0 and sum(later.series["accepted"]) == 1
    clock.now += 5
    assert activity.snapshot() == type(later)(
        series={"accepted": [0] * 300, "applied": [0] * 300, "cancelled": [0] * 300}, p50_ms=None, p99_ms=None
    )


def test_an_empty_batch_records_nothing() -> None:
    activity = Activity(window=10, clock=Clock())
    activity.record_stored([None, None])
    activity.record_applied(Counter(), [])
    snapshot = activity.snapshot()
    assert all(sum(series) == 0 for series in snapshot.series.values())
    assert snapshot.p50_ms is None and snapshot.p99_ms is None


@pytest.mark.parametrize("batch", [1, 2048, 5000])
def test_a_big_batch_keeps_only_what_the_latency_ring_holds(batch: int) -> None:
    activity = Activity(window=10, latency_samples=2048, clock=Clock())
    activity.record_applied(_outcomes(done=batch), [0.001 * (i + 1) for i in range(batch)])
    snapshot = activity.snapshot()
    kept = min(batch, 2048)
    assert snapshot.p99_ms == pytest.approx(1000 * 0.001 * (batch - kept + ((99 * kept + 99) // 100)))
