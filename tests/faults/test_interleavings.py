"""Scenario 9: random interleavings of tasks across users, sent to the real server, against a
sequential model of the apply rules. (The rules alone are property-tested in tests/unit.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from message_broker.ledger import MAX_AMOUNT, TaskType

from ..model import model_run, model_step
from ..pg import admin_connection
from .harness import Outcome, ServerProcess, final_check, poll

pytestmark = pytest.mark.faults

balances = st.one_of(st.integers(0, 100), st.integers(MAX_AMOUNT - 100, MAX_AMOUNT))


@dataclass(frozen=True)
class Step:
    user: int  # index into the example's users
    type: TaskType
    amount: int
    via_sql: bool  # inserted straight into the table (as psql would) instead of POSTed


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[Step]]:
    """Users and steps. Amounts are drawn against the balance each user will have at that step
    (exactly it, one more, the room left below 2^63-1 and one more), besides small and huge
    ones, so that every edge of the rules is hit often."""
    initial = draw(st.lists(balances, min_size=1, max_size=4))
    expected = list(initial)
    steps = []
    for _ in range(draw(st.integers(1, 40))):
        user = draw(st.integers(0, len(initial) - 1))
        kind = draw(st.sampled_from(list(TaskType)))
        balance = expected[user]
        edges = [balance, balance + 1, MAX_AMOUNT - balance, MAX_AMOUNT - balance + 1]
        amount = draw(
            st.one_of(
                st.sampled_from([a for a in edges if 1 <= a <= MAX_AMOUNT] or [1]),
                st.integers(1, 50),
                st.integers(1, MAX_AMOUNT),
            )
        )
        expected[user] = model_step(balance, kind, amount)[2]
        steps.append(Step(user, kind, amount, draw(st.booleans())))
    return initial, steps


def test_random_interleavings_match_the_sequential_model(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """9. Steps are launched in the drawn order, concurrently across users, each waiting only for
    the previous step of its own user (as one client per user would). Every user must end exactly
    as the sequential model says, task by task."""
    server = servers()
    asyncio.run(server.start_ready())
    initial_all: dict[int, int] = {}
    acknowledged: list[int] = []
    totals = {"examples": 0, "tasks": 0}
    examples = itertools.count()

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(scenarios())
    def check(example: tuple[list[int], list[Step]]) -> None:
        initial, steps = example
        n = next(examples)
        user_ids = _create_users(database_url, [f"h{n}_{i}" for i in range(len(initial))], initial)
        initial_all.update(zip(user_ids, initial, strict=True))
        task_ids = asyncio.run(_run(server.url, database_url, user_ids, steps))
        acknowledged.extend(task_ids)  # a committed INSERT from psql is as acknowledged as a 202
        asyncio.run(poll(lambda: _all_finished(database_url, task_ids), timeout=15, what="tasks applied"))
        got = _tasks(database_url, task_ids)
        for index, user_id in enumerate(user_ids):
            mine = [i for i, step in enumerate(steps) if step.user == index]
            final, expected = model_run(initial[index], [(steps[i].type, steps[i].amount) for i in mine])
            assert [got[task_ids[i]] for i in mine] == expected, f"user {index}"
            assert _balance(database_url, user_id) == final
        totals["examples"] += 1
        totals["tasks"] += len(steps)

    check()
    outcome = Outcome("9 random interleavings (hypothesis)", "random tasks across users vs a sequential model")
    outcome.sent = totals["tasks"]
    outcome.notes = dict(totals)
    record(final_check(database_url, initial_all, None, outcome, extra_acknowledged=acknowledged))


async def _run(url: str, database_url: str, user_ids: list[int], steps: list[Step]) -> list[int]:
    previous: dict[int, asyncio.Task[int]] = {}
    async with aiohttp.ClientSession() as session:

        async def send(step: Step, after: asyncio.Task[int] | None) -> int:
            if after is not None:
                await after
            user_id = user_ids[step.user]
            if step.via_sql:
                return await asyncio.to_thread(_insert, database_url, user_id, step)
            async with session.post(
                f"{url}/api/v1/user/{user_id}/amount/", json={"type": step.type.value, "amount": step.amount}
            ) as response:
                assert response.status == 202, await response.text()
                return int((await response.json())["id"])

        launched = []
        for step in steps:
            task = asyncio.create_task(send(step, previous.get(step.user)))
            previous[step.user] = task
            launched.append(task)
        return list(await asyncio.gather(*launched))


def _create_users(database_url: str, names: list[str], balances_: list[int]) -> list[int]:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        ids = []
        for name, balance in zip(names, balances_, strict=True):
            cur.execute("INSERT INTO users (username, balance) VALUES (%s, %s) RETURNING id", (name, balance))
            ids.append(cur.fetchone()[0])
        return ids


def _insert(database_url: str, user_id: int, step: Step) -> int:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(
            "INSERT INTO tasks (user_id, type, amount) VALUES (%s, %s, %s) RETURNING id",
            (user_id, step.type.value, step.amount),
        )
        return int(cur.fetchone()[0])


def _all_finished(database_url: str, task_ids: list[int]) -> bool:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'pending'", (task_ids,))
        return cur.fetchone()[0] == 0


def _tasks(database_url: str, task_ids: list[int]) -> dict[int, tuple[str, str | None, int]]:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT id, status, reason, balance_after FROM tasks WHERE id = ANY(%s)", (task_ids,))
        return {row[0]: (row[1], row[2], row[3]) for row in cur.fetchall()}


def _balance(database_url: str, user_id: int) -> int:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT balance FROM users WHERE id = %s", (user_id,))
        return int(cur.fetchone()[0])
