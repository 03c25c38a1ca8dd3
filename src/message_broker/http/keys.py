"""Typed keys for the state the application shares (aiohttp's web.AppKey; no globals)."""

from __future__ import annotations

from aiohttp import web

from ..config import Settings
from ..db.connector import Pool
from ..db.enqueue_batcher import EnqueueBatcher
from ..metrics import Metrics
from ..worker.event_hub import EventHub
from ..worker.purger import IdempotencyPurger
from ..worker.supervisor import Supervisor
from ..worker.waiters import TaskWaiters

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", Pool)
SUPERVISOR = web.AppKey("supervisor", Supervisor)

# Task lifecycle for clients: waiting requests, event streams, the idempotency-key purge.
WAITERS = web.AppKey("waiters", TaskWaiters)
EVENTS = web.AppKey("events", EventHub)
PURGER = web.AppKey("idempotency_purger", IdempotencyPurger)
ENQUEUE_BATCHER = web.AppKey("enqueue_batcher", EnqueueBatcher)
METRICS = web.AppKey("metrics", Metrics)
