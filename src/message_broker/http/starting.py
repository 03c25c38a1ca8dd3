"""What answers on the service's port while it waits for the database at start-up.

`serve` binds its port first, so that a load balancer or an orchestrator sees a live process at
once and a port in use is reported before anything else; the application proper needs the pool,
so until the database is reachable this stand-in answers on the same sockets:
- /health 200, as always while the process runs;
- /ready 503 with the usual body (every check false, `down: ["startup"]`);
- anything else 503 `database_unavailable` with Retry-After, as during any outage.
Every answer closes its connection, so that clients come back to the application once it has
taken over the listening sockets (the stand-in serves on duplicates of them: closing it leaves
them open, and connections arriving in between wait in the backlog).
"""

from __future__ import annotations

import socket

from aiohttp import web, web_response

from .app import SERVER_HEADER
from .errors import error_response
from .protocol import ApiServer
from .responses import json_response

STARTUP = "startup"  # the name /ready gives to what is down meanwhile


async def _answer(request: web.BaseRequest) -> web.StreamResponse:
    path = request.path.rstrip("/")
    if path == "/health" and request.method in ("GET", "HEAD"):
        response = json_response({"status": "ok"})
    elif path == "/ready" and request.method in ("GET", "HEAD"):
        checks = {"listener": False, "database": False, "background": False}
        response = json_response({"status": "unavailable", "checks": checks, "down": [STARTUP]}, status=503)
    else:
        response = error_response(
            503,
            "database_unavailable",
            "the service is starting and waits for the database; retry shortly",
            headers={"Retry-After": "1"},
        )
    response.force_close()
    return response


class StandIn:
    """The stand-in server on duplicates of `sockets`."""

    def __init__(self) -> None:
        self._runner: web.ServerRunner | None = None

    async def start(self, sockets: list[socket.socket]) -> None:
        web_response.SERVER_SOFTWARE = SERVER_HEADER  # as the application's answers say
        server = ApiServer(_answer, access_log=None)  # malformed requests answered as the application does
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        for sock in sockets:
            await web.SockSite(self._runner, sock.dup()).start()

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
