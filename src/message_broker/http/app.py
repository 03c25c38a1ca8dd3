"""The application factory: everything the service is, wired in one place, top to bottom.

    middlewares   errors (outermost) -> token and scope (auth.py) -> limits
    cleanup_ctx   1. the pool            (opened here unless serve opened it already; closed last)
                  2. the service: the API tokens (loaded before the first request), the LISTEN
                     connection, background loops, the enqueue batcher,
                     the supervisor and its user loops, waiting requests, event streams, hold
                     deadlines, purges  (stopped before the pool closes)
    on_shutdown   end event streams and waits, so the graceful stop does not wait for them
    routes        the API, events, operations, OpenAPI and docs

A task's path through it: handlers.post_amount -> EnqueueBatcher -> INSERT (trigger: NOTIFY
task_created at commit, for the other processes) -> Supervisor.stored (this process's own loop, at
once) -> UserLoop -> db.apply (lock, ledger rules, write outcomes; triggers: NOTIFY task_processed,
task_batch; the waited tasks read back) -> waiters; -> Listener -> feed -> waiters (tasks other
processes applied), streams.
A webhook's: the same COMMIT writes its deliveries (trigger, NOTIFY webhook_delivery) -> Listener
-> SenderProcess (a newline on its child's stdin) -> WebhookSender there (claim, signed POST,
record); with WEBHOOK_SENDER=inline, the WebhookSender here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web, web_response

from ..config import Settings
from ..db.driver import Notification, Pool
from ..db.enqueue_batcher import EnqueueBatcher
from ..db.idempotency import purge_expired
from ..db.listener import Listener
from ..db.options import ConnectionOptions
from ..db.task_events import purge_positions
from ..db.tokens import TokenTable
from ..db.webhooks import purge_deliveries
from ..metrics import JobFigures, LiveState, Metrics
from ..worker.deadlines import HoldDeadlines
from ..worker.event_hub import EventHub
from ..worker.feed import FinishedTaskFeed
from ..worker.housekeeping import (
    PURGE_EVENT_POSITIONS,
    PURGE_IDEMPOTENCY_KEYS,
    PURGE_WEBHOOK_DELIVERIES,
    Housekeeping,
    Purge,
)
from ..worker.sender_process import SenderProcess, new_sender
from ..worker.supervisor import Supervisor
from ..worker.tasks import BackgroundTasks
from ..worker.waiters import TaskWaiters
from ..worker.webhooks import WEBHOOK_DELIVERY, WebhookSender, changed_endpoint
from . import events, handlers, keys, openapi, operations, statements, tokens, webhooks
from .auth import auth_middleware
from .console import add_console_routes
from .errors import error_middleware
from .limits import limits_middleware, parser_limits
from .operations import http_metrics_middleware
from .routes import add_routes
from .stats import add_stats_route

# What every answer says it is: the product, not the versions of the libraries serving it (which
# would tell anyone what to look up vulnerabilities for).
SERVER_HEADER = "message_broker"


def create_app(settings: Settings, *, pool: Pool | None = None) -> web.Application:
    """The application on `settings`; with `pool`, on that pool (which `serve` opened while it
    waited for the database at start-up) instead of opening one. Either way it closes the pool."""
    metrics = Metrics()
    middlewares = [
        http_metrics_middleware(metrics),
        error_middleware(metrics.observe_error),
        # Before any body is read. Always there: a token created at run time turns it on.
        auth_middleware(protect_reads=settings.api_token_protect_reads),
        limits_middleware(settings),
    ]
    app = web.Application(
        middlewares=middlewares, client_max_size=settings.max_body_bytes, handler_args=parser_limits(settings)
    )
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    if pool is not None:
        app[keys.POOL] = pool
    app[keys.ROUTE_SCOPES] = {}
    metrics.read_live = partial(_live_state, app)

    app.cleanup_ctx.append(_pool)
    app.cleanup_ctx.append(_service)
    app.on_shutdown.append(_release_clients)
    # aiohttp writes its default Server header into every answer that has none, including those its
    # HTTP parser sends before any application hook runs (a malformed request line, a header past
    # the hard limit): its module constant is the one place that covers them all.
    web_response.SERVER_SOFTWARE = SERVER_HEADER

    add_routes(app, handlers.ROUTES)
    add_routes(app, events.ROUTES)
    add_routes(app, statements.ROUTES)
    add_routes(app, operations.ROUTES)
    add_routes(app, tokens.ROUTES)
    add_routes(app, webhooks.ROUTES)
    add_stats_route(app)
    add_console_routes(app)
    openapi.add_routes(app)
    return app


async def _pool(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    if keys.POOL not in app:
        app[keys.POOL] = await Pool.open(
            ConnectionOptions.from_settings(settings),
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            acquire_timeout=settings.pool_acquire_timeout,
        )
    yield
    await app[keys.POOL].close()


async def _service(app: web.Application) -> AsyncIterator[None]:
    settings, pool, metrics = app[keys.SETTINGS], app[keys.POOL], app[keys.METRICS]
    tasks = BackgroundTasks(max_backoff=settings.reconnect_max_backoff)
    listen_options = ConnectionOptions.for_listener(settings)
    listener = Listener(
        listen_options,
        pool,
        probe_interval=settings.probe_interval,
        probe_timeout=settings.probe_timeout,
        max_backoff=settings.reconnect_max_backoff,
        shares_pool_path=listen_options.dsn == ConnectionOptions.from_settings(settings).dsn,
    )
    waiters = TaskWaiters(
        pool, tasks, listening=lambda: listener.connected, queue_timeout=settings.pool_acquire_timeout
    )
    sender: WebhookSender | SenderProcess
    if settings.webhook_sender == "process":
        sender = SenderProcess(settings, tasks, on_result=metrics.observe_webhook)
    else:
        sender = new_sender(pool, tasks, settings, metrics.observe_webhook)
    supervisor = Supervisor(
        pool,
        listener,
        tasks,
        settings,
        on_applied=metrics.observe_applied,
        waiters=waiters,
        on_backlog=sender.give_way,
    )
    batcher = EnqueueBatcher(
        pool,
        max_batch=settings.enqueue_max_batch,
        max_in_flight=settings.enqueue_max_in_flight,
        # Queued behind stuck inserts no longer than a request would wait for a pooled connection.
        queue_timeout=settings.pool_acquire_timeout,
        on_stored=metrics.observe_stored,
        on_committed=supervisor.stored,
        storing=supervisor.storing,
    )
    feed = FinishedTaskFeed(listener)
    hub = EventHub(settings.sse_queue_size)
    feed.subscribe_tasks(waiters.finished, waiters.connected, active=waiters.has_waiting)
    feed.subscribe_placed(hub.finished, hub.connected, active=hub.has_subscribers)
    deadlines = HoldDeadlines(
        pool,
        listener,
        tasks,
        max_wait=settings.sweep_interval,
        max_backoff=settings.reconnect_max_backoff,
        on_released=metrics.count_released,
    )
    housekeeping = Housekeeping(pool, tasks)
    token_table = TokenTable(pool, listener, bootstrap=settings.api_token, refresh_interval=settings.sweep_interval)
    # Loaded before the first request: until then every request needs a token anyway.
    await token_table.load()
    app[keys.TOKENS] = token_table

    def webhook_notified(notification: Notification) -> None:
        # Deliveries due, or an endpoint changed (migration 0013).
        endpoint_id = changed_endpoint(notification.payload)
        if endpoint_id is None:
            sender.poke()
        else:
            sender.endpoint_changed(endpoint_id)

    listener.route(WEBHOOK_DELIVERY, webhook_notified)
    # Notifications sent while the LISTEN connection was down are lost: read the database then too.
    listener.on_connected(sender.poke)
    if isinstance(sender, SenderProcess):
        # Its pool is on the pool's path: silent for the listener, silent for it (inline, the
        # sender uses the service's pool, which the listener abandons itself).
        listener.on_path_silent(sender.path_silent)
    app[keys.TASKS], app[keys.LISTENER], app[keys.ENQUEUE_BATCHER] = tasks, listener, batcher
    app[keys.SUPERVISOR], app[keys.WAITERS], app[keys.EVENTS] = supervisor, waiters, hub
    app[keys.DEADLINES], app[keys.HOUSEKEEPING], app[keys.WEBHOOK_SENDER] = deadlines, housekeeping, sender

    # The listener's first connect makes the supervisor scan for work left from before.
    tasks.start("listener", listener.run, interrupt=listener.interrupt)
    tasks.start("api_tokens", token_table.run, interrupt=token_table.interrupt)
    supervisor.start()
    deadlines.start()
    sender.start()
    housekeeping.start(
        Purge(
            PURGE_IDEMPOTENCY_KEYS,
            settings.idempotency_purge_interval,
            settings.idempotency_purge_batch,
            partial(purge_expired, pool),
        )
    )
    housekeeping.start(
        Purge(
            PURGE_EVENT_POSITIONS,
            settings.event_purge_interval,
            settings.event_purge_batch,
            partial(purge_positions, pool, settings.event_retention),
        )
    )
    housekeeping.start(
        Purge(
            PURGE_WEBHOOK_DELIVERIES,
            settings.event_purge_interval,
            settings.event_purge_batch,
            partial(purge_deliveries, pool, settings.webhook_retention),
        )
    )
    yield
    # Requests are over by now: their inserts have finished; stop every loop (user loops let
    # their transaction commit), then what the loops used.
    await tasks.stop(timeout=settings.shutdown_timeout)
    await supervisor.close()
    await batcher.close(timeout=settings.shutdown_timeout)


async def _release_clients(app: web.Application) -> None:
    """Event streams never end and waits can last 30 s: on shutdown, end them now."""
    if keys.EVENTS in app:
        app[keys.EVENTS].close()
    if keys.WAITERS in app:
        app[keys.WAITERS].close()


def _live_state(app: web.Application) -> LiveState | None:
    if keys.HOUSEKEEPING not in app or keys.POOL not in app:
        return None  # not started yet
    tasks, housekeeping = app[keys.TASKS], app[keys.HOUSEKEEPING]
    return LiveState(
        active_user_loops=app[keys.SUPERVISOR].active_users,
        apply_backlog=app[keys.SUPERVISOR].backlogged,
        listen_connects=app[keys.LISTENER].connects,
        sweeps_with_missed_work=app[keys.SUPERVISOR].sweeps_with_missed_work,
        pool_in_use=app[keys.POOL].in_use,
        pool_size=app[keys.POOL].size,
        holds_released=app[keys.DEADLINES].released,
        apply_transactions=app[keys.SUPERVISOR].apply_transactions,
        empty_applies=app[keys.SUPERVISOR].empty_applies,
        applies_from_memory=app[keys.SUPERVISOR].applies_from_memory,
        memory_differed=app[keys.SUPERVISOR].memory_differed,
        waiting_requests=app[keys.WAITERS].waiting,
        loop_restarts=dict(tasks.restarts),
        loops_down=tuple(tasks.down()),
        loops=tasks.names(),
        jobs={
            name: JobFigures(job.runs, job.removed, job.failures, job.last_seconds)
            for name, job in housekeeping.stats.items()
        },
    )
