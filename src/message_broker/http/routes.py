"""The one way routes are added: every path answers with and without a trailing slash, as in
the original API, and every route declares the scope a token needs for it (scopes.py): READ,
WRITE, ADMIN, or PUBLIC for the few that anyone may call. http/auth.py enforces it;
tests/integration/test_scopes.py fails for any route of the app that has none."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

from aiohttp import web

from ..scopes import Scope
from . import keys

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Route(NamedTuple):
    method: str
    path: str  # without a trailing slash
    handler: Handler
    scope: Scope  # what a token needs for it; no default: every route says


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    for route in routes:
        for path in (route.path, route.path + "/"):
            if route.method == "GET":
                added = app.router.add_get(path, route.handler)  # HEAD too, as aiohttp's add_get does
            else:
                added = app.router.add_route(route.method, path, route.handler)
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
