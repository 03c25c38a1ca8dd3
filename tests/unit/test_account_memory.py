"""What a process remembers of its users' accounts (worker/account_memory.py): only guesses, which
the database checks (tests/integration/test_apply_from_memory.py), so these tests are about
guessing well: remember what an apply left when nothing else can have changed it, and not after
news of another process."""

from __future__ import annotations

from datetime import UTC, datetime

from message_broker.ledger import Account, Outcome, Status, TaskType
from message_broker.models import AppliedBatch, Task
from message_broker.worker.account_memory import _AT_MOST, AccountMemory

NOW = datetime(2026, 12, 6, tzinfo=UTC)


def _task(task_id: int, user_id: int = 1, kind: TaskType = TaskType.WRITE_OFF, amount: int = 10) -> Task:
    return Task(task_id, user_id, kind, amount, Status.PENDING, None, None, None, None, None, None, None, NOW, None)


def _batch(
    outcomes: dict[int, list[int]],
    accounts: dict[int, Account],
    *,
    remembered: bool = False,
    deferred: frozenset[int] = frozenset(),
    recipients: frozenset[int] = frozenset(),
) -> AppliedBatch:
    return AppliedBatch(
        {user_id: [Outcome(task_id, Status.DONE, None, 0, 0) for task_id in ids] for user_id, ids in outcomes.items()},
        {},
        0,
        [],
        deferred,
        accounts=accounts,
        recipients=recipients,
        remembered=remembered,
    )


def _applied_as_read(memory: AccountMemory, user_id: int, account: Account, *task_ids: int) -> None:
    started = memory.apply_started([user_id])
    memory.applied(started, _batch({user_id: list(task_ids)}, {user_id: account}))


def test_an_apply_that_read_everything_makes_the_account_remembered() -> None:
    memory = AccountMemory(batch_size=100)
    memory.stored([_task(1)])
    assert memory.remembered([1]) is None  # nothing known of the account yet
    _applied_as_read(memory, 1, Account(90), 1)
    assert memory.remembered([1]) is None  # nothing pending
    memory.stored([_task(2), _task(3, kind=TaskType.REPLENISHMENT)])
    remembered = memory.remembered([1])
    assert remembered is not None
    assert remembered.accounts == {1: Account(90)}
    assert [task.id for task in remembered.pending[1]] == [2, 3]
    # Applied from memory: what it left is remembered in turn.
    started = memory.apply_started([1])
    memory.applied(started, _batch({1: [2, 3]}, {1: Account(90)}, remembered=True))
    memory.stored([_task(4)])
    again = memory.remembered([1])
    assert again is not None and [task.id for task in again.pending[1]] == [4]


def test_tasks_stored_before_a_read_are_dropped_and_those_after_kept() -> None:
    memory = AccountMemory(batch_size=100)
    memory.stored([_task(1), _task(2)])
    started = memory.apply_started([1])
    memory.stored([_task(5)])  # committed after the read was sent: may still be pending
    # Task 2 was not among the outcomes: another process finished it before the read.
    memory.applied(started, _batch({1: [1]}, {1: Account(50)}))
    remembered = memory.remembered([1])
    assert remembered is not None and [task.id for task in remembered.pending[1]] == [5]


def test_news_of_another_process_while_applying_is_not_overwritten() -> None:
    memory = AccountMemory(batch_size=100)
    memory.stored([_task(1)])
    started = memory.apply_started([1])
    memory.changed_elsewhere(1)  # another process stored a task for the user meanwhile
    memory.applied(started, _batch({1: [1]}, {1: Account(50)}))
    memory.stored([_task(2)])
    assert memory.remembered([1]) is None
    _applied_as_read(memory, 1, Account(40), 2)
    memory.stored([_task(3)])
    assert memory.remembered([1]) is not None


def test_what_is_not_remembered() -> None:
    memory = AccountMemory(batch_size=2)
    # A full batch: more may be pending than was read.
    memory.stored([_task(1), _task(2), _task(3)])
    _applied_as_read(memory, 1, Account(50), 1, 2)
    assert memory.remembered([1]) is None
    # A batch cut short (a recipient busy).
    started = memory.apply_started([1])
    memory.applied(started, _batch({1: [3]}, {1: Account(40)}, deferred=frozenset({1})))
    memory.stored([_task(4)])
    assert memory.remembered([1]) is None
    # More known pending than one batch takes.
    _applied_as_read(memory, 1, Account(30), 4)
    memory.stored([_task(5), _task(6), _task(7)])
    assert memory.remembered([1]) is None


def test_a_task_that_reads_more_than_the_account_is_not_applied_from_memory() -> None:
    memory = AccountMemory(batch_size=100)
    _applied_as_read(memory, 1, Account(50))
    for kind in (TaskType.TRANSFER, TaskType.HOLD, TaskType.CAPTURE):
        memory.stored([_task(10, kind=kind)])
        assert memory.remembered([1]) is None
        _applied_as_read(memory, 1, Account(50), 10)


def test_every_user_of_a_transaction_must_be_remembered() -> None:
    memory = AccountMemory(batch_size=100)
    _applied_as_read(memory, 1, Account(50))
    memory.stored([_task(1, user_id=1), _task(2, user_id=2)])
    assert memory.remembered([1, 2]) is None
    assert memory.remembered([1]) is not None


def test_failures_credits_reconnects_and_retired_loops_forget() -> None:
    memory = AccountMemory(batch_size=100)
    for user_id in (1, 2):
        _applied_as_read(memory, user_id, Account(50))
        memory.stored([_task(user_id * 10, user_id=user_id)])
    # A failed apply: its outcome is unknown.
    memory.apply_failed(memory.apply_started([1]))
    assert memory.remembered([1]) is None
    # A credit written to user 2 by another user's batch (a transfer).
    assert memory.remembered([2]) is not None
    started = memory.apply_started([3])
    memory.applied(started, _batch({3: [30]}, {3: Account(0)}, recipients=frozenset({2})))
    assert memory.remembered([2]) is None
    # The LISTEN connection reconnected: anything may have changed unheard.
    _applied_as_read(memory, 2, Account(60))
    memory.stored([_task(21, user_id=2)])
    assert memory.remembered([2]) is not None
    memory.forget_all()
    assert memory.remembered([2]) is None
    # A retired loop's user: its account stays, the tasks it knew of go (its loop knew of none
    # pending).
    _applied_as_read(memory, 2, Account(60))
    memory.stored([_task(22, user_id=2)])
    memory.loop_retired(2)
    memory.stored([_task(23, user_id=2)])
    remembered = memory.remembered([2])
    assert remembered is not None
    assert (remembered.accounts, [task.id for task in remembered.pending[2]]) == ({2: Account(60)}, [23])


def test_at_most_so_many_accounts_the_least_recently_applied_dropped() -> None:
    memory = AccountMemory(batch_size=100)
    for user_id in range(_AT_MOST + 5):
        _applied_as_read(memory, user_id, Account(user_id))
    _applied_as_read(memory, 0, Account(7))  # applied again: the most recent now
    assert len(memory._accounts) == _AT_MOST
    assert memory._accounts[0] == Account(7)
    assert 1 not in memory._accounts and 6 in memory._accounts


def test_news_is_kept_only_while_an_apply_is_under_way() -> None:
    memory = AccountMemory(batch_size=100)
    for user_id in range(1000):
        _applied_as_read(memory, user_id, Account(user_id))  # remembered, with no loop any more
        memory.changed_elsewhere(user_id)  # e.g. a transfer's credit from another user's batch
    assert memory._news_of == {} and memory._accounts == {}
    started = memory.apply_started([1])
    memory.changed_elsewhere(1)
    assert memory._news_of == {1: 1}
    memory.applied(started, _batch({1: []}, {1: Account(1)}))
    assert memory._news_of == {} and memory._accounts == {}


def test_a_reconnect_also_spoils_what_an_apply_under_way_will_leave() -> None:
    memory = AccountMemory(batch_size=100)
    started = memory.apply_started([1])
    memory.forget_all()
    memory.applied(started, _batch({1: []}, {1: Account(1)}))
    assert memory._accounts == {}
