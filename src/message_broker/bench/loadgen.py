"""The HTTP load generator of `make bench`, run in a process of its own.

    python -m message_broker.bench.loadgen closed --port P --users LO:HI --clients 64 --warmup 2 --duration 8
    python -m message_broker.bench.loadgen open   --port P --users LO:HI --rate 300 --duration 5
    ... closed --kind transfer      transfers between random users instead of tasks
    ... closed --kind hold-capture  a hold, then a capture of it: one pair per round
    ... closed --kind wait          a task posted with ?wait=5: accepted once answered 200 (applied)

It posts for random users and prints one JSON object on stdout. It speaks HTTP/1.1 over plain
asyncio protocols (keep-alive, one request in flight per connection) rather than through an HTTP
client library: a library client costs several times more CPU per request, and on a small machine
the load generator would then take the CPU the server under test needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from ..stats import percentile


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("server closed the connection")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result((int(head[0].split()[1]), body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self._lost is not None or self._transport is None:
            raise ConnectionResetError("connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_connection(host: str, port: int) -> HttpConnection:
    _transport, protocol = await asyncio.get_running_loop().create_connection(HttpConnection, host, port)
    return protocol


def post(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def task_request(host: str, port: int, user_id: int, rng: random.Random) -> bytes:
    kind = "write-off" if rng.random() < 0.3 else "replenishment"
    return post(host, port, f"/api/v1/user/{user_id}/amount/", {"type": kind, "amount": rng.randint(1, 100)})


def wait_request(host: str, port: int, user_id: int, rng: random.Random) -> bytes:
    """A task posted with ?wait: answered once it is applied (200), as a synchronous client posts."""
    kind = "write-off" if rng.random() < 0.3 else "replenishment"
    body = {"type": kind, "amount": rng.randint(1, 100)}
    return post(host, port, f"/api/v1/user/{user_id}/amount/?wait=5", body)


def transfer_request(host: str, port: int, user_id: int, rng: random.Random, users: tuple[int, int]) -> bytes:
    low, high = users
    to = low + (user_id - low + rng.randint(1, high - low)) % (high - low + 1)  # anyone but the sender
    return post(host, port, f"/api/v1/user/{user_id}/transfer/", {"to": str(to), "amount": rng.randint(1, 100)})


def with_token(raw: bytes, token: str | None) -> bytes:
    """The request with an Authorization header (after its request line), if there is a token."""
    if token is None:
        return raw
    line, _, rest = raw.partition(b"\r\n")
    return line + f"\r\nAuthorization: Bearer {token}\r\n".encode() + rest


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1000


async def closed_loop(args: argparse.Namespace) -> dict[str, Any]:
    """`clients` connections, each sending its next request as soon as the last is answered."""
    low, high = args.users
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration
    counts = {"accepted": 0, "other": 0, "total": 0}
    latencies: list[float] = []

    async def round_trip(conn: HttpConnection, rng: random.Random) -> bool:
        """One operation (a task, a transfer, or a hold and its capture); True if accepted."""
        user = rng.randint(low, high)
        if args.kind == "task":
            status, _ = await conn.request(task_request(args.host, args.port, user, rng))
            return status == 202
        if args.kind == "wait":
            status, _ = await conn.request(wait_request(args.host, args.port, user, rng))
            return status == 200
        if args.kind == "transfer":
            status, _ = await conn.request(transfer_request(args.host, args.port, user, rng, args.users))
            return status == 202
        amount = rng.randint(2, 100)
        status, body = await conn.request(
            post(args.host, args.port, f"/api/v1/user/{user}/holds/", {"amount": amount, "expires_in": 3600})
        )
        if status != 202:
            return False
        hold_id = json.loads(body)["id"]
        status, _ = await conn.request(
            post(args.host, args.port, f"/api/v1/hold/{hold_id}/capture/", {"amount": amount // 2})
        )
        return status == 202

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = await open_connection(args.host, args.port)
        try:
            while (now := loop.time()) < stop_at:
                sent_at = time.perf_counter()  # uvloop's loop.time() has millisecond steps
                accepted = await round_trip(conn, rng)
                took = time.perf_counter() - sent_at
                counts["total"] += accepted
                if now >= measure_from:
                    counts["accepted" if accepted else "other"] += 1
                    latencies.append(took)
        finally:
            conn.close()

    await asyncio.gather(*(client(args.seed + i) for i in range(args.clients)))
    latencies.sort()
    return {
        "mode": "closed",
        "kind": args.kind,
        "clients": args.clients,
        "seconds": args.duration,
        "accepted": counts["accepted"],
        "other_status": counts["other"],
        "accepted_per_s": counts["accepted"] / args.duration,
        "accepted_with_warmup": counts["total"],
        "http_p50_ms": _ms(percentile(latencies, 0.5)),
        "http_p99_ms": _ms(percentile(latencies, 0.99)),
    }


async def open_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Requests sent on a fixed schedule (`rate` per second) whatever the answers' timing, over a
    pool of connections; the task ids are returned so their created->processed time can be read."""
    low, high = args.users
    rng = random.Random(args.seed)
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(args.clients):
        idle.put_nowait(await open_connection(args.host, args.port))
    total = int(args.rate * args.duration)
    ids: list[int] = []
    statuses: dict[int, int] = {}
    late = 0
    latencies: list[float] = []

    async def send(raw: bytes) -> None:
        conn = await idle.get()
        try:
            sent_at = time.perf_counter()  # uvloop's loop.time() has millisecond steps
            status, body = await conn.request(with_token(raw, args.token))
            latencies.append(time.perf_counter() - sent_at)
        finally:
            idle.put_nowait(conn)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 202:
            ids.append(int(json.loads(body)["id"]))

    in_flight: set[asyncio.Task[None]] = set()
    start = loop.time()
    for n in range(total):
        due = start + n / args.rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        task = asyncio.create_task(send(task_request(args.host, args.port, rng.randint(low, high), rng)))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    elapsed = loop.time() - start
    while not idle.empty():
        idle.get_nowait().close()
    return {
        "mode": "open",
        "rate": args.rate,
        "sent": total,
        "achieved_per_s": total / elapsed,
        "sent_late": late,
        "http_p50_ms": _ms(percentile(sorted(latencies), 0.5)),
        "http_p99_ms": _ms(percentile(sorted(latencies), 0.99)),
        "statuses": {str(k): v for k, v in statuses.items()},
        "task_ids": ids,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="message_broker.bench.loadgen")
    parser.add_argument("mode", choices=["closed", "open"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--users", type=lambda s: tuple(int(x) for x in s.split(":")), required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--token", help="send Authorization: Bearer TOKEN (open loop)")
    parser.add_argument("--kind", choices=["task", "transfer", "hold-capture", "wait"], default="task")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(closed_loop(args) if args.mode == "closed" else open_loop(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
