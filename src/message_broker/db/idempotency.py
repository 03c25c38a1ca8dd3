"""Idempotency keys in the database: claim a key in the same transaction as the work it answers
for, replay the stored answer to a retry, and purge keys past their retention.

The key row and the user or task it answers for commit together or not at all, so a key is
never stored without its effect, nor an effect without its key. The primary key does the
coordination: a second claim of the same key (from any process) waits until the first
transaction ends, then finds the key taken and replays its answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .driver import Connection, Pool
from .errors import DatabaseError
from .queries import query


@dataclass(frozen=True)
class StoredResponse:
    """An answer exactly as it was first sent."""

    status: int
    body: str
    location: str | None = None


class IdempotencyKeyReused(Exception):
    """The key was first used for a different request (another body, path or endpoint)."""


Work = Callable[[Connection], Awaitable[StoredResponse]]

# A claim finds the key taken, yet the row is gone when read: only if it was purged in between,
# which takes an expired key, which the claim would have taken over. Retry rather than trust that.
_CLAIM_ATTEMPTS = 3


async def run_once(
    pool: Pool, key: str, fingerprints: tuple[str, ...], retention_seconds: float, work: Work
) -> tuple[StoredResponse, bool]:
    """Run `work` once per key and return (its answer, False); for a key already used for the
    same request, return (the stored answer, True) without running it.

    `work` runs in the claiming transaction, on the connection it is given; if it raises, the
    transaction (and so the claim) is rolled back and the error propagates.
    The first of `fingerprints` is stored with a new claim; a key first used with any of them is
    the same request. Raises IdempotencyKeyReused if the key was first used with another.
    """
    for _ in range(_CLAIM_ATTEMPTS):
        async with pool.acquire() as conn, conn.transaction():
            claim = {"key": key, "fingerprint": fingerprints[0], "retention": retention_seconds}
            if await conn.fetch_one(query("claim_idempotency_key"), claim) is not None:
                response = await work(conn)
                await conn.execute(
                    query("record_idempotent_response"),
                    {"key": key, "status": response.status, "body": response.body, "location": response.location},
                )
                return response, False
            row = await conn.fetch_one(query("get_idempotency_key"), {"key": key})
        if row is None:
            continue
        if row["fingerprint"] not in fingerprints:
            raise IdempotencyKeyReused(key)
        return StoredResponse(row["response_status"], row["response_body"], row["location"]), True
    raise DatabaseError(f"idempotency key {key!r} could be neither claimed nor read")


async def purge_expired(pool: Pool, batch_size: int) -> int:
    """Delete up to `batch_size` expired keys in one short statement; returns how many."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("purge_expired_idempotency_keys"), {"limit": batch_size})
    return len(rows)
