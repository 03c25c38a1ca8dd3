"""The application factory. Resources open in cleanup_ctx order (pool, then supervisor) and
close in reverse, so the supervisor has stopped before the pool it uses is closed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..config import Settings
from ..db.connector import ConnectionOptions, Pool
from ..db.enqueue_batcher import EnqueueBatcher
from ..worker.supervisor import Supervisor
from . import keys
from .auth import auth_middleware
from .console import add_console_routes
from .errors import error_middleware
from .handlers import add_routes
from .lifecycle import setup as setup_lifecycle
from .limits import limits_middleware, parser_limits
from .metrics import add_metrics_route, create_metrics
from .stats import add_stats_route

log = logging.getLogger(__name__)


def connection_options(settings: Settings) -> ConnectionOptions:
    if not settings.database_url:
        raise ValueError("settings.database_url must be resolved before the app is created")
    return ConnectionOptions(
        dsn=settings.database_url,
        connect_timeout=settings.connect_timeout,
        statement_timeout_ms=settings.statement_timeout_ms,
        idle_in_transaction_timeout_ms=settings.idle_in_transaction_timeout_ms,
    )


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    app[keys.POOL] = await Pool.open(
        connection_options(settings),
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        acquire_timeout=settings.pool_acquire_timeout,
    )
    yield
    await app[keys.POOL].close()


async def _enqueue_batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    batcher = EnqueueBatcher(
        app[keys.POOL],
        max_batch=settings.enqueue_max_batch,
        max_in_flight=settings.enqueue_max_in_flight,
        # Queued behind stuck inserts no longer than a request would wait for a pooled connection.
        queue_timeout=settings.pool_acquire_timeout,
        on_stored=app[keys.METRICS].observe_stored,
    )
    app[keys.ENQUEUE_BATCHER] = batcher
    yield
    await batcher.close(timeout=settings.shutdown_timeout)


async def _supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    supervisor = Supervisor(
        app[keys.POOL], connection_options(settings), settings, on_applied=app[keys.METRICS].observe_applied
    )
    app[keys.SUPERVISOR] = supervisor
    supervisor.start()
    yield
    await supervisor.stop(timeout=settings.shutdown_timeout)


def create_app(settings: Settings) -> web.Application:
    # Outermost first: every error becomes JSON; then the token (before any body is read); then limits.
    middlewares = [error_middleware]
    if settings.api_token:
        middlewares.append(auth_middleware(settings.api_token, protect_reads=settings.api_token_protect_reads))
    middlewares.append(limits_middleware(settings))
    app = web.Application(
        middlewares=middlewares, client_max_size=settings.max_body_bytes, handler_args=parser_limits(settings)
    )
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = create_metrics(app)
    app.cleanup_ctx.append(_pool_ctx)
    app.cleanup_ctx.append(_enqueue_batcher_ctx)
    app.cleanup_ctx.append(_supervisor_ctx)
    add_routes(app)
    setup_lifecycle(app)  # after the supervisor: it subscribes to its notifications
    add_metrics_route(app)
    add_stats_route(app)
    add_console_routes(app)
    return app
