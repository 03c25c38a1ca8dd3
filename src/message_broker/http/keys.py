"""Typed keys for the state the application shares (aiohttp's web.AppKey; no globals)."""

from __future__ import annotations

from aiohttp import web

from ..config import Settings
from ..db.connector import Pool
from ..db.enqueue_batcher import EnqueueBatcher
from ..metrics import Metrics
from ..worker.supervisor import Supervisor

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", Pool)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
ENQUEUE_BATCHER = web.AppKey("enqueue_batcher", EnqueueBatcher)
METRICS = web.AppKey("metrics", Metrics)
