"""GET /metrics: Prometheus text format, from this app's own registry."""

from __future__ import annotations

import logging
import math

from aiohttp import web

from ..db import repository
from ..db.errors import DatabaseError
from ..metrics import CONTENT_TYPE, LiveState, Metrics
from . import keys

log = logging.getLogger(__name__)

PENDING_COUNT_TIMEOUT = 1.0  # seconds; a scrape must stay cheap even with a huge backlog


def create_metrics(app: web.Application) -> Metrics:
    def read_live() -> LiveState | None:
        supervisor, pool = app.get(keys.SUPERVISOR), app.get(keys.POOL)
        if supervisor is None or pool is None:
            return None
        return LiveState(
            active_user_loops=supervisor.active_users,
            listen_connects=supervisor.listener.connects,
            sweeps_with_missed_work=supervisor.sweeps_with_missed_work,
            pool_in_use=pool.in_use,
            pool_size=pool.size,
        )

    return Metrics(read_live)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[keys.METRICS]
    try:
        registry.pending.set(await repository.count_pending(request.app[keys.POOL], PENDING_COUNT_TIMEOUT))
    except (DatabaseError, TimeoutError) as exc:
        registry.pending.set(math.nan)
        log.warning("metrics pending_count=failed error=%r", str(exc))
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})


def add_metrics_route(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
