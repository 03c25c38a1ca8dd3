"""Clients that misbehave below the API: hanging up mid-body. The app is served in this process
exactly as `serve` serves it (its runner, on a socket of its own) rather than through aiohttp's
TestServer, which cancels handlers whose client hangs up (production does not); caplog then sees
every log record, the metrics come over HTTP, and each case asserts the JSON error shape, that
nothing changed and that nothing was logged at ERROR or with a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from message_broker.config import Settings
from message_broker.http.app import create_app

from ..helpers import Samples, eventually, samples, value

USER_PATH = "/api/v1/user/"
JSON_HEAD = f"POST {USER_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@dataclasses.dataclass
class Served:
    host: str
    port: int
    runner: web.AppRunner
    session: aiohttp.ClientSession

    @property
    def requests(self) -> int:
        """Requests the server has taken up (their heads parsed), on every connection."""
        assert self.runner.server is not None
        return self.runner.server.requests_count

    async def scrape(self) -> Samples:
        async with self.session.get("/metrics") as response:
            assert response.status == 200
            return samples(await response.text())


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Served]:
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=settings.shutdown_timeout)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()
        async with aiohttp.ClientSession(base_url=f"http://{host}:{port}") as session:
            yield Served(host, port, runner, session)
    finally:
        await runner.cleanup()


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    caplog.set_level(logging.DEBUG, logger="message_broker")
    return caplog


def assert_quiet(log: pytest.LogCaptureFixture) -> None:
    """Nothing at ERROR, and no traceback at any level: a client's misbehaviour is not ours."""
    loud = [r for r in log.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud)


def errors_in(found: Samples, status: str, code: str) -> float:
    return value(found, "message_broker_http_errors_total", 0.0, status=status, code=code)


async def answered(served: Served, before: Samples) -> Samples | None:
    """A probe for eventually(): the metrics once an error answer more than in `before` is counted."""
    found = await served.scrape()
    return found if _all_errors(found) > _all_errors(before) else None


def _all_errors(found: Samples) -> float:
    return sum(v for (name, _), v in found.items() if name == "message_broker_http_errors_total")


def _count(sql, table: str) -> int:  # type: ignore[no-untyped-def]
    sql.execute(f"SELECT count(*) FROM {table}")
    return int(sql.fetchone()[0])


async def test_a_client_that_hangs_up_mid_body_is_no_server_error(served: Served, sql, log) -> None:  # type: ignore[no-untyped-def]
    before = await served.scrape()
    taken = served.requests
    _, writer = await asyncio.open_connection(served.host, served.port)
    writer.write(f"{JSON_HEAD}Content-Length: 100\r\n\r\n".encode() + b'{"us')
    await writer.drain()
    # Hang up once the server has taken the request up (its handler then waits for the rest).
    await eventually(lambda: served.requests > taken, what="the request taken up")
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()

    # Answered once an error answer is counted, a 400 (the fix) or a 500 (before it).
    after = await eventually(lambda: answered(served, before), what="the hang-up answered")
    assert errors_in(after, "500", "internal_error") == errors_in(before, "500", "internal_error")
    assert errors_in(after, "400", "invalid_body") == errors_in(before, "400", "invalid_body") + 1
    assert _count(sql, "users") == 0
    assert_quiet(log)
