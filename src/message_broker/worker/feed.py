"""Finished tasks, live: task_processed notifications from the process's one LISTEN connection,
parsed once and handed to in-process subscribers (waiting requests, event streams).

Subscribers are also told each time the LISTEN connection has (re)connected, including the first
time: notifications sent while it was down are lost, so whoever depends on them re-checks the
database then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..db.connector import Notification
from ..db.task_events import BadPayload, FinishedTask, parse_processed_payload
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class FinishedTaskFeed:
    def __init__(self, supervisor: Supervisor) -> None:
        self._on_finished: list[Callable[[FinishedTask], None]] = []
        self._on_connected: list[Callable[[], None]] = []
        self.connects = 0
        supervisor.subscribe_processed(self._notified)
        supervisor.subscribe_connected(self._connected)

    def subscribe(self, on_finished: Callable[[FinishedTask], None], on_connected: Callable[[], None]) -> None:
        self._on_finished.append(on_finished)
        self._on_connected.append(on_connected)

    def _notified(self, notification: Notification) -> None:
        try:
            finished = parse_processed_payload(notification.payload)
        except BadPayload as exc:
            log.warning("ignoring task_processed notification: %s", exc)
            return
        for callback in self._on_finished:
            try:
                callback(finished)
            except Exception:  # one broken subscriber must not starve the others
                log.exception("a finished-task subscriber failed on task %s", finished.task.id)

    def _connected(self) -> None:
        self.connects += 1
        for callback in self._on_connected:
            try:
                callback()
            except Exception:
                log.exception("a finished-task subscriber failed on reconnect")
