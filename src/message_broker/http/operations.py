"""For operators and load balancers: /health, /ready, /metrics (and the HTTP figures in it), and
GET /, which says where everything is."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..db import repository, webhooks
from ..db.errors import DatabaseError
from ..metrics import CONTENT_TYPE, Metrics
from ..scopes import Scope
from . import keys
from .errors import Handler
from .responses import json_response
from .routes import Route

log = logging.getLogger(__name__)

# Seconds; a scrape must stay cheap even with a huge backlog or a slow database. The counts are
# stopped by the database at 500 ms; this bound adds room for a pooled connection and the round
# trips of a far database (as stats.PENDING_COUNT_TIMEOUT).
SCRAPE_QUERY_TIMEOUT = 2.0
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


# Methods outside this set are counted as "other", so a client cannot grow the label set.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(request: web.Request) -> str:
    """The matched route as written in the route table ("/api/v1/user/{user_id}"), without its
    trailing slash; "unmatched" for a path no route has (a 404 or 405 from the router)."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical.rstrip("/") or "/"


def http_metrics_middleware(metrics: Metrics) -> Middleware:
    """Counts every answer by route template, method and status, and times it by route. It sits
    outside the error middleware, so errors are counted with the status they were answered with."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a redirect, passed on by the error middleware
            _observe(request, exc.status, started)
            raise
        # (A request cancelled because its client went away is not counted: it got no answer.)
        _observe(request, response.status, started)
        return response

    def _observe(request: web.Request, status: int, started: float) -> None:
        method = request.method if request.method in _METHODS else "other"
        metrics.http.observe(route_template(request), method, status, time.perf_counter() - started)

    return middleware


async def index(request: web.Request) -> web.StreamResponse:
    """GET /: a browser goes to the console; anything else gets where things are."""
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(status=302, headers={"Location": "/console/"})
    return json_response(
        {
            "service": "message_broker",
            "users": "/api/v1/user/",
            "console": "/console/",
            "docs": "/api/v1/docs",
            "openapi": "/api/v1/openapi.json",
            "health": "/health",
            "ready": "/ready",
            "metrics": "/metrics",
        }
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

    async def pending_tasks() -> None:
        try:
            registry.pending.set(await repository.count_pending(pool, SCRAPE_QUERY_TIMEOUT))
        except (DatabaseError, TimeoutError) as exc:
            registry.pending.set(math.nan)
            log.warning("metrics pending_count=failed error=%r", str(exc))

    async def table_sizes() -> None:
        try:
            sizes = await repository.table_sizes(pool, TABLES, SCRAPE_QUERY_TIMEOUT)
        except (DatabaseError, TimeoutError) as exc:
            log.warning("metrics table_sizes=failed error=%r", str(exc))
            return
        for table, (rows, size) in sizes.items():
            registry.table_rows.labels(table).set(rows)
            registry.table_bytes.labels(table).set(size)

    async def webhook_pending() -> None:
        try:
            pending = await asyncio.wait_for(webhooks.pending_by_endpoint(pool), SCRAPE_QUERY_TIMEOUT)
        except (DatabaseError, TimeoutError) as exc:
            log.warning("metrics webhook_pending=failed error=%r", str(exc))
            return
        registry.webhook_pending.clear()  # endpoints deleted, or with nothing pending, drop out
        for endpoint_id, count in pending.items():
            registry.webhook_pending.labels(str(endpoint_id)).set(count)

    # At once, each bounded: a scrape of a slow database takes one bound, not three in a row.
    await asyncio.gather(pending_tasks(), table_sizes(), webhook_pending())
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})


ROUTES = (
    Route("GET", "", index, Scope.PUBLIC),  # the root: "/" (see routes.add_routes)
    Route("GET", "/health", health, Scope.PUBLIC),
    Route("GET", "/ready", ready, Scope.PUBLIC),
    Route("GET", "/metrics", metrics, Scope.READ),
)
