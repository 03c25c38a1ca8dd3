"""Marshmallow schemas: what clients may send (strictly checked) and what they get back.

Integers are strict (a float, a string or a boolean is not an integer) and bounded by bigint.
Ids are strings of digits on the wire, as in the original API.
"""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from ..ledger import BIGINT_MAX, HoldStatus, Reason, Status, TaskType
from .parsing import parse_digits

USERNAME_MAX_CHARS = 64
TOKEN_NAME_MAX_CHARS = 64
MAX_PAGE = 1000
DEFAULT_PAGE = 100  # a list's page without ?limit
# A hold's life: 1 s to 30 days, an hour unless the client says otherwise.
HOLD_MAX_SECONDS = 30 * 24 * 3600
HOLD_DEFAULT_SECONDS = 3600
# What a client may post to /amount; the other kinds have endpoints of their own (or are the
# service's own: transfer-in, release).
AMOUNT_TASK_TYPES = (TaskType.REPLENISHMENT, TaskType.WRITE_OFF)


def _check_username(value: str) -> None:
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8: reject
    # them here rather than fail in the driver. Other control characters are refused too.
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise ValidationError("must not contain control characters or unpaired surrogates")
    if not value.strip():
        raise ValidationError("must not be blank")


class JsonInteger(fields.Integer):
    """A JSON integer: 5, never "5", 5.0 or true; the message says what to send instead."""

    default_error_messages = {"invalid": 'must be a JSON integer (5, not "5" or 5.0)'}  # noqa: RUF012

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)


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
    balance = JsonInteger(
        required=True,
        validate=validate.Range(min=0, max=BIGINT_MAX),
        metadata={"description": "initial balance in the minor unit (cents), an integer >= 0", "example": 500},
    )


def _amount(description: str = "a whole number from 1 to 2^63-1", **kwargs: Any) -> fields.Integer:
    return JsonInteger(
        validate=validate.Range(min=1, max=BIGINT_MAX),
        metadata={"description": description, "example": 100},
        **kwargs,
    )


# The client's own reference and metadata on a task (any endpoint that posts one).
REFERENCE_MAX_CHARS = 128
METADATA_MAX_KEYS = 20
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 512
METADATA_MAX_BYTES = 4096
# Compact and ASCII-escaped: never shorter than PostgreSQL's text of the same jsonb, so a task's
# notification (which carries it) stays below NOTIFY's 8000 bytes.
_METADATA_SIZE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _check_metadata(value: dict[str, str]) -> None:
    if len(value) > METADATA_MAX_KEYS:
        raise ValidationError(f"at most {METADATA_MAX_KEYS} keys")
    for text in (*value, *value.values()):
        # PostgreSQL's jsonb cannot hold NUL, and lone surrogates cannot be encoded as UTF-8.
        if "\x00" in text or any(unicodedata.category(ch) == "Cs" for ch in text):
            raise ValidationError("keys and values must not contain NUL or unpaired surrogates")
    if len(_METADATA_SIZE.encode(value)) > METADATA_MAX_BYTES:
        raise ValidationError(f"at most {METADATA_MAX_BYTES} bytes as JSON")


class _TaskFields(_Strict):
    reference = fields.String(
        validate=validate.Regexp(
            rf"^[\x20-\x7e]{{1,{REFERENCE_MAX_CHARS}}}\Z",
            error=f"must be 1 to {REFERENCE_MAX_CHARS} printable ASCII characters",
        ),
        metadata={
            "description": "your own id for this task (an order or payment id), unique per user: "
            "a second task of the user with it is refused with 409 reference_taken",
            "example": "order-1001",
            "pattern": rf"^[\x20-\x7e]{{1,{REFERENCE_MAX_CHARS}}}$",
            "maxLength": REFERENCE_MAX_CHARS,
        },
    )
    metadata = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=METADATA_KEY_MAX_CHARS)),
        values=fields.String(validate=validate.Length(max=METADATA_VALUE_MAX_CHARS)),
        validate=_check_metadata,
        metadata={
            "description": f"your own strings, kept with the task: at most {METADATA_MAX_KEYS} keys of "
            f"1..{METADATA_KEY_MAX_CHARS} characters, values of at most {METADATA_VALUE_MAX_CHARS}, "
            f"{METADATA_MAX_BYTES} bytes as JSON",
            "example": {"invoice": "INV-7"},
            "maxProperties": METADATA_MAX_KEYS,
        },
    )


class TaskCreateSchema(_TaskFields):
    type = fields.String(
        required=True,
        validate=validate.OneOf([t.value for t in AMOUNT_TASK_TYPES]),
        metadata={"description": "replenishment adds to the balance, write-off takes from it"},
    )
    amount = _amount(required=True)


class DigitString(fields.Field):
    """A non-negative bigint written as ASCII digits only (no sign, spaces or other scripts' digits)."""

    default_error_messages = {  # noqa: RUF012 - marshmallow's convention
        "invalid": 'must be a string of digits (an id, "3")',
        "range": "must be between {min} and {max}",
    }

    def __init__(self, *, minimum: int = 0, maximum: int = BIGINT_MAX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        number = parse_digits(value)
        if number is None:
            if isinstance(value, str) and value.isascii() and value.isdigit():
                # Digits all right, past 2^63-1: say what is wrong with it.
                raise self.make_error("range", min=self.minimum, max=self.maximum)
            raise self.make_error("invalid")
        if not self.minimum <= number <= self.maximum:
            raise self.make_error("range", min=self.minimum, max=self.maximum)
        return number

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(value)


class TransferCreateSchema(_TaskFields):
    to = DigitString(
        required=True,
        minimum=1,
        metadata={"description": "the recipient's id (not the sender's), a string of digits", "example": "7"},
    )
    amount = _amount(required=True)


class HoldCreateSchema(_TaskFields):
    amount = _amount(required=True)
    expires_in = JsonInteger(
        load_default=HOLD_DEFAULT_SECONDS,
        validate=validate.Range(min=1, max=HOLD_MAX_SECONDS),
        metadata={
            "description": f"seconds until the hold is released by itself, 1..{HOLD_MAX_SECONDS} "
            f"(default {HOLD_DEFAULT_SECONDS})",
            "example": 600,
        },
    )


class CaptureSchema(_TaskFields):
    amount = _amount("how much to charge, 1..the hold's amount; without it, the whole hold")


class VoidSchema(_TaskFields):
    pass


class PageQuerySchema(_Strict):
    # "type": "integer" tells the OpenAPI document how these read in a query string.
    limit = DigitString(
        minimum=1, maximum=MAX_PAGE, metadata={"type": "integer", "description": f"page size, 1..{MAX_PAGE}"}
    )
    after = DigitString(
        load_default=0,
        metadata={"type": "integer", "default": 0, "description": "return items with id greater than this"},
    )


class UserListQuerySchema(PageQuerySchema):
    username = fields.String(
        validate=[validate.Length(min=1, max=USERNAME_MAX_CHARS), _check_username],
        metadata={"description": "only the user with exactly this username (an empty list if there is none)"},
    )
    username_prefix = fields.String(
        validate=[validate.Length(min=1, max=USERNAME_MAX_CHARS), _check_username],
        metadata={"description": "only users whose username starts with this, in byte order of the usernames"},
    )
    after_username = fields.String(
        validate=validate.Length(max=USERNAME_MAX_CHARS),
        metadata={"description": "with username_prefix: the page after this username (the last one of a page)"},
    )

    @validates_schema
    def _one_order(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "after_username" in data and "username_prefix" not in data:
            raise ValidationError("only with username_prefix", "after_username")
        if "username_prefix" in data and data.get("after"):
            raise ValidationError("with username_prefix, page with after_username", "after")
        if "username" in data and (len(data) > 2 or data["after"]):  # after has a default: 0
            raise ValidationError("only on its own: it finds at most one user", "username")


def _filter(values: Any, description: str) -> fields.List:
    """A task-list filter: repeat the parameter for several values (any of them matches)."""
    return fields.List(
        fields.String(validate=validate.OneOf([v.value for v in values])),
        validate=validate.Length(min=1, max=20),
        metadata={"description": description, "filter": True},
    )


class TaskListQuerySchema(PageQuerySchema):
    # Filters (fields marked "filter"): each arrives as a list, is passed to the list_user_tasks query
    # under its own name as an array (NULL when absent), and is a line in that query's WHERE clause.
    # Several values of one parameter are either; different parameters must all hold.
    type = _filter(TaskType, "only tasks of these types (repeat for several: type=hold&type=capture)")
    status = _filter(Status, "only tasks in these states (repeat for several)")
    created_by = fields.List(
        fields.String(validate=validate.Length(min=1, max=TOKEN_NAME_MAX_CHARS)),
        validate=validate.Length(min=1, max=20),
        metadata={
            "description": "only tasks posted with the token of this name (`service`: the service's own; repeat "
            "for several)",
            "filter": True,
        },
    )
    order = fields.String(
        load_default="asc",
        validate=validate.OneOf(["asc", "desc"]),
        metadata={"description": "asc: oldest first (after=); desc: newest first (before=)"},
    )
    before = DigitString(
        minimum=1,
        metadata={"type": "integer", "description": "with order=desc: return items with id less than this"},
    )

    reference = fields.String(
        validate=validate.Length(min=1, max=REFERENCE_MAX_CHARS),
        metadata={"description": "only the task with this reference (at most one)"},
    )

    @validates_schema
    def _one_direction(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data["order"] == "asc" and "before" in data:
            raise ValidationError("only with order=desc", "before")
        if data["order"] == "desc" and data.get("after"):
            raise ValidationError("only with order=asc", "after")


class HoldListQuerySchema(PageQuerySchema):
    status = fields.String(
        validate=validate.OneOf([s.value for s in HoldStatus]),
        metadata={"description": "only holds in this state"},
    )


class UserSchema(Schema):
    # `required` on what we send only tells the OpenAPI document that the field is always there.
    id = DigitString(required=True, metadata={"example": "5"})
    username = fields.String(required=True, metadata={"example": "User5"})
    balance = fields.Integer(required=True, metadata={"example": 500})
    held = fields.Integer(required=True, metadata={"description": "the sum of the active holds", "example": 0})
    available = fields.Integer(
        required=True, metadata={"description": "balance - held: what can be written off, sent or held", "example": 500}
    )


def _enum(values: Any) -> dict[str, Any]:
    return {"type": "string", "enum": [v.value for v in values]}


class TaskSchema(Schema):
    id = DigitString(required=True, metadata={"example": "12"})
    user_id = DigitString(required=True, metadata={"example": "5"})
    type = fields.Function(lambda task: task.type.value, required=True, metadata=_enum(TaskType))
    amount = fields.Integer(required=True)
    status = fields.Function(lambda task: task.status.value, required=True, metadata=_enum(Status))
    reason = fields.Function(
        lambda task: task.reason.value if task.reason else None,
        required=True,
        allow_none=True,
        metadata={**_enum(Reason), "enum": [*(r.value for r in Reason), None]},
    )
    balance_after = fields.Integer(required=True, allow_none=True)
    available_after = fields.Integer(
        required=True, allow_none=True, metadata={"description": "balance_after - held, once finished"}
    )
    counterparty_id = DigitString(
        required=True,
        allow_none=True,
        metadata={"description": "a transfer's recipient; a transfer-in's sender; else null"},
    )
    transfer_id = DigitString(
        required=True, allow_none=True, metadata={"description": "a transfer-in's transfer (the sender's task)"}
    )
    hold_id = DigitString(
        required=True, allow_none=True, metadata={"description": "the hold a capture, void or release resolves"}
    )
    expires_at = fields.DateTime(
        format="iso", required=True, allow_none=True, metadata={"description": "a hold's deadline"}
    )
    created_at = fields.DateTime(format="iso", required=True)
    processed_at = fields.DateTime(format="iso", required=True, allow_none=True)
    created_by = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "description": "the name of the API token that posted the task (kept when it is revoked); null when "
            "no token was needed; `service` for the service's own tasks (hold releases); a transfer-in carries "
            "its transfer's",
            "example": "shop-backend",
        },
    )
    reference = fields.String(required=True, allow_none=True, metadata={"description": "your own id for it"})
    metadata = fields.Function(
        lambda task: task.metadata or {},
        required=True,
        metadata={
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "your own strings ({} when none were given)",
        },
    )


class HoldSchema(Schema):
    id = DigitString(required=True, metadata={"description": "the hold task's id", "example": "12"})
    user_id = DigitString(required=True, metadata={"example": "5"})
    amount = fields.Integer(required=True)
    status = fields.Function(lambda hold: hold.status.value, required=True, metadata=_enum(HoldStatus))
    captured_amount = fields.Integer(required=True, allow_none=True)
    expires_at = fields.DateTime(format="iso", required=True)
    resolved_by = DigitString(
        required=True, allow_none=True, metadata={"description": "the capture, void or release that ended it"}
    )


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


class Instant(fields.Field):
    """An RFC 3339 date-time with a UTC offset (2026-11-30T23:59:59Z, ...+01:00), as an aware
    datetime. In a query string an unencoded "+" arrives as a space: read there, it is the "+"
    of the offset. Digits below the microsecond are cut, or with `round_up` make the next one."""

    def __init__(self, *, round_up: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._up = round_up

    _RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+ -]\d{2}:\d{2})")
    default_error_messages = {  # noqa: RUF012 - marshmallow's convention
        "invalid": "must be an RFC 3339 date-time with a UTC offset, such as 2026-11-30T23:59:59Z",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        match = self._RFC3339.fullmatch(value) if isinstance(value, str) and len(value) <= 40 else None
        if match is None:
            raise self.make_error("invalid")
        day, time, fraction, offset = match.groups()
        offset = "+00:00" if offset in "Zz" else offset.replace(" ", "+")
        try:
            # Python keeps microseconds (as PostgreSQL does). In UTC: PostgreSQL takes offsets up to
            # 15:59 only, Python up to 23:59.
            instant = datetime.fromisoformat(f"{day}T{time}.{(fraction or '0')[:6]:0<6}{offset}").astimezone(UTC)
            # Finer digits: the next microsecond for a bound that must not reach back before what
            # was written (a window's start, included; its end, excluded), else this one.
            if self._up and fraction is not None and fraction[6:].strip("0"):
                instant += timedelta(microseconds=1)
            return instant
        except (ValueError, OverflowError):  # 2026-02-30, 25:00, an offset of 24 hours or more, year 0 in UTC
            raise self.make_error("invalid") from None

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else value.isoformat()


class BalanceAtQuerySchema(_Strict):
    at = Instant(
        required=True,
        metadata={
            "type": "string",
            "format": "date-time",
            "description": "the instant (RFC 3339 with an offset; not in the future)",
            "example": "2026-11-30T23:59:59Z",
        },
    )


STATEMENT_MAX_DAYS = 366


class StatementQuerySchema(_Strict):
    start = Instant(
        round_up=True,
        required=True,
        data_key="from",
        metadata={
            "type": "string",
            "format": "date-time",
            "description": "the window's start, included (RFC 3339 with an offset)",
            "example": "2026-11-01T00:00:00Z",
        },
    )
    end = Instant(
        round_up=True,
        data_key="to",
        metadata={
            "type": "string",
            "format": "date-time",
            "description": f"the window's end, excluded (default: now; not in the future; at most "
            f"{STATEMENT_MAX_DAYS} days after from)",
        },
    )
    format = fields.String(
        validate=validate.OneOf(["json", "csv"]),
        metadata={"description": "csv: the statement as a CSV file (as Accept: text/csv); json by default"},
    )

    @validates_schema
    def _a_window(self, data: dict[str, Any], **kwargs: Any) -> None:
        start, end = data.get("start"), data.get("end")
        if start is None or end is None:
            return
        if end <= start:
            raise ValidationError("must be after from", "to")
        if end - start > timedelta(days=STATEMENT_MAX_DAYS):
            raise ValidationError(f"must be at most {STATEMENT_MAX_DAYS} days after from", "to")


class AccountStateSchema(Schema):
    balance = fields.Integer(required=True)
    held = fields.Integer(required=True)
    available = fields.Integer(required=True)


class BalanceAtSchema(AccountStateSchema):
    user_id = DigitString(required=True, metadata={"example": "5"})
    at = fields.DateTime(format="iso", required=True)
    last_task_id = DigitString(
        required=True,
        allow_none=True,
        metadata={"description": "the last task finished by then, in applied order (null: none yet)"},
    )


class StatementTotalsSchema(Schema):
    credits = fields.Integer(required=True, metadata={"description": "done replenishments and transfer-ins"})
    debits = fields.Integer(required=True, metadata={"description": "done write-offs, transfers and captures"})
    done = fields.Integer(required=True, metadata={"description": "entries done"})
    cancelled = fields.Integer(required=True, metadata={"description": "entries cancelled"})


class StatementSchema(Schema):
    user_id = DigitString(required=True)
    from_ = fields.DateTime(format="iso", required=True, data_key="from")
    to = fields.DateTime(format="iso", required=True)
    opening = fields.Nested(AccountStateSchema, required=True, metadata={"description": "the state at from"})
    entries = fields.List(
        fields.Nested(TaskSchema),
        required=True,
        metadata={"description": "every task finished in [from, to), in the order applied"},
    )
    closing = fields.Nested(
        AccountStateSchema, required=True, metadata={"description": "the state at to: opening + credits - debits"}
    )
    totals = fields.Nested(StatementTotalsSchema, required=True)


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
    background = fields.Boolean(required=True, metadata={"description": "every background loop is running"})


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ready", "unavailable"]})
    checks = fields.Nested(ReadyChecksSchema, required=True)
    down = fields.List(
        fields.String(),
        required=True,
        metadata={
            "description": "background loops that are down right now (being restarted); `startup` while the "
            "process waits for its database at start-up"
        },
    )


user_create_schema = UserCreateSchema()
task_create_schema = TaskCreateSchema()
transfer_create_schema = TransferCreateSchema()
hold_create_schema = HoldCreateSchema()
capture_schema = CaptureSchema()
void_schema = VoidSchema()
user_list_query_schema = UserListQuerySchema()
task_list_query_schema = TaskListQuerySchema()
TASK_FILTERS = tuple(name for name, field in task_list_query_schema.fields.items() if field.metadata.get("filter"))
hold_list_query_schema = HoldListQuerySchema()
user_schema = UserSchema()
task_schema = TaskSchema()
hold_schema = HoldSchema()
wait_query_schema = WaitQuerySchema()
balance_at_query_schema = BalanceAtQuerySchema()
statement_query_schema = StatementQuerySchema()
