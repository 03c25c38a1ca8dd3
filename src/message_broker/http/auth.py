"""Bearer tokens and scopes.

Every route declares the scope it needs (http/routes.py). Once any token exists in the database
(revoked ones count: revoking the last token does not open the service), or API_TOKEN is set,
every request but the PUBLIC routes (/health, /ready, GET /, the console's static files, the
OpenAPI document and its docs page) needs `Authorization: Bearer <token>` whose scopes grant the
route's; with API_TOKEN_PROTECT_READS=false (the default) READ routes stay open. Requests no
route matches (404, 405) need a token unless they are reads and reads are open.

The check is a lookup in the process's in-memory table (db/tokens.py: why it is constant-time in
the token's bytes), never a query. Answers: 401 `unauthorized` for a missing, unknown, revoked or
expired token (a token in the query string is never read), 403 `insufficient_scope` naming the
scope needed, both with a WWW-Authenticate challenge (RFC 6750).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..db.tokens import Credential, TokenTable
from ..scopes import Scope
from . import keys
from .errors import ApiError, Handler
from .routes import scope_of

READ_METHODS = frozenset({"GET", "HEAD"})
REALM = 'Bearer realm="message_broker"'
# The token a request was let in with (absent when none was needed).
CREDENTIAL = web.RequestKey("credential", Credential)
# Query parameters some clients put tokens in: answered with a pointer to the header.
_URL_TOKEN_PARAMETERS = ("access_token", "token", "api_token")


class InvalidToken(ApiError):
    """401: the token presented is not one this process knows as usable."""


def auth_middleware(*, protect_reads: bool) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            credential = admit(request, protect_reads)
        except InvalidToken:
            table = request.app[keys.TOKENS]
            if not table.reload_coming():
                raise
            # A token created a moment ago through another process, heard of and not loaded yet:
            # the reload decides. A wrong token waits only for a reload that was coming anyway.
            await table.settled()
            credential = admit(request, protect_reads)
        if credential is not None:
            request[CREDENTIAL] = credential
        return await handler(request)

    return middleware


def admit(request: web.Request, protect_reads: bool) -> Credential | None:
    """The token the request is let in with (None: it needs none), or ApiError 401/403."""
    scope = scope_of(request.app, request)
    if scope is Scope.PUBLIC:
        return None
    table = request.app[keys.TOKENS]
    if not table.required:
        return None
    reading = scope is Scope.READ or (scope is None and request.method in READ_METHODS)
    if reading and not protect_reads:
        return None
    credential = authenticate(request, table)
    if scope is not None and scope not in credential.grants:
        raise ApiError(
            403,
            "insufficient_scope",
            f"this request needs a token with the {scope} scope; token {credential.name!r} has "
            f"{', '.join(credential.scopes)}",
            {"scope": scope.value, "token": credential.name, "token_scopes": [s.value for s in credential.scopes]},
            headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'},
        )
    return credential


def still_admitted(request: web.Request) -> bool:
    """Whether the request would still be let in, as the tables stand now: a long-lived one (an
    event stream) ends when the token it opened with is revoked or expires, or when the first
    token created turns authentication on."""
    try:
        admit(request, request.app[keys.SETTINGS].api_token_protect_reads)
    except ApiError:
        return False
    return True


def authenticate(request: web.Request, table: TokenTable) -> Credential:
    """The usable token the request presents, or ApiError 401."""
    sent = request.headers.getall("Authorization", [])
    if len(sent) > 1:
        # One proxy reads the first, another the last: never guess which identity was meant.
        raise ApiError(
            401,
            "unauthorized",
            f"send one Authorization header, not {len(sent)}",
            headers={"WWW-Authenticate": f'{REALM}, error="invalid_request"'},
        )
    presented = bearer_token(sent[0] if sent else None)
    if presented is None:
        if request.query_string and any(name in request.query for name in _URL_TOKEN_PARAMETERS):
            message = "a token in the URL is not accepted (URLs end up in logs): send Authorization: Bearer <token>"
        else:
            message = "this request needs an Authorization: Bearer <token> header"
        raise ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": REALM})
    # Headers are decoded with surrogateescape: encode the same way, so any bytes hash.
    credential = table.lookup(presented.encode("utf-8", "surrogateescape"))
    if credential is None:
        raise InvalidToken(
            401,
            "unauthorized",
            "the bearer token is not valid (unknown, revoked or expired)",
            headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
        )
    return credential


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def created_by(request: web.Request) -> str | None:
    """The name of the token that posted this request's task (None: no token was needed)."""
    credential = request.get(CREDENTIAL)
    return None if credential is None else credential.name
