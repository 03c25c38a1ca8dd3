"""The webhook sender in a process of its own (WEBHOOK_SENDER=process, the default), as `serve`
runs it: the real server as a subprocess, its sender a child of it, a real receiver. The child
is woken through its stdin, its results counted by the service's /metrics, restarted when it
dies, and gone when the service is (stopped, or killed with -9)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import aiohttp

from .. import pg
from ..conftest import StartServer
from ..faults.harness import FaultProxy
from ..helpers import eventually
from ..servers import ServerProcess
from ..webhook_receiver import Receiver


def sender_pids(parent: int) -> list[int]:
    """The live `send-webhooks` children of process `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        alive = not fields.get("State", "").startswith(("Z", "X"))
        if alive and fields.get("PPid", "").strip() == str(parent) and b"send-webhooks" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state and "State:\tX" not in state


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> dict[str, object]:
    async with session.post(url, json=body) as response:
        assert response.status in (200, 201, 202), await response.text()
        return await response.json()  # type: ignore[no-any-return]


async def delivered_count(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('message_broker_webhook_deliveries_total{result="delivered"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_sender_process_delivers_is_counted_restarted_and_ends_with_the_service(
    start_server: StartServer, receiver: Receiver
) -> None:
    server = await start_server(WEBHOOK_ALLOW_PRIVATE="true")
    base = server.url
    (first,) = await eventually(lambda: sender_pids(server.pid) or None, timeout=10, what="the sender process")
    async with aiohttp.ClientSession() as session:
        hook = await post(session, f"{base}/api/v1/webhooks/", {"url": receiver.url})
        user = await post(session, f"{base}/api/v1/user/", {"username": "piped", "balance": 0})
        one = await post(session, f"{base}/api/v1/user/{user['id']}/amount/", {"type": "replenishment", "amount": 1})
        await eventually(lambda: len(receiver.accepted()) == 1, timeout=10, what="the first event")
        # Counted by the service, from the child's results.
        await eventually(lambda: _at_least(session, base, 1), timeout=10, what="delivered counted")

        # The child killed: the service starts another, which sends what comes next.
        os.kill(first, signal.SIGKILL)
        (second,) = await eventually(
            lambda: [pid for pid in sender_pids(server.pid) if pid != first] or None, timeout=15, what="a new sender"
        )
        two = await post(session, f"{base}/api/v1/user/{user['id']}/amount/", {"type": "replenishment", "amount": 2})
        await eventually(lambda: len(receiver.accepted()) == 2, timeout=15, what="the second event")
        await eventually(lambda: _at_least(session, base, 2), timeout=10, what="both counted")
    assert receiver.task_ids() == {one["id"], two["id"]}
    receiver.verify_all(str(hook["secret"]))

    # Stopped: the child goes with it, and the service still exits 0.
    assert server.stop() == 0
    await eventually(lambda: not alive(second), timeout=10, what="the sender gone with the service")


async def test_a_service_killed_with_minus_9_leaves_no_sender_behind(start_server: StartServer) -> None:
    server = await start_server()
    (child,) = await eventually(lambda: sender_pids(server.pid) or None, timeout=10, what="the sender process")
    server.signal(signal.SIGKILL)
    # Its stdin closed with the service: it stops by itself.
    await eventually(lambda: not alive(child), timeout=15, what="the orphaned sender gone")


async def test_the_sender_process_abandons_its_connections_when_the_path_goes_silent(
    owned_pg: pg.OwnedPostgres, receiver: Receiver, tmp_path: Path
) -> None:
    """The child's pool reaches the database the way the service's does: when the listener shows
    that path silent (half-open: bytes swallowed, nothing closed) the child retires its connections
    on it too. Before, its idle connection stayed in its pool through the stall, and after the heal
    its next claim waited out the query limit (15 s) on it, once per such connection (up to 4): the
    API served again at once, the webhooks 15-60 s later."""
    proxy = FaultProxy(owned_pg.socket_path)
    await proxy.start()
    name = f"mb_sender_silent_{uuid.uuid4().hex[:8]}"
    server: ServerProcess | None = None
    try:
        with pg.fresh_database(owned_pg.uri(), name):
            via_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
            server = ServerProcess(
                via_proxy,
                tmp_path / "server.log",
                LISTEN_DATABASE_URL=via_proxy,
                WEBHOOK_ALLOW_PRIVATE="true",
                PROBE_INTERVAL="0.5",
                PROBE_TIMEOUT="0.5",
                RECONNECT_MAX_BACKOFF="0.5",
            )
            await server.start()
            base = server.url
            async with aiohttp.ClientSession() as session:
                hook = await post(session, f"{base}/api/v1/webhooks/", {"url": receiver.url})
                user = await post(session, f"{base}/api/v1/user/", {"username": "silent", "balance": 0})
                amount = f"{base}/api/v1/user/{user['id']}/amount/"
                await post(session, amount, {"type": "replenishment", "amount": 1})
                # Delivered and recorded: the child's pool holds idle connections on the path now.
                await eventually(lambda: len(receiver.accepted()) == 1, timeout=10, what="the first event")
                await eventually(
                    lambda: _delivered(session, f"{base}/api/v1/webhooks/{hook['id']}", 1), timeout=10, what="recorded"
                )

                proxy.stall()
                await eventually(lambda: "listen path_silent" in server.log_tail(10**6), timeout=15, what="path silent")
                proxy.heal()
                await server.wait_ready(timeout=15)
                await post(session, amount, {"type": "replenishment", "amount": 2})
                posted = time.monotonic()
                await eventually(lambda: len(receiver.accepted()) == 2, timeout=40, what="the second event")
                # The query limit is 15 s; a reconnect and a claim take well under a second.
                assert time.monotonic() - posted < 8, server.log_tail()
    finally:
        if server is not None:
            server.stop()
        await proxy.close()


async def _delivered(session: aiohttp.ClientSession, url: str, count: int) -> bool:
    async with session.get(url) as response:
        return bool((await response.json())["deliveries"]["delivered"] >= count)


async def _at_least(session: aiohttp.ClientSession, base: str, count: int) -> bool:
    return await delivered_count(session, base) >= count
