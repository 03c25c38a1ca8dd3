"""Clients that misbehave below the API: hanging up mid-body, HTTP that aiohttp's parser refuses,
bodies that cannot be decoded. The app is served in this process exactly as `serve` serves it
(http/protocol.py's runner, on a socket of its own) rather than through aiohttp's TestServer,
which has neither that runner's connections nor its handling of a client that hangs up (the
TestServer cancels the handler; production does not); caplog then sees
every log record, the metrics come over HTTP, and each case asserts the JSON error shape, that
nothing changed and that nothing was logged at ERROR or with a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import logging
import socket
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from message_broker.config import Settings
from message_broker.http.app import create_app
from message_broker.http.protocol import app_runner

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
    app = create_app(dataclasses.replace(settings, request_body_timeout=30.0))  # a 408 would take 30 s
    runner = app_runner(app, shutdown_timeout=settings.shutdown_timeout)
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


async def exchange(served: Served, data: bytes, then: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """`data` (and, once the server has taken a request up, `then`) on a connection of its own;
    (status, headers, JSON body) of the answer, read to the end of the connection: the
    server closes it once it is done with it, logs included."""
    taken = served.requests
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(data)
        if then:
            await eventually(lambda: served.requests > taken, what="the request taken up")
            writer.write(then)
        async with asyncio.timeout(5):  # far below REQUEST_BODY_TIMEOUT: an answer at once
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def assert_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body


CHUNKED_HEAD = f"{JSON_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode()
REFUSED_BY_THE_PARSER = {
    "bad chunk size": CHUNKED_HEAD + b"zz\r\n{}\r\n0\r\n\r\n",
    "Content-Length and Transfer-Encoding": (
        f"{JSON_HEAD}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n".encode()
    ),
    "two Content-Lengths": f"{JSON_HEAD}Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
    "non-ASCII in the path": b"GET /api/v1/user/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in the path": b"GET /api/v1/user/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in a header": b"GET /api/v1/user/ HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "non-ASCII header name": b"GET /api/v1/user/ HTTP/1.1\r\nHost: x\r\nX-\xe9: a\r\n\r\n",
    "DEL in a header": b"GET /api/v1/user/ HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
    "unknown method": f"FOO {USER_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
}


@pytest.mark.parametrize("data", REFUSED_BY_THE_PARSER.values(), ids=REFUSED_BY_THE_PARSER.keys())
async def test_http_the_parser_refuses_is_a_json_400_logged_quietly(served: Served, sql, log, data: bytes) -> None:  # type: ignore[no-untyped-def]
    before = await served.scrape()
    status, headers, body = await exchange(served, data)
    assert (status, headers["Content-Type"]) == (400, "application/json; charset=utf-8")
    assert_error(body, "invalid_body")
    assert "\\x" not in body["error"]["message"]  # the parser's reason, not the bytes it quotes
    assert errors_in(await served.scrape(), "400", "invalid_body") == errors_in(before, "400", "invalid_body") + 1
    assert _count(sql, "users") == 0
    assert_quiet(log)
    async with served.session.get("/health") as response:
        assert response.status == 200


async def test_a_bad_chunk_after_good_ones_is_a_prompt_400(served: Served, sql, log) -> None:  # type: ignore[no-untyped-def]
    """aiohttp's C parser drops the body it was filling without telling its reader: this waited
    for REQUEST_BODY_TIMEOUT and answered 408."""
    status, _, body = await exchange(served, CHUNKED_HEAD + b'5\r\n{"use\r\n', then=b'zz\r\nrname": "x"}\r\n0\r\n\r\n')
    assert status == 400
    assert_error(body, "invalid_body")
    assert _count(sql, "users") == 0
    assert_quiet(log)


async def test_a_broken_gzip_body_is_400_logged_quietly(served: Served, sql, log) -> None:  # type: ignore[no-untyped-def]
    status, _, body = await exchange(
        served, f"{JSON_HEAD}Content-Encoding: gzip\r\nContent-Length: 7\r\n\r\nnotgzip".encode()
    )
    assert status == 400
    assert_error(body, "invalid_body")
    assert body["error"]["message"] == "the request body cannot be read: Can not decode content-encoding: gzip"
    assert _count(sql, "users") == 0
    assert_quiet(log)


async def test_a_line_past_the_hard_limit_is_a_json_431(served: Served, log) -> None:  # type: ignore[no-untyped-def]
    status, _, body = await exchange(
        served, f"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: {'x' * 40_000}\r\n\r\n".encode()
    )
    assert status == 431
    assert_error(body, "headers_too_large")
    assert_quiet(log)


async def test_headers_past_twice_the_limit_are_a_json_431(served: Served, settings: Settings, log) -> None:  # type: ignore[no-untyped-def]
    """Past twice MAX_HEADERS aiohttp's parser refuses the request itself: 431 as below that (the
    README: "past twice those ... 414 or 431"), not 400 invalid_body (found from outside)."""
    headers = "".join(f"X-Pad-{i}: x\r\n" for i in range(2 * settings.max_headers + 1))
    status, _, body = await exchange(served, f"GET /health HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert status == 431
    assert_error(body, "headers_too_large")
    assert_quiet(log)


@pytest.mark.parametrize("coding", ["br", "zstd", "foo", "compress", "x-gzip", "gzip, gzip"])
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_content_encoding_we_do_not_decode_is_a_json_415(
    served: Served, sql, log, method: str, coding: str
) -> None:  # type: ignore[no-untyped-def]
    """aiohttp's parser refused br and zstd (no decoder installed) with a plain-text 400 and an
    ERROR traceback, even on a GET without a body; any other coding it read as uncompressed."""
    body = b'{"username": "packed", "balance": 1}'
    sent = f"Content-Length: {len(body)}\r\n".encode() + b"\r\n" + body if method == "POST" else b"\r\n"
    head = f"{method} {USER_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    status, headers, answer = await exchange(served, f"{head}Content-Encoding: {coding}\r\n".encode() + sent)
    assert (status, headers["Content-Type"]) == (415, "application/json; charset=utf-8")
    assert_error(answer, "unsupported_media_type")
    assert answer["error"]["details"]["supported"] == ["gzip", "deflate", "identity"]
    assert headers["Accept-Encoding"] == "gzip, deflate"
    assert _count(sql, "users") == 0
    assert_quiet(log)


@pytest.mark.parametrize("coding", ["gzip", "GZip", "deflate", "identity"])
async def test_the_content_encodings_we_decode_are_read(served: Served, coding: str) -> None:
    body = json.dumps({"username": f"packed-{coding}", "balance": 1}).encode()
    packed = {"gzip": gzip.compress, "deflate": zlib.compress}.get(coding.lower(), lambda raw: raw)(body)
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    async with served.session.post(USER_PATH, data=packed, headers=headers) as response:
        assert response.status == 201, await response.text()


def _answered_on(found: Samples, route: str) -> float:
    return sum(
        v
        for (name, labels), v in found.items()
        if name == "message_broker_http_requests_total" and dict(labels).get("route") == route
    )


async def _hang_up_mid_download(served: Served, path: str) -> None:
    """GET `path`, read the start of the answer, then reset the connection (SO_LINGER 0)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server cannot run far ahead
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (served.host, served.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await reader.readexactly(1000)  # into the body: the server is streaming it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/api/v1/user/", "/api/v1/user"),
        ("/api/v1/user/{user_id}/statement?from={start}", "/api/v1/user/{user_id}/statement"),
        ("/api/v1/user/{user_id}/statement?from={start}&format=csv", "/api/v1/user/{user_id}/statement"),
    ],
    ids=["users", "statement", "statement-csv"],
)
async def test_a_client_that_hangs_up_mid_download_is_no_server_error(  # type: ignore[no-untyped-def]
    served: Served, sql, log, path: str, route: str
) -> None:
    """The streamed user listing and statement wrote on after the client had gone: each hang-up
    was logged at ERROR with a traceback and counted as a 500 (found from outside)."""
    sql.execute("INSERT INTO users (username, balance) SELECT 'many-' || i, 1 FROM generate_series(1, 30000) AS i")
    sql.execute("SELECT min(id), now() - interval '1 minute' FROM users")
    user_id, start = sql.fetchone()
    # 5000 finished tasks (the service applies them), pages of a statement of one user.
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount) SELECT %s, 'replenishment', 1 FROM generate_series(1, 5000)",
        (user_id,),
    )

    def applied() -> bool:
        sql.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
        return sql.fetchone()[0] == 0

    await eventually(applied, timeout=30, what="the tasks applied")
    before = await served.scrape()
    await _hang_up_mid_download(served, path.format(user_id=user_id, start=start.isoformat().replace("+", "%2B")))

    async def ended() -> Samples | None:
        found = await served.scrape()
        return found if _answered_on(found, route) > _answered_on(before, route) else None

    after = await eventually(ended, what="the download's handler ended")
    assert errors_in(after, "500", "internal_error") == errors_in(before, "500", "internal_error")
    assert_quiet(log)
    async with served.session.get("/health") as response:
        assert response.status == 200


@pytest.mark.parametrize("path", [USER_PATH, "/no/such/path", "/console/"])
async def test_an_expectation_other_than_100_continue_is_a_json_417(served: Served, sql, log, path: str) -> None:  # type: ignore[no-untyped-def]
    """aiohttp raised its plain-text "Unknown Expect: foo" before any middleware ran (found from
    outside); 100-continue still gets its interim answer."""
    body = b'{"username": "expecting", "balance": 1}'
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    status, headers, answer = await exchange(
        served, f"{head}Expect: foo\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    assert (status, headers["Content-Type"]) == (417, "application/json; charset=utf-8")
    assert_error(answer, "expectation_failed")
    assert answer["error"]["details"] == {"expect": "foo"}
    assert errors_in(await served.scrape(), "417", "expectation_failed") == 1
    assert _count(sql, "users") == 0
    assert_quiet(log)


async def test_expect_100_continue_gets_its_interim_answer(served: Served, sql) -> None:  # type: ignore[no-untyped-def]
    body = b'{"username": "continued", "balance": 1}'
    head = f"{JSON_HEAD}Expect: 100-continue\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(head.encode())
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            assert (await reader.read()).startswith(b"HTTP/1.1 201 Created\r\n")
    finally:
        writer.close()
    assert _count(sql, "users") == 1


async def test_a_body_announced_past_the_limit_is_a_prompt_413(served: Served, settings: Settings, sql, log) -> None:  # type: ignore[no-untyped-def]
    """A Content-Length past MAX_BODY_BYTES was awaited for REQUEST_BODY_TIMEOUT and answered
    408 (found from outside): the limit is known from the head."""
    status, _, body = await exchange(
        served, f"{JSON_HEAD}Content-Length: {settings.max_body_bytes + 1}\r\n\r\n".encode() + b'{"username": "big"'
    )
    assert status == 413
    assert_error(body, "payload_too_large")
    assert _count(sql, "users") == 0
    assert_quiet(log)


@pytest.mark.parametrize(
    "data",
    [
        f"POST {USER_PATH} HTTP/2.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 33\r\n\r\n"
        '{"username": "two", "balance": 1}',
        f"GET {USER_PATH}\r\n\r\n",
    ],
    ids=["HTTP/2.0", "HTTP/0.9"],
)
async def test_a_request_line_in_another_http_version_is_refused(served: Served, sql, log, data: str) -> None:  # type: ignore[no-untyped-def]
    """aiohttp's parser refuses HTTP/9.9 but took HTTP/2.0 and a line without a version, and the
    service served them, answering "HTTP/2.0 201 Created" (found from outside)."""
    status, _, body = await exchange(served, data.encode())
    assert status == 400
    assert_error(body, "invalid_body")
    assert _count(sql, "users") == 0
    assert_quiet(log)
