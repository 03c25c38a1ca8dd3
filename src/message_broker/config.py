"""Settings, read once from the environment into one frozen object."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    # None means "start the embedded PostgreSQL under embedded_data_dir".
    database_url: str | None = None
    # The LISTEN connection's endpoint, when the pool's (DATABASE_URL) cannot carry a LISTEN: a
    # direct or session-pooled one beside PgBouncer in transaction pooling. Default: DATABASE_URL.
    listen_database_url: str | None = None
    embedded_data_dir: str = ".pgdata"
    host: str = "127.0.0.1"
    port: int = 3333
    log_level: str = "INFO"

    # Pool: requests and workers share it. Several processes may run against one database,
    # so the default stays well under PostgreSQL's default of 100 connections.
    pool_min_size: int = 2
    pool_max_size: int = 10
    # A request waits this long for a free connection before it is answered 503.
    pool_acquire_timeout: float = 3.0
    connect_timeout: float = 5.0
    # Server-side limits: aiopg cancels a query by closing its connection, which does not stop
    # the query on the server; these make PostgreSQL itself give up and release the locks.
    statement_timeout_ms: int = 10_000
    idle_in_transaction_timeout_ms: int = 15_000

    # Supervisor.
    sweep_interval: float = 30.0  # the safety sweep for missed notifications
    probe_interval: float = 5.0  # how often an idle LISTEN connection is checked
    # How long the listener's probe (a NOTIFY through the pool) may take to be heard on the LISTEN
    # connection; /ready is 503 until one is heard after each (re)connect.
    probe_timeout: float = 3.0
    reconnect_max_backoff: float = 5.0
    user_idle_timeout: float = 5.0  # an idle user's coroutine retires after this
    batch_size: int = 500  # tasks applied per transaction
    # Apply transactions in flight at once (each serves many users), leaving the rest of the pool
    # to requests. Fewer, fuller transactions cost less per task than many small ones, so more
    # than one runs only while there is a backlog (a full batch of users waiting) or the running
    # one is stuck (see batching.Coalescer).
    worker_concurrency: int = 3

    # HTTP.
    max_body_bytes: int = 64 * 1024
    shutdown_timeout: float = 5.0
    # How long `serve` waits at start-up for the database (the embedded server or DATABASE_URL:
    # reachable, created if missing, migrated, the pool open) before it gives up with exit 1;
    # 0 waits for ever. Meanwhile /health answers 200 and /ready 503.
    startup_timeout: float = 60.0

    # -- Security and limits -------------------------------------------------------------------
    # With api_token set, every request that changes state needs "Authorization: Bearer <token>";
    # api_token_protect_reads extends that to reads. /health and /ready always stay open.
    api_token: str | None = None
    api_token_protect_reads: bool = False
    # HTTP limits: a longer request line is answered 414, a longer header or more headers 431, a
    # body that does not arrive within request_body_timeout seconds 408; a connection that sends
    # no complete request for keepalive_timeout seconds (idle, or a slow-drip client) is closed.
    max_request_line_bytes: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 64
    request_body_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    # `message-broker create-role` creates or updates this least-privilege login role.
    app_db_role: str | None = None
    app_db_password: str | None = None

    # -- Task lifecycle for clients (idempotency keys, ?wait, event streams) ---------------------
    # How long an Idempotency-Key is remembered; a retry after that is a new request.
    idempotency_retention: float = 24 * 3600.0
    # How often expired keys are purged, and how many are deleted per statement (small batches
    # keep each delete short, so it never holds up requests).
    idempotency_purge_interval: float = 60.0
    idempotency_purge_batch: int = 500
    # Server-sent event streams: a comment line this often keeps idle streams (and proxies) alive;
    # a stream whose client falls this many events behind is disconnected (it resumes with
    # Last-Event-ID) instead of buffering without bound.
    sse_heartbeat_interval: float = 15.0
    sse_queue_size: int = 1000
    # How far back an event stream can resume (Last-Event-ID): stream positions older than this
    # are purged every event_purge_interval seconds, event_purge_batch rows per statement, and a
    # resume from before that is answered 410. The ledger itself (users, tasks) is never purged.
    event_retention: float = 7 * 24 * 3600.0
    event_purge_interval: float = 60.0
    event_purge_batch: int = 1000

    # -- Webhooks -----------------------------------------------------------------------------------
    # A delivery succeeds with a 2xx within webhook_timeout seconds (redirects are not followed).
    webhook_timeout: float = 15.0
    # The pauses after the first attempt, each +-20 % (s, m, h, d units); after the last, failed.
    webhook_retry_schedule: str = "5s,5m,30m,2h,5h,10h,10h"
    # An endpoint whose attempts have all failed for this many seconds is disabled.
    webhook_disable_after: float = 5 * 24 * 3600.0
    # Requests in flight per process (and at most WEBHOOK_PER_ENDPOINT to any one endpoint).
    webhook_concurrency: int = 32
    # Refuse loopback, private, link-local, multicast, reserved and unspecified addresses, at
    # registration and at every delivery, unless this is set (local use and tests).
    webhook_allow_private: bool = False
    # Delivered and failed deliveries are purged after this (every EVENT_PURGE_INTERVAL).
    webhook_retention: float = 7 * 24 * 3600.0
    # "process": the sender runs in a child process of its own, which the service starts, wakes
    # and restarts (worker/sender_process.py); "inline": in the service's own event loop.
    webhook_sender: str = "process"
    # Money first: while this process's apply has a backlog (e.g. after a restart), its sender
    # claims no new deliveries, for at most this many seconds at a stretch and at most half the
    # time; then deliveries go beside the backlog. 0: never hold them back.
    webhook_give_way: float = 5.0

    # -- Batching and the event loop --------------------------------------------------------------
    # Concurrent POSTs of tasks share INSERT statements: at most this many tasks per statement,
    enqueue_max_batch: int = 500
    # and at most this many such statements running at once (requests arriving meanwhile queue
    # up and go together in the next one).
    enqueue_max_in_flight: int = 3
    # Users whose loops want a batch at the same moment share one transaction (one commit), up to
    # this many; each still gets up to BATCH_SIZE of its tasks, in order.
    apply_max_users: int = 100
    # "uvloop" (when installed; it is on Linux and macOS) or "asyncio": uvloop serves about a
    # third more requests per CPU-second here.
    event_loop: str = "uvloop"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        kinds = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.name, kinds[field.name], raw)
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"PORT must be 1..65535, not {self.port}")
        if self.pool_min_size < 0 or self.pool_max_size < 2 or self.pool_min_size > self.pool_max_size:
            raise ConfigError("need 0 <= POOL_MIN_SIZE <= POOL_MAX_SIZE and POOL_MAX_SIZE >= 2")
        if not 1 <= self.worker_concurrency < self.pool_max_size:
            raise ConfigError("WORKER_CONCURRENCY must be at least 1 and below POOL_MAX_SIZE")
        if not 1 <= self.enqueue_max_in_flight < self.pool_max_size:
            raise ConfigError("ENQUEUE_MAX_IN_FLIGHT must be at least 1 and below POOL_MAX_SIZE")
        for field in fields(self):
            value = getattr(self, field.name)
            # Every float setting is seconds; NaN, infinity and negatives pass no comparison below.
            if isinstance(value, float) and not 0 <= value <= MAX_SECONDS:
                raise ConfigError(f"{field.name.upper()} must be a number of seconds from 0 to {MAX_SECONDS:.0f}")
        for name in ("statement_timeout_ms", "idle_in_transaction_timeout_ms"):
            if not 0 <= getattr(self, name) <= MAX_TIMEOUT_MS:
                raise ConfigError(f"{name.upper()} must be 0 (no limit) to {MAX_TIMEOUT_MS} milliseconds")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()} must be positive")
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.upper()} must be at least 1")
        if not self.startup_timeout >= 0:  # NaN too
            raise ConfigError("STARTUP_TIMEOUT must be 0 (wait for ever) or a number of seconds")
        if self.webhook_sender not in ("process", "inline"):
            raise ConfigError(f"WEBHOOK_SENDER must be process or inline, not {self.webhook_sender!r}")
        if not 0 <= self.webhook_give_way < float("inf"):  # NaN too
            raise ConfigError("WEBHOOK_GIVE_WAY must be 0 (never) or a number of seconds")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"EVENT_LOOP must be uvloop or asyncio, not {self.event_loop!r}")
        webhook_retry_delays(self.webhook_retry_schedule)  # raises ConfigError if it cannot be read
        token = self.api_token
        if token is not None and not (
            len(token) >= 16 and token.isascii() and token.isprintable() and " " not in token
        ):
            raise ConfigError("API_TOKEN must be at least 16 printable ASCII characters without spaces")


# The longest duration a setting may hold (100 years): retentions and timeouts become PostgreSQL
# intervals and are subtracted from now, which infinity or 1e300 s overflow (every POST with an
# Idempotency-Key answered 500 with IDEMPOTENCY_RETENTION=inf).
MAX_SECONDS = 100 * 365.25 * 86400
# PostgreSQL's range for statement_timeout and idle_in_transaction_session_timeout.
MAX_TIMEOUT_MS = 2**31 - 1

# What LOG_LEVEL may be (any case): logging's own level names.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Durations (seconds) that must be above zero, and counts that must be at least one.
_POSITIVE = (
    "sweep_interval",
    "probe_interval",
    "probe_timeout",
    "user_idle_timeout",
    "pool_acquire_timeout",
    "connect_timeout",
    "reconnect_max_backoff",
    "idempotency_retention",
    "idempotency_purge_interval",
    "sse_heartbeat_interval",
    "event_retention",
    "event_purge_interval",
    "request_body_timeout",
    "keepalive_timeout",
    "webhook_timeout",
    "webhook_disable_after",
    "webhook_retention",
)
_AT_LEAST_ONE = (
    "batch_size",
    "max_body_bytes",
    "idempotency_purge_batch",
    "sse_queue_size",
    "event_purge_batch",
    "apply_max_users",
    "enqueue_max_batch",
    "max_request_line_bytes",
    "max_header_bytes",
    "max_headers",
    "webhook_concurrency",
)


def _parse(name: str, kind: object, raw: str) -> object:
    """`raw` as the field's type: bool, int, float or str (or an optional one of those)."""
    if isinstance(kind, types.UnionType):  # e.g. str | None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name.upper()}={raw!r} is not a boolean (true/false)")
    if kind in (int, float):
        try:
            return kind(raw)  # type: ignore[operator]
        except ValueError:
            raise ConfigError(f"{name.upper()}={raw!r} is not a number") from None
    return raw


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def webhook_retry_delays(schedule: str) -> tuple[float, ...]:
    """WEBHOOK_RETRY_SCHEDULE ("5s,5m,30m,2h") as seconds; an empty schedule means no retry."""
    delays = []
    for item in filter(None, (part.strip() for part in schedule.split(","))):
        number, unit = item[:-1], item[-1:]
        try:
            delay = float(number) * _UNITS[unit]
        except (KeyError, ValueError):
            raise ConfigError(f"WEBHOOK_RETRY_SCHEDULE: {item!r} is not a duration like 5s, 5m, 2h or 1d") from None
        if not 0 <= delay < float("inf"):
            raise ConfigError(f"WEBHOOK_RETRY_SCHEDULE: {item!r} is not a duration like 5s, 5m, 2h or 1d")
        delays.append(delay)
    return tuple(delays)
