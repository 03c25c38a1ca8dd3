"""Prometheus metrics, one registry per application (never the process-wide default, so that
several apps in one process, as in the tests, keep their own figures).

Counters and histograms are fed as work happens (the enqueue batcher, the supervisor and the error
middleware call `observe_*`); gauges and the counters other objects keep already are read at
scrape time (`LiveState`), so that nothing is kept twice.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .ledger import Status, TaskType
from .models import AppliedBatch, Task
from .stats import Activity

# The text format generate_latest writes.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TASK_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2500, 5000, 10000)
_USER_BUCKETS = (1, 2, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class JobFigures:
    runs: int
    removed: int
    failures: int
    last_seconds: float


@dataclass(frozen=True)
class LiveState:
    """What the scrape reads from the running service."""

    active_user_loops: int
    listen_connects: int
    sweeps_with_missed_work: int
    pool_in_use: int
    pool_size: int
    holds_released: int = 0
    apply_backlog: bool = False
    apply_transactions: int = 0
    empty_applies: int = 0
    applies_from_memory: int = 0
    memory_differed: int = 0
    waiting_requests: int = 0
    loop_restarts: Mapping[str, int] = field(default_factory=dict)
    loops_down: tuple[str, ...] = ()
    loops: tuple[str, ...] = ()
    jobs: Mapping[str, JobFigures] = field(default_factory=dict)


class HttpFigures(Collector):
    """Requests by route template, method and status, and their durations by route, as Prometheus
    counters and histograms. Kept in plain dicts and turned into metric families only at scrape
    time: an increment per request costs well under a microsecond, where prometheus_client's
    labelled Counter and Histogram (locks, a bucket search each) cost several."""

    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self._buckets = buckets
        self._requests: dict[tuple[str, str, int], int] = {}
        # Per route: a count per bucket (the last one is +Inf), then the sum of the seconds.
        self._durations: dict[str, list[float]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        counts = self._durations.get(route)
        if counts is None:
            counts = self._durations[route] = [0] * (len(self._buckets) + 1) + [0.0]
        counts[bisect_left(self._buckets, seconds)] += 1  # le is inclusive: the first bucket >= seconds
        counts[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "message_broker_http_requests",
            "HTTP requests answered, by route template, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in self._requests.items():
            requests.add_metric([route, method, str(status)], count)
        yield requests
        durations = HistogramMetricFamily(
            "message_broker_http_request_duration_seconds",
            "Seconds from a request's handling to its answer (for event streams: the stream's life), by route",
            labels=["route"],
        )
        bounds = [*(str(float(b)) for b in self._buckets), "+Inf"]
        for route, counts in self._durations.items():
            cumulative = list(accumulate(counts[:-1]))
            durations.add_metric([route], list(zip(bounds, cumulative, strict=True)), counts[-1])
        yield durations


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
        yield GaugeMetricFamily(
            "message_broker_apply_backlog",
            "1 while the apply has a backlog (the webhook sender claims nothing new then, WEBHOOK_GIVE_WAY)",
            int(state.apply_backlog),
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
        yield CounterMetricFamily(
            "message_broker_apply_transactions",
            "Apply transactions this process ran (each a look at some users' pending tasks)",
            state.apply_transactions,
        )
        yield CounterMetricFamily(
            "message_broker_apply_transactions_empty",
            "Apply transactions that found no pending task (another process had applied them, or a wake-up came late)",
            state.empty_applies,
        )
        from_memory = CounterMetricFamily(
            "message_broker_apply_transactions_from_memory",
            "Apply transactions tried in one round trip from what this process remembered of the accounts:"
            " applied, or differed (the database held something else; the batch was then applied as usual)",
            labels=["outcome"],
        )
        from_memory.add_metric(["applied"], state.applies_from_memory)
        from_memory.add_metric(["differed"], state.memory_differed)
        yield from_memory
        yield GaugeMetricFamily(
            "message_broker_waiting_requests",
            "Requests waiting for their task's outcome (?wait)",
            state.waiting_requests,
        )
        yield GaugeMetricFamily(
            "message_broker_pool_connections_in_use", "Pooled connections lent out", state.pool_in_use
        )
        yield GaugeMetricFamily("message_broker_pool_connections", "Pooled connections open", state.pool_size)
        yield CounterMetricFamily(
            "message_broker_holds_released_at_deadline",
            "Release tasks this process queued for holds past their deadline",
            state.holds_released,
        )
        restarts = CounterMetricFamily(
            "message_broker_background_restarts",
            "Times a background loop ended unexpectedly and was started again",
            labels=["loop"],
        )
        up = GaugeMetricFamily("message_broker_background_up", "1 while a background loop runs", labels=["loop"])
        for name in state.loops:
            restarts.add_metric([name], state.loop_restarts.get(name, 0))
            up.add_metric([name], 0 if name in state.loops_down else 1)
        yield restarts
        yield up
        runs = CounterMetricFamily("message_broker_purge_runs", "Purge runs this process made", labels=["job"])
        removed = CounterMetricFamily("message_broker_purge_removed_rows", "Rows purges removed", labels=["job"])
        failures = CounterMetricFamily("message_broker_purge_failures", "Purge runs that failed", labels=["job"])
        seconds = GaugeMetricFamily("message_broker_purge_last_seconds", "Duration of the last purge", labels=["job"])
        for name, job in state.jobs.items():
            runs.add_metric([name], job.runs)
            removed.add_metric([name], job.removed)
            failures.add_metric([name], job.failures)
            seconds.add_metric([name], job.last_seconds)
        yield from (runs, removed, failures, seconds)


class Metrics:
    def __init__(self) -> None:
        # Set by the app factory once it knows where to read from; None before start-up.
        self.read_live: Callable[[], LiveState | None] = lambda: None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        accepted = Counter(
            "message_broker_tasks_accepted",
            "Tasks stored, each once whatever stored it (with or without Idempotency-Key, releases at a hold's "
            "deadline); a replay stores nothing",
            ["type"],
            registry=r,
        )
        applied = Counter("message_broker_tasks_applied", "Tasks finished done", ["type"], registry=r)
        self._cancelled = Counter(
            "message_broker_tasks_cancelled", "Tasks finished cancelled", ["type", "reason"], registry=r
        )
        # Label children resolved once: these are touched for every task.
        self._accepted = {t: accepted.labels(t.value) for t in TaskType}
        self._applied = {t: applied.labels(t.value) for t in TaskType}
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
        self.table_rows = Gauge(
            "message_broker_table_rows", "Live rows of a table (the statistics' estimate)", ["table"], registry=r
        )
        self.table_bytes = Gauge(
            "message_broker_table_bytes", "Bytes of a table on disk, indexes and TOAST included", ["table"], registry=r
        )
        self._error_answers = Counter(
            "message_broker_http_errors",
            "Error answers by status and code (every 503 counted, however the log summarises them)",
            ["status", "code"],
            registry=r,
        )
        webhook_deliveries = Counter(
            "message_broker_webhook_deliveries",
            "Webhook attempts by result: delivered, retry (due again later) or failed (for good)",
            ["result"],
            registry=r,
        )
        self._webhook_results = {
            result: webhook_deliveries.labels(result) for result in ("delivered", "retry", "failed")
        }
        self.webhook_lag = Histogram(
            "message_broker_webhook_lag_seconds",
            "Time from a task's processed_at to the receiver's 2xx for its event",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.webhook_pending = Gauge(
            "message_broker_webhook_pending_deliveries",
            "Webhook deliveries pending per endpoint, counted at scrape time",
            ["endpoint"],
            registry=r,
        )
        # HTTP by route template (never a path with ids in it), method and status: the labels stay few.
        self.http = HttpFigures()
        r.register(self.http)
        r.register(_LiveCollector(lambda: self.read_live()))
        self.activity = Activity()  # the last minutes per second, for GET /api/v1/stats

    def observe_stored(self, stored: list[Task | None]) -> None:
        """An enqueue statement's tasks (None where a request's task was not stored)."""
        self.enqueue_batch_tasks.observe(len(stored))
        self.count_stored(stored)

    def count_stored(self, stored: list[Task | None]) -> None:
        """Tasks stored by any path (the enqueue statement, a keyed request's own transaction),
        each counted once, after its commit."""
        for task_type, count in Tally(task.type for task in stored if task is not None).items():
            self._accepted[task_type].inc(count)
        self.activity.record_stored(stored)

    def count_released(self, count: int) -> None:
        """Release tasks stored for holds past their deadline."""
        self._accepted[TaskType.RELEASE].inc(count)
        self.activity.record_stored([TaskType.RELEASE] * count)

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
            else:
                self._cancelled.labels(task_type.value, reason.value if reason else "").inc(count)
        if batch.transfers_in:
            self._applied[TaskType.TRANSFER_IN].inc(batch.transfers_in)
        for seconds in batch.latencies:
            self.task_latency.observe(seconds)
        self.activity.record_applied(kinds, batch.latencies)

    def observe_webhook(self, result: str, lag: float | None) -> None:
        self._webhook_results[result].inc()
        if lag is not None:
            self.webhook_lag.observe(lag)

    def observe_error(self, status: int, code: str) -> None:
        self._error_answers.labels(str(status), code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
