"""One error shape for every failure: {"error": {"code", "message", "details"}}.

The middleware turns every exception into that shape. Anything unexpected is logged with its
traceback and answered with a bare 500: no stack trace or SQL ever reaches a client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from ..db.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Codes for aiohttp's own HTTP exceptions (routing, body size, ...).
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    431: "headers_too_large",
    503: "database_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return web.Response(
        status=status,
        text=json.dumps(body, ensure_ascii=False),
        content_type="application/json",
        headers=headers,
    )


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    headers = {}
    details: dict[str, Any] = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        headers["Allow"] = ", ".join(allowed)
        details["allowed_methods"] = allowed
    message = exc.reason or HTTPStatus(exc.status).phrase
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        message = "request body is too large"
    return error_response(exc.status, _CODES.get(exc.status, "http_error"), message, details, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    except DatabaseUnavailable as exc:
        log.warning("request method=%s path=%s status=503 error=%r", request.method, request.path, str(exc))
        return error_response(
            503, "database_unavailable", "the database is unavailable; retry shortly", headers={"Retry-After": "1"}
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc)
    except Exception:
        log.exception("request method=%s path=%s status=500", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")
