"""The API contract: GET /api/v1/openapi.json, an OpenAPI 3 document built (apispec with its
MarshmallowPlugin) from the very marshmallow schemas the handlers validate and dump with, and
GET /api/v1/docs, a Swagger UI page served from the swagger-ui-bundle package (no CDN)."""

from __future__ import annotations

import html
from typing import Any

from aiohttp import web
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import fields
from swagger_ui_bundle import swagger_ui_path

from .. import __version__
from ..ledger import MAX_AMOUNT
from .idempotency import HEADER as IDEMPOTENCY_HEADER
from .idempotency import MAX_KEY_LENGTH, REPLAYED_HEADER
from .schemas import (
    DigitString,
    ErrorSchema,
    HealthSchema,
    PageQuerySchema,
    ReadySchema,
    Seconds,
    TaskCreateSchema,
    TaskSchema,
    UserCreateSchema,
    UserSchema,
    WaitQuerySchema,
)
from .stats import StatsSchema

SPEC_PATH = "/api/v1/openapi.json"
DOCS_PATH = "/api/v1/docs"
_ASSETS_PATH = "/api/v1/docs/assets"

_ERRORS = {
    400: "The request is malformed: bad JSON, a field missing, unknown or out of range, a bad id, "
    "query parameter or header",
    404: "No such user, task or path",
    405: "Method not allowed (the Allow header lists the allowed ones)",
    409: "The username is taken",
    413: "The body is larger than the limit",
    415: "The body is not application/json in UTF-8",
    422: f"The {IDEMPOTENCY_HEADER} was already used for a different request (idempotency_key_reused)",
    503: "The database is unavailable; retry after Retry-After seconds",
}


def _field_extras(self: Any, field: fields.Field, **kwargs: Any) -> dict[str, Any]:
    """OpenAPI details of our own field types."""
    if isinstance(field, DigitString):
        if field.metadata.get("type") == "integer":  # a number in a query string
            return {"minimum": field.minimum, "maximum": field.maximum}
        return {"type": "string", "pattern": "^[0-9]+$"}
    if isinstance(field, Seconds):
        return {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": field.maximum}
    return {}


def _error(status: int, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or _ERRORS[status],
        "content": {"application/json": {"schema": "Error"}},
    }
    if status == 405:
        response["headers"] = {"Allow": {"description": "the allowed methods", "schema": {"type": "string"}}}
    if status == 503:
        response["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}
    return response


def _errors(*statuses: int) -> dict[int, dict[str, Any]]:
    return {status: _error(status) for status in (*statuses, 405, 503)}


def _json(schema: Any, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _id_parameter(name: str, what: str) -> dict[str, Any]:
    return {
        "in": "path",
        "name": name,
        "required": True,
        "description": f"the {what}'s id",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT},
    }


_HTML_PAGE = {"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
_LOCATION = {"Location": {"description": "where the new resource is", "schema": {"type": "string"}}}
_REPLAYED = {
    REPLAYED_HEADER: {
        "description": f"`true` when this is the stored answer to an earlier request with the same "
        f"{IDEMPOTENCY_HEADER}",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_IDEMPOTENCY_KEY = {
    "in": "header",
    "name": IDEMPOTENCY_HEADER,
    "required": False,
    "description": "Makes retries safe: the same key with the same request returns the first answer (same "
    "status and body) and creates nothing; with a different request, 422. Keys are kept for "
    "IDEMPOTENCY_RETENTION (default 24 h).",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[\\x20-\\x7e]+$"},
}
_LAST_EVENT_ID = {
    "in": "header",
    "name": "Last-Event-ID",
    "required": False,
    "description": "Resume after this event (a task id; 0 for the very start): the tasks that finished after it "
    "are replayed first.",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
_EVENT_STREAM = {
    "description": "A stream of server-sent events, one per finished task: `id` is the task id, `data` the "
    "task as JSON (the Task schema). Comment lines (`: ping`) are heartbeats.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _paths() -> dict[str, dict[str, Any]]:
    user_id = _id_parameter("user_id", "user")
    task_id = _id_parameter("task_id", "task")
    wait = {"in": "query", "schema": WaitQuerySchema}
    task_json = {"application/json": {"schema": "TaskCreate"}}
    return {
        "/api/v1/user/": {
            "post": {
                "summary": "Create a user",
                "tags": ["users"],
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": {"application/json": {"schema": "UserCreate"}}},
                "responses": {
                    201: _json("User", "The new user", {**_LOCATION, **_REPLAYED}),
                    **_errors(400, 409, 413, 415, 422),
                },
            },
            "get": {
                "summary": "List users, id ascending (all of them, or a page with limit/after)",
                "tags": ["users"],
                "parameters": [{"in": "query", "schema": PageQuerySchema}],
                "responses": {200: _json({"type": "array", "items": "User"}, "Users"), **_errors(400)},
            },
        },
        "/api/v1/user/{user_id}": {
            "get": {
                "summary": "Get a user",
                "tags": ["users"],
                "parameters": [user_id],
                "responses": {200: _json("User", "The user"), **_errors(400, 404)},
            },
        },
        "/api/v1/user/{user_id}/amount/": {
            "post": {
                "summary": "Ask for a balance change (a task); with ?wait, wait for its outcome",
                "tags": ["tasks"],
                "parameters": [user_id, wait, _IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": task_json},
                "responses": {
                    200: _json(
                        "Task", "With ?wait: the task finished (done or cancelled) in time", {**_LOCATION, **_REPLAYED}
                    ),
                    202: _json(
                        "Task",
                        "The task is stored and will be applied (with ?wait: still pending at the timeout)",
                        {**_LOCATION, **_REPLAYED},
                    ),
                    **_errors(400, 404, 413, 415, 422),
                },
            },
        },
        "/api/v1/user/{user_id}/tasks": {
            "get": {
                "summary": "A user's tasks, id ascending (100 unless limit says otherwise)",
                "tags": ["tasks"],
                "parameters": [user_id, {"in": "query", "schema": PageQuerySchema}],
                "responses": {200: _json({"type": "array", "items": "Task"}, "Tasks"), **_errors(400, 404)},
            },
        },
        "/api/v1/task/{task_id}": {
            "get": {
                "summary": "Get a task; with ?wait, once it is finished or the time is up (200 either way)",
                "tags": ["tasks"],
                "parameters": [task_id, wait],
                "responses": {200: _json("Task", "The task"), **_errors(400, 404)},
            },
        },
        "/api/v1/user/{user_id}/events": {
            "get": {
                "summary": "Server-sent events: this user's tasks as they finish",
                "tags": ["events"],
                "parameters": [user_id, _LAST_EVENT_ID],
                "responses": {200: _EVENT_STREAM, **_errors(400, 404)},
            },
        },
        "/api/v1/events": {
            "get": {
                "summary": "Server-sent events: every user's tasks as they finish",
                "tags": ["events"],
                "parameters": [_LAST_EVENT_ID],
                "responses": {200: _EVENT_STREAM, **_errors(400)},
            },
        },
        "/api/v1/stats": {
            "get": {
                "summary": "The service at a glance (this process's figures): tasks per second over the last 5 "
                "minutes, pending tasks, latency percentiles, active user loops, database and listener up",
                "tags": ["operations"],
                "responses": {200: _json("Stats", "The figures"), **_errors()},
            },
        },
        "/console/": {
            "get": {
                "summary": "The operator console (an HTML page; its API calls carry the token)",
                "tags": ["console"],
                "responses": {200: _HTML_PAGE, 405: _error(405)},
            },
        },
        "/console/user/{user_id}": {
            "get": {
                "summary": "The operator console's page of one user (an HTML page that reads the id from its URL)",
                "tags": ["console"],
                "parameters": [{"in": "path", "name": "user_id", "required": True, "schema": {"type": "string"}}],
                "responses": {200: _HTML_PAGE, 405: _error(405)},
            },
        },
        "/health": {
            "get": {
                "summary": "200 while the process runs",
                "tags": ["operations"],
                "responses": {200: _json("Health", "Alive"), 405: _error(405)},
            },
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "tags": ["operations"],
                "responses": {
                    200: {
                        "description": "Counters, gauges and histograms of the service",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    405: _error(405),
                },
            },
        },
        "/ready": {
            "get": {
                "summary": "200 while the pool and the LISTEN connection are up",
                "tags": ["operations"],
                "responses": {
                    200: _json("Ready", "Ready"),
                    503: _json("Ready", "Not ready: see checks"),
                    405: _error(405),
                },
            },
        },
        SPEC_PATH: {
            "get": {
                "summary": "This document",
                "tags": ["operations"],
                "responses": {
                    200: _json({"type": "object"}, "The OpenAPI document"),
                    405: _error(405),
                },
            },
        },
        DOCS_PATH: {
            "get": {
                "summary": "This document, browsable (Swagger UI)",
                "tags": ["operations"],
                "responses": {
                    200: {"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}},
                    405: _error(405),
                },
            },
        },
    }


def build_spec() -> dict[str, Any]:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="message_broker",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[plugin],
        info={
            "description": "User balances changed by tasks that PostgreSQL stores and per-user workers apply, "
            'exactly once and in order. Every error is `{"error": {"code", "message", "details"}}`.'
        },
    )
    assert plugin.converter is not None
    plugin.converter.add_attribute_function(_field_extras)
    for name, schema in (
        ("UserCreate", UserCreateSchema),
        ("User", UserSchema),
        ("TaskCreate", TaskCreateSchema),
        ("Task", TaskSchema),
        ("Error", ErrorSchema),
        ("Health", HealthSchema),
        ("Ready", ReadySchema),
        ("Stats", StatsSchema),
    ):
        spec.components.schema(name, schema=schema)
    for path, operations in _paths().items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[_SPEC])


_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title}</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{assets}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "{spec}", dom_id: "#swagger-ui", deepLinking: true}});
  </script>
</body>
</html>
"""


async def docs_page(request: web.Request) -> web.Response:
    page = _DOCS_PAGE.format(title=html.escape("message_broker API"), assets=_ASSETS_PATH, spec=SPEC_PATH)
    return web.Response(text=page, content_type="text/html")


_SPEC = web.AppKey("openapi_spec", dict)


def add_routes(app: web.Application) -> None:
    app[_SPEC] = build_spec()
    for path in (SPEC_PATH, SPEC_PATH + "/"):
        app.router.add_get(path, openapi_json)
    for path in (DOCS_PATH, DOCS_PATH + "/"):
        app.router.add_get(path, docs_page)
    app.router.add_static(_ASSETS_PATH, swagger_ui_path)
