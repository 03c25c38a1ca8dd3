"""The hot path of posting tasks: the same answers as the marshmallow schemas at a fraction of the
CPU (the schemas stay the definition, for errors and for the API docs).

`dump_task` is the one serializer of a task: every answer, replayed response and event uses it.
A well-formed body is checked by `load_task_create` directly; anything else goes through the
schema, so every error keeps marshmallow's exact shape. tests/unit/test_fastpath.py holds both
equal to the schemas.
"""

from __future__ import annotations

from typing import Any

from ..ledger import BIGINT_MAX
from ..models import Task
from .parsing import load
from .schemas import AMOUNT_TASK_TYPES, task_create_schema

_TASK_TYPES = frozenset(t.value for t in AMOUNT_TASK_TYPES)


def load_task_create(data: dict[str, Any]) -> dict[str, Any]:
    """What task_create_schema.load returns, or its ApiError."""
    kind, amount = data.get("type"), data.get("amount")
    # type() rather than isinstance(): a bool is an int subclass, and it is not an amount.
    # type(kind) is str first: a dict or list is unhashable, and `in` on a frozenset would raise.
    if (
        len(data) == 2
        and type(amount) is int
        and 1 <= amount <= BIGINT_MAX
        and type(kind) is str
        and kind in _TASK_TYPES
    ):
        return {"type": kind, "amount": amount}
    return load(task_create_schema, data)


def dump_task(task: Task) -> dict[str, Any]:
    """What task_schema.dump returns, key for key."""
    return {
        "id": str(task.id),
        "user_id": str(task.user_id),
        "type": task.type.value,
        "amount": task.amount,
        "status": task.status.value,
        "reason": task.reason.value if task.reason else None,
        "balance_after": task.balance_after,
        "available_after": task.available_after,
        "counterparty_id": None if task.counterparty_id is None else str(task.counterparty_id),
        "transfer_id": None if task.transfer_id is None else str(task.transfer_id),
        "hold_id": None if task.hold_id is None else str(task.hold_id),
        "expires_at": task.expires_at.isoformat() if task.expires_at else None,
        "created_at": task.created_at.isoformat(),
        "processed_at": task.processed_at.isoformat() if task.processed_at else None,
        "created_by": task.created_by,
        "reference": task.reference,
        "metadata": task.metadata or {},
    }
