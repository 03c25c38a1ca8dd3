"""Prometheus metrics, one registry per application (never the process-wide default, so that
several apps in one process, as in the tests, keep their own figures).

Counters and histograms are fed as work happens (the enqueue batcher and the supervisor call
`observe_stored` / `observe_applied`); gauges and the supervisor's own counters are read at
scrape time, so that nothing is kept twice.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .db.repository import AppliedBatch
from .ledger import Reason, Status, TaskType
from .models import Task
from .stats import Activity

# The text format generate_latest writes.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TASK_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2500, 5000, 10000)
_USER_BUCKETS = (1, 2, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class LiveState:
    """What the scrape reads from the running service."""

    active_user_loops: int
    listen_connects: int
    sweeps_with_missed_work: int
    pool_in_use: int
    pool_size: int


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], LiveState | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        if state is None:  # not started yet, or shut down
            return
        yield GaugeMetricFamily(
            "message_broker_active_user_loops", "Users with a coroutine applying their tasks", state.active_user_loops
        )
        yield CounterMetricFamily(
            "message_broker_listen_reconnects",
            "Times the LISTEN connection was re-established after a loss",
            max(state.listen_connects - 1, 0),
        )
        yield CounterMetricFamily(
            "message_broker_sweeps_found_missed_work",
            "Safety sweeps that found pending tasks nobody was working on",
            state.sweeps_with_missed_work,
        )
        yield GaugeMetricFamily(
            "message_broker_pool_connections_in_use", "Pooled connections lent out", state.pool_in_use
        )
        yield GaugeMetricFamily("message_broker_pool_connections", "Pooled connections open", state.pool_size)


class Metrics:
    def __init__(self, read_live: Callable[[], LiveState | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        accepted = Counter("message_broker_tasks_accepted", "Tasks stored by the API", ["type"], registry=r)
        applied = Counter("message_broker_tasks_applied", "Tasks finished done", ["type"], registry=r)
        cancelled = Counter(
            "message_broker_tasks_cancelled", "Tasks finished cancelled", ["type", "reason"], registry=r
        )
        # Label children resolved once: these are touched for every task.
        self._accepted = {t: accepted.labels(t.value) for t in TaskType}
        self._applied = {t: applied.labels(t.value) for t in TaskType}
        self._cancelled_family = cancelled
        self._cancelled = {
            (TaskType.WRITE_OFF, Reason.INSUFFICIENT_FUNDS): cancelled.labels("write-off", "insufficient_funds"),
            (TaskType.REPLENISHMENT, Reason.BALANCE_OVERFLOW): cancelled.labels("replenishment", "balance_overflow"),
        }
        self.task_latency = Histogram(
            "message_broker_task_latency_seconds",
            "Time from a task's created_at to its processed_at",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.apply_batch_tasks = Histogram(
            "message_broker_apply_batch_tasks", "Tasks applied per transaction", buckets=_TASK_BUCKETS, registry=r
        )
        self.apply_batch_users = Histogram(
            "message_broker_apply_batch_users", "Users served per apply transaction", buckets=_USER_BUCKETS, registry=r
        )
        self.enqueue_batch_tasks = Histogram(
            "message_broker_enqueue_batch_tasks",
            "Tasks per enqueue INSERT statement (concurrent requests share one)",
            buckets=_TASK_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "message_broker_tasks_pending",
            "Tasks pending in the database, counted at scrape time (NaN if the count failed)",
            registry=r,
        )
        self.pending.set(math.nan)
        r.register(_LiveCollector(read_live))
        self.activity = Activity()  # the last minutes per second, for GET /api/v1/stats

    def observe_stored(self, stored: list[Task | None]) -> None:
        self.enqueue_batch_tasks.observe(len(stored))
        for task_type, count in Tally(task.type for task in stored if task is not None).items():
            self._accepted[task_type].inc(count)
        self.activity.record_stored(stored)

    def observe_applied(self, batch: AppliedBatch) -> None:
        self.apply_batch_tasks.observe(len(batch.task_types))
        self.apply_batch_users.observe(sum(1 for outcomes in batch.outcomes.values() if outcomes))
        # One increment per kind of outcome, not per task (each takes a lock).
        kinds = Tally(
            (batch.task_types[outcome.task_id], outcome.status, outcome.reason)
            for outcomes in batch.outcomes.values()
            for outcome in outcomes
        )
        for (task_type, status, reason), count in kinds.items():
            if status is Status.DONE:
                self._applied[task_type].inc(count)
            elif reason is not None:
                child = self._cancelled.get((task_type, reason))
                if child is None:  # a pair the rules never produce; counted all the same
                    child = self._cancelled_family.labels(task_type.value, reason.value)
                child.inc(count)
        for seconds in batch.latencies:
            self.task_latency.observe(seconds)
        self.activity.record_applied(kinds, batch.latencies)

    def render(self) -> bytes:
        return generate_latest(self.registry)
