"""The in-memory parts of the client lifecycle: the event hub's bounded buffers, the waiter
registry, notification payloads, request fingerprints and the ?wait value."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from marshmallow import ValidationError

from message_broker.config import ConfigError, Settings
from message_broker.db.driver import Notification
from message_broker.db.task_events import BadPayload, FinishedTask, parse_batch_payload, parse_processed_payload
from message_broker.http.idempotency import fingerprint
from message_broker.http.schemas import wait_query_schema
from message_broker.ledger import Status, TaskType
from message_broker.models import Task
from message_broker.worker.event_hub import CATCH_UP, EventHub, StreamEnded
from message_broker.worker.feed import TASK_BATCH, TASK_PROCESSED, FinishedTaskFeed
from message_broker.worker.waiters import TaskWaiters


def _task(task_id: int, user_id: int = 1) -> Task:
    now = datetime.now(UTC)
    return Task(task_id, user_id, TaskType.REPLENISHMENT, 1, Status.DONE, None, 1, 1, None, None, None, None, now, now)


def _finished(task_id: int, user_id: int = 1) -> FinishedTask:
    return FinishedTask(_task(task_id, user_id), (task_id, task_id))


async def test_hub_routes_by_user_and_to_global_subscribers() -> None:
    hub = EventHub(maxsize=10)
    with hub.subscribe(1, lambda: None) as mine, hub.subscribe(None, lambda: None) as everyone:
        hub.finished(_finished(1, user_id=1))
        hub.finished(_finished(2, user_id=2))
        assert [(await mine.next()).task.id] == [1]  # type: ignore[union-attr]
        assert [(await everyone.next()).task.id, (await everyone.next()).task.id] == [1, 2]  # type: ignore[union-attr]
        assert mine.buffered == 0
    assert hub.subscribers == 0


async def test_full_buffer_while_writing_ends_the_stream_and_cuts_the_client_off() -> None:
    cut_off = []
    hub = EventHub(maxsize=3)
    with hub.subscribe(None, lambda: cut_off.append(True)) as subscription:
        subscription.writing = True
        for n in range(4):
            hub.finished(_finished(n + 1))
        assert cut_off == [True] and hub.overflows == 1
        with pytest.raises(StreamEnded, match="overflow"):
            await subscription.next()
        assert subscription.buffered == 0  # nothing kept for a stream that is over


async def test_full_buffer_while_idle_becomes_a_catch_up() -> None:
    hub = EventHub(maxsize=3)
    with hub.subscribe(None, lambda: pytest.fail("a burst must not cut a reader off")) as subscription:
        for n in range(10):
            hub.finished(_finished(n + 1))
        assert subscription.buffered <= 3
        items = [await subscription.next() for _ in range(subscription.buffered)]
        assert CATCH_UP in items and subscription.catch_ups >= 1
        assert hub.overflows == 0


async def test_reconnect_and_shutdown_reach_every_subscription() -> None:
    hub = EventHub(maxsize=3)
    with hub.subscribe(7, lambda: None) as one, hub.subscribe(None, lambda: None) as other:
        hub.connected()
        assert await one.next() is CATCH_UP and await other.next() is CATCH_UP
        waiting = asyncio.create_task(one.next())
        await asyncio.sleep(0)
        hub.close()
        with pytest.raises(StreamEnded, match="shutdown"):
            await waiting
    with hub.subscribe(None, lambda: None) as late, pytest.raises(StreamEnded):
        await late.next()


async def test_waiters_registry_is_cleaned_up_whatever_happens() -> None:
    waiters = TaskWaiters(pool=None, tasks=None, listening=lambda: True)  # type: ignore[arg-type]
    with waiters._watch(5) as first, waiters._watch(5) as second, waiters._watch(6):
        assert waiters.waiting == 3
        waiters.finished(_task(5))
        assert first.result().id == 5 and second.result().id == 5  # type: ignore[union-attr]
        assert waiters.waiting == 1
    assert waiters.waiting == 0
    with pytest.raises(RuntimeError), waiters._watch(9):
        raise RuntimeError("the request failed")
    assert waiters.waiting == 0


def test_processed_payload_round_trip() -> None:
    payload = json.dumps(
        {
            "id": "12",
            "user_id": "5",
            "type": "write-off",
            "amount": 3,
            "status": "cancelled",
            "reason": "insufficient_funds",
            "balance_after": 2,
            "created_at": "2026-11-28T19:43:04.554573+01:00",
            "processed_at": "2026-11-28T18:43:05+00:00",
            "finish_batch": 77,
        }
    )
    finished = parse_processed_payload(payload)
    assert finished.batch == 77 and finished.task.id == 12 and finished.task.user_id == 5
    assert finished.task.reason is not None and finished.task.reason.value == "insufficient_funds"
    assert finished.task.created_at == datetime(2026, 11, 28, 18, 43, 4, 554573, tzinfo=UTC)
    assert finished.task.created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    for bad in ["", "[]", '{"id": "1"}', payload.replace('"cancelled"', '"lost"')]:
        with pytest.raises(BadPayload):
            parse_processed_payload(bad)


def test_fingerprint_is_about_meaning_not_spelling() -> None:
    base = fingerprint("POST", "/api/v1/user/5/amount/", {"type": "write-off", "amount": 5})
    assert base == fingerprint("POST", "/api/v1/user/5/amount/", {"amount": 5, "type": "write-off"})
    assert base != fingerprint("POST", "/api/v1/user/6/amount/", {"type": "write-off", "amount": 5})
    assert base != fingerprint("POST", "/api/v1/user/5/amount/", {"type": "write-off", "amount": 6})


@pytest.mark.parametrize(("raw", "seconds"), [("30", 30.0), ("0.5", 0.5), (".25", 0.25), ("1e1", 10.0), ("5.", 5.0)])
def test_wait_accepts(raw: str, seconds: float) -> None:
    assert wait_query_schema.load({"wait": raw}) == {"wait": seconds}


@pytest.mark.parametrize(
    "raw", ["0", "0.0", "-1", "30.000001", "1e2", "nan", "inf", "", " 5", "5 ", "٣", "0x1", "1" * 40]
)
def test_wait_refuses(raw: str) -> None:
    with pytest.raises(ValidationError):
        wait_query_schema.load({"wait": raw})


@pytest.mark.parametrize(
    "env",
    [
        {"IDEMPOTENCY_RETENTION": "0"},
        {"IDEMPOTENCY_PURGE_INTERVAL": "-1"},
        {"IDEMPOTENCY_PURGE_BATCH": "0"},
        {"SSE_QUEUE_SIZE": "0"},
        {"SSE_HEARTBEAT_INTERVAL": "0"},
    ],
)
def test_lifecycle_settings_are_checked(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)
    defaults = Settings.from_env({})
    assert (defaults.idempotency_retention, defaults.sse_queue_size) == (86400.0, 1000)


def test_batch_payload() -> None:
    assert parse_batch_payload("7731:12") == (7731, 12)
    assert parse_batch_payload("-5:3") == (-5, 3)
    for bad in ["", "12", "a:b", "1:"]:
        with pytest.raises(BadPayload):
            parse_batch_payload(bad)


class _FakeListener:
    """Just the routing side of the Listener."""

    def __init__(self) -> None:
        self.processed: list = []  # type: ignore[type-arg]
        self.batches: list = []  # type: ignore[type-arg]
        self.connected: list = []  # type: ignore[type-arg]

    def route(self, channel: str, callback) -> None:  # type: ignore[no-untyped-def]
        {TASK_PROCESSED: self.processed, TASK_BATCH: self.batches}[channel].append(callback)

    def on_connected(self, callback) -> None:  # type: ignore[no-untyped-def]
        self.connected.append(callback)

    def task(self, task_id: int, batch: int) -> None:
        payload = {
            "id": str(task_id),
            "user_id": "1",
            "type": "replenishment",
            "amount": 1,
            "status": "done",
            "reason": None,
            "balance_after": 1,
            "created_at": "2026-11-28T19:43:04+00:00",
            "processed_at": "2026-11-28T19:43:05+00:00",
            "finish_batch": batch,
        }
        for callback in self.processed:
            callback(Notification("task_processed", json.dumps(payload), 1))

    def batch(self, batch: int, position: int) -> None:
        for callback in self.batches:
            callback(Notification("task_batch", f"{batch}:{position}", 1))


def test_feed_places_a_batch_once_its_position_arrives() -> None:
    listener = _FakeListener()
    feed = FinishedTaskFeed(listener)  # type: ignore[arg-type]
    tasks: list[int] = []
    placed: list[tuple[int, int]] = []
    reconnects: list[bool] = []
    feed.subscribe_tasks(lambda task: tasks.append(task.id), lambda: reconnects.append(True))
    feed.subscribe_placed(lambda finished: placed.append(finished.place), lambda: None)
    listener.task(12, batch=900)
    listener.task(11, batch=900)
    assert tasks == [12, 11] and placed == []  # waiters hear at once; streams wait for the position
    listener.batch(900, 40)
    assert placed == [(40, 11), (40, 12)]  # in id order within the batch
    listener.task(13, batch=900)  # a late task of an already placed batch
    assert placed[-1] == (40, 13)
    listener.task(20, batch=901)
    for callback in listener.connected:
        callback()
    listener.batch(901, 41)  # its task was dropped on the reconnect: the streams replay it
    assert placed[-1] == (40, 13) and reconnects == [True]


def test_feed_skips_finished_tasks_while_nobody_wants_them() -> None:
    listener = _FakeListener()
    feed = FinishedTaskFeed(listener)  # type: ignore[arg-type]
    tasks: list[int] = []
    wanted = False
    feed.subscribe_tasks(lambda task: tasks.append(task.id), lambda: None, active=lambda: wanted)
    listener.task(1, batch=900)
    assert tasks == []  # no request waiting: not even parsed
    wanted = True
    listener.task(2, batch=900)
    assert tasks == [2]
