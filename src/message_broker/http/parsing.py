"""Reading what a client sent: JSON bodies, path ids and query strings, each rejected with a
clear 4xx ApiError when it is not exactly what we accept."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError, fields

from ..ledger import BIGINT_MAX
from .errors import ApiError

# Longer digit strings cannot be a bigint; refusing them early also avoids int() on huge input.
_MAX_INT_DIGITS = 30
_BIGINT_DIGITS = len(str(BIGINT_MAX))


class _BadJson(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _BadJson(f"duplicate key {duplicate!r}")
    return obj


def _no_constants(name: str) -> Any:
    raise _BadJson(f"{name} is not valid JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _BadJson("number has too many digits")
    return int(text)


# Built once: json.loads with any option builds a new decoder per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants, parse_int=_bounded_int)


def decode_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no duplicate keys, no NaN/Infinity, no absurdly long integers."""
    if not raw.strip():
        raise ApiError(400, "invalid_json", "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "request body is not valid UTF-8") from None
    try:
        return _DECODER.decode(text)
    except _BadJson as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else "cannot be parsed"
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {message}") from None


def parse_digits(raw: object) -> int | None:
    """A non-negative bigint written with ASCII digits only (no sign, spaces or other scripts'
    digits), or None: the one reading of every id and number a client writes as a string."""
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= _BIGINT_DIGITS:
        value = int(raw)
        if value <= BIGINT_MAX:
            return value
    return None


async def read_json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object; with `optional`, a request without a body reads as {}."""
    if optional and not request.body_exists:
        return {}
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
            {"content_type": request.content_type},
        )
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_media_type", "only UTF-8 JSON is accepted", {"charset": charset})
    body = decode_json(await request.read())  # aiohttp answers 413 past client_max_size
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", f"expected a JSON object, got {_json_type(body)}")
    return body


_UNSTORABLE = "must not contain NUL or unpaired surrogates"


def _storable(value: Any) -> bool:
    """No NUL and no unpaired surrogate in a string, or in any key or string a value holds:
    PostgreSQL's text and jsonb cannot hold NUL, and a surrogate cannot be encoded as UTF-8 (the
    driver would fail on either). One rule for every field, body or query string."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_storable(key) and _storable(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_storable(item) for item in value)
    return True


def load(schema: Schema, data: dict[str, Any], where: str = "body") -> dict[str, Any]:
    """`data` through `schema`, or 400 validation_failed: the schema's own checks first (their
    messages are the most precise), then NUL and unpaired surrogates in any string it let through."""
    try:
        loaded: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        raise ApiError(
            400, "validation_failed", f"the request {where} is not valid", {"fields": exc.messages}
        ) from None
    unstorable = {key: [_UNSTORABLE] for key, value in loaded.items() if not _storable(value)}
    if unstorable:
        raise ApiError(400, "validation_failed", f"the request {where} is not valid", {"fields": unstorable})
    return loaded


def load_query(schema: Schema, request: web.Request) -> dict[str, Any]:
    """The query string through `schema`: a List field takes every value of its parameter
    (`?type=a&type=b`); any other parameter may appear once."""
    query = request.query
    lists = {name for name, field in schema.fields.items() if isinstance(field, fields.List)}
    repeated = sorted({key for key in query if key not in lists and len(query.getall(key)) > 1})
    if repeated:
        raise ApiError(400, "validation_failed", "query parameters may appear once", {"repeated": repeated})
    data = {key: query.getall(key) if key in lists else query[key] for key in query}
    return load(schema, data, where="query")


def path_id(request: web.Request, name: str) -> int:
    """A path segment that must be a positive bigint id."""
    raw = request.match_info[name]
    value = parse_digits(raw)
    if value is None or value == 0:
        raise ApiError(400, "invalid_id", f"{name} must be a positive whole number below 2^63", {name: raw})
    return value


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
