"""The apply rules against the independent sequential model (tests/model.py), with amounts
drawn at the edges of each balance, and the batch boundary shown not to matter."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from message_broker.ledger import MAX_AMOUNT, PendingTask, TaskType, apply_batch

from ..model import model_run, model_step


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[tuple[TaskType, int]]]:
    """A starting balance and tasks whose amounts hit the edges of the balance at their turn."""
    balance = draw(
        st.one_of(st.integers(0, 100), st.integers(MAX_AMOUNT - 100, MAX_AMOUNT), st.integers(0, MAX_AMOUNT))
    )
    initial = balance
    steps = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(list(TaskType)))
        edges = [
            a for a in (balance, balance + 1, MAX_AMOUNT - balance, MAX_AMOUNT - balance + 1) if 1 <= a <= MAX_AMOUNT
        ]
        amount = draw(st.sampled_from(edges) if edges and draw(st.booleans()) else st.integers(1, MAX_AMOUNT))
        steps.append((kind, amount))
        balance = model_step(balance, kind, amount)[2]
    return initial, steps


def _apply(
    balance: int, steps: list[tuple[TaskType, int]], first_id: int = 1
) -> tuple[int, list[tuple[str, str | None, int]]]:
    pending = [PendingTask(first_id + i, kind, amount) for i, (kind, amount) in enumerate(steps)]
    final, outcomes = apply_batch(balance, pending)
    return final, [(o.status.value, o.reason.value if o.reason else None, o.balance_after) for o in outcomes]


@given(histories())
def test_apply_batch_matches_the_sequential_model(history: tuple[int, list[tuple[TaskType, int]]]) -> None:
    initial, steps = history
    assert _apply(initial, steps) == model_run(initial, steps)


@given(histories(), st.lists(st.integers(1, 30), max_size=10))
def test_splitting_into_batches_changes_nothing(
    history: tuple[int, list[tuple[TaskType, int]]], sizes: list[int]
) -> None:
    """Workers apply a user's tasks in batches of BATCH_SIZE; where the cuts fall must not matter."""
    initial, steps = history
    balance, outcomes, start = initial, [], 0
    for size in [*sizes, len(steps)]:
        chunk = steps[start : start + size]
        balance, chunk_outcomes = _apply(balance, chunk, first_id=start + 1)
        outcomes += chunk_outcomes
        start += len(chunk)
    assert (balance, outcomes) == model_run(initial, steps)


@given(histories())
def test_balance_stays_in_range_and_only_refusals_keep_it(history: tuple[int, list[tuple[TaskType, int]]]) -> None:
    initial, steps = history
    _, outcomes = _apply(initial, steps)
    before = initial
    for (kind, amount), (status, reason, after) in zip(steps, outcomes, strict=True):
        assert 0 <= after <= MAX_AMOUNT
        if status == "cancelled":
            assert after == before
            assert reason == ("insufficient_funds" if kind is TaskType.WRITE_OFF else "balance_overflow")
        else:
            assert after == before + (amount if kind is TaskType.REPLENISHMENT else -amount)
        before = after
