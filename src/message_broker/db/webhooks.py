"""Webhook endpoints, the deliveries outbox and its attempts (migration 0010).

The deliveries are written by the transaction that finishes the tasks (the trigger
queue_webhook_deliveries, at COMMIT), so none is lost and none is invented. The sender claims due
ones here with a lease (SKIP LOCKED: one process per attempt) and records what became of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..models import Task
from .driver import Pool, Row
from .queries import query
from .repository import task_from_row

EVENT_TYPES = ("task.done", "task.cancelled")
ENDPOINT_STATUSES = ("enabled", "disabled")
DELIVERY_STATUSES = ("pending", "delivered", "failed")
# How long a rotated-out secret keeps signing beside the new one.
ROTATION_OVERLAP = 24 * 3600.0


def webhook_id(task_id: int, endpoint_id: int) -> str:
    """The webhook-id of a task's event at an endpoint: the same on every attempt and replay."""
    return f"msg_{task_id}_{endpoint_id}"


@dataclass(frozen=True)
class Endpoint:
    id: int
    url: str
    events: tuple[str, ...]
    description: str
    status: str
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    # Deliveries kept, by status: every query that answers with an endpoint counts them.
    deliveries: Mapping[str, int]


@dataclass(frozen=True)
class Claimed:
    """A delivery claimed for one attempt (number `attempt`, counted over the delivery's whole
    life), with what it takes to make it. `schedule_attempt` is its place in the retry schedule
    (1: the first attempt, or the first of a replay); None for a manual retry's one attempt."""

    delivery_id: int
    endpoint_id: int
    event_type: str
    attempt: int
    schedule_attempt: int | None
    url: str
    # The keys that sign it: the endpoint's secret, and the previous one during a rotation.
    secrets: tuple[bytes, ...]
    task: Task

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.task.id, self.endpoint_id)


@dataclass(frozen=True)
class AttemptResult:
    delivery_id: int
    endpoint_id: int
    attempt: int
    # "delivered", "retry" (due again in retry_in seconds) or "failed" (for good).
    outcome: str
    attempted_at: datetime
    duration_ms: float
    http_status: int | None = None
    error: str | None = None
    retry_in: float | None = None
    gone: bool = False  # 410: disable the endpoint


@dataclass(frozen=True)
class Recorded:
    recorded: int
    disabled_endpoints: tuple[int, ...] = ()


@dataclass(frozen=True)
class Delivery:
    id: int
    endpoint_id: int
    task_id: int
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
    attempt_log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.task_id, self.endpoint_id)


class EndpointNotFound(Exception):
    pass


def _endpoint(row: Row) -> Endpoint:
    return Endpoint(
        id=row["id"],
        url=row["url"],
        events=tuple(row["events"]),
        description=row["description"],
        status=row["status"],
        disabled_reason=row["disabled_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deliveries={status: int(row[status]) for status in DELIVERY_STATUSES},
    )


# -- endpoints ---------------------------------------------------------------------------------


async def create_endpoint(pool: Pool, url: str, events: Sequence[str], description: str, secret: bytes) -> Endpoint:
    params = {"url": url, "events": list(events), "description": description, "secret": secret}
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("create_webhook_endpoint"), params)
    assert row is not None
    return _endpoint(row)


async def list_endpoints(pool: Pool, endpoint_id: int | None = None) -> list[Endpoint]:
    """Every endpoint (or the one with this id), with its deliveries counted by status."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("list_webhook_endpoints"), {"endpoint_id": endpoint_id})
    return [_endpoint(row) for row in rows]


async def get_endpoint(pool: Pool, endpoint_id: int) -> Endpoint | None:
    found = await list_endpoints(pool, endpoint_id)
    return found[0] if found else None


async def update_endpoint(
    pool: Pool,
    endpoint_id: int,
    *,
    url: str | None = None,
    events: Sequence[str] | None = None,
    description: str | None = None,
    status: str | None = None,
    lease: float,
) -> Endpoint:
    """Change the fields given (None: unchanged); raises EndpointNotFound. Enabling a disabled
    endpoint makes its pending deliveries due at once (but those due within `lease`, a claim's
    lease, as one may be under way) and wakes the senders."""
    params = {
        "endpoint_id": endpoint_id,
        "url": url,
        "events": None if events is None else list(events),
        "description": description,
        "status": status,
    }
    async with pool.acquire() as conn, conn.transaction():
        if status == "enabled":
            await conn.execute(query("bring_forward_webhook_deliveries"), {"endpoint_id": endpoint_id, "lease": lease})
        row = await conn.fetch_one(query("update_webhook_endpoint"), params)
        if row is None:
            raise EndpointNotFound(endpoint_id)
        if status == "enabled":
            await conn.execute(query("wake_webhook_senders"))
    return _endpoint(row)


async def delete_endpoint(pool: Pool, endpoint_id: int) -> None:
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("delete_webhook_endpoint"), {"endpoint_id": endpoint_id})
    if row is None:
        raise EndpointNotFound(endpoint_id)


async def rotate_secret(pool: Pool, endpoint_id: int, secret: bytes, overlap: float = ROTATION_OVERLAP) -> Endpoint:
    params = {"endpoint_id": endpoint_id, "secret": secret, "overlap": overlap}
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("rotate_webhook_secret"), params)
    if row is None:
        raise EndpointNotFound(endpoint_id)
    return _endpoint(row)


# -- the sender ----------------------------------------------------------------------------------


async def claim_due(
    pool: Pool, *, limit: int, per_endpoint: int, room: Mapping[int, int], lease: float
) -> list[Claimed]:
    """Claim up to `limit` due deliveries for `lease` seconds: at most room[e] of endpoint e, and
    `per_endpoint` of an endpoint not in `room`. One round trip (see claim_webhook_deliveries)."""
    params = {
        "limit": limit,
        "per_endpoint": per_endpoint,
        "room_ids": list(room),
        "room": list(room.values()),
        "lease": lease,
    }
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("claim_webhook_deliveries"), params)
    claimed = []
    for row in rows:
        secrets = (bytes(row["secret"]),)
        if row["previous_secret"] is not None:
            secrets += (bytes(row["previous_secret"]),)
        claimed.append(
            Claimed(
                delivery_id=row["delivery_id"],
                endpoint_id=row["endpoint_id"],
                event_type=row["event_type"],
                attempt=row["attempt"],
                schedule_attempt=row["schedule_attempt"],
                url=row["url"],
                secrets=secrets,
                task=task_from_row(row),
            )
        )
    return claimed


async def next_due(pool: Pool, saturated: Sequence[int] = ()) -> float | None:
    """Seconds until the next delivery of an enabled endpoint falls due (<= 0: due); None: none.
    Endpoints in `saturated` (every slot taken by this process) are left out."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("next_webhook_due"), {"saturated": list(saturated)})
    return None if row is None or row["seconds"] is None else float(row["seconds"])


async def release(pool: Pool, claimed: Sequence[Claimed]) -> None:
    """Give back claimed deliveries that will not be attempted: due again now, the claim not
    counted (see release_webhook_deliveries)."""
    params = {"ids": [c.delivery_id for c in claimed], "attempts": [c.attempt for c in claimed]}
    async with pool.acquire() as conn:
        await conn.execute(query("release_webhook_deliveries"), params)


async def record_attempts(pool: Pool, results: Sequence[AttemptResult], disable_after: float) -> Recorded:
    """Record many attempts' results in one round trip (see record_webhook_attempts)."""
    params: dict[str, Any] = {
        "ids": [r.delivery_id for r in results],
        "attempts": [r.attempt for r in results],
        "outcomes": [r.outcome for r in results],
        # Floats and booleans travel as array literals of their text.
        "retry_in": "{" + ",".join("NULL" if r.retry_in is None else repr(float(r.retry_in)) for r in results) + "}",
        "attempted_at": [r.attempted_at.isoformat() for r in results],
        "durations": "{" + ",".join(repr(float(r.duration_ms)) for r in results) + "}",
        "http_statuses": [r.http_status for r in results],
        "errors": [r.error for r in results],
        "gone": "{" + ",".join("true" if r.gone else "false" for r in results) + "}",
        "disable_after": disable_after,
        "endpoint_ids": sorted({r.endpoint_id for r in results}),
    }
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("record_webhook_attempts"), params)
    assert row is not None
    return Recorded(int(row["recorded"]), tuple(row["disabled"] or ()))


# -- the delivery log, retries, replays, retention -------------------------------------------------


async def list_deliveries(
    pool: Pool, endpoint_id: int, *, before: int, limit: int, status: str | None = None
) -> list[Delivery]:
    params = {"endpoint_id": endpoint_id, "before": before, "limit": limit, "status": status}
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("list_webhook_deliveries"), params)
    return [
        Delivery(
            id=row["id"],
            endpoint_id=row["endpoint_id"],
            task_id=row["task_id"],
            event_type=row["event_type"],
            status=row["status"],
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"] if row["status"] == "pending" else None,
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            attempt_log=list(row["attempt_log"]),
        )
        for row in rows
    ]


class DeliveryNotFound(Exception):
    pass


class DeliveryNotFailed(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


async def retry_delivery(pool: Pool, endpoint_id: int, delivery_id: int) -> None:
    """Make a failed delivery due now for one more attempt (failed again if it fails); raises
    DeliveryNotFound or DeliveryNotFailed."""
    params = {"endpoint_id": endpoint_id, "delivery_id": delivery_id}
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetch_one(query("retry_webhook_delivery"), params)
        if row is None:
            found = await conn.fetch_one(query("webhook_delivery_status"), params)
            if found is None:
                raise DeliveryNotFound(delivery_id)
            raise DeliveryNotFailed(found["status"])
        await conn.execute(query("wake_webhook_senders"))


async def replay(pool: Pool, endpoint_id: int, since: datetime) -> int:
    """Queue again every event of the endpoint's types finished since `since`; how many. Each
    starts the retry schedule again; its attempts count on."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetch_one(query("replay_webhook_events"), {"endpoint_id": endpoint_id, "since": since})
        assert row is not None
        if not row["found"]:
            raise EndpointNotFound(endpoint_id)
        if row["queued"]:
            await conn.execute(query("wake_webhook_senders"))
    return int(row["queued"])


async def purge_deliveries(pool: Pool, retention: float, limit: int) -> int:
    """Delete up to `limit` delivered or failed deliveries older than `retention` seconds."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("purge_old_webhook_deliveries"), {"retention": retention, "limit": limit})
    return len(rows)


async def pending_by_endpoint(pool: Pool) -> dict[int, int]:
    """Pending deliveries per endpoint (for /metrics); raises DatabaseError past a short limit
    (the query's SET LOCAL, in the implicit transaction of its one message: one round trip)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("pending_webhook_deliveries"))
    return {row["endpoint_id"]: int(row["pending"]) for row in rows}
