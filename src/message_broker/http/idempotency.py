"""The Idempotency-Key header: validate it, fingerprint the request, and run a create at most once
per key (see db/idempotency.py for how the database makes that hold across processes)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web

from ..db.idempotency import IdempotencyKeyReused, StoredResponse, Work, run_once
from . import keys
from .auth import created_by
from .errors import ApiError
from .responses import encode_json

HEADER = "Idempotency-Key"
# Also the header that marks an answer as a replay of the first one.
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")
# Not an answer's encoder: a canonical form (sorted keys, no spaces) to hash.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key, None without one; 400 unless it is 1 to 255 printable ASCII
    characters, sent once."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "invalid_idempotency_key", f"send at most one {HEADER} header")
    key = values[0]
    if not _KEY.fullmatch(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            {"length": len(key)},
        )
    return key


def fingerprint(method: str, path: str, body: dict[str, Any], client: str | None = None) -> str:
    """What makes two requests "the same": the method, the canonical path and the validated body
    (so key order, whitespace or a trailing slash do not matter), and the client that sent it (the
    token's name; None: no token was needed)."""
    request = [method, path, body] if client is None else [method, path, body, client]
    return hashlib.sha256(_CANONICAL.encode(request).encode()).hexdigest()


async def respond_once(
    request: web.Request, key: str, path: str, body: dict[str, Any], work: Work
) -> tuple[web.Response, bool]:
    """Run `work` at most once for this key and answer with its response (and False); a retry
    with the same request gets the stored response again (marked Idempotent-Replayed: true, and
    True), another request with the same key gets 422. Another client's request is another
    request: one client never gets another's answer (or task) back for a key both happen to use."""
    app = request.app
    client = created_by(request)
    # Keys stored without a client (by a server that needed no token, or before clients were
    # told apart) are still answered for their request, so a retry across an upgrade replays.
    fingerprints = (fingerprint(request.method, path, body, client), fingerprint(request.method, path, body))
    try:
        stored, replayed = await run_once(
            app[keys.POOL], key, fingerprints, app[keys.SETTINGS].idempotency_retention, work
        )
    except IdempotencyKeyReused:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"this {HEADER} was already used for a different request",
            {"idempotency_key": key},
        ) from None
    return stored_response(stored, replayed), replayed


def stored_response(stored: StoredResponse, replayed: bool) -> web.Response:
    headers = {}
    if stored.location:
        headers["Location"] = stored.location
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return web.Response(status=stored.status, text=stored.body, content_type="application/json", headers=headers)


def json_stored(status: int, body: Any, location: str | None) -> StoredResponse:
    """A response to store: the exact bytes a replay will send."""
    return StoredResponse(status, encode_json(body), location)
