"""The hot path of POST /api/v1/user/<id>/amount/: the same answers as the marshmallow schemas
at a fraction of the CPU (the schemas stay the definition, for errors and for the API docs).

A well-formed body is checked here directly; anything else goes through the schema, so every
error keeps marshmallow's exact shape. tests/unit/test_fastpath.py holds both paths equal.
"""

from __future__ import annotations

from typing import Any

from ..ledger import MAX_AMOUNT, TaskType
from ..models import Task
from .parsing import load
from .schemas import task_create_schema

_TASK_TYPES = frozenset(t.value for t in TaskType)


def load_task_create(data: dict[str, Any]) -> dict[str, Any]:
    """What task_create_schema.load returns, or its ApiError."""
    kind, amount = data.get("type"), data.get("amount")
    # type() rather than isinstance(): a bool is an int subclass, and it is not an amount.
    # type(kind) is str first: a dict or list is unhashable, and `in` on a frozenset would raise.
    if (
        len(data) == 2
        and type(amount) is int
        and 1 <= amount <= MAX_AMOUNT
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
        "created_at": task.created_at.isoformat(),
        "processed_at": task.processed_at.isoformat() if task.processed_at else None,
    }
