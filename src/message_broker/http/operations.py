"""For operators and load balancers: /health, /ready and /metrics."""

from __future__ import annotations

import asyncio
import logging
import math

from aiohttp import web

from ..db import repository, webhooks
from ..db.errors import DatabaseError
from ..metrics import CONTENT_TYPE
from . import keys
from .responses import json_response
from .routes import Route

log = logging.getLogger(__name__)

# Seconds; a scrape must stay cheap even with a huge backlog or a slow database.
SCRAPE_QUERY_TIMEOUT = 1.0
# The service's tables, whose rows and bytes /metrics reports.
TABLES = (
    "users",
    "tasks",
    "holds",
    "task_batches",
    "idempotency_keys",
    "maintenance_runs",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
)


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """200 while this process can do its work: the pool answers, the LISTEN connection is up and
    every background loop runs; else 503 naming what is down."""
    down = request.app[keys.TASKS].down()
    checks = {
        "listener": request.app[keys.LISTENER].connected,
        "database": await repository.ping(request.app[keys.POOL], timeout=1.0),
        "background": not down,
    }
    status = 200 if all(checks.values()) else 503
    body = {"status": "ready" if status == 200 else "unavailable", "checks": checks, "down": down}
    return json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    registry, pool = request.app[keys.METRICS], request.app[keys.POOL]
    try:
        registry.pending.set(await repository.count_pending(pool, SCRAPE_QUERY_TIMEOUT))
    except (DatabaseError, TimeoutError) as exc:
        registry.pending.set(math.nan)
        log.warning("metrics pending_count=failed error=%r", str(exc))
    try:
        sizes = await repository.table_sizes(pool, TABLES, SCRAPE_QUERY_TIMEOUT)
    except (DatabaseError, TimeoutError) as exc:
        log.warning("metrics table_sizes=failed error=%r", str(exc))
    else:
        for table, (rows, size) in sizes.items():
            registry.table_rows.labels(table).set(rows)
            registry.table_bytes.labels(table).set(size)
    try:
        pending = await asyncio.wait_for(webhooks.pending_by_endpoint(pool), SCRAPE_QUERY_TIMEOUT)
    except (DatabaseError, TimeoutError) as exc:
        log.warning("metrics webhook_pending=failed error=%r", str(exc))
    else:
        registry.webhook_pending.clear()  # endpoints deleted, or with nothing pending, drop out
        for endpoint_id, count in pending.items():
            registry.webhook_pending.labels(str(endpoint_id)).set(count)
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})


ROUTES = (
    Route("GET", "/health", health),
    Route("GET", "/ready", ready),
    Route("GET", "/metrics", metrics),
)
