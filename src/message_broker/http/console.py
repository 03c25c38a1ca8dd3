"""The operator console: GET /console/ (the service at a glance, the live feed, users),
GET /console/user/<id> (one user, live) and GET /console/webhooks (endpoints, failures, retry):
static pages and ES modules shipped in the package (message_broker/console/static), read once at
start-up. No CDN, no build step.

The pages are static and public (see http/auth.py): everything they show comes from the API,
which they call with the operator's token when the server wants one. Pages get a strict
Content-Security-Policy: scripts, styles and connections from this origin only, no inline code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

from aiohttp import web

from ..scopes import Scope
from .routes import Route, add_routes

PREFIX = "/console"
ASSETS = PREFIX + "/assets"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_TYPES = MappingProxyType(
    {
        ".html": "text/html",
        ".js": "text/javascript",
        ".css": "text/css",
        ".svg": "image/svg+xml",
        ".png": "image/png",
    }
)
_COMMON_HEADERS = MappingProxyType(
    {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        # Small files, changed with each release: the browser asks again each time (and gets a 304).
        "Cache-Control": "no-cache",
    }
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file of the package's console/static folder, by name."""
    folder = resources.files("message_broker") / "console" / "static"
    assets = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            body = entry.read_bytes()
            assets[entry.name] = Asset(body, _TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


_ASSETS = web.AppKey("console_assets", dict)


def _serve(request: web.Request, name: str) -> web.Response:
    asset = request.app[_ASSETS].get(name)
    if asset is None:
        raise web.HTTPNotFound()
    headers = {**_COMMON_HEADERS, "ETag": asset.etag}
    if asset.content_type == "text/html":
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    charset = "utf-8" if asset.content_type.startswith("text/") or asset.content_type.endswith("+xml") else None
    return web.Response(body=asset.body, content_type=asset.content_type, charset=charset, headers=headers)


async def dashboard_page(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


async def user_page(request: web.Request) -> web.Response:
    # Any id: the page reads it from its URL and says so itself when it is not a user's.
    return _serve(request, "user.html")


async def webhooks_page(request: web.Request) -> web.Response:
    return _serve(request, "webhooks.html")


async def asset(request: web.Request) -> web.Response:
    return _serve(request, request.match_info["name"])


def add_console_routes(app: web.Application) -> None:
    app[_ASSETS] = load_assets()
    add_routes(
        app,
        [
            # Static pages and assets: open (http/auth.py); their API calls carry the token.
            Route("GET", PREFIX, dashboard_page, Scope.PUBLIC),
            Route("GET", PREFIX + "/user/{user_id}", user_page, Scope.PUBLIC),
            Route("GET", PREFIX + "/webhooks", webhooks_page, Scope.PUBLIC),
            Route("GET", ASSETS + "/{name}", asset, Scope.PUBLIC),
        ],
    )
