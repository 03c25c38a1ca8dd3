"""Token management over HTTP (the `admin` scope): POST/GET /api/v1/tokens/, DELETE
/api/v1/tokens/<id>; and GET /api/v1/whoami, which tells a client (the console) which token it
holds and what that token may do. The CLI (`message-broker token ...`) does the same through
db/tokens.py directly."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError, fields, validate

from ..db import tokens
from ..db.errors import DatabaseError
from ..db.tokens import ApiToken, TokenNameTaken
from ..logs import AUDIT
from ..scopes import EVERY_SCOPE, TOKEN_SCOPES, Scope, parse_scopes
from . import keys
from .auth import authenticate, created_by
from .errors import ApiError, not_found
from .parsing import load, path_id, read_json_object
from .responses import json_response
from .routes import Route

log = logging.getLogger(__name__)

PATH = "/api/v1/tokens"
WHOAMI_PATH = "/api/v1/whoami"


def _check_name(value: str) -> None:
    try:
        tokens.check_name(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


_SCOPE_ENUM = {"type": "string", "enum": [s.value for s in TOKEN_SCOPES]}


class TokenCreateSchema(Schema):
    class Meta:
        unknown = "raise"

    name = fields.String(
        required=True,
        validate=_check_name,
        metadata={
            "description": "unique, 1 to 64 printable characters, not blank; `API_TOKEN` and `service` are the "
            "service's own",
            "example": "shop-backend",
        },
    )
    scopes = fields.List(
        fields.String(validate=validate.OneOf([s.value for s in TOKEN_SCOPES]), metadata=_SCOPE_ENUM),
        required=True,
        validate=validate.Length(min=1, max=len(TOKEN_SCOPES)),
        metadata={
            "description": "read (every GET and event stream), write (users and tasks; includes read), admin "
            "(tokens, and everything; includes write)",
            "example": ["read", "write"],
        },
    )
    expires_in = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=tokens.MAX_EXPIRES_IN),
        metadata={"description": "seconds until the token stops working (default: never)", "example": 7776000},
    )


class TokenSchema(Schema):
    id = fields.Function(lambda t: str(t.id), required=True, metadata={"type": "string", "example": "3"})
    name = fields.String(required=True, metadata={"example": "shop-backend"})
    scopes = fields.Function(
        lambda t: [s.value for s in t.scopes],
        required=True,
        metadata={"type": "array", "items": _SCOPE_ENUM},
    )
    created_at = fields.DateTime(format="iso", required=True)
    expires_at = fields.DateTime(format="iso", required=True, allow_none=True)
    last_used_at = fields.DateTime(
        format="iso",
        required=True,
        allow_none=True,
        metadata={"description": "written at most once a minute per token and process"},
    )
    revoked_at = fields.DateTime(format="iso", required=True, allow_none=True)


class TokenCreatedSchema(TokenSchema):
    secret = fields.String(
        required=True,
        metadata={
            "description": "the token itself, for `Authorization: Bearer <secret>`: shown this once, never stored "
            "(only its SHA-256 is)",
            "example": "mbt_Wm9vbS1leGFtcGxlLW5vdC1hLXJlYWwtdG9rZW4tMDEyMw",
        },
    )


class WhoamiSchema(Schema):
    required = fields.Boolean(
        required=True, metadata={"description": "whether this server asks for tokens (any exists, or API_TOKEN)"}
    )
    reads_open = fields.Boolean(required=True, metadata={"description": "whether reads work without a token"})
    token = fields.String(
        required=True, allow_none=True, metadata={"description": "the name of the token presented (null: none)"}
    )
    token_scopes = fields.List(
        fields.String(metadata=_SCOPE_ENUM), required=True, metadata={"description": "the scopes it was given"}
    )
    allowed = fields.List(
        fields.String(metadata=_SCOPE_ENUM),
        required=True,
        metadata={"description": "what this client may do now: the scopes its token grants, or what is open"},
    )


token_create_schema = TokenCreateSchema()
token_schema = TokenSchema()
whoami_schema = WhoamiSchema()


def _dump(token: ApiToken) -> dict[str, Any]:
    return token_schema.dump(token)  # type: ignore[no-any-return]


def _acting(request: web.Request) -> str:
    return created_by(request) or "anonymous (no token needed yet)"


async def _reload(request: web.Request) -> None:
    """After the change is in this process's table: the rest of the table as it stands now (the
    other processes reload on the notification, as this one would)."""
    try:
        await request.app[keys.TOKENS].load()
    except DatabaseError as exc:  # the change is committed: the notification still reloads the table
        request.app[keys.TOKENS].changed()
        log.warning("api_tokens reload_failed error=%r", str(exc))


async def create_token(request: web.Request) -> web.Response:
    data = load(token_create_schema, await read_json_object(request))
    scopes = parse_scopes(data["scopes"])
    try:
        async with request.app[keys.POOL].acquire() as conn:
            token, secret = await tokens.create_token(conn, data["name"], scopes, data.get("expires_in"))
    except TokenNameTaken:
        raise ApiError(
            409, "token_name_taken", f"a token named {data['name']!r} exists already (or the name is reserved)"
        ) from None
    request.app[keys.TOKENS].added(token, secret)
    log.warning(
        "api_token created id=%s name=%r scopes=%s expires_at=%s by=%r",
        token.id,
        token.name,
        ",".join(scopes),
        token.expires_at.isoformat() if token.expires_at else "never",
        _acting(request),
        extra=AUDIT,
    )
    await _reload(request)
    body = {**_dump(token), "secret": secret}  # token_created_schema: the document's
    return json_response(body, status=201, headers={"Location": f"{PATH}/{token.id}", "Cache-Control": "no-store"})


async def list_tokens(request: web.Request) -> web.Response:
    async with request.app[keys.POOL].acquire() as conn:
        found = await tokens.list_tokens(conn)
    return json_response([_dump(t) for t in found])


async def revoke_token(request: web.Request) -> web.Response:
    token_id = path_id(request, "token_id")
    async with request.app[keys.POOL].acquire() as conn:
        token = await tokens.revoke_token(conn, token_id)
    if token is None:
        raise not_found("token", token_id)
    request.app[keys.TOKENS].revoked(token.id)
    log.warning("api_token revoked id=%s name=%r by=%r", token.id, token.name, _acting(request), extra=AUDIT)
    await _reload(request)
    return json_response(_dump(token))


async def whoami(request: web.Request) -> web.Response:
    table = request.app[keys.TOKENS]
    reads_open = not request.app[keys.SETTINGS].api_token_protect_reads
    body: dict[str, Any] = {"required": table.required, "reads_open": reads_open, "token": None, "token_scopes": []}
    if not table.required:
        allowed = EVERY_SCOPE
    elif request.headers.get("Authorization") is None:
        allowed = frozenset({Scope.READ}) if reads_open else frozenset()
    else:
        credential = authenticate(request, table)  # 401 for a token that does not work
        body["token"], body["token_scopes"] = credential.name, [s.value for s in credential.scopes]
        allowed = credential.grants
    body["allowed"] = [s.value for s in TOKEN_SCOPES if s in allowed]
    return json_response(whoami_schema.dump(body), headers={"Cache-Control": "no-store"})


ROUTES = (
    Route("POST", PATH, create_token, Scope.ADMIN),
    Route("GET", PATH, list_tokens, Scope.ADMIN),
    Route("DELETE", PATH + "/{token_id}", revoke_token, Scope.ADMIN),
    # Open: it authenticates what it is shown itself, and says what is open without a token.
    Route("GET", WHOAMI_PATH, whoami, Scope.PUBLIC),
)
