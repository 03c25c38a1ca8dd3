"""The audit's reads: every check a streamed query in one consistent snapshot (REPEATABLE READ,
read only), so a live service can keep working while it runs and what it sees adds up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .driver import Connection, Row, connect
from .options import ConnectionOptions
from .queries import query

CHECKS = ("audit_users", "audit_transfers", "audit_hold_resolutions", "audit_holds", "audit_history")


class Snapshot:
    def __init__(self, conn: Connection, user_id: int | None) -> None:
        self._conn = conn
        self._user_id = user_id

    async def rows(self, check: str, page_size: int = 10_000) -> AsyncIterator[Row]:
        """The rows of one check (a query named in CHECKS), a cursor page at a time."""
        assert check in CHECKS, check
        async for page in self._conn.stream(query(check), {"user_id": self._user_id}, page_size=page_size):
            for row in page:
                yield row


@asynccontextmanager
async def snapshot(options: ConnectionOptions, user_id: int | None) -> AsyncIterator[Snapshot]:
    """A connection of its own (not the service's pool) without the service's statement limit: a
    whole-database check may take minutes. The idle-in-transaction limit stays: the snapshot holds
    back every VACUUM, and if the path to the server dies silently only that limit makes the server
    end it (TCP keepalives take hours); between its statements and pages verify does not idle."""
    conn = await connect(options.with_changes(statement_timeout_ms=0))
    try:
        async with conn.transaction(snapshot=True):
            yield Snapshot(conn, user_id)
    finally:
        conn.close()
