"""GET /api/v1/stats: the service at a glance, for the operator console (and anyone), cheap
enough to ask every second.

The per-second series and the latency percentiles come from the metrics' Activity rings (filled as
work happens, read here); the pending count is the partial-index count /metrics uses, shared by
every request for a second, so that many open consoles cost one count a second at most, and a
closed console costs nothing. Figures are this process's (several processes: ask each).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from marshmallow import Schema, fields

from ..db import repository
from ..db.driver import Pool
from ..db.errors import DatabaseError
from ..scopes import Scope
from ..stats import WINDOW_SECONDS
from . import keys
from .responses import json_response
from .routes import Route, add_routes

log = logging.getLogger(__name__)

PATH = "/api/v1/stats"
# Seconds. The count uses a partial index, and the database stops it at 500 ms (a huge backlog must
# not stall); this client-side bound only adds room for a pooled connection and the round trip, so
# that a far database answers too, and the server's limit, not a cancel (which costs the pooled
# connection), ends a slow count.
PENDING_COUNT_TIMEOUT = 2.0
PENDING_CACHE_SECONDS = 1.0


class _SeriesSchema(Schema):
    accepted = fields.List(fields.Integer(), required=True, metadata={"description": "tasks stored by the API"})
    applied = fields.List(fields.Integer(), required=True, metadata={"description": "tasks finished done"})
    cancelled = fields.List(fields.Integer(), required=True, metadata={"description": "tasks finished cancelled"})


class _LatencySchema(Schema):
    p50 = fields.Float(required=True, allow_none=True, metadata={"description": "median, ms (null: none yet)"})
    p99 = fields.Float(required=True, allow_none=True, metadata={"description": "99th percentile, ms"})


class StatsSchema(Schema):
    time = fields.DateTime(format="iso", required=True, metadata={"description": "when these figures were read, UTC"})
    window_seconds = fields.Integer(required=True, metadata={"example": WINDOW_SECONDS})
    series = fields.Nested(
        _SeriesSchema,
        required=True,
        metadata={
            "description": f"tasks per second over the last {WINDOW_SECONDS} s, oldest first, one number per "
            "second; the last is the current (unfinished) second"
        },
    )
    pending = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "tasks pending in the database (null if the count failed); refreshed once a second"},
    )
    latency_ms = fields.Nested(
        _LatencySchema,
        required=True,
        metadata={
            "description": "created_at -> processed_at of the tasks this process finished recently, done or "
            "cancelled (the last 2048, within the window)"
        },
    )
    active_user_loops = fields.Integer(required=True, metadata={"description": "users with a coroutine right now"})
    database = fields.Boolean(required=True, metadata={"description": "a pooled connection answers"})
    listener = fields.Boolean(required=True, metadata={"description": "the LISTEN connection is up"})


stats_schema = StatsSchema()


class PendingCount:
    """The pending count and whether the database answered, read at most once per `ttl` seconds;
    requests that arrive while a read runs share it."""

    def __init__(self, ttl: float = PENDING_CACHE_SECONDS, timeout: float = PENDING_COUNT_TIMEOUT) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self._value: tuple[int | None, bool] = (None, False)
        self._read_at = -float("inf")
        self._reading: asyncio.Task[tuple[int | None, bool]] | None = None

    async def get(self, pool: Pool) -> tuple[int | None, bool]:
        if time.monotonic() - self._read_at < self.ttl:
            return self._value
        if self._reading is None:
            self._reading = asyncio.create_task(self._read(pool), name="stats-pending-count")
        # Shielded: a client that hangs up does not cancel the read the others wait for.
        return await asyncio.shield(self._reading)

    async def _read(self, pool: Pool) -> tuple[int | None, bool]:
        try:
            try:
                value: tuple[int | None, bool] = (await repository.count_pending(pool, self.timeout), True)
            except (DatabaseError, TimeoutError) as exc:
                log.warning("stats pending_count=failed error=%r", str(exc))
                # The count may fail on a huge backlog alone: say whether the database answers at all.
                value = (None, await repository.ping(pool, timeout=self.timeout))
            self._value, self._read_at = value, time.monotonic()
            return value
        finally:
            self._reading = None


_PENDING = web.AppKey("stats_pending_count", PendingCount)


async def stats(request: web.Request) -> web.Response:
    app = request.app
    snapshot = app[keys.METRICS].activity.snapshot()
    pending, database = await app[_PENDING].get(app[keys.POOL])
    body: dict[str, Any] = {
        "time": datetime.now(UTC),
        "window_seconds": WINDOW_SECONDS,
        "series": snapshot.series,
        "pending": pending,
        "latency_ms": {"p50": snapshot.p50_ms, "p99": snapshot.p99_ms},
        "active_user_loops": app[keys.SUPERVISOR].active_users,
        "database": database,
        "listener": app[keys.LISTENER].connected,
    }
    return json_response(stats_schema.dump(body), headers={"Cache-Control": "no-store"})


def add_stats_route(app: web.Application) -> None:
    app[_PENDING] = PendingCount()
    add_routes(app, [Route("GET", PATH, stats, Scope.READ)])
