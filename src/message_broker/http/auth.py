"""Optional bearer-token authentication.

With API_TOKEN set, every request that can change state needs `Authorization: Bearer <token>`;
with API_TOKEN_PROTECT_READS, reads need it too. Webhook management (/api/v1/webhooks...) always
needs it, reads included: an endpoint's URL and deliveries are the operator's business.
/health and /ready always stay open, so load balancers and orchestrators can probe without the
secret, and so do the operator console's static pages (GET /console/...), whose API calls carry
the token, the API's description (the OpenAPI document and its docs page) and GET /, which says
where things are. The comparison is constant-time.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware

from .console import is_console_path
from .errors import Handler, error_response
from .openapi import is_docs_path

OPEN_PATHS = frozenset({"/health", "/ready", "/"})
READ_METHODS = frozenset({"GET", "HEAD"})
# Paths whose reads need the token even when reads are open.
ALWAYS_PROTECTED_PREFIX = "/api/v1/webhooks"
_REALM = 'Bearer realm="message_broker"'


def auth_middleware(token: str, *, protect_reads: bool) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The console's pages are static and public; the API calls they make carry the token.
        if request.path in OPEN_PATHS or (
            request.method in READ_METHODS
            and (not protect_reads or is_console_path(request.path) or is_docs_path(request.path))
            and not request.path.startswith(ALWAYS_PROTECTED_PREFIX)
        ):
            return await handler(request)
        presented = _bearer_token(request.headers.get("Authorization"))
        if presented is None:
            return error_response(
                401,
                "unauthorized",
                "this request needs an Authorization: Bearer <token> header",
                headers={"WWW-Authenticate": _REALM},
            )
        # Headers are decoded with surrogateescape: encode the same way, so any bytes compare.
        if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected):
            return error_response(
                401,
                "unauthorized",
                "the bearer token is not valid",
                headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        return await handler(request)

    return middleware


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()
