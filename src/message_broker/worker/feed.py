"""Finished tasks, live, from the process's one LISTEN connection, for in-process subscribers.

Two kinds of subscriber:
- waiting requests want each finished task at once (`on_task`);
- event streams want each finished task with its place in the stream (`on_placed`), in order.
  A transaction's task_processed notifications carry its batch id and are followed by one
  task_batch '<batch>:<position>' notification (migration 0003), so the feed holds a batch's tasks
  until that arrives, then hands them on in id order, each with its place (position, id).

Both are told each time the LISTEN connection has (re)connected, the first time included:
notifications sent while it was down are lost, so they re-check the database then.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from ..db.driver import Notification
from ..db.listener import Listener
from ..db.task_events import BadPayload, FinishedTask, parse_batch_payload, parse_processed_payload
from ..models import Task

log = logging.getLogger(__name__)

TASK_PROCESSED = "task_processed"
# Follows a finishing transaction's task_processed notifications with its stream position
# (migration 0003).
TASK_BATCH = "task_batch"

# Batches whose tasks are held until their position arrives. Only a lost notification leaves one
# here for long; past this many, the oldest are dropped and streams told to catch up.
_MAX_UNPLACED_BATCHES = 1000
# Positions of the last batches seen, for a task that comes after its batch's position (a
# transaction that finished tasks in two statements).
_RECENT_BATCHES = 1000


class FinishedTaskFeed:
    def __init__(self, listener: Listener) -> None:
        self._on_task: list[Callable[[Task], None]] = []
        self._on_placed: list[Callable[[FinishedTask], None]] = []
        self._on_connected: list[Callable[[], None]] = []
        self._active: list[Callable[[], bool]] = []
        self._unplaced: dict[int, list[Task]] = {}
        self._recent: OrderedDict[int, int] = OrderedDict()
        listener.route(TASK_PROCESSED, self._processed)
        listener.route(TASK_BATCH, self._batch)
        listener.on_connected(self._connected)

    def subscribe_tasks(
        self,
        on_task: Callable[[Task], None],
        on_connected: Callable[[], None],
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        """`active` says whether the subscriber wants tasks right now (see _processed)."""
        self._on_task.append(on_task)
        self._add_subscriber(on_connected, active)

    def subscribe_placed(
        self,
        on_placed: Callable[[FinishedTask], None],
        on_connected: Callable[[], None],
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self._on_placed.append(on_placed)
        self._add_subscriber(on_connected, active)

    def _add_subscriber(self, on_connected: Callable[[], None], active: Callable[[], bool]) -> None:
        self._on_connected.append(on_connected)
        self._active.append(active)

    def _processed(self, notification: Notification) -> None:
        # With no request waiting and no stream open, nobody needs the task: skip the parsing,
        # a good part of a process's CPU per task under load. A waiter or a stream that starts
        # later reads the database after subscribing, and so sees every task notified before
        # (it had committed); a stream skips what it replayed (see http/events.py).
        if not any(active() for active in self._active):
            return
        try:
            notice = parse_processed_payload(notification.payload)
        except BadPayload as exc:
            log.warning("ignoring task_processed notification: %s", exc)
            return
        _call_each(self._on_task, notice.task)
        if notice.batch is None:
            log.warning("task_processed for task %s has no batch; event streams will not see it", notice.task.id)
            return
        position = self._recent.get(notice.batch)
        if position is not None:
            _call_each(self._on_placed, FinishedTask(notice.task, (position, notice.task.id)))
            return
        self._unplaced.setdefault(notice.batch, []).append(notice.task)
        if len(self._unplaced) > _MAX_UNPLACED_BATCHES:
            dropped = next(iter(self._unplaced))
            del self._unplaced[dropped]
            log.warning("batch %s never got its position; event streams catch up from the database", dropped)
            _call_each(self._on_connected)

    def _batch(self, notification: Notification) -> None:
        try:
            batch, position = parse_batch_payload(notification.payload)
        except BadPayload as exc:
            log.warning("ignoring task_batch notification: %s", exc)
            return
        self._recent[batch] = position
        if len(self._recent) > _RECENT_BATCHES:
            self._recent.popitem(last=False)
        for task in sorted(self._unplaced.pop(batch, ()), key=lambda t: t.id):
            _call_each(self._on_placed, FinishedTask(task, (position, task.id)))

    def _connected(self) -> None:
        # A batch cut in two by the loss would never be completed: the replay covers it.
        self._unplaced.clear()
        _call_each(self._on_connected)


def _call_each(callbacks: list[Callable[..., None]], *args: object) -> None:
    for callback in callbacks:
        try:
            callback(*args)
        except Exception:  # one broken subscriber must not starve the others
            log.exception("a finished-task subscriber failed")
