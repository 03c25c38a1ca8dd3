import pytest

from ..ledger_check import FinishedTask, check_user_ledger


def t(id: int, type: str, amount: int, status: str, after: int, reason: str | None = None) -> FinishedTask:
    return FinishedTask(id, type, amount, status, reason, after)


def test_accepts_a_consistent_ledger_applied_out_of_id_order() -> None:
    tasks = [t(1, "write-off", 5, "done", 5), t(2, "replenishment", 10, "done", 10)]
    # Task 2 must have gone first: 0 + 10 = 10, then 10 - 5 = 5.
    assert check_user_ledger(0, 5, tasks) == [2, 1]


@pytest.mark.parametrize(
    ("initial", "final", "tasks", "message"),
    [
        (0, 9, [t(1, "replenishment", 10, "done", 10)], "final balance"),
        (
            0,
            0,
            [
                t(1, "write-off", 5, "cancelled", 0, "insufficient_funds"),
                FinishedTask(2, "write-off", 1, "pending", None, None),
            ],
            "pending",
        ),
        (10, 10, [t(1, "write-off", 5, "cancelled", 10, "insufficient_funds")], "cancelled wrongly"),
        (0, 10, [t(1, "replenishment", 10, "done", 11)], "no order"),
    ],
)
def test_rejects_inconsistent_ledgers(initial: int, final: int, tasks: list[FinishedTask], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_user_ledger(initial, final, tasks)


def test_finds_the_order_of_a_long_ledger_applied_out_of_id_order() -> None:
    # Concurrent inserts can commit out of id order, so a worker may apply a later id first. A
    # depth-first search over such a ledger can take exponential time; the check must not.
    import random

    rng = random.Random(7)
    ids = list(range(1, 401))
    rng.shuffle(ids)
    balance, tasks = 0, []
    for task_id in ids:  # the order of application
        amount = rng.randint(1, 3)
        if rng.random() < 0.5:
            balance += amount
            tasks.append(t(task_id, "replenishment", amount, "done", balance))
        elif amount <= balance:
            balance -= amount
            tasks.append(t(task_id, "write-off", amount, "done", balance))
        else:
            tasks.append(t(task_id, "write-off", amount, "cancelled", balance, "insufficient_funds"))
    order = check_user_ledger(0, balance, sorted(tasks, key=lambda task: task.id))
    assert sorted(order) == sorted(ids)
