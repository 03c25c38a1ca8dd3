from hypothesis import given
from hypothesis import strategies as st

from message_broker.ledger import MAX_AMOUNT, PendingTask, Reason, Status, TaskType, apply_batch, apply_one

from ..ledger_check import FinishedTask, check_user_ledger


def test_replenishment_adds() -> None:
    assert apply_one(10, TaskType.REPLENISHMENT, 5) == (Status.DONE, None, 15)


def test_write_off_takes() -> None:
    assert apply_one(10, TaskType.WRITE_OFF, 10) == (Status.DONE, None, 0)


def test_write_off_larger_than_balance_is_cancelled() -> None:
    assert apply_one(10, TaskType.WRITE_OFF, 11) == (Status.CANCELLED, Reason.INSUFFICIENT_FUNDS, 10)


def test_replenishment_past_bigint_is_cancelled() -> None:
    assert apply_one(MAX_AMOUNT - 1, TaskType.REPLENISHMENT, 1) == (Status.DONE, None, MAX_AMOUNT)
    assert apply_one(MAX_AMOUNT, TaskType.REPLENISHMENT, 1) == (Status.CANCELLED, Reason.BALANCE_OVERFLOW, MAX_AMOUNT)


def test_batch_applies_in_order() -> None:
    tasks = [
        PendingTask(1, TaskType.WRITE_OFF, 15),  # cancelled: only 10
        PendingTask(2, TaskType.REPLENISHMENT, 10),
        PendingTask(3, TaskType.WRITE_OFF, 15),  # now fine
    ]
    balance, outcomes = apply_batch(10, tasks)
    assert balance == 5
    assert [(o.task_id, o.status, o.balance_after) for o in outcomes] == [
        (1, Status.CANCELLED, 10),
        (2, Status.DONE, 20),
        (3, Status.DONE, 5),
    ]


amounts = st.integers(min_value=1, max_value=MAX_AMOUNT)
task_lists = st.lists(st.tuples(st.sampled_from(list(TaskType)), amounts), max_size=40)


@given(balance=st.integers(min_value=0, max_value=MAX_AMOUNT), tasks=task_lists)
def test_batch_keeps_balance_in_range_and_ledger_explains_it(balance: int, tasks: list[tuple[TaskType, int]]) -> None:
    pending = [PendingTask(i + 1, kind, amount) for i, (kind, amount) in enumerate(tasks)]
    final, outcomes = apply_batch(balance, pending)
    assert 0 <= final <= MAX_AMOUNT
    finished = [
        FinishedTask(
            p.id, p.type.value, p.amount, o.status.value, o.reason.value if o.reason else None, o.balance_after
        )
        for p, o in zip(pending, outcomes, strict=True)
    ]
    assert check_user_ledger(balance, final, finished) == [p.id for p in pending]


@given(balance=st.integers(min_value=0, max_value=10**6), tasks=task_lists)
def test_batch_equals_one_by_one(balance: int, tasks: list[tuple[TaskType, int]]) -> None:
    pending = [PendingTask(i, kind, amount) for i, (kind, amount) in enumerate(tasks)]
    expected = balance
    for task in pending:
        _, _, expected = apply_one(expected, task.type, task.amount)
    assert apply_batch(balance, pending)[0] == expected
