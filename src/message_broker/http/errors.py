"""One error shape for every failure: {"error": {"code", "message", "details"}}.

The middleware turns every exception into that shape. Anything unexpected is logged with its
traceback and answered with a bare 500: no stack trace or SQL ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..db.errors import DatabaseUnavailable
from .responses import json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

# Codes for aiohttp's own HTTP exceptions (routing, body size, ...).
_CODES = MappingProxyType(
    {
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
)


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


def log_client_gone(request: web.BaseRequest) -> None:
    """The client hung up while its request was read or its answer sent: its choice, one debug
    line, not a 500 logged with a traceback."""
    log.debug("request method=%s path=%s client_gone=yes", request.method, request.path)


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    response = json_response({"error": {"code": code, "message": message, "details": details or {}}}, status, headers)
    response.error_code = code  # type: ignore[attr-defined]  # for the middleware's count
    return response


def not_found(what: str, object_id: int) -> ApiError:
    """404 `<what>_not_found` for a user, task or hold id that names nothing."""
    return ApiError(404, f"{what}_not_found", f"{what} {object_id} does not exist", {f"{what}_id": str(object_id)})


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


def error_middleware(on_error: Callable[[int, str], None] = lambda status, code: None) -> Middleware:
    """Every failure as the error shape; `on_error(status, code)` counts each (the metrics)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await _answer(request, handler)
        # Only error answers count (each one is built by error_response): /ready's 503 is a state.
        code = getattr(response, "error_code", None)
        if code is not None:
            on_error(response.status, code)
        return response

    return middleware


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    except DatabaseUnavailable as exc:
        # One line per 503 would flood the log in an outage: logs.RepeatSummarizer condenses them,
        # the metrics count each one.
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
