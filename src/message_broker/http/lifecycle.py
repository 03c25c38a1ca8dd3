"""Wiring of the client lifecycle features: waiting requests and event streams fed by the
supervisor's task_processed notifications, the idempotency-key purge, and their routes.

Its cleanup_ctx runs after the supervisor's (it subscribes to it) and so is cleaned up before it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..worker.event_hub import EventHub
from ..worker.feed import FinishedTaskFeed
from ..worker.purger import IdempotencyPurger
from ..worker.waiters import TaskWaiters
from . import keys, openapi
from .events import all_events, user_events


async def lifecycle_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, pool = app[keys.SETTINGS], app[keys.POOL]
    waiters = TaskWaiters(pool)
    hub = EventHub(settings.sse_queue_size)
    feed = FinishedTaskFeed(app[keys.SUPERVISOR])
    feed.subscribe_tasks(waiters.finished, waiters.connected, active=waiters.has_waiting)
    feed.subscribe_placed(hub.finished, hub.connected, active=hub.has_subscribers)
    purger = IdempotencyPurger(
        pool, interval=settings.idempotency_purge_interval, batch_size=settings.idempotency_purge_batch
    )
    app[keys.WAITERS], app[keys.EVENTS], app[keys.PURGER] = waiters, hub, purger
    purger.start()
    yield
    await _release_clients(app)
    await purger.stop(timeout=settings.shutdown_timeout)


async def _release_clients(app: web.Application) -> None:
    """Event streams never end and waits can last 30 s: on shutdown, end them now so the
    server's graceful stop does not wait for them."""
    if keys.EVENTS in app:
        app[keys.EVENTS].close()
    if keys.WAITERS in app:
        await app[keys.WAITERS].close()


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(lifecycle_ctx)
    # on_shutdown runs before aiohttp waits for in-flight requests (cleanup runs after).
    app.on_shutdown.append(_release_clients)
    for path in ("/api/v1/user/{user_id}/events", "/api/v1/user/{user_id}/events/"):
        app.router.add_get(path, user_events)
    for path in ("/api/v1/events", "/api/v1/events/"):
        app.router.add_get(path, all_events)
    openapi.add_routes(app)
