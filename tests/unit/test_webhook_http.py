"""The webhook sender's HTTP/1.1 client against a raw server: the answer's framings (length,
chunked with trailers, to the close), interim answers, kept-alive connections reused, a stale one
replaced, under asyncio and uvloop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from yarl import URL

from message_broker.worker.webhook_http import Answer, BadAnswer, WebhookClient

ANSWERS = {
    "/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;x=y\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
    "/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n",
    "/close": b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\nwhatever comes until the close",
    "/garbage": b"SMTP ready\r\n\r\n",
}


async def _serve(received: list[tuple[int, bytes]]) -> tuple[asyncio.Server, int]:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                path = head.split(b" ")[1].decode()
                received.append((number, head + body))
                writer.write(ANSWERS[path])
                await writer.drain()
                if path in ("/close", "/garbage", "/stale"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _scenario() -> None:
    received: list[tuple[int, bytes]] = []
    server, port = await _serve(received)
    client = WebhookClient(check_address=None, user_agent="message_broker")
    base = f"http://127.0.0.1:{port}"

    async def post(path: str) -> Answer:
        return await client.post(URL(base + path), {"webhook-id": "msg_1"}, b"{}")

    try:
        answer = await post("/length")
        assert answer.status == 200
        answer = await post("/chunked")
        assert answer.status == 201
        answer = await post("/interim")
        assert (answer.status, answer.headers["retry-after"]) == (429, "7")
        # Three answers, one connection kept alive; the request as sent.
        assert [number for number, _ in received] == [1, 1, 1]
        head, _, body = received[0][1].partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"POST /length HTTP/1.1" and body == b"{}"
        assert {b"Host: 127.0.0.1:%d" % port, b"User-Agent: message_broker", b"webhook-id: msg_1"} <= set(
            head.split(b"\r\n")
        )
        answer = await post("/close")
        assert answer.status == 503
        answer = await post("/length")  # a new connection after the close
        assert answer.status == 200 and received[-1][0] == 2
        with pytest.raises(BadAnswer):
            await post("/garbage")
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def test_framings_and_kept_alive_connections() -> None:
    await _scenario()


def test_under_uvloop_too() -> None:
    # The service runs on uvloop, whose transports are not asyncio.Transport subclasses.
    uvloop.run(_scenario())
