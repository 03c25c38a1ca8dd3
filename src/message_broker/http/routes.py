"""The one way routes are added: every path answers with and without a trailing slash, as in
the original API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Route(NamedTuple):
    method: str
    path: str  # without a trailing slash
    handler: Handler


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    for route in routes:
        for path in (route.path, route.path + "/"):
            if route.method == "GET":
                app.router.add_get(path, route.handler)  # HEAD too, as aiohttp's add_get does
            else:
                app.router.add_route(route.method, path, route.handler)
