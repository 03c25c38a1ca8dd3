"""A user's history: its finished tasks in the order they were applied, (processed_at, id)
(migration 0008 stamps one instant per apply transaction, after its locks, so that order is the
applied one), the state at any instant, and keyset pages of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..models import Task
from .driver import Pool
from .queries import query
from .repository import task_from_row

# PostgreSQL's timestamps have microseconds: "at or before t" is "before t + 1 µs".
_TICK = timedelta(microseconds=1)
# The reviewed composition (tests/unit/test_sql_is_parameterised.py): two named queries, one message.
_WAIT_THEN_STATE_BEFORE = f"{query('wait_for_the_users_applies')}\n{query('state_before')}"


@dataclass(frozen=True)
class State:
    """A user's account after every task it finished before some instant."""

    balance: int
    held: int
    last_task_id: int | None  # the last of those tasks; None: none yet (the opening balance)

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True)
class StateAt:
    state: State
    created_at: datetime  # when the user was created (its opening balance)
    now: datetime  # the database's clock when this was read


async def state_before(pool: Pool, user_id: int, before: datetime, *, until: datetime | None) -> StateAt | None:
    """The user's state after every task finished strictly before `before`; None: no such user.

    `until`: the latest instant the caller will read of this history (None: now). Every apply
    that will stamp an instant up to it has committed when this returns (wait_for_the_users_applies),
    so what is read up to it never changes."""
    params = {"user_id": user_id, "before": before, "until": until}
    # One message, so one implicit transaction: the read runs with the wait's lock held.
    async with pool.acquire() as conn:
        row = await conn.fetch_one(_WAIT_THEN_STATE_BEFORE, params)
    if row is None:
        return None
    if row["last_task_id"] is None:
        state = State(row["opening_balance"], row["opening_held"], None)
    else:
        balance = row["balance_after"]
        state = State(balance, balance - row["available_after"], row["last_task_id"])
    return StateAt(state, row["created_at"], row["now"])


async def state_at(pool: Pool, user_id: int, at: datetime) -> StateAt | None:
    """The user's state after every task finished at or before `at`."""
    try:
        before = at + _TICK
    except OverflowError:  # the last microsecond Python can hold: no task is that late anyway
        before = at
    return await state_before(pool, user_id, before, until=at)


async def finished_between(
    pool: Pool, user_id: int, start: datetime, end: datetime, *, page_size: int = 1000
) -> AsyncIterator[list[Task]]:
    """The user's tasks finished in [start, end), in applied order, a page at a time: memory
    stays flat however long the window, and no connection is held between pages."""
    after_at, after_id = start, 0  # ids start at 1: (start, 0) comes before every task at start
    while True:
        params = {
            "user_id": user_id,
            "after_at": after_at,
            "after_id": after_id,
            "before": end,
            "limit": page_size,
        }
        async with pool.acquire() as conn:
            rows = await conn.fetch_all(query("history_page"), params)
        if not rows:
            return
        yield [task_from_row(row) for row in rows]
        if len(rows) < page_size:
            return
        after_at, after_id = rows[-1]["processed_at"], rows[-1]["id"]
