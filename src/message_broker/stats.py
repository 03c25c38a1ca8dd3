"""Recent activity for GET /api/v1/stats and the operator console: tasks accepted, applied and
cancelled per second over the last few minutes, and the latency of recently applied tasks.

Nothing here runs by itself: counts are recorded when work happens (the metrics' observe_stored
and observe_applied call in), into rings of one-second buckets keyed by the monotonic second, and
read on request. A bucket left over from an earlier lap of a ring is recognised by its second and
read as zero, so an idle service has no timer, no sampler and nothing to clear. Pure: the clock is
a parameter.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from .ledger import Status

WINDOW_SECONDS = 300
LATENCY_SAMPLES = 2048
SERIES = ("accepted", "applied", "cancelled")

Clock = Callable[[], float]


class PerSecond:
    """Counts per second over the last `window` seconds: a ring of buckets, each tagged with the
    second it counts."""

    def __init__(self, window: int = WINDOW_SECONDS) -> None:
        self.window = window
        self._seconds = [-1] * window
        self._counts = [0] * window

    def add(self, second: int, count: int = 1) -> None:
        index = second % self.window
        if self._seconds[index] != second:  # a bucket from an earlier lap: start it afresh
            self._seconds[index] = second
            self._counts[index] = 0
        self._counts[index] += count

    def series(self, now: int) -> list[int]:
        """One count per second from `now - window + 1` to `now`, oldest first."""
        seconds, counts, window = self._seconds, self._counts, self.window
        return [
            counts[second % window] if seconds[second % window] == second else 0
            for second in range(now - window + 1, now + 1)
        ]


class LatencyRing:
    """The most recent `size` latencies, each with the second it was recorded in."""

    def __init__(self, size: int = LATENCY_SAMPLES) -> None:
        self.size = size
        self._samples: deque[tuple[int, float]] = deque(maxlen=size)

    def add(self, second: int, latencies: Iterable[float]) -> None:
        self._samples.extend(zip(repeat(second), latencies))

    def percentiles(self, since: int, quantiles: Iterable[float]) -> list[float | None]:
        """Nearest-rank percentiles of the samples recorded at or after second `since` (None
        for each when there are none)."""
        values = sorted(latency for second, latency in self._samples if second >= since)
        return [percentile(values, q) for q in quantiles]


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (0 < q <= 1) of an ascending list; None if it is empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Snapshot:
    series: dict[str, list[int]]
    p50_ms: float | None
    p99_ms: float | None


class Activity:
    """What the process did recently. `record_*` are called as work happens; `snapshot` on request."""

    def __init__(
        self, window: int = WINDOW_SECONDS, latency_samples: int = LATENCY_SAMPLES, clock: Clock = time.monotonic
    ) -> None:
        self.window = window
        self._clock = clock
        self._series = {name: PerSecond(window) for name in SERIES}
        self._latencies = LatencyRing(latency_samples)

    def _now(self) -> int:
        return int(self._clock())

    def record_stored(self, stored: list[Any]) -> None:
        """An enqueue batch: one entry per request, None where nothing was stored."""
        count = len(stored) - stored.count(None)
        if count:
            self._series["accepted"].add(self._now(), count)

    def record_applied(self, outcome_counts: Mapping[tuple[Any, Status, Any], int], latencies: list[float]) -> None:
        """An apply transaction: its task counts by (type, status, reason), and the seconds from
        created_at to processed_at of its tasks."""
        second = self._now()
        done = cancelled = 0
        for (_, status, _), count in outcome_counts.items():
            if status is Status.DONE:
                done += count
            else:
                cancelled += count
        if done:
            self._series["applied"].add(second, done)
        if cancelled:
            self._series["cancelled"].add(second, cancelled)
        if latencies:
            # Only the last ones can stay in the ring anyway.
            self._latencies.add(second, latencies[-self._latencies.size :])

    def snapshot(self) -> Snapshot:
        now = self._now()
        p50, p99 = self._latencies.percentiles(now - self.window + 1, (0.50, 0.99))
        return Snapshot(
            series={name: ring.series(now) for name, ring in self._series.items()},
            p50_ms=None if p50 is None else round(p50 * 1000, 3),
            p99_ms=None if p99 is None else round(p99 * 1000, 3),
        )
