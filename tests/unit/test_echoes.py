"""The supervisor's own-insert echoes: a task this process stored wakes its user's loop at once, and
the task_created notification that comes back for it (same backend pid, same user) wakes nobody
again, whichever of the two this process reads first; anything else still wakes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from message_broker.config import Settings
from message_broker.db.driver import Notification
from message_broker.ledger import Status, TaskType
from message_broker.models import Task
from message_broker.worker.supervisor import TASK_CREATED, Supervisor
from message_broker.worker.tasks import BackgroundTasks


class FakeListener:
    def __init__(self) -> None:
        self.routes: dict[str, Callable[[Notification], None]] = {}
        self.connected: list[Callable[[], None]] = []

    def route(self, channel: str, handler: Callable[[Notification], None]) -> None:
        self.routes[channel] = handler

    def on_connected(self, callback: Callable[[], None]) -> None:
        self.connected.append(callback)


def _task(user_id: int) -> Task:
    fields: dict[str, Any] = dict.fromkeys(Task._fields)
    return Task(**{**fields, "id": 1, "user_id": user_id, "type": TaskType.REPLENISHMENT, "status": Status.PENDING})


def _supervisor() -> tuple[Supervisor, FakeListener, list[int]]:
    listener = FakeListener()
    supervisor = Supervisor(None, listener, BackgroundTasks(), Settings.from_env({}))  # type: ignore[arg-type]
    woken: list[int] = []
    supervisor.wake = lambda user_id, **_: woken.append(user_id) or False  # type: ignore[method-assign]
    return supervisor, listener, woken


async def test_the_echo_of_an_own_insert_wakes_nobody_again() -> None:
    supervisor, listener, woken = _supervisor()
    sent = time.monotonic()
    supervisor.stored(101, [_task(7), _task(7)], sent)
    assert woken == [7]  # once per user and commit
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))
    assert woken == [7] and supervisor.echoes_expected == 0
    # Another backend's notification for the same user, and a second one from ours, still wake.
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 202))
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))
    assert woken == [7, 7, 7]


async def test_an_echo_read_before_its_inserts_answer_is_the_one_wake_up() -> None:
    supervisor, listener, woken = _supervisor()
    sent = time.monotonic()
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))  # the echo, first
    supervisor.stored(101, [_task(7)], sent)
    assert woken == [7] and supervisor.echoes_expected == 0
    # A notification heard before the statement was sent is not this commit's echo.
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "8", 101))
    supervisor.stored(101, [_task(8)], time.monotonic())
    assert woken == [7, 8, 8] and supervisor.echoes_expected == 1


async def test_two_echoes_read_before_their_inserts_answers_are_each_their_own() -> None:
    """Two inserts of one user through one server process, both echoes read before either answer
    (an insert's connection goes back to the pool before its answer is handled, and the next
    insert can commit on it meanwhile). Each echo is its own insert's, so none is left expected:
    the next notification of that user from that server process, such as a hold's release (which
    nothing else wakes), wakes the loop (found from outside: releases pending until the sweep)."""
    supervisor, listener, woken = _supervisor()
    with supervisor.storing([7]), supervisor.storing([7]):
        first = time.monotonic()
        listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))  # the first's echo
        second = time.monotonic()
        listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))  # the second's
        supervisor.stored(101, [_task(7)], first)
        supervisor.stored(101, [_task(7)], second)
    assert supervisor.echoes_expected == 0
    woken.clear()
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))  # the release's
    assert woken == [7]


async def test_a_reconnect_forgets_the_echoes_it_lost() -> None:
    supervisor, listener, woken = _supervisor()
    supervisor.stored(101, [_task(7)], time.monotonic())
    for connected in listener.connected:
        connected()
    assert supervisor.echoes_expected == 0
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))
    assert woken == [7, 7]


async def test_an_insert_sent_before_a_reconnect_and_answered_after_it_expects_no_echo() -> None:
    """Its echo may have gone with the old LISTEN connection: expecting it would swallow the next
    notification of that user from that server process, such as a hold's release (inserted by
    the deadlines' timer, which wakes nobody itself)."""
    supervisor, listener, woken = _supervisor()
    sent = time.monotonic()
    for connected in listener.connected:  # the LISTEN connection comes back meanwhile
        connected()
    supervisor.stored(101, [_task(7)], sent)
    assert woken == [7] and supervisor.echoes_expected == 0
    listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))  # the release's
    assert woken == [7, 7]


async def test_inside_storing_an_echo_read_first_wakes_the_loop_only_with_the_inserts_answer() -> None:
    """So that the loop's memory has the task when it looks (worker/account_memory.py)."""
    supervisor, listener, woken = _supervisor()
    with supervisor.storing([7]):
        sent = time.monotonic()
        listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))  # the echo, first
        assert woken == []
        supervisor.stored(101, [_task(7)], sent)
        assert woken == [7]
        assert supervisor.memory._pending[7]  # known before the loop was woken
    assert woken == [7] and supervisor.echoes_expected == 0


async def test_inside_storing_another_notification_wakes_when_the_insert_ends_whatever_its_end() -> None:
    supervisor, listener, woken = _supervisor()
    try:
        with supervisor.storing([7, 8]):
            listener.routes[TASK_CREATED](Notification(TASK_CREATED, "8", 202))  # another process's
            listener.routes[TASK_CREATED](Notification(TASK_CREATED, "9", 202))  # no insert of ours
            assert woken == [9]
            raise ConnectionError("the insert failed")
    except ConnectionError:
        pass
    assert woken == [9, 8]
    # Two inserts on their way for one user: the wake-up waits for both, or for the first answer.
    with supervisor.storing([7]):
        with supervisor.storing([7]):
            listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 202))
        assert woken == [9, 8]
        supervisor.stored(101, [_task(7)], time.monotonic())
        assert woken == [9, 8, 7]
    assert woken == [9, 8, 7]


async def test_inside_storing_a_notification_from_an_unknown_server_process_is_judged_by_the_answer() -> None:
    """A pool connection's first insert: its echo, read before its answer, comes from a server
    process no insert of this process has used yet. The answer names it ours, and the remembered
    account stands; a notification from any other unknown server process meanwhile was another
    process's task, and the account is forgotten (whatever way the insert ends)."""
    supervisor, listener, woken = _supervisor()
    elsewhere: list[int] = []
    supervisor.memory.changed_elsewhere = elsewhere.append  # type: ignore[method-assign]
    with supervisor.storing([7]):
        sent = time.monotonic()
        listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 101))  # the echo, first
        supervisor.stored(101, [_task(7)], sent)
    assert elsewhere == [] and woken == [7]
    with supervisor.storing([7]):
        sent = time.monotonic()
        listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 202))  # another process's
        assert elsewhere == []  # not known yet: it may be this insert's echo
        supervisor.stored(303, [_task(7)], sent)
        assert elsewhere == [7] and woken == [7, 7]
    # Two inserts on their way: a server process unknown to the first answer may be the second's.
    with supervisor.storing([7]), supervisor.storing([7]):
        sent = time.monotonic()
        listener.routes[TASK_CREATED](Notification(TASK_CREATED, "7", 404))
        supervisor.stored(101, [_task(7)], sent)
        assert elsewhere == [7]
        supervisor.stored(404, [_task(7)], sent)
    assert elsewhere == [7]
    try:
        with supervisor.storing([8]):
            listener.routes[TASK_CREATED](Notification(TASK_CREATED, "8", 505))
            raise ConnectionError("the insert failed")
    except ConnectionError:
        pass
    assert elsewhere == [7, 8] and supervisor._unknown_while_storing == {}
