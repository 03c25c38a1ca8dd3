"""The webhook sender's HTTP/1.1 client: one POST at a time per connection, connections kept alive
per origin, and of the answer only what a delivery needs (the status, Retry-After).

Why not aiohttp's client: it spends about 150 us of CPU per request here, three times this, and
one endpoint's rate at thousands of deliveries per second is paid for by the very process that
serves the API and applies the tasks. What a webhook needs is small: no redirects, no cookies, no
proxies, a body we do not read beyond its framing.

A connection is opened to an address the resolver gave and that was checked (unless private
addresses are allowed): the check and the connection use the one answer, so a DNS change cannot
slip a private address in between. A kept-alive connection is reused only while it has been idle
less than KEEPALIVE seconds (servers close idle ones, Node's after 5 s), and a request that finds
a reused connection closed under it, before any byte of the answer, goes once more on a new one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from yarl import URL

KEEPALIVE = 4.0
# An answer's head (status line and headers) longer than this is refused; a body longer than this
# is not read: the connection is closed instead of kept.
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024
# Idle connections kept per origin (an endpoint has at most 4 requests in flight).
MAX_IDLE = 8


class BadAnswer(Exception):
    """The peer's answer is not HTTP/1.x as we read it."""


class ConnectionClosed(ConnectionError):
    """The connection closed before the whole answer came."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # lower-case names; the last of repeated ones


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.got_bytes = False  # of the current answer: none, and a closed reused one is stale

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have what is used here.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self.got_bytes = True
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    async def _more(self) -> None:
        """Wait for more bytes; ConnectionClosed if none can come."""
        if self.closed:
            raise ConnectionClosed("the connection closed before the whole answer came")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def exchange(self, request: bytes) -> tuple[Answer, bool]:
        """Send a request, read its answer; (the answer, whether the connection may carry another)."""
        assert self._transport is not None
        self._buffer.clear()
        self.got_bytes = False
        self._transport.write(request)
        while True:
            while (end := self._buffer.find(b"\r\n\r\n")) < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise BadAnswer("the answer's headers are too long")
                await self._more()
            version, status, headers = _head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            break
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if status in (204, 304) or 100 <= status < 200:
            return Answer(status, headers), keep
        if "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower() != "chunked":
                return Answer(status, headers), False
            return Answer(status, headers), keep and await self._skip_chunks()
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            return Answer(status, headers), False  # read to its end otherwise: not worth it
        while len(self._buffer) < int(length):
            await self._more()
        return Answer(status, headers), keep and len(self._buffer) == int(length)

    async def _skip_chunks(self) -> bool:
        """Read a chunked body to its end; False if it is too long to bother (close instead)."""
        total = 0
        while True:
            while (end := self._buffer.find(b"\r\n")) < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise BadAnswer("a chunk's size line is too long")
                await self._more()
            size_text = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadAnswer(f"a chunk's size is not hexadecimal: {size_text[:20]!r}") from None
            total += size
            if total > MAX_BODY:
                return False
            if size == 0:
                del self._buffer[: end + 2]
                # The empty line, after trailers if any.
                while True:
                    if self._buffer.startswith(b"\r\n"):
                        del self._buffer[:2]
                        return not self._buffer
                    if (end := self._buffer.find(b"\r\n\r\n")) >= 0:
                        del self._buffer[: end + 4]
                        return not self._buffer
                    if len(self._buffer) > MAX_HEAD:
                        raise BadAnswer("the answer's trailers are too long")
                    await self._more()
            while len(self._buffer) < end + 2 + size + 2:
                await self._more()
            del self._buffer[: end + 2 + size + 2]


def _head(raw: bytes) -> tuple[str, int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise BadAnswer(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadAnswer(f"a header line without a colon: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], int(parts[1]), headers


class WebhookClient:
    def __init__(self, *, check_address: Callable[[str, str], None] | None, user_agent: str) -> None:
        """`check_address(host, address)` raises if the address a host resolved to may not be
        reached; None: every address may (and names resolve as the system does, at connect)."""
        self._check_address = check_address
        self._user_agent = user_agent
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    async def post(self, url: URL, headers: Mapping[str, str], body: bytes) -> Answer:
        """POST `body` to `url` (http or https, with a host and a port) and read the answer.
        Raises OSError (connecting, the connection lost), ConnectionClosed, BadAnswer, and what
        check_address raises; the caller bounds the time it takes."""
        assert url.host is not None and url.port is not None
        origin = (url.scheme, url.host, url.port)
        host = url.raw_host or url.host
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        authority = host if url.explicit_port is None else f"{host}:{url.port}"
        request = (
            f"POST {url.raw_path_qs or '/'} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {self._user_agent}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        conn = self._reuse(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, request)
            except ConnectionClosed:
                if conn.got_bytes:
                    raise
                # Not a byte of an answer: most likely closed by the server while it was idle.
                # Once more on a new connection (at worst a duplicate: delivery is at least once).
        conn = await self._connect(url)
        return await self._exchange(origin, conn, request)

    async def _exchange(self, origin: tuple[str, str, int], conn: _Connection, request: bytes) -> Answer:
        self._busy.add(conn)
        keep = False
        try:
            answer, keep = await conn.exchange(request)
        finally:
            self._busy.discard(conn)
            if keep and not conn.closed:
                conn.idle_since = asyncio.get_running_loop().time()
                idle = self._idle.setdefault(origin, [])
                idle.append(conn)
                if len(idle) > MAX_IDLE:
                    idle.pop(0).close()
            else:
                conn.close()
        return answer

    def _reuse(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()  # the most recently used: least likely closed by the server
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                return conn
            conn.close()
        if idle is not None:
            del self._idle[origin]
        return None

    async def _connect(self, url: URL) -> _Connection:
        assert url.host is not None and url.port is not None
        loop = asyncio.get_running_loop()
        secure = url.scheme == "https"
        if secure and self._ssl is None:
            self._ssl = ssl.create_default_context()
        context = self._ssl if secure else None
        server_hostname = url.host if secure else None
        if self._check_address is None:
            _, conn = await loop.create_connection(
                _Connection, url.host, url.port, ssl=context, server_hostname=server_hostname
            )
            return conn
        # Resolve once, check every address, connect to one of those very addresses.
        infos = await loop.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
        for info in infos:
            self._check_address(url.host, str(info[4][0]))
        error: OSError | None = None
        for family, _, proto, _, address in infos:
            try:
                _, conn = await loop.create_connection(
                    _Connection,
                    str(address[0]),
                    address[1],
                    family=family,
                    proto=proto,
                    ssl=context,
                    server_hostname=server_hostname,
                )
                return conn
            except OSError as exc:
                error = exc
        raise error or OSError(f"{url.host} did not resolve")

    def prune(self) -> None:
        """Close the idle connections past KEEPALIVE (and forget origins left without any)."""
        now = asyncio.get_running_loop().time()
        for origin, idle in list(self._idle.items()):
            for conn in [c for c in idle if c.closed or now - c.idle_since >= KEEPALIVE]:
                idle.remove(conn)
                conn.close()
            if not idle:
                del self._idle[origin]

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in self._busy:
            conn.close()
        self._busy.clear()
