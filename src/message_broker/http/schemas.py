"""Marshmallow schemas: what clients may send (strictly checked) and what they get back.

Integers are strict (a float, a string or a boolean is not an integer) and bounded by bigint.
Ids are strings of digits on the wire, as in the original API.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from ..ledger import MAX_AMOUNT, TaskType

USERNAME_MAX_CHARS = 64
MAX_PAGE = 1000


def _check_username(value: str) -> None:
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8: reject
    # them here rather than fail in the driver. Other control characters are refused too.
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise ValidationError("must not contain control characters or unpaired surrogates")
    if not value.strip():
        raise ValidationError("must not be blank")


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class UserCreateSchema(_Strict):
    username = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=USERNAME_MAX_CHARS), _check_username],
        metadata={
            "description": "1 to 64 characters, stored verbatim; no control characters, not blank",
            "example": "User5",
            # What _check_username enforces, for the OpenAPI document.
            "pattern": r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$",
        },
    )
    balance = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(min=0, max=MAX_AMOUNT),
        metadata={"description": "initial balance, a whole number >= 0", "example": 500},
    )


class TaskCreateSchema(_Strict):
    type = fields.String(
        required=True,
        validate=validate.OneOf([t.value for t in TaskType]),
        metadata={"description": "replenishment adds to the balance, write-off takes from it"},
    )
    amount = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(min=1, max=MAX_AMOUNT),
        metadata={"description": "a whole number from 1 to 2^63-1", "example": 100},
    )


class DigitString(fields.Field):
    """A non-negative bigint written as ASCII digits only (no sign, spaces or other scripts' digits)."""

    default_error_messages = {  # noqa: RUF012 - marshmallow's convention
        "invalid": "must be a whole number written with digits 0-9",
        "range": "must be between {min} and {max}",
    }

    def __init__(self, *, minimum: int = 0, maximum: int = MAX_AMOUNT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 19:
            raise self.make_error("invalid")
        number = int(value)
        if not self.minimum <= number <= self.maximum:
            raise self.make_error("range", min=self.minimum, max=self.maximum)
        return number

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(value)


class PageQuerySchema(_Strict):
    # "type": "integer" tells the OpenAPI document how these read in a query string.
    limit = DigitString(
        minimum=1, maximum=MAX_PAGE, metadata={"type": "integer", "description": f"page size, 1..{MAX_PAGE}"}
    )
    after = DigitString(
        load_default=0,
        metadata={"type": "integer", "default": 0, "description": "return items with id greater than this"},
    )


class UserSchema(Schema):
    # `required` on what we send only tells the OpenAPI document that the field is always there.
    id = DigitString(required=True, metadata={"example": "5"})
    username = fields.String(required=True, metadata={"example": "User5"})
    balance = fields.Integer(required=True, metadata={"example": 500})


class TaskSchema(Schema):
    id = DigitString(required=True, metadata={"example": "12"})
    user_id = DigitString(required=True, metadata={"example": "5"})
    type = fields.Function(
        lambda task: task.type.value, required=True, metadata={"type": "string", "enum": [t.value for t in TaskType]}
    )
    amount = fields.Integer(required=True)
    status = fields.Function(
        lambda task: task.status.value,
        required=True,
        metadata={"type": "string", "enum": ["pending", "done", "cancelled"]},
    )
    reason = fields.Function(
        lambda task: task.reason.value if task.reason else None,
        required=True,
        allow_none=True,
        metadata={"type": "string", "enum": ["insufficient_funds", "balance_overflow", None]},
    )
    balance_after = fields.Integer(required=True, allow_none=True)
    created_at = fields.DateTime(format="iso", required=True)
    processed_at = fields.DateTime(format="iso", required=True, allow_none=True)


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"example": "validation_failed"})
    message = fields.String(required=True)
    details = fields.Dict(required=True)


class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema, required=True)


# -- Task lifecycle for clients ------------------------------------------------------------------

MAX_WAIT_SECONDS = 30


class Seconds(fields.Field):
    """A number of seconds in a query string: 0 < s <= maximum, written as a decimal number
    (5, 0.25, 1e1), ASCII digits only."""

    _NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
    default_error_messages = {  # noqa: RUF012 - marshmallow's convention
        "invalid": "must be a number of seconds, such as 5 or 0.5",
        "range": "must be more than 0 and at most {max}",
    }

    def __init__(self, *, maximum: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.maximum = maximum

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if not isinstance(value, str) or len(value) > 32 or not self._NUMBER.fullmatch(value):
            raise self.make_error("invalid")
        seconds = float(value)
        if not 0 < seconds <= self.maximum:
            raise self.make_error("range", max=self.maximum)
        return seconds


class WaitQuerySchema(_Strict):
    wait = Seconds(
        maximum=MAX_WAIT_SECONDS,
        metadata={
            "description": f"wait up to this many seconds (more than 0, at most {MAX_WAIT_SECONDS}) "
            "for the task to be done or cancelled before answering",
            "example": 5,
        },
    )


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok"]})


class ReadyChecksSchema(Schema):
    listener = fields.Boolean(required=True)
    database = fields.Boolean(required=True)


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ready", "unavailable"]})
    checks = fields.Nested(ReadyChecksSchema, required=True)


user_create_schema = UserCreateSchema()
task_create_schema = TaskCreateSchema()
page_query_schema = PageQuerySchema()
user_schema = UserSchema()
task_schema = TaskSchema()
wait_query_schema = WaitQuerySchema()
