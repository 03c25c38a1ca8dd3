"""What aiohttp's HTTP protocol answers and logs by itself, before any middleware runs.

aiohttp answers a request its HTTP parser refuses (a bad chunk size, Content-Length with
Transfer-Encoding, a control byte in a header, an unknown method, a line past the hard limits, a
Content-Encoding it has no decoder for) with a plain-text 400 from RequestHandler.handle_error,
and logs each one at ERROR with a traceback: any client could flood the log. aiohttp has no hook
for that answer (aio-libs/aiohttp#3287), so the service's connections are ApiRequestHandlers,
which answer in the API's error shape and log one DEBUG line; the metrics count each refusal.
The runner `serve` uses (`app_runner`) makes them; the stand-in (starting.py) serves on ApiServer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from . import keys
from .errors import error_response
from .limits import unsupported_coding

log = logging.getLogger(__name__)

OnError = Callable[[int, str], None]


def _refusal(exc: HttpProcessingError) -> web.Response:
    """The answer to a request the parser refused."""
    if isinstance(exc, ContentEncodingError):  # raised with the head: br, zstd (their decoders are not installed)
        return unsupported_coding()
    if isinstance(exc, LineTooLong):  # past twice our limits (limits.py answers 414/431 below that)
        if _request_line(exc.args[0]):
            return error_response(414, "uri_too_long", f"the request line is longer than {exc.args[1]} bytes")
        return error_response(431, "headers_too_large", f"a header is longer than {exc.args[1]} bytes")
    if isinstance(exc, BadHttpMessage) and exc.message.startswith(_TOO_MANY_HEADERS):  # past twice MAX_HEADERS
        return error_response(431, "headers_too_large", "too many headers")
    return error_response(400, "invalid_body", f"the request cannot be read as HTTP: {_reason(exc)}")


# What both of aiohttp's parsers say past their max_headers (a BadHttpMessage, not a LineTooLong).
_TOO_MANY_HEADERS = "Too many headers received"
_REQUEST_LINE = re.compile(rb"/|[A-Za-z][A-Za-z0-9+.-]*://|[A-Z]+ ")


def _request_line(start: bytes | bytearray | str) -> bool:
    """The line the parser quotes is the request line (the C parser quotes its target, the Python
    one the whole line), not a header (the C parser quotes its value, the Python one the line)."""
    return isinstance(start, (bytes, bytearray)) and _REQUEST_LINE.match(start) is not None


def _reason(exc: HttpProcessingError) -> str:
    """The parser's reason without the bytes it quotes: "Invalid character in chunk size"."""
    reason = exc.message.splitlines()[0].rstrip(":")[:120] if exc.message else ""
    if isinstance(exc, TransferEncodingError):  # the Python parser names only the bad chunk line
        return f"broken chunked encoding ({reason})"
    return reason or type(exc).__name__


class _NotingParser:
    """aiohttp's HTTP parser, noting the body it fills. When the C parser (llhttp) refuses input in
    the middle of a body (a bad chunk after good ones), it drops that body without failing its
    reader, which would wait for REQUEST_BODY_TIMEOUT and answer 408 (the Python parser does fail
    it): failing it here makes the limits middleware answer 400 invalid_body at once."""

    __slots__ = ("_body", "_parser")

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self._body: Any = None

    def feed_data(self, data: bytes) -> Any:
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            body, self._body = self._body, None
            if body is not None and not body.is_eof() and body.exception() is None:
                body.set_exception(web.RequestPayloadError(_reason(exc)))
            raise
        if messages:
            self._body = messages[-1][1]  # the last one's body may still be arriving
        return messages, upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class ApiRequestHandler(RequestHandler):
    """aiohttp's connection protocol, answering what its parser refuses in the error shape."""

    __slots__ = ("_on_error",)

    def __init__(self, manager: web.Server, *, on_error: OnError | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._parser = _NotingParser(self._parser)
        self._on_error = on_error

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # ours to fix (a 500): aiohttp's log, with the traceback
            return super().handle_error(request, status, exc, message)
        response = _refusal(exc)
        code = response.error_code  # type: ignore[attr-defined]
        log.debug(
            "request refused peer=%s status=%d code=%s error=%r", request.remote, response.status, code, _reason(exc)
        )
        if self._on_error is not None:
            self._on_error(response.status, code)
        response.force_close()  # the parser cannot go on on this connection
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After an answer to a body that could not be read (400 invalid_body), aiohttp drains what
        # is left of it and meets the same error again: the client's, answered already.
        if isinstance(kw.get("exc_info"), (web.RequestPayloadError, HttpProcessingError)):
            log.debug("request body unreadable after the answer: %s", kw["exc_info"])
            return
        super().log_exception(*args, **kw)


async def _answering_expectations(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    on_error: OnError | None,
    request: web.BaseRequest,
) -> web.StreamResponse:
    """aiohttp answers an `Expect` other than 100-continue with a plain-text 417 raised before any
    middleware runs (every route's and the router's 404/405 expect handler): in the error shape here."""
    try:
        return await handler(request)
    except web.HTTPExpectationFailed:
        expect = request.headers.get("Expect", "")
        if on_error is not None:
            on_error(417, "expectation_failed")
        return error_response(
            417, "expectation_failed", "only Expect: 100-continue is supported", {"expect": expect[:100]}
        )


class ApiServer(web.Server):
    """aiohttp's low-level server (the sites' protocol factory), making ApiRequestHandlers."""

    def __init__(self, handler: Any, *, on_error: OnError | None = None, **kwargs: Any) -> None:
        super().__init__(partial(_answering_expectations, handler, on_error), **kwargs)
        self._on_error = on_error

    def __call__(self) -> RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, on_error=self._on_error, **self._kwargs)


class ApiRunner(web.AppRunner):
    """web.AppRunner whose server is an ApiServer (AppRunner builds a plain web.Server)."""

    def __init__(self, app: web.Application, *, on_error: OnError | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._on_error = on_error

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        try:
            return ApiServer(
                made.request_handler,
                request_factory=made.request_factory,
                handler_cancellation=made.handler_cancellation,
                loop=made._loop,
                on_error=self._on_error,
                **made._kwargs,
            )
        except (AttributeError, TypeError) as exc:  # another aiohttp's internals: serve as it would
            log.warning("plain aiohttp answers for unreadable HTTP (its internals differ: %r)", exc)
            return made


def app_runner(app: web.Application, *, shutdown_timeout: float) -> ApiRunner:
    """The runner `serve` serves the application with (and the tests that need what it does)."""
    return ApiRunner(
        app,
        on_error=app[keys.METRICS].observe_error,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
