"""The API's resources: users, tasks (balance changes, transfers, holds and their captures and
voids) and holds. Parse and validate, call the repository or the enqueue batcher, dump the answer.
No SQL here.

Every kind of task is posted the same way (`_post_task`): 202 with the task and its Location, an
optional Idempotency-Key, an optional ?wait for its outcome.
"""

from __future__ import annotations

import contextlib
import json
import time
from enum import Enum
from typing import Any, NamedTuple, TypeVar

from aiohttp import web

from ..db import repository
from ..db.driver import Connection
from ..db.errors import DatabaseError
from ..db.idempotency import StoredResponse
from ..db.repository import HoldNotFound, NewTask, ReferenceTaken, UserNotFound
from ..ledger import BIGINT_MAX, HoldStatus, TaskType
from ..models import Task
from ..scopes import Scope
from ..worker.waiters import Claim
from . import keys
from .auth import created_by
from .errors import ApiError, log_client_gone, not_found
from .fastpath import dump_task, load_task_create
from .idempotency import idempotency_key, json_stored, respond_once
from .parsing import load, load_query, path_id, read_json_object
from .responses import encode_json, json_response, paged_response
from .routes import Route
from .schemas import (
    DEFAULT_PAGE,
    TASK_FILTERS,
    capture_schema,
    hold_create_schema,
    hold_list_query_schema,
    hold_schema,
    task_list_query_schema,
    transfer_create_schema,
    user_create_schema,
    user_list_query_schema,
    user_schema,
    void_schema,
    wait_query_schema,
)

T = TypeVar("T")

# -- users -----------------------------------------------------------------------------------------


async def create_user(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    data = load(user_create_schema, await read_json_object(request))
    try:
        if key is not None:
            return await _create_user_once(request, key, data)
        user = await repository.create_user(request.app[keys.POOL], data["username"], data["balance"])
    except repository.UsernameTaken:
        existing = await repository.find_user_by_username(request.app[keys.POOL], data["username"])
        raise ApiError(
            409,
            "username_taken",
            "a user with this username already exists",
            {"id": str(existing.id)} if existing else {},
        ) from None
    return json_response(user_schema.dump(user), status=201, headers={"Location": f"/api/v1/user/{user.id}"})


async def _create_user_once(request: web.Request, key: str, data: dict[str, Any]) -> web.Response:
    async def create(conn: Connection) -> StoredResponse:
        user = await repository.insert_user(conn, data["username"], data["balance"])
        return json_stored(201, user_schema.dump(user), f"/api/v1/user/{user.id}")

    response, _replayed = await respond_once(request, key, "/api/v1/user/", data, create)
    return response


async def get_user(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    return json_response(
        user_schema.dump(_found(await repository.get_user(request.app[keys.POOL], user_id), "user", user_id))
    )


def _found(found: T | None, what: str, object_id: int) -> T:
    """What a lookup found, or 404 `<what>_not_found`."""
    if found is None:
        raise not_found(what, object_id)
    return found


async def _of_a_user(request: web.Request, user_id: int, items: list[T]) -> list[T]:
    """A user's items, or 404 when there are none because the user does not exist."""
    if not items and await repository.get_user(request.app[keys.POOL], user_id) is None:
        raise not_found("user", user_id)
    return items


async def list_users(request: web.Request) -> web.StreamResponse:
    query = load_query(user_list_query_schema, request)
    pool = request.app[keys.POOL]
    if "username" in query:
        user = await repository.find_user_by_username(pool, query["username"])
        return json_response(user_schema.dump([user] if user else [], many=True))
    if "username_prefix" in query:
        limit = query.get("limit", DEFAULT_PAGE)
        found = await repository.find_users_by_username_prefix(
            pool, query["username_prefix"], after=query.get("after_username", ""), limit=limit
        )
        next_page = {"after_username": found[-1].username} if found else {}
        return paged_response(request, user_schema.dump(found, many=True), limit, next_page)
    if "limit" in query:
        page = await repository.list_users(pool, after=query["after"], limit=query["limit"])
        return paged_response(
            request, user_schema.dump(page, many=True), query["limit"], {"after": page[-1].id} if page else {}
        )
    # No limit: every user. Stream page by page so memory stays flat with millions of users.
    pages = repository.iter_users(pool, after=query["after"])
    first = await anext(pages, [])  # fail with a proper error before any byte is sent
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    if request.method == "HEAD":
        # aiohttp sends whatever a StreamResponse writes, even to HEAD: the bytes would be read
        # as the start of the next response on the connection.
        await response.write_eof()
        return response
    await response.write(b"[")
    separator = b""
    try:
        page = first
        while page:
            chunk = encode_json(user_schema.dump(page, many=True))[1:-1].encode()
            await response.write(separator + chunk)
            separator = b","
            page = await anext(pages, [])
    except DatabaseError:
        # Too late for an error status: cut the response so the client sees it is incomplete.
        if request.transport is not None:
            request.transport.close()
        return response
    except ConnectionError:
        log_client_gone(request)  # mid-listing
        return response
    await response.write(b"]")
    await response.write_eof()
    return response


# -- posting tasks ---------------------------------------------------------------------------------


async def post_amount(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    wait, key = _wait_seconds(request), idempotency_key(request)
    data = load_task_create(await read_json_object(request))
    task = NewTask(user_id, TaskType(data["type"]), data["amount"], **_client_fields(data))
    return await _post_task(request, task, f"/api/v1/user/{user_id}/amount/", data, wait, key)


async def post_transfer(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    wait, key = _wait_seconds(request), idempotency_key(request)
    data = load(transfer_create_schema, await read_json_object(request))
    if data["to"] == user_id:
        raise ApiError(
            400,
            "validation_failed",
            "the request body is not valid",
            {"fields": {"to": ["must be another user than the sender"]}},
        )
    task = NewTask(user_id, TaskType.TRANSFER, data["amount"], counterparty_id=data["to"], **_client_fields(data))
    return await _post_task(request, task, f"/api/v1/user/{user_id}/transfer/", data, wait, key)


async def post_hold(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    wait, key = _wait_seconds(request), idempotency_key(request)
    data = load(hold_create_schema, await read_json_object(request))
    task = NewTask(user_id, TaskType.HOLD, data["amount"], expires_in=data["expires_in"], **_client_fields(data))
    return await _post_task(request, task, f"/api/v1/user/{user_id}/holds/", data, wait, key)


async def post_capture(request: web.Request) -> web.Response:
    hold_id = path_id(request, "hold_id")
    wait, key = _wait_seconds(request), idempotency_key(request)
    data = load(capture_schema, await read_json_object(request, optional=True))
    # The hold gives the user and, without an amount, the amount (the whole hold). More than the
    # hold is refused when applied (amount_exceeds_hold), like every other outcome, in order.
    task = NewTask(None, TaskType.CAPTURE, data.get("amount"), hold_id=hold_id, **_client_fields(data))
    return await _post_task(request, task, f"/api/v1/hold/{hold_id}/capture/", data, wait, key)


async def post_void(request: web.Request) -> web.Response:
    hold_id = path_id(request, "hold_id")
    wait, key = _wait_seconds(request), idempotency_key(request)
    data = load(void_schema, await read_json_object(request, optional=True))
    task = NewTask(None, TaskType.VOID, None, hold_id=hold_id, **_client_fields(data))
    return await _post_task(request, task, f"/api/v1/hold/{hold_id}/void/", data, wait, key)


def _client_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The client's reference and metadata of a validated body, as NewTask takes them."""
    metadata = data.get("metadata")
    return {"reference": data.get("reference"), "metadata": encode_json(metadata) if metadata else None}


async def _post_task(
    request: web.Request,
    task: NewTask,
    canonical_path: str,
    data: dict[str, Any],
    wait: float | None,
    key: str | None,
) -> web.Response:
    """Store `task` and answer 202 with it (or, with ?wait, 200 once it is finished)."""
    task = task._replace(created_by=created_by(request))
    # ?wait: claimed before the insert is sent, so that no finish of the task can be missed and
    # the task need not be read again (worker/waiters.py).
    with request.app[keys.WAITERS].expecting() if wait is not None else contextlib.nullcontext() as claim:
        try:
            if key is None:
                stored = await request.app[keys.ENQUEUE_BATCHER].enqueue(task)
                created = Created(stored)
                task_id, fresh = stored.id, stored
            else:
                response, task_id, fresh = await _post_task_once(request, key, task, canonical_path, data)
                created = Created(response)
        except UserNotFound:
            raise await _missing_user(request, task) from None
        except HoldNotFound:
            raise await _hold_not_found(request, task.hold_id or 0) from None
        except ReferenceTaken as taken:
            raise ApiError(
                409,
                "reference_taken",
                "a task of this user already has this reference",
                {"reference": taken.reference, "task_id": str(taken.task_id)},
            ) from None
        if wait is None:
            return created.response()
        return await _answer_when_finished(request, task_id, created, wait, claim, fresh)


async def _post_task_once(
    request: web.Request, key: str, task: NewTask, canonical_path: str, data: dict[str, Any]
) -> tuple[web.Response, int, Task | None]:
    """The response, the task's id, and the task as stored now (None for a replay)."""
    created: list[Task] = []
    sent: list[tuple[int, float]] = []  # the server process that stored it, when the insert was sent

    async def create(conn: Connection) -> StoredResponse:
        sent_at = time.monotonic()
        stored, backend_pid = await repository.insert_task(conn, task)
        created.append(stored)
        sent.append((backend_pid, sent_at))
        return json_stored(202, dump_task(stored), f"/api/v1/task/{stored.id}")

    # `"metadata": {}` stores what no metadata stores: the same request either way. Left out of the
    # fingerprint when empty, so that the requests without it keep the fingerprint they always had.
    body = {name: value for name, value in data.items() if name != "metadata" or value}
    supervisor = request.app[keys.SUPERVISOR]
    with supervisor.storing([task.user_id]):  # until its user's loop is woken here, below
        response, replayed = await respond_once(request, key, canonical_path, body, create)
        if replayed:  # the first request's task, counted then: its id is in the stored body
            return response, int(json.loads(response.text or "{}")["id"]), None
        # Committed now: counted, and its user's loop woken here (as the enqueue batcher's are).
        request.app[keys.METRICS].count_stored(created)
        pid, sent_at = sent[-1]
        supervisor.stored(pid, created, sent_at)
    return response, created[0].id, created[0]


class Created(NamedTuple):
    """The 202 a posted task is answered with: the stored task, or (with an Idempotency-Key) the
    stored response. A ?wait answers with the finished task instead, under the same headers, so
    its 202 is built only if it is the answer after all."""

    answer: Task | web.Response

    def headers(self) -> dict[str, str]:
        """Location (and a replay's Idempotent-Replayed): every header but the body's type."""
        if isinstance(self.answer, web.Response):
            return {name: value for name, value in self.answer.headers.items() if name != "Content-Type"}
        return {"Location": f"/api/v1/task/{self.answer.id}"}

    def response(self) -> web.Response:
        if isinstance(self.answer, web.Response):
            return self.answer
        return json_response(dump_task(self.answer), status=202, headers=self.headers())


async def _answer_when_finished(
    request: web.Request, task_id: int, created: Created, wait: float, claim: Claim | None, stored: Task | None
) -> web.Response:
    """?wait on a new task: 200 with the task once it is done or cancelled, or 202 with the task
    as it stands when `wait` seconds are up. The created answer's headers (Location, ...) stay."""
    task = await request.app[keys.WAITERS].wait(task_id, wait, claim=claim, stored=stored)
    if task is None:  # deleted meanwhile (by hand): nothing better to say than the first answer
        return created.response()
    return json_response(dump_task(task), status=200 if task.finished else 202, headers=created.headers())


async def _missing_user(request: web.Request, task: NewTask) -> ApiError:
    """404 for the user a task could not be stored for: its own, or its transfer's recipient."""
    assert task.user_id is not None  # tasks that name a hold instead fail with HoldNotFound
    if task.counterparty_id is not None and await repository.get_user(request.app[keys.POOL], task.user_id):
        return not_found("user", task.counterparty_id)
    return not_found("user", task.user_id)


def _wait_seconds(request: web.Request) -> float | None:
    """The ?wait= of a request (None without one); the common case, no query, costs nothing."""
    if not request.query_string:
        return None
    wait: float | None = load_query(wait_query_schema, request).get("wait")
    return wait


# -- reading tasks ---------------------------------------------------------------------------------


async def get_task(request: web.Request) -> web.Response:
    task_id = path_id(request, "task_id")
    wait = _wait_seconds(request)
    if wait is None:
        task = await repository.get_task(request.app[keys.POOL], task_id)
    else:
        # ?wait: 200 either way, with the finished task or the task as it stands at the timeout.
        task = await request.app[keys.WAITERS].wait(task_id, wait)
    return json_response(dump_task(_found(task, "task", task_id)))


async def list_user_tasks(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    query = load_query(task_list_query_schema, request)
    pool = request.app[keys.POOL]
    limit = query.get("limit", DEFAULT_PAGE)
    filters = {name: query.get(name) for name in TASK_FILTERS}
    if "reference" in query:
        # At most one task: the unique index (user_id, reference) finds it.
        found = await repository.find_user_task_by_reference(pool, user_id, query["reference"])
        tasks = [found] if found is not None and _in_page(found, query, filters) else []
        next_page: dict[str, Any] = {}
    elif query["order"] == "desc":
        tasks = await repository.list_user_tasks(
            pool, user_id, limit=limit, before=query.get("before", BIGINT_MAX), filters=filters
        )
        next_page = {"before": tasks[-1].id} if tasks else {}
    else:
        tasks = await repository.list_user_tasks(pool, user_id, limit=limit, after=query["after"], filters=filters)
        next_page = {"after": tasks[-1].id} if tasks else {}
    tasks = await _of_a_user(request, user_id, tasks)
    return paged_response(request, [dump_task(task) for task in tasks], limit, next_page)


def _in_page(task: Task, query: dict[str, Any], filters: dict[str, list[str] | None]) -> bool:
    """Whether a task is one the list query asks for: within its page (after=/before=) and
    passing its filters (type=, status=, created_by=: enums compared by their value, a plain
    string as it is, a null created_by matching none)."""
    if not query["after"] < task.id < query.get("before", BIGINT_MAX):
        return False
    return all(values is None or _filtered_value(getattr(task, name)) in values for name, values in filters.items())


def _filtered_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


# -- holds -----------------------------------------------------------------------------------------


async def get_hold(request: web.Request) -> web.Response:
    hold_id = path_id(request, "hold_id")
    hold = await repository.get_hold(request.app[keys.POOL], hold_id)
    if hold is None:
        raise await _hold_not_found(request, hold_id)
    return json_response(hold_schema.dump(hold))


async def _hold_not_found(request: web.Request, hold_id: int) -> ApiError:
    """404 hold_not_found; when the id is another kind of task, the message says which."""
    task = await repository.get_task(request.app[keys.POOL], hold_id)
    if task is None:
        return not_found("hold", hold_id)
    return ApiError(
        404, "hold_not_found", f"task {hold_id} is a {task.type.value}, not a hold", {"hold_id": str(hold_id)}
    )


async def list_user_holds(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    query = load_query(hold_list_query_schema, request)
    pool = request.app[keys.POOL]
    statuses = [HoldStatus(query["status"])] if "status" in query else None
    limit = query.get("limit", DEFAULT_PAGE)
    holds = await repository.list_user_holds(pool, user_id, after=query["after"], limit=limit, statuses=statuses)
    holds = await _of_a_user(request, user_id, holds)
    return paged_response(request, hold_schema.dump(holds, many=True), limit, {"after": holds[-1].id} if holds else {})


# The task-posting routes first: aiohttp tries a prefix's dynamic routes in the order they were
# added, and these take the most requests.
ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/user/{user_id}/amount", post_amount, Scope.WRITE, wait_query_schema),
    Route("POST", "/api/v1/user/{user_id}/transfer", post_transfer, Scope.WRITE, wait_query_schema),
    Route("POST", "/api/v1/user/{user_id}/holds", post_hold, Scope.WRITE, wait_query_schema),
    Route("POST", "/api/v1/hold/{hold_id}/capture", post_capture, Scope.WRITE, wait_query_schema),
    Route("POST", "/api/v1/hold/{hold_id}/void", post_void, Scope.WRITE, wait_query_schema),
    Route("POST", "/api/v1/user", create_user, Scope.WRITE),
    Route("GET", "/api/v1/user", list_users, Scope.READ, user_list_query_schema),
    Route("GET", "/api/v1/user/{user_id}", get_user, Scope.READ),
    Route("GET", "/api/v1/user/{user_id}/tasks", list_user_tasks, Scope.READ, task_list_query_schema),
    Route("GET", "/api/v1/user/{user_id}/holds", list_user_holds, Scope.READ, hold_list_query_schema),
    Route("GET", "/api/v1/task/{task_id}", get_task, Scope.READ, wait_query_schema),
    Route("GET", "/api/v1/hold/{hold_id}", get_hold, Scope.READ),
)
