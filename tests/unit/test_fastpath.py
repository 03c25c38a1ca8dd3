"""The hand-written hot path must answer exactly as the schemas do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from message_broker.http.errors import ApiError
from message_broker.http.fastpath import dump_task, load_task_create
from message_broker.http.parsing import load
from message_broker.http.schemas import task_create_schema, task_schema
from message_broker.ledger import MAX_AMOUNT, Reason, Status, TaskType
from message_broker.models import Task


def _schema_load(data: dict[str, Any]) -> dict[str, Any] | tuple[int, str, dict[str, Any]]:
    try:
        return load(task_create_schema, data)
    except ApiError as exc:
        return (exc.status, exc.code, exc.details)


def _fast_load(data: dict[str, Any]) -> dict[str, Any] | tuple[int, str, dict[str, Any]]:
    try:
        return load_task_create(data)
    except ApiError as exc:
        return (exc.status, exc.code, exc.details)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, MAX_AMOUNT, MAX_AMOUNT + 1, 5.0, "5", "replenishment", "write-off", "other"]),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)


# No deadline: the machine may be busy; the property is about answers, not speed.
@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "amount", "extra", "Type"]), values, max_size=4))
def test_load_matches_the_schema(data: dict[str, Any]) -> None:
    assert _fast_load(data) == _schema_load(data)


@pytest.mark.parametrize("kind", list(TaskType))
@pytest.mark.parametrize("amount", [1, 77, MAX_AMOUNT])
def test_load_accepts_what_the_schema_accepts(kind: TaskType, amount: int) -> None:
    data = {"type": kind.value, "amount": amount}
    assert load_task_create(data) == _schema_load(data) == data


@pytest.mark.parametrize(
    ("status", "reason", "balance_after", "processed"),
    [
        (Status.PENDING, None, None, False),
        (Status.DONE, None, 300, True),
        (Status.CANCELLED, Reason.INSUFFICIENT_FUNDS, 0, True),
        (Status.CANCELLED, Reason.BALANCE_OVERFLOW, MAX_AMOUNT, True),
    ],
)
@pytest.mark.parametrize(
    "created",
    [
        datetime(2026, 11, 28, 19, 43, 4, 554573, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=3))),
    ],
)
def test_dump_matches_the_schema(
    status: Status, reason: Reason | None, balance_after: int | None, processed: bool, created: datetime
) -> None:
    task = Task(
        id=12,
        user_id=5,
        type=TaskType.WRITE_OFF,
        amount=200,
        status=status,
        reason=reason,
        balance_after=balance_after,
        created_at=created,
        processed_at=created + timedelta(microseconds=731) if processed else None,
    )
    fast = dump_task(task)
    assert fast == task_schema.dump(task)
    assert list(fast) == list(task_schema.dump(task))
