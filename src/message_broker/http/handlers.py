"""Request handlers: parse and validate, call the repository, dump the answer. No SQL here."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..db import repository
from ..db.connector import Connection
from ..db.errors import DatabaseError
from ..db.idempotency import StoredResponse
from ..db.repository import insert_task, insert_user
from ..ledger import TaskType
from . import keys
from .errors import ApiError
from .fastpath import dump_task, load_task_create
from .idempotency import fingerprint, idempotency_key, json_stored, respond_once
from .parsing import load, load_query, path_id, read_json_object
from .schemas import page_query_schema, task_schema, user_create_schema, user_schema, wait_query_schema

# One encoder for every answer: json.dumps with any option builds a new encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=_ENCODER.encode(data), status=status, content_type="application/json", headers=headers)


def _user_not_found(user_id: int) -> ApiError:
    return ApiError(404, "user_not_found", f"user {user_id} does not exist", {"user_id": str(user_id)})


async def create_user(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    data = load(user_create_schema, await read_json_object(request))
    try:
        if key is not None:
            return await _create_user_once(request, key, data)
        user = await repository.create_user(request.app[keys.POOL], data["username"], data["balance"])
    except repository.UsernameTaken:
        raise ApiError(409, "username_taken", "a user with this username already exists") from None
    return json_response(user_schema.dump(user), status=201, headers={"Location": f"/api/v1/user/{user.id}"})


async def _create_user_once(request: web.Request, key: str, data: dict[str, Any]) -> web.Response:
    async def create(conn: Connection) -> StoredResponse:
        user = await insert_user(conn, data["username"], data["balance"])
        return json_stored(201, user_schema.dump(user), f"/api/v1/user/{user.id}")

    return await respond_once(request, key, fingerprint("POST", "/api/v1/user/", data), create)


async def get_user(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    user = await repository.get_user(request.app[keys.POOL], user_id)
    if user is None:
        raise _user_not_found(user_id)
    return json_response(user_schema.dump(user))


async def list_users(request: web.Request) -> web.StreamResponse:
    query = load_query(page_query_schema, request)
    pool = request.app[keys.POOL]
    if "limit" in query:
        page = await repository.list_users(pool, after=query["after"], limit=query["limit"])
        return json_response(user_schema.dump(page, many=True))
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
            chunk = json.dumps(user_schema.dump(page, many=True), ensure_ascii=False)[1:-1].encode()
            await response.write(separator + chunk)
            separator = b","
            page = await anext(pages, [])
    except DatabaseError:
        # Too late for an error status: cut the response so the client sees it is incomplete.
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write(b"]")
    await response.write_eof()
    return response


async def create_task(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    wait = _wait_seconds(request)
    key = idempotency_key(request)
    data = load_task_create(await read_json_object(request))
    if key is not None:
        response = await _create_task_once(request, key, user_id, data)
        task_id = int(json.loads(response.text or "{}")["id"])
        return response if wait is None else await _answer_when_finished(request, task_id, response, wait)
    try:
        task = await request.app[keys.ENQUEUE_BATCHER].enqueue(user_id, TaskType(data["type"]), data["amount"])
    except repository.UserNotFound:
        raise _user_not_found(user_id) from None
    response = json_response(dump_task(task), status=202, headers={"Location": f"/api/v1/task/{task.id}"})
    return response if wait is None else await _answer_when_finished(request, task.id, response, wait)


def _wait_seconds(request: web.Request) -> float | None:
    """The ?wait= of a request (None without one); the common case, no query, costs nothing."""
    if not request.query_string:
        return None
    wait: float | None = load_query(wait_query_schema, request).get("wait")
    return wait


async def _create_task_once(request: web.Request, key: str, user_id: int, data: dict[str, Any]) -> web.Response:
    async def create(conn: Connection) -> StoredResponse:
        task = await insert_task(conn, user_id, TaskType(data["type"]), data["amount"])
        return json_stored(202, task_schema.dump(task), f"/api/v1/task/{task.id}")

    request_fingerprint = fingerprint("POST", f"/api/v1/user/{user_id}/amount/", data)
    try:
        return await respond_once(request, key, request_fingerprint, create)
    except repository.UserNotFound:
        raise _user_not_found(user_id) from None


async def _answer_when_finished(request: web.Request, task_id: int, created: web.Response, wait: float) -> web.Response:
    """?wait on a new task: 200 with the task once it is done or cancelled, or 202 with the task
    as it stands when `wait` seconds are up. The created answer's headers (Location, ...) stay."""
    task = await request.app[keys.WAITERS].wait(task_id, wait)
    if task is None:  # deleted meanwhile (by hand): nothing better to say than the first answer
        return created
    headers = {name: value for name, value in created.headers.items() if name != "Content-Type"}
    return json_response(task_schema.dump(task), status=200 if task.finished else 202, headers=headers)


async def get_task(request: web.Request) -> web.Response:
    task_id = path_id(request, "task_id")
    wait = _wait_seconds(request)
    if wait is None:
        task = await repository.get_task(request.app[keys.POOL], task_id)
    else:
        # ?wait: 200 either way, with the finished task or the task as it stands at the timeout.
        task = await request.app[keys.WAITERS].wait(task_id, wait)
    if task is None:
        raise ApiError(404, "task_not_found", f"task {task_id} does not exist", {"task_id": str(task_id)})
    return json_response(task_schema.dump(task))


async def list_user_tasks(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    query = load_query(page_query_schema, request)
    pool = request.app[keys.POOL]
    tasks = await repository.list_user_tasks(pool, user_id, after=query["after"], limit=query.get("limit", 100))
    if not tasks and await repository.get_user(pool, user_id) is None:
        raise _user_not_found(user_id)
    return json_response(task_schema.dump(tasks, many=True))


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    checks = {
        "listener": request.app[keys.SUPERVISOR].ready,
        "database": await repository.ping(request.app[keys.POOL], timeout=1.0),
    }
    status = 200 if all(checks.values()) else 503
    return json_response({"status": "ready" if status == 200 else "unavailable", "checks": checks}, status=status)


def add_routes(app: web.Application) -> None:
    def both(path: str) -> list[str]:
        # Every path works with and without a trailing slash, as in the original API.
        return [path, path + "/"]

    # The hot route first: aiohttp tries a prefix's dynamic routes in the order they were added.
    for path in both("/api/v1/user/{user_id}/amount"):
        app.router.add_post(path, create_task)
    for path in both("/api/v1/user"):
        app.router.add_post(path, create_user)
        app.router.add_get(path, list_users)
    for path in both("/api/v1/user/{user_id}"):
        app.router.add_get(path, get_user)
    for path in both("/api/v1/user/{user_id}/tasks"):
        app.router.add_get(path, list_user_tasks)
    for path in both("/api/v1/task/{task_id}"):
        app.router.add_get(path, get_task)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
