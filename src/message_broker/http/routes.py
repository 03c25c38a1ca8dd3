"""The one way routes are added: every path answers with and without a trailing slash, as in
the original API; every route declares the scope a token needs for it (scopes.py): READ, WRITE,
ADMIN, or PUBLIC for the few that anyone may call (http/auth.py enforces it;
tests/integration/test_tokens.py fails for any route of the app that has none); and every route
refuses query parameters it does not know (400, the same error everywhere), so a typo such as
`?limt=5` is never silently ignored."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from aiohttp import web
from marshmallow import Schema

from ..scopes import Scope
from . import keys
from .errors import ApiError, Handler


class Route(NamedTuple):
    method: str
    path: str  # without a trailing slash ("" for the root, "/")
    handler: Handler
    scope: Scope  # what a token needs for it; no default: every route says
    # The query parameters the route reads (its schema's fields); None: it reads none.
    query: Schema | None = None


def query_names(schema: Schema | None) -> frozenset[str]:
    if schema is None:
        return frozenset()
    return frozenset(field.data_key or name for name, field in schema.fields.items() if not field.dump_only)


def unknown_query_error(unknown: Iterable[str]) -> ApiError:
    names = sorted(unknown)
    return ApiError(
        400,
        "validation_failed",
        f"unknown query parameter{'s' if len(names) > 1 else ''}: {', '.join(names)}",
        {"unknown": names},
    )


def _checking_query(handler: Handler, allowed: frozenset[str]) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        if request.query_string:  # the common case, no query, costs one attribute read
            unknown = request.query.keys() - allowed
            if unknown:
                raise unknown_query_error(unknown)
        return await handler(request)

    return checked


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    for route in routes:
        handler = _checking_query(route.handler, query_names(route.query))
        for path in (route.path, route.path + "/") if route.path else ("/",):
            if route.method == "GET":
                added = app.router.add_get(path, handler)  # HEAD too, as aiohttp's add_get does
            else:
                added = app.router.add_route(route.method, path, handler)
            declare_scope(app, added.resource, route.method, route.scope)


def declare_scope(app: web.Application, resource: web.AbstractResource | None, method: str, scope: Scope) -> None:
    """The scope of `method` on `resource` (GET covers HEAD), for routes added some other way
    (static files)."""
    assert resource is not None
    app.setdefault(keys.ROUTE_SCOPES, {})[(resource, method)] = scope


def scope_of(app: web.Application, request: web.Request) -> Scope | None:
    """The scope the matched route declares; None when no route matched (404, 405)."""
    route = request.match_info.route
    if route.resource is None:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    scope: Scope | None = app[keys.ROUTE_SCOPES].get((route.resource, method))
    return scope
