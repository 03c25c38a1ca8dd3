"""The one way routes are added: every path answers with and without a trailing slash, as in
the original API, and every route refuses query parameters it does not know (400, the same error
everywhere), so a typo such as `?limt=5` is never silently ignored."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from aiohttp import web
from marshmallow import Schema

from .errors import ApiError, Handler


class Route(NamedTuple):
    method: str
    path: str  # without a trailing slash ("" for the root, "/")
    handler: Handler
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
                app.router.add_get(path, handler)  # HEAD too, as aiohttp's add_get does
            else:
                app.router.add_route(route.method, path, handler)
