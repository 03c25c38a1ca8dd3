"""Limits on what one request may cost: the request line, the headers, and how long its body
may take to arrive.

aiohttp's own parser enforces hard limits (twice ours, set in create_app) and answers past them
with a bare 400 before any middleware runs. Between our limits and those this middleware answers
in the API's JSON error shape: 414 for a long request line, 431 for a long header or too many,
408 (closing the connection) for a body that trickles in slower than REQUEST_BODY_TIMEOUT, and
400 for a body that cannot be decoded or whose client hung up before sending all of it, and 415
for a Content-Encoding other than gzip, deflate or identity.
The body is read here, once; handlers get it from aiohttp's cache.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware

from ..config import Settings
from .errors import Handler, error_response, log_client_gone

# The content codings aiohttp decodes without extra packages (Brotli, zstd are not installed).
# Any other it would read as uncompressed ("foo", "x-gzip": invalid_json, misleadingly).
CONTENT_CODINGS = ("gzip", "deflate")
_ACCEPTED_CODINGS = frozenset({*CONTENT_CODINGS, "identity"})


def unsupported_coding(content_encoding: str | None = None) -> web.Response:
    """415 for a Content-Encoding we do not decode, naming those we do (RFC 9110 15.5.16)."""
    named = f" {content_encoding[:64]!r}" if content_encoding is not None else ""
    return error_response(
        415,
        "unsupported_media_type",
        f"Content-Encoding{named} is not supported; send the body as is or with {' or '.join(CONTENT_CODINGS)}",
        {"supported": [*CONTENT_CODINGS, "identity"]},
        {"Accept-Encoding": ", ".join(CONTENT_CODINGS)},
    )


def parser_limits(settings: Settings) -> dict[str, Any]:
    """handler_args for aiohttp: the hard limits, and the idle/slow-client connection timeout."""
    return {
        "max_line_size": 2 * settings.max_request_line_bytes,
        "max_field_size": 2 * settings.max_header_bytes,
        "max_headers": 2 * settings.max_headers,
        "keepalive_timeout": settings.keepalive_timeout,
        # After an answer sent before the whole body arrived (408, 413), aiohttp drains what is
        # left of it for this long before it hangs up (default 10 s): a slow-drip client would
        # keep the connection for that long.
        "lingering_time": 2.0,
    }


def limits_middleware(settings: Settings) -> Middleware:
    max_line = settings.max_request_line_bytes
    max_header = settings.max_header_bytes
    max_headers = settings.max_headers
    body_timeout = settings.request_body_timeout
    max_body = settings.max_body_bytes

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.version.major != 1:
            # aiohttp's parser refuses "HTTP/9.9" but takes "HTTP/2.0" (and a line with no version,
            # HTTP/0.9) and would serve it as HTTP/1.x: refused the same way, changing nothing.
            response = error_response(
                400,
                "invalid_body",
                f"the request cannot be read as HTTP: HTTP/{request.version.major}.{request.version.minor} "
                "is not supported (HTTP/1.1 or HTTP/1.0)",
            )
            response.force_close()
            return response
        # "METHOD /path?query HTTP/1.1"
        if len(request.method) + len(request.raw_path) + 10 > max_line:
            return error_response(
                414, "uri_too_long", f"the request line is longer than {max_line} bytes", {"limit": max_line}
            )
        if len(request.raw_headers) > max_headers:
            return error_response(431, "headers_too_large", f"more than {max_headers} headers", {"limit": max_headers})
        for name, value in request.raw_headers:
            if len(name) + len(value) + 2 > max_header:
                return error_response(
                    431,
                    "headers_too_large",
                    f"a header is longer than {max_header} bytes",
                    {"header": name[:64].decode("latin-1"), "limit": max_header},
                )
        coding = request.headers.get(hdrs.CONTENT_ENCODING)
        if coding is not None and coding.lower() not in _ACCEPTED_CODINGS:
            return unsupported_coding(coding)
        declared = request.content_length
        if declared is not None and declared > max_body and (coding is None or coding.lower() == "identity"):
            # A body announced past the limit is refused at once (a compressed one counts once
            # decoded, below), not awaited for up to REQUEST_BODY_TIMEOUT and answered 408.
            # aiohttp then drains what arrives of it for its lingering time before it hangs up.
            return error_response(413, "payload_too_large", "request body is too large", {"limit": max_body})
        if request.body_exists:
            try:
                if request.content.is_eof():
                    # All of a small body usually arrives with the headers: nothing to wait for,
                    # so no timer to set up (this runs once per request).
                    await request.read()  # 413 past client_max_size; cached for the handler
                else:
                    async with asyncio.timeout(body_timeout):
                        await request.read()
            except TimeoutError:
                response = error_response(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {body_timeout:g} s",
                    {"limit_seconds": body_timeout},
                )
                response.force_close()  # the rest of the body may still be on its way
                return response
            except ConnectionError:
                # The client hung up before its whole body arrived (aiohttp fails the read with
                # ConnectionResetError): its fault, not a 500 with a traceback. The answer goes
                # nowhere; 400 is what the metrics count.
                log_client_gone(request)
                return error_response(400, "invalid_body", "the connection closed before the whole body arrived")
            except (web.RequestPayloadError, HttpProcessingError) as exc:
                # A body aiohttp cannot decode (bad gzip/deflate, broken chunked encoding; its Python
                # parser fails a bad chunk with its own TransferEncodingError): the client's fault,
                # not a 500. The last line of aiohttp's message: "Can not decode content-encoding: gzip".
                reason = str(exc.args[0] if exc.args else exc).strip().splitlines()[-1].strip()
                response = error_response(400, "invalid_body", f"the request body cannot be read: {reason}")
                response.force_close()
                return response
        return await handler(request)

    return middleware
