"""The API contract: GET /api/v1/openapi.json, an OpenAPI 3 document built (apispec with its
MarshmallowPlugin) from the very marshmallow schemas the handlers validate and dump with, and
GET /api/v1/docs, a Swagger UI page served from the swagger-ui-bundle package (no CDN)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import fields
from swagger_ui_bundle import swagger_ui_path

from .. import __version__
from ..ledger import BIGINT_MAX
from ..scopes import Scope
from . import keys
from .idempotency import HEADER as IDEMPOTENCY_HEADER
from .idempotency import MAX_KEY_LENGTH, REPLAYED_HEADER
from .responses import json_response
from .routes import Route
from .routes import add_routes as add_route_table
from .schemas import (
    BalanceAtQuerySchema,
    BalanceAtSchema,
    CaptureSchema,
    DigitString,
    ErrorSchema,
    HealthSchema,
    HoldCreateSchema,
    HoldListQuerySchema,
    HoldSchema,
    ReadySchema,
    Seconds,
    StatementQuerySchema,
    StatementSchema,
    TaskCreateSchema,
    TaskListQuerySchema,
    TaskSchema,
    TransferCreateSchema,
    UserCreateSchema,
    UserListQuerySchema,
    UserSchema,
    VoidSchema,
    WaitQuerySchema,
)
from .stats import StatsSchema
from .tokens import WHOAMI_PATH, TokenCreatedSchema, TokenCreateSchema, TokenSchema, WhoamiSchema
from .webhooks import (
    DeliveryListQuerySchema,
    DeliverySchema,
    NoFieldsSchema,
    ReplayResultSchema,
    ReplaySchema,
    RetryResultSchema,
    WebhookCreateSchema,
    WebhookSchema,
    WebhookUpdateSchema,
    WebhookWithSecretSchema,
)

RouteKey = tuple[str, str]  # (method, path without a trailing slash)
SPEC_PATH = "/api/v1/openapi.json"
DOCS_PATH = "/api/v1/docs"
_ASSETS_PATH = "/api/v1/docs/assets"


# Everything below is built afresh by build_spec (apispec may add to what it is given).


def _error_descriptions() -> dict[int, str]:
    return {
        400: "The request is malformed: bad JSON, a field missing, unknown or out of range, a bad id, "
        "query parameter or header; for webhooks also invalid_webhook_url and webhook_url_not_allowed",
        404: "No such user, task, hold, webhook, webhook delivery or path (or, for a balance at an instant, the "
        "user did not exist yet: details.created_at)",
        405: "Method not allowed (the Allow header lists the allowed ones)",
        401: "No usable token: missing, unknown, revoked or expired (`unauthorized`; a token in the query "
        "string is never read). Only once the server asks for tokens: any token exists, or API_TOKEN is set",
        403: "The token's scopes do not grant the scope this operation needs (`insufficient_scope`; details.scope "
        "names it)",
        409: "The username is taken, or the token name (`token_name_taken`), or the user already has a task with "
        "this reference (`reference_taken`: details.task_id names it); or the webhook delivery to retry has "
        "not failed (`webhook_delivery_not_failed`)",
        410: "Last-Event-ID is older than EVENT_RETENTION: read the state through the API, then open a new "
        "stream without it (last_event_id_expired)",
        408: "The body did not arrive within REQUEST_BODY_TIMEOUT (request_timeout); the connection is closed",
        413: "The body is larger than the limit",
        414: "The request line is longer than MAX_REQUEST_LINE_BYTES (uri_too_long)",
        415: "The body is not application/json in UTF-8",
        422: f"The {IDEMPOTENCY_HEADER} was already used for a different request (idempotency_key_reused)",
        431: "A header is longer than MAX_HEADER_BYTES, or there are more than MAX_HEADERS (headers_too_large)",
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


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _error_descriptions()[status],
        "content": {"application/json": {"schema": "Error"}},
    }
    if status == 405:
        response["headers"] = {"Allow": {"description": "the allowed methods", "schema": {"type": "string"}}}
    if status == 503:
        response["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}
    if status in (401, 403):
        response["headers"] = {
            "WWW-Authenticate": {
                "description": 'the challenge (RFC 6750), e.g. `Bearer realm="message_broker", '
                'error="insufficient_scope", scope="write"`',
                "schema": {"type": "string"},
            }
        }
    return response


# Paths that never need the token (http/auth.py): probes, the console's pages, the API's description.
BEARER = "bearerAuth"


def _add_common_answers(paths: dict[str, dict[str, Any]]) -> None:
    """What any route may answer besides its own: a query parameter it does not know (400), the
    limits on the request line and headers (414, 431), the token (401, 403) where one may be
    needed, and a body's limits (408, 413)."""
    for operations in paths.values():
        for operation in operations.values():
            answers = operation["responses"]
            extra = [400, 414, 431]
            if operation["security"]:  # set by _with_scope: [] for the PUBLIC routes
                extra += [401, 403]
            if "requestBody" in operation:
                extra += [408, 413]
            for status in extra:
                answers.setdefault(status, _error(status))


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
        "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX},
    }


def _page(items: str, description: str) -> dict[str, Any]:
    """A page of a list: an array, and a Link to the next page when this one is full."""
    link = {
        "description": 'RFC 8288 `<url>; rel="next"`: the next page, when this one came back full (absent on the last)',
        "schema": {"type": "string"},
    }
    return _json({"type": "array", "items": items}, description, {"Link": link})


def _html_page() -> dict[str, Any]:
    return {"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}


def _created_headers() -> dict[str, Any]:
    return {
        "Location": {"description": "where the new resource is", "schema": {"type": "string"}},
        REPLAYED_HEADER: {
            "description": f"`true` when this is the stored answer to an earlier request with the same "
            f"{IDEMPOTENCY_HEADER}",
            "schema": {"type": "string", "enum": ["true"]},
        },
    }


def _idempotency_key() -> dict[str, Any]:
    return {
        "in": "header",
        "name": IDEMPOTENCY_HEADER,
        "required": False,
        "description": "Makes retries safe: the same key with the same request returns the first answer (same "
        "status and body) and creates nothing; with a different request, 422. Keys are kept for "
        "IDEMPOTENCY_RETENTION (default 24 h).",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[\\x20-\\x7e]+$"},
    }


def _last_event_id() -> dict[str, Any]:
    return {
        "in": "header",
        "name": "Last-Event-ID",
        "required": False,
        "description": "Resume after this event (a task id; 0 for as far back as positions are kept): the tasks "
        "that finished after it are replayed first. Older than EVENT_RETENTION (default 7 days): 410.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }


def _event_stream() -> dict[str, Any]:
    return {
        "description": "A stream of server-sent events, one per finished task: `id` is the task id, `data` the "
        "task as JSON (the Task schema). Comment lines (`: ping`) are heartbeats.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }


def _post_task(summary: str, parameters: list[Any], body: str | None, *, body_required: bool = True) -> dict[str, Any]:
    """A task-creating POST: every kind answers alike."""
    headers = _created_headers()
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": ["tasks"],
        "parameters": [*parameters, {"in": "query", "schema": WaitQuerySchema}, _idempotency_key()],
        "responses": {
            200: _json("Task", "With ?wait: the task finished (done or cancelled) in time", headers),
            202: _json(
                "Task", "The task is stored and will be applied (with ?wait: still pending at the timeout)", headers
            ),
            **_errors(400, 404, 409, 413, 415, 422),
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    return {"post": operation}


def _webhook_paths() -> dict[str, dict[str, Any]]:
    webhook_id = _id_parameter("webhook_id", "webhook endpoint")
    delivery_id = _id_parameter("delivery_id", "delivery")
    tags = ["webhooks"]

    def body(schema: str, *, required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": schema}}}

    return {
        "/api/v1/webhooks/": {
            "post": {
                "summary": "Register an endpoint: every finished task of its event types is POSTed to it, signed "
                "(Standard Webhooks); the answer carries the signing secret, shown only here",
                "tags": tags,
                "requestBody": body("WebhookCreate"),
                "responses": {
                    201: _json("WebhookWithSecret", "The endpoint and its secret", {"Location": _location()}),
                    **_errors(400, 401, 413, 415),
                },
            },
            "get": {
                "summary": "Every endpoint, with its deliveries counted by status",
                "tags": tags,
                "responses": {200: _json({"type": "array", "items": "Webhook"}, "Endpoints"), **_errors(400, 401)},
            },
        },
        "/api/v1/webhooks/{webhook_id}": {
            "get": {
                "summary": "An endpoint (without its secret)",
                "tags": tags,
                "parameters": [webhook_id],
                "responses": {200: _json("Webhook", "The endpoint"), **_errors(400, 401, 404)},
            },
            "patch": {
                "summary": "Change an endpoint's url, events, description or status (enabled, disabled)",
                "tags": tags,
                "parameters": [webhook_id],
                "requestBody": body("WebhookUpdate"),
                "responses": {200: _json("Webhook", "The endpoint"), **_errors(400, 401, 404, 413, 415)},
            },
            "delete": {
                "summary": "Delete an endpoint; its pending deliveries are dropped",
                "tags": tags,
                "parameters": [webhook_id],
                "responses": {204: {"description": "Deleted"}, **_errors(400, 401, 404)},
            },
        },
        "/api/v1/webhooks/{webhook_id}/rotate-secret": {
            "post": {
                "summary": "A new signing secret; for 24 hours every delivery carries both signatures",
                "tags": tags,
                "parameters": [webhook_id],
                "requestBody": body("NoFields", required=False),
                "responses": {
                    200: _json("WebhookWithSecret", "The endpoint and its new secret"),
                    **_errors(400, 401, 404, 413, 415),
                },
            },
        },
        "/api/v1/webhooks/{webhook_id}/deliveries/": {
            "get": {
                "summary": "The endpoint's deliveries, newest first (keyset paging with before=), each with its "
                "attempts",
                "tags": tags,
                "parameters": [webhook_id, {"in": "query", "schema": DeliveryListQuerySchema}],
                "responses": {200: _page("Delivery", "Deliveries"), **_errors(400, 401, 404)},
            },
        },
        "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry": {
            "post": {
                "summary": "Send a failed delivery again now: one attempt, numbered after its others",
                "tags": tags,
                "parameters": [webhook_id, delivery_id],
                "requestBody": body("NoFields", required=False),
                "responses": {
                    202: _json("RetryResult", "Due now"),
                    **_errors(400, 401, 404, 409, 413, 415),
                },
            },
        },
        "/api/v1/webhooks/{webhook_id}/replay": {
            "post": {
                "summary": "Queue again every event of the endpoint's types finished since an instant (within "
                "WEBHOOK_RETENTION), with their original webhook-ids; each starts the retry schedule again, its "
                "attempts counting on",
                "tags": tags,
                "parameters": [webhook_id],
                "requestBody": body("Replay"),
                "responses": {
                    202: _json("ReplayResult", "Queued"),
                    **_errors(400, 401, 404, 413, 415),
                },
            },
        },
    }


def _location() -> dict[str, Any]:
    return {"description": "where the new resource is", "schema": {"type": "string"}}


def _paths() -> dict[str, dict[str, Any]]:
    user_id = _id_parameter("user_id", "user")
    task_id = _id_parameter("task_id", "task")
    hold_id = _id_parameter("hold_id", "hold (its hold task)")
    wait = {"in": "query", "schema": WaitQuerySchema}
    return {
        "/api/v1/user/": {
            "post": {
                "summary": "Create a user",
                "tags": ["users"],
                "parameters": [_idempotency_key()],
                "requestBody": {"required": True, "content": {"application/json": {"schema": "UserCreate"}}},
                "responses": {
                    201: _json("User", "The new user", _created_headers()),
                    **_errors(400, 409, 413, 415, 422),
                },
            },
            "get": {
                "summary": "List users: id ascending (all of them, or a page with limit/after), those whose "
                "username starts with username_prefix, in username order, or the one with exactly `username`",
                "tags": ["users"],
                "parameters": [{"in": "query", "schema": UserListQuerySchema}],
                "responses": {200: _page("User", "Users"), **_errors(400)},
            },
        },
        "/api/v1/user/{user_id}": {
            "get": {
                "summary": "Get a user: balance, held (active holds) and available (balance - held)",
                "tags": ["users"],
                "parameters": [user_id],
                "responses": {200: _json("User", "The user"), **_errors(400, 404)},
            },
        },
        "/api/v1/user/{user_id}/amount/": _post_task(
            "Ask for a balance change: replenishment or write-off (a task); with ?wait, wait for its outcome",
            [user_id],
            "TaskCreate",
        ),
        "/api/v1/user/{user_id}/transfer/": _post_task(
            "Move money to another user (a task in the sender's queue); the recipient gets a transfer-in entry "
            "in the same transaction",
            [user_id],
            "TransferCreate",
        ),
        "/api/v1/user/{user_id}/holds/": {
            **_post_task(
                "Reserve an amount (a hold task): available falls now; capture, void or the deadline ends it",
                [user_id],
                "HoldCreate",
            ),
            "get": {
                "summary": "A user's holds, id ascending",
                "tags": ["holds"],
                "parameters": [user_id, {"in": "query", "schema": HoldListQuerySchema}],
                "responses": {200: _page("Hold", "Holds"), **_errors(400, 404)},
            },
        },
        "/api/v1/user/{user_id}/tasks": {
            "get": {
                "summary": "A user's tasks: id ascending (after=), or newest first (order=desc, before=); 100 "
                "unless limit says otherwise; only some types or states with type= and status= (repeatable); "
                "with reference=, the one task with that reference (or none)",
                "tags": ["tasks"],
                "parameters": [user_id, {"in": "query", "schema": TaskListQuerySchema}],
                "responses": {200: _page("Task", "Tasks"), **_errors(400, 404)},
            },
        },
        "/api/v1/user/{user_id}/balance": {
            "get": {
                "summary": "The user's balance, held and available at an instant: after every task it had finished "
                "by then, in the order applied (one index probe, however long the history)",
                "tags": ["statements"],
                "parameters": [user_id, {"in": "query", "schema": BalanceAtQuerySchema}],
                "responses": {
                    200: _json("BalanceAt", "The state at `at`"),
                    **_errors(400, 404),
                },
            },
        },
        "/api/v1/user/{user_id}/statement": {
            "get": {
                "summary": "A statement of [from, to): opening and closing state, totals, and every task finished "
                "in the window in the order applied; as CSV with Accept: text/csv or format=csv. Streamed.",
                "tags": ["statements"],
                "parameters": [user_id, {"in": "query", "schema": StatementQuerySchema}],
                "responses": {
                    200: {
                        "description": "The statement (JSON), or a CSV file: a header row, an opening row, one row "
                        "per entry, a closing row; text cells a spreadsheet would run as a formula start with '",
                        "content": {
                            "application/json": {"schema": "Statement"},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                        "headers": {
                            "Content-Disposition": {
                                "description": 'CSV only: attachment; filename="user-<id>-<from>-<to>.csv"',
                                "schema": {"type": "string"},
                            }
                        },
                    },
                    **_errors(400, 404),
                },
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
        "/api/v1/hold/{hold_id}": {
            "get": {
                "summary": "Get a hold",
                "tags": ["holds"],
                "parameters": [hold_id],
                "responses": {200: _json("Hold", "The hold"), **_errors(400, 404)},
            },
        },
        "/api/v1/hold/{hold_id}/capture/": _post_task(
            "Charge a hold (a capture task, queued for the hold's user): the balance falls by the amount (all of "
            "the hold without one) and the whole hold is released",
            [hold_id],
            "Capture",
            body_required=False,
        ),
        "/api/v1/hold/{hold_id}/void/": _post_task(
            "Release a hold without charging it (a void task)", [hold_id], "Void", body_required=False
        ),
        "/api/v1/user/{user_id}/events": {
            "get": {
                "summary": "Server-sent events: this user's tasks as they finish",
                "tags": ["events"],
                "parameters": [user_id, _last_event_id()],
                "responses": {200: _event_stream(), **_errors(400, 404, 410)},
            },
        },
        "/api/v1/events": {
            "get": {
                "summary": "Server-sent events: every user's tasks as they finish",
                "tags": ["events"],
                "parameters": [_last_event_id()],
                "responses": {200: _event_stream(), **_errors(400, 410)},
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
        "/api/v1/tokens/": {
            "post": {
                "summary": "Create a named token with scopes; its secret is in this answer only",
                "tags": ["tokens"],
                "requestBody": {"required": True, "content": {"application/json": {"schema": "TokenCreate"}}},
                "responses": {
                    201: _json(
                        "TokenCreated",
                        "The new token and its secret",
                        {"Location": {"description": "the token's URL", "schema": {"type": "string"}}},
                    ),
                    **_errors(400, 409, 413, 415),
                },
            },
            "get": {
                "summary": "Every token, revoked and expired ones included (never their secrets)",
                "tags": ["tokens"],
                "responses": {200: _json({"type": "array", "items": "Token"}, "Tokens"), **_errors()},
            },
        },
        "/api/v1/tokens/{token_id}": {
            "delete": {
                "summary": "Revoke a token: every process refuses it within a second (again: no change)",
                "tags": ["tokens"],
                "parameters": [_id_parameter("token_id", "token")],
                "responses": {200: _json("Token", "The token, revoked"), **_errors(400, 404)},
            },
        },
        "/api/v1/whoami": {
            "get": {
                "summary": "Which token this request carries and what it may do (the console asks this); open, "
                "but a token that does not work is 401",
                "tags": ["tokens"],
                "responses": {200: _json("Whoami", "The token and what it allows"), **_errors()},
            },
        },
        "/console/": {
            "get": {
                "summary": "The operator console (an HTML page; its API calls carry the token)",
                "tags": ["console"],
                "responses": {200: _html_page(), 405: _error(405)},
            },
        },
        "/console/user/{user_id}": {
            "get": {
                "summary": "The operator console's page of one user (an HTML page that reads the id from its URL)",
                "tags": ["console"],
                "parameters": [{"in": "path", "name": "user_id", "required": True, "schema": {"type": "string"}}],
                "responses": {200: _html_page(), 405: _error(405)},
            },
        },
        "/console/webhooks": {
            "get": {
                "summary": "The operator console's webhooks page: endpoints, deliveries by status, the latest "
                "failures with a retry button (an HTML page; its API calls carry the token)",
                "tags": ["console"],
                "responses": {200: _html_page(), 405: _error(405)},
            },
        },
        "/": {
            "get": {
                "summary": "Where things are: the API, the console, the docs; a browser (Accept: text/html) is "
                "sent to the console",
                "tags": ["operations"],
                "responses": {
                    200: _json(
                        {"type": "object", "additionalProperties": {"type": "string"}},
                        "Paths of the users list, console, docs, OpenAPI document, probes and metrics",
                    ),
                    302: {
                        "description": "To the console, for a browser",
                        "headers": {"Location": {"description": "/console/", "schema": {"type": "string"}}},
                    },
                    405: _error(405),
                },
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
                "summary": "200 while the pool, the LISTEN connection and every background loop are up",
                "tags": ["operations"],
                "responses": {
                    200: _json("Ready", "Ready"),
                    503: _json("Ready", "Not ready: see checks and down"),
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
                    200: _html_page(),
                    405: _error(405),
                },
            },
        },
    }


def build_spec(scopes: Mapping[RouteKey, Scope]) -> dict[str, Any]:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="message_broker",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[plugin],
        security=[{BEARER: []}],
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
        ("TransferCreate", TransferCreateSchema),
        ("HoldCreate", HoldCreateSchema),
        ("Capture", CaptureSchema),
        ("Void", VoidSchema),
        ("NoFields", NoFieldsSchema),
        ("Task", TaskSchema),
        ("Hold", HoldSchema),
        ("Error", ErrorSchema),
        ("Health", HealthSchema),
        ("Ready", ReadySchema),
        ("Stats", StatsSchema),
        ("TokenCreate", TokenCreateSchema),
        ("Token", TokenSchema),
        ("TokenCreated", TokenCreatedSchema),
        ("Whoami", WhoamiSchema),
        ("BalanceAt", BalanceAtSchema),
        ("Statement", StatementSchema),
        ("WebhookCreate", WebhookCreateSchema),
        ("WebhookUpdate", WebhookUpdateSchema),
        ("Webhook", WebhookSchema),
        ("WebhookWithSecret", WebhookWithSecretSchema),
        ("Delivery", DeliverySchema),
        ("Replay", ReplaySchema),
        ("ReplayResult", ReplayResultSchema),
        ("RetryResult", RetryResultSchema),
    ):
        spec.components.schema(name, schema=schema)
    spec.components.security_scheme(
        BEARER,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "A named API token (`message-broker token create`, or POST /api/v1/tokens/), or the "
            "API_TOKEN bootstrap token (every scope). Needed once any token exists or API_TOKEN is set; each "
            "operation names the scope it needs in `x-required-scope`: read, write (includes read) or admin "
            "(includes both); reads are open unless API_TOKEN_PROTECT_READS=true.",
        },
    )
    paths = {
        path: {method: _with_scope(method, path, operation, scopes) for method, operation in operations.items()}
        for path, operations in {**_paths(), **_webhook_paths()}.items()
    }
    _add_common_answers(paths)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def _with_scope(method: str, path: str, operation: dict[str, Any], scopes: Mapping[RouteKey, Scope]) -> dict[str, Any]:
    """The operation with the scope its route declares (KeyError: a route that declares none)."""
    scope = scopes[(method.upper(), path.rstrip("/"))]
    operation["x-required-scope"] = scope.value
    if scope is Scope.PUBLIC:
        operation["security"] = []
        if path == WHOAMI_PATH:
            operation["responses"][401] = _error(401)
        return operation
    operation["security"] = [{BEARER: []}]
    needs = f"Needs a token with the `{scope}` scope (see the bearer scheme)."
    operation["description"] = f"{operation['description']}\n\n{needs}" if "description" in operation else needs
    operation["responses"].update({401: _error(401), 403: _error(403)})
    return operation


def route_scopes(app: web.Application) -> dict[RouteKey, Scope]:
    """Each route's scope by (method, path without its trailing slash), as the document names them."""
    return {
        (method, resource.canonical.rstrip("/")): scope for (resource, method), scope in app[keys.ROUTE_SCOPES].items()
    }


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request.app[_SPEC])


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
# The files of swagger_ui_bundle's folder, by name (megabytes: sent from the disk, not kept).
_ASSET_NAMES = web.AppKey("swagger_ui_assets", frozenset)


async def docs_asset(request: web.Request) -> web.StreamResponse:
    # aiohttp's static route answered a missing file with an empty application/octet-stream 404,
    # set while sending: the error middleware never saw it.
    name = request.match_info["name"]
    if name not in request.app[_ASSET_NAMES]:
        raise web.HTTPNotFound()
    return web.FileResponse(Path(swagger_ui_path) / name)


def add_routes(app: web.Application) -> None:
    # The API's description (the document, its page and the page's files) is public, like the
    # console's static files: it holds no data.
    app[_ASSET_NAMES] = frozenset(entry.name for entry in Path(swagger_ui_path).iterdir() if entry.is_file())
    add_route_table(
        app,
        (
            Route("GET", SPEC_PATH, openapi_json, Scope.PUBLIC),
            Route("GET", DOCS_PATH, docs_page, Scope.PUBLIC),
            Route("GET", _ASSETS_PATH + "/{name}", docs_asset, Scope.PUBLIC),
        ),
    )
    app[_SPEC] = build_spec(route_scopes(app))  # last: every route is in the table
