"""The hand-written hot path must answer exactly as the schemas do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from unittest.mock import ANY

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from message_broker.http.errors import ApiError
from message_broker.http.fastpath import dump_task, load_task_create
from message_broker.http.parsing import load
from message_broker.http.schemas import AMOUNT_TASK_TYPES, task_create_schema, task_schema
from message_broker.ledger import BIGINT_MAX, Reason, Status, TaskType
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
    st.sampled_from([0, 1, BIGINT_MAX, BIGINT_MAX + 1, 5.0, "5", "replenishment", "write-off", "other"]),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)


# No deadline: the machine may be busy; the property is about answers, not speed.
@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "amount", "extra", "Type"]), values, max_size=4))
def test_load_matches_the_schema(data: dict[str, Any]) -> None:
    assert _fast_load(data) == _schema_load(data)


@pytest.mark.parametrize("kind", AMOUNT_TASK_TYPES)
@pytest.mark.parametrize("amount", [1, 77, BIGINT_MAX])
def test_load_accepts_what_the_schema_accepts(kind: TaskType, amount: int) -> None:
    data = {"type": kind.value, "amount": amount}
    assert load_task_create(data) == _schema_load(data) == data


@pytest.mark.parametrize("kind", sorted(set(TaskType) - set(AMOUNT_TASK_TYPES)))
def test_other_kinds_have_endpoints_of_their_own(kind: TaskType) -> None:
    data = {"type": kind.value, "amount": 5}
    assert _fast_load(data) == _schema_load(data) == (400, "validation_failed", {"fields": {"type": ANY}})


timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=3))]),
)
ids = st.integers(min_value=1, max_value=BIGINT_MAX)
amounts = st.integers(min_value=0, max_value=BIGINT_MAX)


@settings(deadline=None)
@given(
    task=st.builds(
        Task,
        id=ids,
        user_id=ids,
        type=st.sampled_from(list(TaskType)),
        amount=amounts,
        status=st.sampled_from(list(Status)),
        reason=st.none() | st.sampled_from(list(Reason)),
        balance_after=st.none() | amounts,
        available_after=st.none() | amounts,
        counterparty_id=st.none() | ids,
        transfer_id=st.none() | ids,
        hold_id=st.none() | ids,
        expires_at=st.none() | timestamps,
        created_at=timestamps,
        processed_at=st.none() | timestamps,
        reference=st.none() | st.text(min_size=1, max_size=8),
        metadata=st.none() | st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=4), max_size=3),
    )
)
def test_dump_matches_the_schema(task: Task) -> None:
    fast = dump_task(task)
    assert fast == task_schema.dump(task)
    assert list(fast) == list(task_schema.dump(task))
