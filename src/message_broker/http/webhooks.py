"""Webhook endpoints and their delivery log: register, change, rotate the secret, delete, read
the deliveries, retry one, replay a period. No SQL here (db/webhooks.py); the sender is
worker/webhooks.py. These routes need the API token whenever one is set, even when reads are open
(the admin scope, auth.py): an endpoint's URL and deliveries are the operator's business.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from marshmallow import Schema, fields, validate

from ..db import webhooks as store
from ..ledger import BIGINT_MAX
from ..scopes import Scope
from ..worker.webhooks import InvalidUrl, SenderSettings, UrlNotAllowed, check_url, secret_text
from . import keys
from .errors import ApiError, not_found
from .parsing import load, load_query, path_id, read_json_object
from .responses import json_response, paged_response
from .routes import Route
from .schemas import MAX_PAGE, DigitString, _Strict

SECRET_BYTES = 32
DESCRIPTION_MAX_CHARS = 1000


# -- schemas ---------------------------------------------------------------------------------------


def _events(**kwargs: Any) -> fields.List:
    return fields.List(
        fields.String(validate=validate.OneOf(store.EVENT_TYPES)),
        validate=validate.Length(min=1, max=len(store.EVENT_TYPES)),
        metadata={"description": "the event types to send: task.done, task.cancelled (default: all)"},
        **kwargs,
    )


_URL_DESCRIPTION = (
    "where to POST the events: http or https, at most 2,048 characters, with a host and without credentials; "
    "hosts that are or resolve to loopback, private, link-local, multicast, reserved or unspecified addresses "
    "are refused unless WEBHOOK_ALLOW_PRIVATE=true"
)


class WebhookCreateSchema(_Strict):
    url = fields.String(
        required=True, metadata={"description": _URL_DESCRIPTION, "example": "https://example.com/hook"}
    )
    events = _events(load_default=list(store.EVENT_TYPES))
    description = fields.String(load_default="", validate=validate.Length(max=DESCRIPTION_MAX_CHARS))


class WebhookUpdateSchema(_Strict):
    url = fields.String(metadata={"description": _URL_DESCRIPTION})
    events = _events()
    description = fields.String(validate=validate.Length(max=DESCRIPTION_MAX_CHARS))
    status = fields.String(validate=validate.OneOf(store.ENDPOINT_STATUSES))


class DeliveryCountsSchema(Schema):
    pending = fields.Integer(required=True)
    delivered = fields.Integer(required=True)
    failed = fields.Integer(required=True)


class WebhookSchema(Schema):
    id = DigitString(required=True, metadata={"example": "1"})
    url = fields.String(required=True)
    events = fields.List(fields.String(validate=validate.OneOf(store.EVENT_TYPES)), required=True)
    description = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": list(store.ENDPOINT_STATUSES)})
    disabled_reason = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "enum": ["manual", "gone", "failing", None],
            "description": "manual (PATCH), gone (the receiver answered 410) or failing (every attempt failed "
            "for WEBHOOK_DISABLE_AFTER); null while enabled",
        },
    )
    created_at = fields.DateTime(format="iso", required=True)
    updated_at = fields.DateTime(format="iso", required=True)
    deliveries = fields.Nested(
        DeliveryCountsSchema,
        required=True,
        metadata={"description": "deliveries kept, by status (in every answer carrying an endpoint)"},
    )


class WebhookWithSecretSchema(WebhookSchema):
    secret = fields.String(
        required=True,
        metadata={
            "description": "whsec_ + base64 of 32 random bytes: the key that signs the deliveries (Standard "
            "Webhooks). Shown only here.",
        },
    )


class NoFieldsSchema(_Strict):
    """A body with nothing in it (or none): what rotating a secret or retrying a delivery takes."""


class DeliveryListQuerySchema(_Strict):
    status = fields.String(validate=validate.OneOf(store.DELIVERY_STATUSES))
    limit = DigitString(
        minimum=1, maximum=MAX_PAGE, metadata={"type": "integer", "description": f"page size, 1..{MAX_PAGE}"}
    )
    before = DigitString(
        minimum=1,
        metadata={"type": "integer", "description": "the page after this one: deliveries with an id below this"},
    )


class AttemptSchema(Schema):
    attempt = fields.Integer(
        required=True, metadata={"description": "1, 2, ...: unique within the delivery, across retries and replays"}
    )
    attempted_at = fields.String(required=True, metadata={"format": "date-time"})
    duration_ms = fields.Float(required=True)
    http_status = fields.Integer(required=True, allow_none=True)
    error = fields.String(required=True, allow_none=True)


class DeliverySchema(Schema):
    id = DigitString(required=True)
    webhook_id = fields.String(
        required=True,
        metadata={
            "description": "the webhook-id header: the same on every attempt and replay of this event at this endpoint"
        },
    )
    task_id = DigitString(required=True)
    event_type = fields.String(required=True, metadata={"enum": list(store.EVENT_TYPES)})
    status = fields.String(required=True, metadata={"enum": list(store.DELIVERY_STATUSES)})
    attempt_count = fields.Integer(
        required=True,
        metadata={
            "description": "attempts made so far, over the delivery's whole life: retries and replays count on "
            "(the number of the latest attempt)"
        },
    )
    next_attempt_at = fields.DateTime(format="iso", required=True, allow_none=True)
    created_at = fields.DateTime(format="iso", required=True)
    finished_at = fields.DateTime(format="iso", required=True, allow_none=True)
    attempts = fields.List(fields.Nested(AttemptSchema), required=True)


class ReplaySchema(_Strict):
    since = fields.AwareDateTime(
        format="iso",
        required=True,
        metadata={
            "description": "RFC 3339 with a time zone, not in the future; an instant further back than "
            "WEBHOOK_RETENTION reads as the start of the retention"
        },
    )


class ReplayResultSchema(Schema):
    queued = fields.Integer(required=True, metadata={"description": "events queued again"})
    since = fields.DateTime(format="iso", required=True)


class RetryResultSchema(Schema):
    id = DigitString(required=True)
    status = fields.String(required=True, metadata={"enum": ["pending"]})


webhook_create_schema = WebhookCreateSchema()
webhook_update_schema = WebhookUpdateSchema()
webhook_schema = WebhookSchema()
webhook_with_secret_schema = WebhookWithSecretSchema()
delivery_list_query_schema = DeliveryListQuerySchema()
delivery_schema = DeliverySchema()
replay_schema = ReplaySchema()
no_fields_schema = NoFieldsSchema()


# -- handlers ----------------------------------------------------------------------------------------


async def _checked_url(request: web.Request, raw: str) -> str:
    try:
        await check_url(raw, allow_private=request.app[keys.SETTINGS].webhook_allow_private)
    except InvalidUrl as exc:
        raise ApiError(400, "invalid_webhook_url", str(exc), {"url": raw[:200]}) from None
    except UrlNotAllowed as exc:
        raise ApiError(
            400, "webhook_url_not_allowed", f"webhooks may not reach this host: {exc}", {"url": raw[:200]}
        ) from None
    return raw


def _dump(endpoint: store.Endpoint, secret: bytes | None = None) -> dict[str, Any]:
    data = {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": list(endpoint.events),
        "description": endpoint.description,
        "status": endpoint.status,
        "disabled_reason": endpoint.disabled_reason,
        "created_at": endpoint.created_at,
        "updated_at": endpoint.updated_at,
        "deliveries": dict(endpoint.deliveries),
    }
    if secret is None:
        return webhook_schema.dump(data)  # type: ignore[no-any-return]
    return webhook_with_secret_schema.dump({**data, "secret": secret_text(secret)})  # type: ignore[no-any-return]


async def create_webhook(request: web.Request) -> web.Response:
    data = load(webhook_create_schema, await read_json_object(request))
    url = await _checked_url(request, data["url"])
    secret = secrets.token_bytes(SECRET_BYTES)
    endpoint = await store.create_endpoint(
        request.app[keys.POOL], url, _unique(data["events"]), data["description"], secret
    )
    return json_response(_dump(endpoint, secret), status=201, headers={"Location": f"/api/v1/webhooks/{endpoint.id}"})


def _unique(events: list[str]) -> list[str]:
    return [event for event in store.EVENT_TYPES if event in events]


async def list_webhooks(request: web.Request) -> web.Response:
    return json_response([_dump(endpoint) for endpoint in await store.list_endpoints(request.app[keys.POOL])])


async def get_webhook(request: web.Request) -> web.Response:
    endpoint_id = path_id(request, "webhook_id")
    endpoint = await store.get_endpoint(request.app[keys.POOL], endpoint_id)
    if endpoint is None:
        raise not_found("webhook", endpoint_id)
    return json_response(_dump(endpoint))


async def update_webhook(request: web.Request) -> web.Response:
    endpoint_id = path_id(request, "webhook_id")
    data = load(webhook_update_schema, await read_json_object(request))
    if "url" in data:
        await _checked_url(request, data["url"])
    try:
        endpoint = await store.update_endpoint(
            request.app[keys.POOL],
            endpoint_id,
            url=data.get("url"),
            events=_unique(data["events"]) if "events" in data else None,
            description=data.get("description"),
            status=data.get("status"),
            lease=SenderSettings.from_settings(request.app[keys.SETTINGS]).lease,
        )
    except store.EndpointNotFound:
        raise not_found("webhook", endpoint_id) from None
    return json_response(_dump(endpoint))


async def delete_webhook(request: web.Request) -> web.Response:
    endpoint_id = path_id(request, "webhook_id")
    try:
        await store.delete_endpoint(request.app[keys.POOL], endpoint_id)
    except store.EndpointNotFound:
        raise not_found("webhook", endpoint_id) from None
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    endpoint_id = path_id(request, "webhook_id")
    load(no_fields_schema, await read_json_object(request, optional=True))
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        endpoint = await store.rotate_secret(request.app[keys.POOL], endpoint_id, secret)
    except store.EndpointNotFound:
        raise not_found("webhook", endpoint_id) from None
    return json_response(_dump(endpoint, secret))


async def list_deliveries(request: web.Request) -> web.Response:
    endpoint_id = path_id(request, "webhook_id")
    query = load_query(delivery_list_query_schema, request)
    pool = request.app[keys.POOL]
    limit = query.get("limit", 100)
    deliveries = await store.list_deliveries(
        pool, endpoint_id, before=query.get("before", BIGINT_MAX), limit=limit, status=query.get("status")
    )
    if not deliveries and await store.get_endpoint(pool, endpoint_id) is None:
        raise not_found("webhook", endpoint_id)
    return paged_response(
        request,
        delivery_schema.dump(
            [
                {
                    "id": d.id,
                    "webhook_id": d.webhook_id,
                    "task_id": d.task_id,
                    "event_type": d.event_type,
                    "status": d.status,
                    "attempt_count": d.attempts,
                    "next_attempt_at": d.next_attempt_at,
                    "created_at": d.created_at,
                    "finished_at": d.finished_at,
                    "attempts": d.attempt_log,
                }
                for d in deliveries
            ],
            many=True,
        ),
        limit,
        {"before": deliveries[-1].id} if deliveries else {},
    )


async def retry_delivery(request: web.Request) -> web.Response:
    endpoint_id = path_id(request, "webhook_id")
    delivery_id = path_id(request, "delivery_id")
    load(no_fields_schema, await read_json_object(request, optional=True))
    try:
        await store.retry_delivery(request.app[keys.POOL], endpoint_id, delivery_id)
    except store.DeliveryNotFound:
        if await store.get_endpoint(request.app[keys.POOL], endpoint_id) is None:
            raise not_found("webhook", endpoint_id) from None
        raise not_found("webhook_delivery", delivery_id) from None
    except store.DeliveryNotFailed as exc:
        raise ApiError(
            409,
            "webhook_delivery_not_failed",
            f"only a failed delivery can be retried; this one is {exc.status}",
            {"delivery_id": str(delivery_id), "status": exc.status},
        ) from None
    return json_response({"id": str(delivery_id), "status": "pending"}, status=202)


async def replay(request: web.Request) -> web.Response:
    endpoint_id = path_id(request, "webhook_id")
    data = load(replay_schema, await read_json_object(request))
    settings = request.app[keys.SETTINGS]
    now = datetime.now(UTC)
    if data["since"] > now:
        # Nothing finished after it yet: a mistake (a local time written as UTC), not 202 with 0.
        raise ApiError(
            400,
            "validation_failed",
            "the request body is not valid",
            {"fields": {"since": ["must not be in the future"]}, "now": now.isoformat()},
        )
    oldest = now - timedelta(seconds=settings.webhook_retention)
    since = max(data["since"], oldest)
    try:
        queued = await store.replay(request.app[keys.POOL], endpoint_id, since)
    except store.EndpointNotFound:
        raise not_found("webhook", endpoint_id) from None
    return json_response({"queued": queued, "since": since.isoformat()}, status=202)


# Every webhook route needs the admin scope, reads included: an endpoint's URL and its deliveries
# (the tasks in them) are the operator's business, and a token that may read balances may not
# send them elsewhere.
ADMIN = Scope.ADMIN
ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/webhooks", create_webhook, ADMIN),
    Route("GET", "/api/v1/webhooks", list_webhooks, ADMIN),
    Route("GET", "/api/v1/webhooks/{webhook_id}", get_webhook, ADMIN),
    Route("PATCH", "/api/v1/webhooks/{webhook_id}", update_webhook, ADMIN),
    Route("DELETE", "/api/v1/webhooks/{webhook_id}", delete_webhook, ADMIN),
    Route("POST", "/api/v1/webhooks/{webhook_id}/rotate-secret", rotate_secret, ADMIN),
    Route("GET", "/api/v1/webhooks/{webhook_id}/deliveries", list_deliveries, ADMIN, delivery_list_query_schema),
    Route("POST", "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry", retry_delivery, ADMIN),
    Route("POST", "/api/v1/webhooks/{webhook_id}/replay", replay, ADMIN),
)
