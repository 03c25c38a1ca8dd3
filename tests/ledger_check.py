"""The ledger check used by every test that ends with money moved: the balances must be explained
exactly by the finished tasks, and the tasks by each other.

Per user: in the order of application, each entry's balance_after and available_after follow from
the previous ones by what the entry is (a replenishment or transfer-in adds, a write-off or
transfer subtracts, a hold reserves, a capture charges and frees its hold, a void or release frees
it, a cancelled task changes nothing); every cancellation is justified by what it records; the
last entry is the user's balance and held. The order of application is (batch position, id) where
positions are known; without them, some order that chains every entry must exist.

Across users: every done transfer has exactly one transfer-in (same amount, mirrored ids), no
cancelled transfer has one; every hold resolves at most once; money is conserved.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MAX = 2**63 - 1

# One user's state: (balance, available).
State = tuple[int, int]


@dataclass(frozen=True)
class FinishedTask:
    id: int
    type: str
    amount: int
    status: str
    reason: str | None
    balance_after: int | None
    available_after: int | None = None  # None: as balance_after (no holds)
    counterparty_id: int | None = None
    transfer_id: int | None = None
    hold_id: int | None = None
    position: int | None = None  # its batch's position in the streams

    @property
    def after(self) -> State:
        assert self.balance_after is not None
        available = self.balance_after if self.available_after is None else self.available_after
        return self.balance_after, available


def _delta(task: FinishedTask, hold_amounts: Mapping[int, int]) -> State:
    """What a task did to (balance, available)."""
    if task.status == "cancelled":
        return 0, 0
    kind, amount = task.type, task.amount
    if kind in ("replenishment", "transfer-in"):
        return amount, amount
    if kind in ("write-off", "transfer"):
        return -amount, -amount
    if kind == "hold":
        return 0, -amount
    assert task.hold_id is not None and task.hold_id in hold_amounts, f"task {task.id}: unknown hold {task.hold_id}"
    if kind == "capture":
        return -amount, hold_amounts[task.hold_id] - amount
    if kind in ("void", "release"):
        return 0, hold_amounts[task.hold_id]
    raise AssertionError(f"task {task.id}: unknown type {kind}")


def _before(task: FinishedTask, hold_amounts: Mapping[int, int]) -> State:
    """The state this task must have started from, given what it recorded."""
    (balance, available), (db, da) = task.after, _delta(task, hold_amounts)
    return balance - db, available - da


def _check_entry(task: FinishedTask, hold_amounts: Mapping[int, int]) -> None:
    """What one entry must say on its own (its recorded state is the one it found if cancelled)."""
    balance, available = task.after
    assert 0 <= available <= balance <= MAX, f"task {task.id}: balance {balance}, available {available}"
    if task.status == "done":
        assert task.reason is None, f"task {task.id}: {task}"
        return
    assert task.status == "cancelled", f"task {task.id}: {task.status}"
    assert task.type != "transfer-in", f"task {task.id}: a transfer-in is never cancelled"
    if task.reason == "insufficient_funds":
        assert task.type in ("write-off", "transfer", "hold") and task.amount > available, f"cancelled wrongly: {task}"
    elif task.reason == "balance_overflow":
        if task.type == "replenishment":
            assert task.amount > MAX - balance, f"cancelled wrongly: {task}"
        else:  # the recipient's balance is checked across users (check_database)
            assert task.type == "transfer", f"cancelled wrongly: {task}"
    elif task.reason == "amount_exceeds_hold":
        assert task.type == "capture" and task.amount > hold_amounts.get(task.hold_id or 0, MAX), task
    elif task.reason == "hold_not_active":
        assert task.type in ("capture", "void", "release"), f"cancelled wrongly: {task}"
    else:
        raise AssertionError(f"task {task.id}: cancelled without a known reason: {task}")


def check_user_ledger(
    initial: int,
    final: int,
    tasks: Sequence[FinishedTask],
    *,
    final_held: int = 0,
    hold_amounts: Mapping[int, int] | None = None,
) -> list[int]:
    """Raise AssertionError unless the tasks explain the final balance and held; returns the
    order of application (task ids) that explains every recorded entry."""
    holds = hold_amounts or {}
    pending = [t.id for t in tasks if t.status == "pending"]
    assert not pending, f"tasks left pending: {pending}"
    for task in tasks:
        _check_entry(task, holds)
    if all(t.position is not None for t in tasks):
        order = sorted(tasks, key=lambda t: (t.position, t.id))
        state = (initial, initial)
        for task in order:
            start = _before(task, holds)
            assert start == state, f"task {task.id} started from {start}, but the state before it was {state}"
            state = task.after
        trail = [t.id for t in order]
    else:
        found = _find_order((initial, initial), list(tasks), holds)
        assert found is not None, "no order of application explains the recorded balance_after values"
        trail = found
        state = next(t.after for t in tasks if t.id == trail[-1]) if trail else (initial, initial)
    assert state[0] == final, f"final balance {final} != initial {initial} + applied changes = {state[0]}"
    assert state[0] - state[1] == final_held, f"held {final_held} != what the entries leave held: {state[0] - state[1]}"
    return trail


def _find_order(initial: State, tasks: list[FinishedTask], holds: Mapping[int, int]) -> list[int] | None:
    """An order of application whose states chain from `initial`, or None.

    Each task is an edge from the state before it to the state after it, so such an order is a
    trail from `initial` that uses every edge once: an Eulerian trail, which Hierholzer's
    algorithm finds in linear time (a depth-first search is exponential when tasks were not
    applied in id order, as happens when a later id commits first). Edges are taken lowest id
    first, so tasks applied in id order come back in id order."""
    edges: dict[State, list[FinishedTask]] = defaultdict(list)
    for task in sorted(tasks, key=lambda t: t.id, reverse=True):  # pop() takes the lowest id
        edges[_before(task, holds)].append(task)
    stack: list[tuple[State, int | None]] = [(initial, None)]
    trail: list[int] = []
    while stack:
        state, via = stack[-1]
        if edges[state]:
            task = edges[state].pop()
            stack.append((task.after, task.id))
        else:
            stack.pop()
            if via is not None:
                trail.append(via)
    trail.reverse()
    # Without an Eulerian trail from `initial` the walk can still use every edge, out of order.
    by_id = {t.id: t for t in tasks}
    state = initial
    for task_id in trail:
        if _before(by_id[task_id], holds) != state:
            return None
        state = by_id[task_id].after
    return trail if len(trail) == len(tasks) else None


def check_applied_in_id_order(initial: int, tasks: Sequence[FinishedTask]) -> None:
    """For a user whose tasks were sent one after another (each after the previous one's 202)
    and who received no transfer: applying them in id order must reproduce every entry."""
    state = (initial, initial)
    for task in sorted(tasks, key=lambda t: t.id):
        start = _before(task, {})
        assert start == state, f"task {task.id} started from {start}, but in id order the state was {state}"
        state = task.after


@dataclass
class LedgerSummary:
    task_ids: set[int] = field(default_factory=set)  # every task in the database, all finished
    transfers: int = 0  # done
    by_type: Counter[str] = field(default_factory=Counter)

    @property
    def stored(self) -> int:
        """Tasks in the database."""
        return len(self.task_ids)


_TASK_COLUMNS = (
    "t.id, t.type, t.amount, t.status, t.reason, t.balance_after, t.available_after, t.counterparty_id, "
    "t.transfer_id, t.hold_id, b.position"
)


def load_ledgers(  # type: ignore[no-untyped-def]
    cursor, initial_balances: Mapping[int, int]
) -> dict[int, tuple[int, int, list[FinishedTask]]]:
    """Final balance, held and tasks of each user, read straight from the database."""
    cursor.execute("SELECT id, balance, held FROM users")
    finals = {row[0]: (row[1], row[2]) for row in cursor.fetchall()}
    cursor.execute(
        f"SELECT t.user_id, {_TASK_COLUMNS} FROM tasks AS t"
        " LEFT JOIN task_batches AS b ON b.batch_id = t.finish_batch ORDER BY t.id"
    )
    tasks: dict[int, list[FinishedTask]] = {user_id: [] for user_id in finals}
    for user_id, *columns in cursor.fetchall():
        tasks[user_id].append(FinishedTask(*columns))
    return {user_id: (*finals[user_id], tasks[user_id]) for user_id in initial_balances}


def check_database(  # type: ignore[no-untyped-def]
    cursor,
    initial_balances: Mapping[int, int],
    *,
    acknowledged: Iterable[int] = (),
    sequential_users: Collection[int] = (),
) -> LedgerSummary:
    """The check every fault scenario ends with, over every user in the database: each ledger is
    explained by its tasks (check_user_ledger), transfers pair up, holds resolve once, money is
    conserved, every task the API acknowledged with 202 is stored and finished, and users whose
    tasks were sent one after another had them applied in that order."""
    cursor.execute("SELECT id FROM users")
    in_database = {row[0] for row in cursor.fetchall()}
    assert in_database == set(initial_balances), (
        f"users in the database {sorted(in_database - set(initial_balances))} were not created by the test, "
        f"or {sorted(set(initial_balances) - in_database)} are missing"
    )
    ledgers = load_ledgers(cursor, initial_balances)
    every = [task for _, _, tasks in ledgers.values() for task in tasks]
    hold_amounts = {t.id: t.amount for t in every if t.type == "hold" and t.status == "done"}
    summary = LedgerSummary()
    for user_id, (final, held, tasks) in ledgers.items():
        try:
            check_user_ledger(initial_balances[user_id], final, tasks, final_held=held, hold_amounts=hold_amounts)
            if user_id in sequential_users:
                check_applied_in_id_order(initial_balances[user_id], tasks)
        except AssertionError as exc:
            raise AssertionError(f"user {user_id}: {exc}") from None
        summary.by_type.update(t.type for t in tasks)
    owner = {t.id: user_id for user_id, (_, _, tasks) in ledgers.items() for t in tasks}
    _check_transfers(every, owner)
    _check_holds(cursor, every, owner, {user_id: held for user_id, (_, held, _) in ledgers.items()})
    _check_conservation(initial_balances, ledgers, every)
    summary.transfers = sum(t.type == "transfer" and t.status == "done" for t in every)
    summary.task_ids = set(owner)
    acknowledged_missing = sorted(set(acknowledged) - set(owner))
    assert not acknowledged_missing, (
        f"{len(acknowledged_missing)} tasks acknowledged with 202 are not stored: {acknowledged_missing[:20]}"
    )
    return summary


def _check_transfers(every: list[FinishedTask], owner: Mapping[int, int]) -> None:
    transfers = {t.id: t for t in every if t.type == "transfer"}
    entries: dict[int, list[FinishedTask]] = defaultdict(list)
    for t in every:
        if t.type == "transfer-in":
            assert t.transfer_id in transfers, f"transfer-in {t.id} of no transfer ({t.transfer_id})"
            entries[t.transfer_id].append(t)
    for transfer in transfers.values():
        found = entries.get(transfer.id, [])
        if transfer.status != "done":
            assert not found, f"cancelled transfer {transfer.id} has entries {[e.id for e in found]}"
            continue
        assert len(found) == 1, f"done transfer {transfer.id} has {len(found)} transfer-in entries"
        (entry,) = found
        assert entry.amount == transfer.amount, f"transfer {transfer.id}: {entry.amount} != {transfer.amount}"
        assert owner[entry.id] == transfer.counterparty_id, f"transfer {transfer.id} credited the wrong user"
        assert entry.counterparty_id == owner[transfer.id], f"transfer-in {entry.id} names the wrong sender"
        assert entry.position is None or transfer.position is None or entry.position == transfer.position, (
            f"transfer {transfer.id} and its transfer-in {entry.id} were not one transaction"
        )


def _check_holds(  # type: ignore[no-untyped-def]
    cursor, every: list[FinishedTask], owner: Mapping[int, int], held: Mapping[int, int]
) -> None:
    """Each hold resolves at most once, by a task of its own user; the holds table agrees with the
    tasks; each user's held is the sum of its active holds."""
    cursor.execute("SELECT id, user_id, amount, status, captured_amount, resolved_by FROM holds")
    rows = {row[0]: row[1:] for row in cursor.fetchall()}
    hold_tasks = {t.id: t for t in every if t.type == "hold"}
    resolvers: dict[int, list[FinishedTask]] = defaultdict(list)
    for t in every:
        if t.type in ("capture", "void", "release"):
            assert t.hold_id in hold_tasks, f"task {t.id} names no hold ({t.hold_id})"
            assert owner[t.id] == owner[t.hold_id], f"task {t.id} resolves another user's hold {t.hold_id}"
            if t.status == "done":
                resolvers[t.hold_id].append(t)
    active: Counter[int] = Counter()
    for hold in hold_tasks.values():
        row = rows.get(hold.id)
        if hold.status != "done":
            assert row is None and not resolvers.get(hold.id), f"hold {hold.id} was never made but has {row}"
            continue
        assert row is not None, f"done hold {hold.id} has no holds row"
        user_id, amount, status, captured, resolved_by = row
        assert (user_id, amount) == (owner[hold.id], hold.amount), f"hold {hold.id}: {row}"
        done = resolvers.get(hold.id, [])
        assert len(done) <= 1, f"hold {hold.id} resolved {len(done)} times: {[t.id for t in done]}"
        if not done:
            assert status == "active" and resolved_by is None, f"hold {hold.id}: {row} with no resolver"
            active[user_id] += amount
            continue
        (resolver,) = done
        expected = {"capture": "captured", "void": "voided", "release": "expired"}[resolver.type]
        assert (status, resolved_by) == (expected, resolver.id), f"hold {hold.id}: {row}, resolved by {resolver}"
        assert captured == (resolver.amount if resolver.type == "capture" else None), f"hold {hold.id}: {row}"
    for user_id, amount in held.items():
        assert amount == active[user_id], f"user {user_id}: held {amount} != its active holds {active[user_id]}"


def _check_conservation(
    initial: Mapping[int, int], ledgers: Mapping[int, tuple[int, int, list[FinishedTask]]], every: list[FinishedTask]
) -> None:
    """Money only enters by replenishments and leaves by write-offs and captures."""
    done = [t for t in every if t.status == "done"]
    inflow = sum(t.amount for t in done if t.type == "replenishment")
    outflow = sum(t.amount for t in done if t.type in ("write-off", "capture"))
    final = sum(balance for balance, _, _ in ledgers.values())
    assert final == sum(initial.values()) + inflow - outflow, (
        f"money not conserved: {final} != {sum(initial.values())} + {inflow} - {outflow}"
    )
