"""The ledger check used by every test that ends with money moved: the balances must be
explained exactly by the finished tasks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

MAX = 2**63 - 1


@dataclass(frozen=True)
class FinishedTask:
    id: int
    type: str
    amount: int
    status: str
    reason: str | None
    balance_after: int | None


def _before(task: FinishedTask) -> int:
    """The balance this task must have started from, given what it recorded."""
    assert task.balance_after is not None
    if task.status == "cancelled":
        return task.balance_after
    delta = task.amount if task.type == "replenishment" else -task.amount
    return task.balance_after - delta


def check_user_ledger(initial: int, final: int, tasks: Sequence[FinishedTask]) -> list[int]:
    """Raise AssertionError unless the tasks explain the final balance; returns an order of
    application (task ids) that explains every recorded balance_after."""
    pending = [t.id for t in tasks if t.status == "pending"]
    assert not pending, f"tasks left pending: {pending}"
    done = [t for t in tasks if t.status == "done"]
    expected = (
        initial
        + sum(t.amount for t in done if t.type == "replenishment")
        - sum(t.amount for t in done if t.type == "write-off")
    )
    assert final == expected, f"final balance {final} != initial {initial} + applied changes = {expected}"
    for t in tasks:
        assert t.balance_after is not None and t.balance_after >= 0, f"task {t.id}: balance_after {t.balance_after}"
        if t.status == "cancelled":
            if t.reason == "insufficient_funds":
                assert t.type == "write-off" and t.amount > t.balance_after, f"task {t.id} cancelled wrongly: {t}"
            elif t.reason == "balance_overflow":
                assert t.type == "replenishment" and t.amount > MAX - t.balance_after, f"task {t.id}: {t}"
            else:
                raise AssertionError(f"task {t.id}: cancelled without a known reason: {t}")
        else:
            assert t.status == "done" and t.reason is None, f"task {t.id}: {t}"
    order = _find_order(initial, list(tasks))
    assert order is not None, "no order of application explains the recorded balance_after values"
    return order


def _find_order(initial: int, tasks: list[FinishedTask]) -> list[int] | None:
    """An order of application whose balances chain from `initial`, or None.

    Each task is an edge from the balance before it to its balance_after, so such an order is a
    trail from `initial` that uses every edge once: an Eulerian trail, which Hierholzer's
    algorithm finds in linear time (a plain depth-first search is exponential when tasks were
    not applied in id order, as happens when a later id commits first). Edges are taken lowest
    id first, so tasks applied in id order come back in id order."""
    edges: dict[int, list[FinishedTask]] = defaultdict(list)
    for task in sorted(tasks, key=lambda t: t.id, reverse=True):  # pop() takes the lowest id
        edges[_before(task)].append(task)
    stack: list[tuple[int, int | None]] = [(initial, None)]
    trail: list[int] = []
    while stack:
        balance, via = stack[-1]
        if edges[balance]:
            task = edges[balance].pop()
            stack.append((task.balance_after or 0, task.id))
        else:
            stack.pop()
            if via is not None:
                trail.append(via)
    trail.reverse()
    # Without an Eulerian trail from `initial` the walk can still use every edge, out of order.
    by_id = {t.id: t for t in tasks}
    balance = initial
    for task_id in trail:
        if _before(by_id[task_id]) != balance:
            return None
        balance = by_id[task_id].balance_after or 0
    return trail if len(trail) == len(tasks) else None


def load_ledgers(cursor, initial_balances: dict[int, int]) -> dict[int, tuple[int, list[FinishedTask]]]:  # type: ignore[no-untyped-def]
    """Final balance and tasks of each user, read straight from the database."""
    cursor.execute("SELECT id, balance FROM users")
    finals = dict(cursor.fetchall())
    cursor.execute("SELECT user_id, id, type, amount, status, reason, balance_after FROM tasks ORDER BY id")
    tasks: dict[int, list[FinishedTask]] = {user_id: [] for user_id in finals}
    for user_id, *fields in cursor.fetchall():
        tasks[user_id].append(FinishedTask(*fields))
    return {user_id: (finals[user_id], tasks[user_id]) for user_id in initial_balances}


def check_applied_in_id_order(initial: int, tasks: Sequence[FinishedTask]) -> None:
    """For a user whose tasks were sent one after another (each after the previous one's 202):
    applying them in id order must reproduce every recorded balance_after."""
    balance = initial
    for task in sorted(tasks, key=lambda t: t.id):
        start = _before(task)
        assert start == balance, f"task {task.id} started from {start}, but in id order the balance was {balance}"
        balance = task.balance_after or 0


def check_all_ledgers(cursor, initial_balances: dict[int, int]) -> None:  # type: ignore[no-untyped-def]
    for user_id, (final, tasks) in load_ledgers(cursor, initial_balances).items():
        try:
            check_user_ledger(initial_balances[user_id], final, tasks)
        except AssertionError as exc:
            raise AssertionError(f"user {user_id}: {exc}") from None


@dataclass
class LedgerSummary:
    users: int = 0
    stored: int = 0  # tasks in the database
    done: int = 0
    cancelled: int = 0
    acknowledged_missing: list[int] = field(default_factory=list)

    @property
    def applied(self) -> int:
        return self.done + self.cancelled


def check_database(  # type: ignore[no-untyped-def]
    cursor,
    initial_balances: dict[int, int],
    *,
    acknowledged: Iterable[int] = (),
    sequential_users: Collection[int] = (),
) -> LedgerSummary:
    """The check every fault scenario ends with, over every user in the database: each ledger is
    explained by its tasks (check_user_ledger), every task the API acknowledged with 202 is stored
    and finished, and users whose tasks were sent one after another had them applied in that order."""
    cursor.execute("SELECT id FROM users")
    in_database = {row[0] for row in cursor.fetchall()}
    assert in_database == set(initial_balances), (
        f"users in the database {sorted(in_database - set(initial_balances))} were not created by the test, "
        f"or {sorted(set(initial_balances) - in_database)} are missing"
    )
    summary = LedgerSummary(users=len(in_database))
    stored: set[int] = set()
    for user_id, (final, tasks) in load_ledgers(cursor, initial_balances).items():
        try:
            check_user_ledger(initial_balances[user_id], final, tasks)
            if user_id in sequential_users:
                check_applied_in_id_order(initial_balances[user_id], tasks)
        except AssertionError as exc:
            raise AssertionError(f"user {user_id}: {exc}") from None
        stored.update(t.id for t in tasks)
        summary.done += sum(t.status == "done" for t in tasks)
        summary.cancelled += sum(t.status == "cancelled" for t in tasks)
    summary.stored = len(stored)
    summary.acknowledged_missing = sorted(set(acknowledged) - stored)
    assert not summary.acknowledged_missing, (
        f"{len(summary.acknowledged_missing)} tasks acknowledged with 202 are not stored: "
        f"{summary.acknowledged_missing[:20]}"
    )
    return summary
