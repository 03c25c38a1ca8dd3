"""Typed keys for the state the application shares (aiohttp's web.AppKey; no globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..config import Settings
from ..db.driver import Pool
from ..db.enqueue_batcher import EnqueueBatcher
from ..db.listener import Listener
from ..db.tokens import TokenTable
from ..metrics import Metrics
from ..scopes import Scope
from ..worker.deadlines import HoldDeadlines
from ..worker.event_hub import EventHub
from ..worker.housekeeping import Housekeeping
from ..worker.supervisor import Supervisor
from ..worker.tasks import BackgroundTasks
from ..worker.waiters import TaskWaiters

if TYPE_CHECKING:  # the sender's module imports from this package
    from ..worker.sender_process import SenderProcess
    from ..worker.webhooks import WebhookSender

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", Pool)
TASKS = web.AppKey("background_tasks", BackgroundTasks)
LISTENER = web.AppKey("listener", Listener)
ENQUEUE_BATCHER = web.AppKey("enqueue_batcher", EnqueueBatcher)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
WAITERS = web.AppKey("waiters", TaskWaiters)
EVENTS = web.AppKey("events", EventHub)
DEADLINES = web.AppKey("hold_deadlines", HoldDeadlines)
HOUSEKEEPING = web.AppKey("housekeeping", Housekeeping)
TOKENS = web.AppKey("api_tokens", TokenTable)
WEBHOOK_SENDER: web.AppKey[WebhookSender | SenderProcess] = web.AppKey("webhook_sender")
# The scope each (resource, method) declares (http/routes.py).
ROUTE_SCOPES = web.AppKey("route_scopes", dict[tuple[web.AbstractResource, str], Scope])
