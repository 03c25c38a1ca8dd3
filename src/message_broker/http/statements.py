"""A user's balance at a point in time and statements of a window of its history, as JSON or
CSV, both from the same rows (db/history.py) and the one task serializer. No SQL here.

A statement streams: the entries go out a keyset page at a time, and the closing state and the
totals are summed from the entries as they pass, so they agree with them by construction, and
memory does not grow with the window.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from ..db import history
from ..db.errors import DatabaseError
from ..db.history import State
from ..ledger import CREDITS, DEBITS, Status, balance_change
from ..models import Task
from ..scopes import Scope
from . import keys
from .errors import ApiError, log_client_gone, not_found
from .fastpath import dump_task
from .parsing import load_query, path_id
from .responses import encode_json, json_response
from .routes import Route
from .schemas import STATEMENT_MAX_DAYS, balance_at_query_schema, statement_query_schema

CSV_COLUMNS = (
    "id",
    "time",
    "type",
    "status",
    "reason",
    "amount",
    "change",
    "balance_after",
    "available_after",
    "counterparty_id",
    "reference",
    "created_by",
)
# A cell a spreadsheet would run as a formula (OWASP's list) is read as text once it starts with '.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _invalid(field: str, message: str, **details: Any) -> ApiError:
    return ApiError(
        400, "validation_failed", "the request query is not valid", {"fields": {field: [message]}, **details}
    )


def _not_yet(user_id: int, when: str, created_at: datetime) -> ApiError:
    """404 for a time before the user existed: there is no balance to tell, not even 0."""
    return ApiError(
        404,
        "user_not_found",
        f"user {user_id} did not exist {when}",
        {"user_id": str(user_id), "created_at": created_at.isoformat()},
    )


def _state(state: State) -> dict[str, int]:
    return {"balance": state.balance, "held": state.held, "available": state.available}


async def balance_at(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    at: datetime = load_query(balance_at_query_schema, request)["at"]
    found = await history.state_at(request.app[keys.POOL], user_id, at)
    if found is None:
        raise not_found("user", user_id)
    if at > found.now:
        raise _invalid("at", "must not be in the future", now=found.now.isoformat())
    if at < found.created_at:
        raise _not_yet(user_id, f"at {at.isoformat()}", found.created_at)
    state = found.state
    return json_response(
        {
            "user_id": str(user_id),
            "at": at.isoformat(),
            **_state(state),
            "last_task_id": None if state.last_task_id is None else str(state.last_task_id),
        }
    )


class _Running:
    """The closing state and the totals, summed from the entries as they stream."""

    def __init__(self, opening: State) -> None:
        self.balance, self.held = opening.balance, opening.held
        self.last_task_id = opening.last_task_id
        self.credits = self.debits = self.done = self.cancelled = 0

    def add(self, task: Task) -> None:
        if task.status is Status.DONE:
            self.done += 1
            if task.type in CREDITS:
                self.credits += task.amount
            elif task.type in DEBITS:
                self.debits += task.amount
        else:
            self.cancelled += 1
        # Every finished task records the state it left: the closing state is the last one's.
        assert task.balance_after is not None and task.available_after is not None
        self.balance, self.held = task.balance_after, task.balance_after - task.available_after
        self.last_task_id = task.id

    def closing(self) -> State:
        return State(self.balance, self.held, self.last_task_id)

    def totals(self) -> dict[str, int]:
        return {"credits": self.credits, "debits": self.debits, "done": self.done, "cancelled": self.cancelled}


async def statement(request: web.Request) -> web.StreamResponse:
    user_id = path_id(request, "user_id")
    query = load_query(statement_query_schema, request)
    start: datetime = query["start"]
    pool = request.app[keys.POOL]
    found = await history.state_before(pool, user_id, start, until=query.get("end"))
    if found is None:
        raise not_found("user", user_id)
    end: datetime = query.get("end", found.now)
    if end > found.now:
        raise _invalid("to", "must not be in the future", now=found.now.isoformat())
    if start >= end:
        raise _invalid("from", "must be before to (now, when to is not given)")
    if end - start > timedelta(days=STATEMENT_MAX_DAYS):
        raise _invalid("from", f"must be at most {STATEMENT_MAX_DAYS} days before to")
    if end <= found.created_at:
        # A window that starts earlier opens with the user's opening balance, as of its creation.
        raise _not_yet(user_id, f"before {end.isoformat()}", found.created_at)
    pages = history.finished_between(pool, user_id, start, end)
    first = await anext(pages, [])  # fail with a proper error before any byte is sent
    as_csv = query.get("format") == "csv" or ("format" not in query and _prefers_csv(request))
    if as_csv:
        name = f"user-{user_id}-{_compact(start)}-{_compact(end)}.csv"
        headers = {
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}"',
        }
        chunks = _csv(found.state, start, end, first, pages)
    else:
        headers = {"Content-Type": "application/json"}
        chunks = _json(user_id, found.state, start, end, first, pages)
    return await _stream(request, headers, chunks)


def _prefers_csv(request: web.Request) -> bool:
    """Accept ranks text/csv above application/json by quality (RFC 9110 12.5.1: q=0 is "not
    acceptable", a type not named ranks 0); JSON, the default, wins a tie."""
    quality: dict[str, float] = {}
    for part in request.headers.get("Accept", "").split(","):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    return quality.get("text/csv", 0.0) > quality.get("application/json", 0.0)


def _compact(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


async def _json(
    user_id: int, opening: State, start: datetime, end: datetime, first: list[Task], pages: AsyncIterator[list[Task]]
) -> AsyncIterator[bytes]:
    head = {"user_id": str(user_id), "from": start.isoformat(), "to": end.isoformat(), "opening": _state(opening)}
    yield (encode_json(head)[:-1] + ',"entries":[').encode()
    running = _Running(opening)
    separator = ""
    page = first
    while page:
        for task in page:
            running.add(task)
        yield (separator + encode_json([dump_task(task) for task in page])[1:-1]).encode()
        separator = ","
        page = await anext(pages, [])
    tail = {"closing": _state(running.closing()), "totals": running.totals()}
    yield ("]," + encode_json(tail)[1:]).encode()


def neutralise(cell: str) -> str:
    """A text cell a spreadsheet will show as text, never run as a formula."""
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


async def _csv(
    opening: State, start: datetime, end: datetime, first: list[Task], pages: AsyncIterator[list[Task]]
) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def flush() -> bytes:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text.encode()

    writer.writerow(CSV_COLUMNS)
    writer.writerow(["", start.isoformat(), "opening", "", "", "", "", opening.balance, opening.available, "", "", ""])
    yield flush()
    running = _Running(opening)
    page = first
    while page:
        for task in page:
            running.add(task)
            writer.writerow(
                [
                    task.id,
                    task.processed_at.isoformat() if task.processed_at else "",
                    task.type.value,
                    task.status.value,
                    task.reason.value if task.reason else "",
                    task.amount,
                    balance_change(task.type, task.status, task.amount),
                    task.balance_after,
                    task.available_after,
                    "" if task.counterparty_id is None else task.counterparty_id,
                    "" if task.reference is None else neutralise(task.reference),
                    "" if task.created_by is None else neutralise(task.created_by),
                ]
            )
        yield flush()
        page = await anext(pages, [])
    closing = running.closing()
    writer.writerow(["", end.isoformat(), "closing", "", "", "", "", closing.balance, closing.available, "", "", ""])
    yield flush()


async def _stream(request: web.Request, headers: dict[str, str], chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    if request.method == "HEAD":
        # aiohttp sends whatever a StreamResponse writes, even to HEAD.
        await response.write_eof()
        return response
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except DatabaseError:
        # Too late for an error status: cut the response so the client sees it is incomplete.
        if request.transport is not None:
            request.transport.close()
        return response
    except ConnectionError:
        log_client_gone(request)  # mid-download
        return response
    await response.write_eof()
    return response


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/user/{user_id}/balance", balance_at, Scope.READ, balance_at_query_schema),
    Route("GET", "/api/v1/user/{user_id}/statement", statement, Scope.READ, statement_query_schema),
)
