"""Scenario 9: random interleavings of every kind of task across users, sent to the real server,
against the sequential model of the rules (tests/model.py). (The rules alone are property-tested
in tests/unit.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from message_broker.ledger import BIGINT_MAX

from ..model import Model, Step, edge_amounts, model_run
from ..pg import admin_connection
from .harness import Outcome, ServerProcess, create_users, final_check, poll

pytestmark = pytest.mark.faults

balances = st.one_of(st.integers(0, 100), st.integers(BIGINT_MAX - 100, BIGINT_MAX))
Cursor = psycopg2.extensions.cursor
KINDS = ["replenishment", "write-off", "transfer", "hold", "capture", "void"]


@dataclass(frozen=True)
class Drawn:
    step: Step
    via_sql: bool  # inserted straight into the table (as psql would) instead of POSTed


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[Drawn]]:
    """Users and steps. Amounts are drawn against what each user will have at that step (its
    balance, its available, the room left below 2^63-1, a hold's amount, and one more), besides
    small and huge ones, so that every edge of the rules is hit often."""
    initial = draw(st.lists(balances, min_size=1, max_size=4))
    model = Model(dict(enumerate(initial)))
    steps: list[Drawn] = []
    for index in range(draw(st.integers(1, 40))):
        user = draw(st.integers(0, len(initial) - 1))
        kind = draw(st.sampled_from(KINDS))
        holds = [i for i, d in enumerate(steps) if d.step.type == "hold" and d.step.user == user]
        others = [u for u in range(len(initial)) if u != user]
        if (kind in ("capture", "void") and not holds) or (kind == "transfer" and not others):
            kind = "write-off"
        hold = draw(st.sampled_from(holds)) if kind in ("capture", "void") else None
        to = draw(st.sampled_from(others)) if kind == "transfer" else None
        edges = edge_amounts(model, user, to, None if hold is None else steps[hold].step.amount)
        amount = draw(st.one_of(st.sampled_from(edges), st.integers(1, 50), st.integers(1, BIGINT_MAX)))
        if kind == "void":
            assert hold is not None
            amount = steps[hold].step.amount
        step = Step(user, kind, amount, to=to, hold=hold)
        model.step(index, step)
        steps.append(Drawn(step, kind in ("replenishment", "write-off") and draw(st.booleans())))
    return initial, steps


def test_random_interleavings_match_the_sequential_model(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """9. Steps are launched in the drawn order, concurrently across users, each waiting only for
    the previous step of its own user (as one client per user would); a transfer, which touches
    two users, waits for both users' earlier steps to be applied, and their later steps wait for
    it. Every user must end exactly as the sequential model says, task by task."""
    server = servers()
    asyncio.run(server.start_ready())
    initial_all: dict[int, int] = {}
    acknowledged: list[int] = []
    totals = {"examples": 0, "tasks": 0, "transfers": 0, "holds": 0}
    examples = itertools.count()

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(scenarios())
    def check(example: tuple[list[int], list[Drawn]]) -> None:
        initial, steps = example
        created = create_users(database_url, initial, prefix=f"h{next(examples)}_")
        user_ids = list(created)
        initial_all.update(created)
        task_ids = asyncio.run(_run(server.url, database_url, user_ids, steps))
        acknowledged.extend(task_ids)  # a committed INSERT from psql is as acknowledged as a 202
        conn = admin_connection(database_url)
        with contextlib.closing(conn), conn.cursor() as cur:
            asyncio.run(poll(lambda: _all_finished(cur, task_ids), timeout=15, what="tasks applied"))
            got, transfer_in = _tasks(cur, task_ids)
            model, expected = model_run(dict(enumerate(initial)), [d.step for d in steps])
            for index, (outcome, credited) in enumerate(expected):
                assert got[task_ids[index]][:4] == outcome, f"step {index}: {steps[index]}"
                if credited is not None:
                    assert transfer_in.get(task_ids[index]) == credited, f"step {index}: {steps[index]}"
            for index, user_id in enumerate(user_ids):
                assert _account(cur, user_id) == (model.balance[index], model.held.get(index, 0))
        totals["examples"] += 1
        totals["tasks"] += len(steps)
        totals["transfers"] += sum(d.step.type == "transfer" for d in steps)
        totals["holds"] += sum(d.step.type == "hold" for d in steps)

    check()
    outcome = Outcome("9 random interleavings (hypothesis)", "random tasks of every kind across users vs a model")
    outcome.sent = totals["tasks"]
    outcome.notes = dict(totals)
    record(final_check(database_url, initial_all, None, outcome, extra_acknowledged=acknowledged))


async def _run(url: str, database_url: str, user_ids: list[int], steps: list[Drawn]) -> list[int]:
    previous: dict[int, asyncio.Task[int]] = {}
    async with aiohttp.ClientSession() as session:

        async def finished(task: asyncio.Task[int]) -> None:
            task_id = await task
            async with session.get(f"{url}/api/v1/task/{task_id}?wait=30") as response:
                assert (await response.json())["status"] != "pending"

        async def send(drawn: Drawn, after: list[asyncio.Task[int]], task_ids: list[asyncio.Task[int]]) -> int:
            step = drawn.step
            if step.type == "transfer":
                for earlier in after:
                    await finished(earlier)
            else:
                for earlier in after:
                    await earlier
            user_id = user_ids[step.user]
            if drawn.via_sql:
                return await asyncio.to_thread(_insert, database_url, user_id, step)
            if step.type in ("capture", "void"):
                assert step.hold is not None
                path = f"/api/v1/hold/{await task_ids[step.hold]}/{step.type}/"
                body = {"amount": step.amount} if step.type == "capture" else {}
            elif step.type == "transfer":
                assert step.to is not None
                path, body = (
                    f"/api/v1/user/{user_id}/transfer/?wait=30",
                    {"to": str(user_ids[step.to]), "amount": step.amount},
                )
            elif step.type == "hold":
                path, body = f"/api/v1/user/{user_id}/holds/", {"amount": step.amount, "expires_in": 3600}
            else:
                path, body = f"/api/v1/user/{user_id}/amount/", {"type": step.type, "amount": step.amount}
            async with session.post(url + path, json=body) as response:
                assert response.status in (200, 202), await response.text()
                return int((await response.json())["id"])

        launched: list[asyncio.Task[int]] = []
        applied: list[asyncio.Task[None]] = []
        for drawn in steps:
            step = drawn.step
            users = [step.user] if step.to is None else [step.user, step.to]
            after = [previous[u] for u in users if u in previous]
            task = asyncio.create_task(send(drawn, after, launched))
            launched.append(task)
            for user in users:
                previous[user] = task
            if step.type == "transfer":
                # Later steps of both users wait for the transfer to be applied, not just stored.
                done = asyncio.create_task(finished(task))
                applied.append(done)
                for user in users:
                    previous[user] = asyncio.create_task(_then(done, task))
        ids = list(await asyncio.gather(*launched))
        await asyncio.gather(*applied)
        return ids


async def _then(first: asyncio.Task[None], value: asyncio.Task[int]) -> int:
    await first
    return await value


def _insert(database_url: str, user_id: int, step: Step) -> int:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(
            "INSERT INTO tasks (user_id, type, amount) VALUES (%s, %s, %s) RETURNING id",
            (user_id, step.type, step.amount),
        )
        return int(cur.fetchone()[0])


def _all_finished(cur: Cursor, task_ids: list[int]) -> bool:
    cur.execute("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'pending'", (task_ids,))
    return cur.fetchone()[0] == 0


Entry = tuple[str, str | None, int, int]  # status, reason, balance_after, available_after


def _tasks(cur: Cursor, task_ids: list[int]) -> tuple[dict[int, Entry], dict[int, Entry]]:
    """Each task's entry, and each transfer's transfer-in's (by transfer id)."""
    cur.execute(
        "SELECT id, transfer_id, status, reason, balance_after, available_after FROM tasks"
        " WHERE id = ANY(%s) OR transfer_id = ANY(%s)",
        (task_ids, task_ids),
    )
    tasks: dict[int, Entry] = {}
    transfer_in: dict[int, Entry] = {}
    for task_id, transfer_id, *entry in cur.fetchall():
        if transfer_id is None:
            tasks[task_id] = tuple(entry)  # type: ignore[assignment]
        else:
            assert transfer_id not in transfer_in, f"transfer {transfer_id} has two transfer-in entries"
            transfer_in[transfer_id] = tuple(entry)  # type: ignore[assignment]
    return tasks, transfer_in


def _account(cur: Cursor, user_id: int) -> tuple[int, int]:
    cur.execute("SELECT balance, held FROM users WHERE id = %s", (user_id,))
    balance, held = cur.fetchone()
    return int(balance), int(held)
