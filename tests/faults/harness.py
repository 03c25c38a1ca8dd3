"""The fault suite's tools: the real server as a subprocess, a load of concurrent HTTP clients, an
observer that counts task_processed notifications, a proxy in front of PostgreSQL that can go
half-open, and the end-of-scenario check that every scenario shares."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import aiohttp
import psycopg2
import psycopg2.extensions

from message_broker.db.driver import ListenConnection
from message_broker.db.errors import DatabaseError
from message_broker.db.options import ConnectionOptions

from ..helpers import call, eventually
from ..ledger_check import check_database
from ..pg import admin_connection, free_port

# Settings that make a scenario finish in seconds; the code paths are the ones production runs.
FAST = {
    "SWEEP_INTERVAL": "2",
    "PROBE_INTERVAL": "1",
    "PROBE_TIMEOUT": "1",
    "RECONNECT_MAX_BACKOFF": "0.5",
    "USER_IDLE_TIMEOUT": "1",
}


class ServerProcess:
    """`python -m message_broker serve` in a child process, logging to a file."""

    def __init__(self, database_url: str, log_dir: Path, name: str = "server", **env: str) -> None:
        self.port = free_port()
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL", "PORT")},
            "DATABASE_URL": database_url,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **FAST,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = False  # the scenario stopped it (kill, terminate, stop): its exit is expected
        self.unexpected_exits: list[str] = []  # exits the scenario did not cause, with their log tails

    def exited_on_its_own(self) -> bool:
        """Whether the process has exited although nothing stopped it (and note it if so)."""
        if self.proc is None or self.proc.poll() is None or self._stopping:
            return False
        note = f"{self.name} (start #{self.starts}) exited on its own with status {self.proc.returncode}"
        if not any(line.startswith(note) for line in self.unexpected_exits):
            self.unexpected_exits.append(f"{note}:\n{self.log_tail(25)}")
        return True

    def aborts(self) -> int:
        """How many times the log says the interpreter aborted ("Fatal Python error")."""
        return self.log_text().count("Fatal Python error")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.exited_on_its_own()  # noted before the process is replaced
        self._stopping = False
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- start #{self.starts} ----\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "message_broker", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def wait_ready(self, timeout: float = 20.0) -> float:
        """Poll /ready until 200; returns the seconds it took."""
        started = time.monotonic()

        async def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log_tail()}"
            return await http_status(self.url + "/ready") == 200

        await poll(ready, timeout=timeout, what=f"{self.name} ready", on_fail=self.log_tail)
        return time.monotonic() - started

    async def start_ready(self, timeout: float = 20.0) -> None:
        self.start()
        await self.wait_ready(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.exited_on_its_own()
        self._stopping = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def terminate(self, timeout: float = 15.0) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code or None if it did not exit in `timeout`, seconds taken)."""
        assert self.proc is not None
        self.exited_on_its_own()
        self._stopping = True
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, timeout)
        return self.proc.poll(), time.monotonic() - started

    def stop(self) -> None:
        """Teardown: make sure nothing is left running."""
        self.exited_on_its_own()
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@contextlib.contextmanager
def server_factory(
    log_dir: Path, database_url: str, pool_url: Callable[[str], str] | None = None
) -> Iterator[Callable[..., ServerProcess]]:
    """make(name="server", url=None, **env): ServerProcess objects (not started) on `database_url`
    (or `url`), logging under `log_dir`; every one is killed at the end if still running. With
    `pool_url`, the pool of a server on `database_url` goes where it says (a PgBouncer) and its
    LISTEN connection to `database_url`.

    A service process must never exit on its own, whatever the fault (an abort in native code,
    an unhandled error): at the end, any process that exited without the scenario stopping it
    (kill, terminate, stop) fails the scenario, even if nothing was lost."""
    made: list[ServerProcess] = []

    def make(name: str = "server", url: str | None = None, **env: str) -> ServerProcess:
        if url is None and pool_url is not None:
            url, env = pool_url(database_url), {"LISTEN_DATABASE_URL": database_url, **env}
        server = ServerProcess(url or database_url, log_dir, name=f"{name}{len(made)}", **env)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()
    exits = [note for server in made for note in server.unexpected_exits]
    assert not exits, "service processes exited on their own:\n" + "\n\n".join(exits)


async def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None when nothing answered."""
    try:
        return (await call("GET", url, timeout=timeout))[0]
    except (aiohttp.ClientError, TimeoutError):
        return None


# The fault suite polls a little less often: its probes are requests to servers under load.
poll = functools.partial(eventually, interval=0.05)


# -- load ----------------------------------------------------------------------------------------


class _Clients:
    """`clients` concurrent client tasks (`_client(i)`) sharing one session that opens a new
    connection per request (force_close): a killed server is noticed per request, no request rides
    on a connection a fault broke, and round-robin over several servers really alternates."""

    def __init__(self, clients: int, request_timeout: float) -> None:
        self.clients = clients
        self._timeout = request_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )
        name = type(self).__name__
        self._tasks = [asyncio.create_task(self._client(i), name=f"{name}-{i}") for i in range(self.clients)]
        return self

    async def _client(self, index: int) -> None:
        raise NotImplementedError

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass
class LoadStats:
    sent: int = 0
    acknowledged: list[int] = field(default_factory=list)  # task ids answered 202
    statuses: Counter[int] = field(default_factory=Counter)  # HTTP status -> count
    # HTTP status -> time.monotonic() of its first and of its last answer
    answered: dict[int, tuple[float, float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)  # no HTTP answer: exception name -> count
    max_latency: float = 0.0
    max_error_latency: float = 0.0  # slowest answer that was not a 202 (503s, connection errors)
    bodies_5xx: list[str] = field(default_factory=list)
    acknowledged_by_url: Counter[str] = field(default_factory=Counter)
    # (sent, answered), time.monotonic() of each 202, in the order answered.
    acknowledged_at: list[tuple[float, float]] = field(default_factory=list)
    slow: list[tuple[float, str, float]] = field(default_factory=list)  # (when, answer, seconds) over 1 s


class Load(_Clients):
    """`clients` concurrent clients, each posting tasks one after another until stopped.

    Client i posts to `users_of(i)` in turn, spreading requests over `urls` round-robin. Amounts
    are small against the initial balances, and write-offs frequent, so some are cancelled."""

    def __init__(
        self,
        urls: list[str],
        users_of: Callable[[int], list[int]],
        clients: int,
        *,
        seed: int = 1,
        request_timeout: float = 30.0,
        pause_after_error: float = 0.05,
        amounts: tuple[int, int] = (1, 60),
    ) -> None:
        super().__init__(clients, request_timeout)
        self.urls = urls
        self.users_of = users_of
        self.stats = LoadStats()
        self.stop = asyncio.Event()
        self._seed = seed
        self._pause = pause_after_error
        self._amounts = amounts

    async def __aexit__(self, *exc: object) -> None:
        await self.finish()

    async def finish(self) -> LoadStats:
        self.stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        await self._close_session()
        return self.stats

    async def until_acknowledged(self, count: int, timeout: float = 30.0) -> None:
        await poll(lambda: len(self.stats.acknowledged) >= count, timeout=timeout, what=f"{count} tasks acknowledged")

    def first_acknowledged_sent_after(self, moment: float) -> float | None:
        """When the first 202 came to a request sent after `moment` (None: none yet): a request
        sent before it may have been through already."""
        return min((answered for sent, answered in self.stats.acknowledged_at if sent > moment), default=None)

    async def _client(self, index: int) -> None:
        rng = random.Random(self._seed * 1000 + index)
        users = self.users_of(index)
        n = 0
        assert self._session is not None
        while not self.stop.is_set():
            user_id = users[n % len(users)]
            url = self.urls[(index + n) % len(self.urls)]
            n += 1
            body = {
                "type": "write-off" if rng.random() < 0.45 else "replenishment",
                "amount": rng.randint(*self._amounts),
            }
            self.stats.sent += 1
            started = time.monotonic()
            try:
                async with self._session.post(f"{url}/api/v1/user/{user_id}/amount/", json=body) as response:
                    text = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.stats.errors[type(exc).__name__] += 1
                if time.monotonic() - started > 1.0:
                    self.stats.slow.append(
                        (round(started, 2), type(exc).__name__, round(time.monotonic() - started, 2))
                    )
                self.stats.max_error_latency = max(self.stats.max_error_latency, time.monotonic() - started)
                await asyncio.sleep(self._pause)
                continue
            latency = time.monotonic() - started
            self.stats.max_latency = max(self.stats.max_latency, latency)
            if latency > 1.0:
                self.stats.slow.append((round(started, 2), str(status), round(latency, 2)))
            self.stats.statuses[status] += 1
            now = time.monotonic()
            self.stats.answered[status] = (self.stats.answered.get(status, (now, now))[0], now)
            if status == 202:
                self.stats.acknowledged.append(int(json.loads(text)["id"]))
                self.stats.acknowledged_by_url[url] += 1
                self.stats.acknowledged_at.append((started, time.monotonic()))
            else:
                self.stats.max_error_latency = max(self.stats.max_error_latency, latency)
                if status >= 500 and status != 503:
                    self.stats.bodies_5xx.append(text[:500])
                await asyncio.sleep(self._pause)


# -- clients that retry with an Idempotency-Key ----------------------------------------------------------

# The task types clients post (transfer-in and release are the service's own entries).
POSTED_TYPES = ("replenishment", "write-off", "transfer", "hold", "capture", "void")


@dataclass
class KeyedStats:
    operations: int = 0  # operations begun: Idempotency-Keys used
    attempts: int = 0  # HTTP requests, retries included
    statuses: Counter[int] = field(default_factory=Counter)  # HTTP status -> count, every attempt
    errors: Counter[str] = field(default_factory=Counter)  # no HTTP answer: exception name -> count
    answered: dict[str, int] = field(default_factory=dict)  # Idempotency-Key -> task id of its 2xx
    answered_at: list[float] = field(default_factory=list)  # time.monotonic() of every 2xx, in order
    kinds: Counter[str] = field(default_factory=Counter)  # operations answered, by kind
    bodies_5xx: list[str] = field(default_factory=list)  # 5xx other than 503 (retried, but none expected)
    unexpected: list[str] = field(default_factory=list)  # 4xx answers: nothing the clients send may be refused
    unanswered: list[str] = field(default_factory=list)  # keys still unanswered when the clients gave up
    replayed: int = 0  # 2xx answers marked Idempotent-Replayed (a retry whose first try had succeeded)
    retried: int = 0  # operations that took more than one attempt
    longest_s: float = 0.0  # longest time from an operation's first attempt to its 2xx

    @property
    def retries(self) -> int:
        return self.attempts - self.operations

    @property
    def connection_errors(self) -> int:
        return sum(self.errors.values())

    def answers(self) -> dict[str, int]:
        """Every attempt's outcome: HTTP status or, without an answer, the exception's name -> count."""
        return {str(k): v for k, v in sorted(self.statuses.items())} | dict(self.errors)

    def answered_after(self, moment: float) -> int:
        return sum(t > moment for t in self.answered_at)

    def first_answer_after(self, moment: float) -> float | None:
        return min((t for t in self.answered_at if t > moment), default=None)

    def longest_gap(self, start: float | None = None, end: float | None = None) -> tuple[float, float]:
        """(seconds, when it ended): the longest time without a 2xx answer, between consecutive ones
        (within [start, end] if given, the edges counting as answers)."""
        times = sorted(self.answered_at)
        if start is not None:
            times = [start, *(t for t in times if t > start)]
        if end is not None:
            times = [*(t for t in times if t < end), end]
        best, ended = 0.0, times[0] if times else 0.0
        for before, after in itertools.pairwise(times):
            if after - before > best:
                best, ended = after - before, after
        return best, ended


class KeyedClients(_Clients):
    """`clients` concurrent clients, each doing one operation after another, each with a fresh
    Idempotency-Key, retried with the same key and body until it is answered 2xx (a 503 or another
    5xx, no answer at all, a timeout: try again after `retry_pause`, a range in seconds; a 4xx ends
    the operation as unexpected). Client i works for users[i % len(users)]: top-ups and write-offs,
    transfers to another of `users`, holds (half of them expiring within 1-3 s, so releases at the
    deadline happen meanwhile), and captures (whole, partial, now and then more than the hold) and
    voids of its own acknowledged holds, in the mix of WEIGHTS. Given several service URLs, client i
    starts each operation at url i % len(urls) and tries the next one after a failed attempt (its
    key goes to another process, as behind a load balancer)."""

    WEIGHTS: ClassVar[dict[str, int]] = {
        "replenishment": 25,
        "write-off": 20,
        "transfer": 20,
        "hold": 15,
        "capture": 10,
        "void": 10,
    }

    def __init__(
        self,
        url: str | list[str],
        users: list[int],
        clients: int,
        *,
        seed: int,
        request_timeout: float = 10.0,
        retry_pause: tuple[float, float] = (0.05, 0.05),
    ) -> None:
        super().__init__(clients, request_timeout)
        self.urls = [url] if isinstance(url, str) else url
        self.users = users
        assert set(self.WEIGHTS) <= set(POSTED_TYPES), self.WEIGHTS
        self.stats = KeyedStats()
        self._seed = seed
        self._pause = retry_pause
        self._extra = itertools.count()
        self._stop = asyncio.Event()  # no new operations
        self._give_up = asyncio.Event()  # no more retries either

    async def __aexit__(self, *exc: object) -> None:
        await self.finish(timeout=0)

    async def finish(self, timeout: float) -> KeyedStats:
        """Start no new operation; give the ones under way `timeout` seconds to be answered."""
        self._stop.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            if late:
                self._give_up.set()
                await asyncio.wait(late)
            for task in self._tasks:
                task.result()  # a client that crashed fails the test
            self._tasks = []
        await self._close_session()
        return self.stats

    async def until_answered(self, count: int, timeout: float = 30.0) -> None:
        await poll(lambda: len(self.stats.answered) >= count, timeout=timeout, what=f"{count} operations answered")

    async def post(self, kind: str, path: str, body: dict[str, Any]) -> int | None:
        """One more operation besides the clients' (with a key of its own, retried like theirs):
        its task id once answered 2xx, None if refused or given up."""
        key = f"{self._seed}-extra-{next(self._extra)}"
        return await self._operation(kind, key, path, body, random.Random(key))

    async def _client(self, index: int) -> None:
        rng = random.Random(f"{self._seed}-{index}")
        pauses = random.Random(f"{self._seed}-{index}-pauses")  # retries do not change the choices
        user = self.users[index % len(self.users)]
        others = [u for u in self.users if u != user]
        holds: list[tuple[int, int]] = []  # (hold task id, amount) acknowledged, not yet captured or voided
        kinds, weights = list(self.WEIGHTS), list(self.WEIGHTS.values())
        n = 0
        while not self._stop.is_set():
            n += 1
            kind = rng.choices(kinds, weights)[0]
            if kind in ("capture", "void") and not holds:
                kind = "hold"
            amount = 0
            if kind in ("replenishment", "write-off"):
                path, body = f"/api/v1/user/{user}/amount/", {"type": kind, "amount": rng.randint(1, 60)}
            elif kind == "transfer":
                path = f"/api/v1/user/{user}/transfer/"
                body = {"to": str(rng.choice(others)), "amount": rng.randint(1, 60)}
            elif kind == "hold":
                amount = rng.randint(1, 100)
                expires_in = rng.randint(1, 3) if rng.random() < 0.5 else 3600
                path, body = f"/api/v1/user/{user}/holds/", {"amount": amount, "expires_in": expires_in}
            else:
                hold_id, hold_amount = holds.pop(rng.randrange(len(holds)))
                path = f"/api/v1/hold/{hold_id}/{kind}/"
                body = {} if kind == "void" or rng.random() < 0.4 else {"amount": rng.randint(1, hold_amount + 5)}
            task_id = await self._operation(kind, f"{self._seed}-{index}-{n}", path, body, pauses, index)
            if task_id is not None and kind == "hold":
                holds.append((task_id, amount))

    async def _operation(
        self, kind: str, key: str, path: str, body: dict[str, Any], pauses: random.Random, home: int = 0
    ) -> int | None:
        assert self._session is not None
        self.stats.operations += 1
        started = time.monotonic()
        for attempt in itertools.count():
            if self._give_up.is_set():
                self.stats.unanswered.append(key)
                return None
            if attempt:
                await asyncio.sleep(pauses.uniform(*self._pause))
            self.stats.attempts += 1
            try:
                url = self.urls[(home + attempt) % len(self.urls)]
                async with self._session.post(url + path, json=body, headers={"Idempotency-Key": key}) as response:
                    status, text = response.status, await response.text()
                    replayed = response.headers.get("Idempotent-Replayed") == "true"
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.stats.errors[type(exc).__name__] += 1
                continue
            self.stats.statuses[status] += 1
            if 200 <= status < 300:
                self.stats.answered_at.append(time.monotonic())
                self.stats.retried += attempt > 0
                self.stats.replayed += replayed
                self.stats.longest_s = max(self.stats.longest_s, time.monotonic() - started)
                task_id = int(json.loads(text)["id"])
                self.stats.answered[key] = task_id
                self.stats.kinds[kind] += 1
                return task_id
            if status >= 500:
                if status != 503:
                    self.stats.bodies_5xx.append(f"{status} {path} {text[:500]}")
                continue  # not known whether it was stored: the same key again
            self.stats.unexpected.append(f"{status} {path} {json.dumps(body)} {text[:300]}")
            return None  # a 4xx stored nothing
        raise AssertionError("unreachable")


# -- observing task_processed ----------------------------------------------------------------------


class ProcessedObserver:
    """Counts task_processed notifications per task id on its own connection: a task finished by
    two transactions would show up twice."""

    def __init__(self, database_url: str) -> None:
        self._options = ConnectionOptions(database_url)
        self.seen: Counter[int] = Counter()
        self.lost_connection = False
        self._conn: ListenConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ProcessedObserver:
        self._conn = await ListenConnection.open(self._options, ["task_processed"])
        self._task = asyncio.create_task(self._run(), name="observer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None and self._conn is not None
        # Drain what has arrived, then stop.
        self._conn.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        assert self._conn is not None
        try:
            while True:
                notification = await self._conn.next_notification(timeout=3600)
                if notification is not None:
                    self.seen[int(json.loads(notification.payload)["id"])] += 1
        except DatabaseError:
            self.lost_connection = True

    @property
    def twice(self) -> list[int]:
        return sorted(task_id for task_id, count in self.seen.items() if count > 1)


# -- the database side -------------------------------------------------------------------------------


def create_users(database_url: str, balances: list[int], prefix: str = "user") -> dict[int, int]:
    """Users straight in SQL: {id: initial balance}."""
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        ids = []
        for i, balance in enumerate(balances):
            cur.execute("INSERT INTO users (username, balance) VALUES (%s, %s) RETURNING id", (f"{prefix}{i}", balance))
            ids.append(cur.fetchone()[0])
    return dict(zip(ids, balances, strict=True))


def pending_count(database_url: str) -> int:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
        return int(cur.fetchone()[0])


def finished_ids(database_url: str) -> set[int]:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT id FROM tasks WHERE status <> 'pending'")
        return {row[0] for row in cur.fetchall()}


async def wait_drained(database_url: str, timeout: float = 30.0, observer: ProcessedObserver | None = None) -> float:
    """Wait until no task is pending (and the observer has heard of every finished one)."""
    started = time.monotonic()
    await poll(lambda: pending_count(database_url) == 0, timeout=timeout, interval=0.1, what="no task pending")
    elapsed = time.monotonic() - started
    if observer is not None:
        await poll(
            lambda: not finished_ids(database_url) - set(observer.seen),
            timeout=10,
            interval=0.1,
            what="task_processed heard for every finished task",
        )
    return elapsed


Cursor = psycopg2.extensions.cursor


@contextlib.contextmanager
def ledger_snapshot(database_url: str) -> Iterator[Cursor]:
    """A cursor in one read-only REPEATABLE READ transaction: every check made through it reads the
    same snapshot of the database, as if nothing else ran meanwhile."""
    conn = psycopg2.connect(database_url)
    with contextlib.closing(conn):
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            yield cur
        conn.rollback()


@contextlib.contextmanager
def _cursor(database_url: str, cur: Cursor | None) -> Iterator[Cursor]:
    """`cur` if given, else one of a connection of its own (autocommit: each query its own snapshot)."""
    if cur is not None:
        yield cur
        return
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as own:
        yield own


@dataclass
class Outcome:
    """What one scenario saw; recorded for the README's Reliability section."""

    scenario: str
    injected: str
    sent: int = 0
    acknowledged: int = 0
    applied: int = 0
    lost: int = 0
    applied_twice: int = 0
    stored_unacknowledged: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def final_check(
    database_url: str,
    initial: dict[int, int],
    stats: LoadStats | None,
    outcome: Outcome,
    *,
    observer: ProcessedObserver | None = None,
    sequential_users: set[int] | frozenset[int] = frozenset(),
    extra_acknowledged: list[int] | None = None,
    cur: Cursor | None = None,
) -> Outcome:
    """Every scenario ends here: the ledger of every user, every 202 stored and applied, no 5xx
    other than 503, and (when an observer watched throughout) no task finished twice. With `cur`,
    it reads through that cursor (a snapshot: see ledger_snapshot)."""
    acknowledged = [*(stats.acknowledged if stats else []), *(extra_acknowledged or [])]
    with _cursor(database_url, cur) as cur:
        summary = check_database(cur, initial, acknowledged=acknowledged, sequential_users=sequential_users)
    finished = summary.task_ids  # every task, all of them finished (check_database found none pending)
    assert len(set(acknowledged)) == len(acknowledged), "the API acknowledged one task id twice"
    outcome.acknowledged = len(acknowledged)
    outcome.applied = len(finished & set(acknowledged))
    outcome.lost = len(set(acknowledged) - finished)
    outcome.stored_unacknowledged = summary.stored - len(set(acknowledged))
    if stats is not None:
        outcome.sent += stats.sent
        outcome.answers = {str(k): v for k, v in sorted(stats.statuses.items())} | dict(stats.errors)
        assert not stats.bodies_5xx, f"5xx answers other than 503: {stats.bodies_5xx[:3]}"
    if observer is not None:
        assert not observer.lost_connection, "the observer lost its connection; it cannot vouch for exactly-once"
        outcome.applied_twice = len(observer.twice)
        assert not observer.twice, f"tasks finished twice: {observer.twice[:20]}"
        missing = finished - set(observer.seen)
        assert not missing, f"tasks finished without a task_processed notification: {sorted(missing)[:20]}"
    assert outcome.lost == 0
    return outcome


def final_check_keyed(
    database_url: str, initial: dict[int, int], stats: KeyedStats, outcome: Outcome, cur: Cursor | None = None
) -> Outcome:
    """The end of a scenario under KeyedClients (after `wait_settled`): every operation answered 2xx,
    none refused, no 5xx but 503; every key answered is stored with the task its 2xx named, every key
    names exactly one task and every task of the posted types has exactly one key (a retry that
    stored a second task fails here); then final_check over every acknowledged task."""
    assert not stats.bodies_5xx, f"5xx answers other than 503: {stats.bodies_5xx[:5]}"
    assert not stats.unexpected, f"answers that are neither 2xx nor 5xx: {stats.unexpected[:5]}"
    assert not stats.unanswered, f"operations never answered 2xx: {stats.unanswered[:5]}"
    ids = list(stats.answered.values())
    assert len(set(ids)) == len(ids), "two keys were answered with the same task"
    per_key = check_keys(database_url, stats.answered, cur)
    outcome.sent = stats.attempts
    final_check(database_url, initial, None, outcome, extra_acknowledged=ids, cur=cur)
    # The service's own entries (transfer-in, release) are not requests nobody acknowledged.
    outcome.stored_unacknowledged = per_key["tasks_posted"] - len(ids)
    outcome.answers = stats.answers()
    outcome.notes |= {
        "operations": dict(stats.kinds),
        "retried": stats.retried,
        "replayed": stats.replayed,
        "longest_to_2xx_s": round(stats.longest_s, 2),
        **per_key,
    }
    return outcome


def check_keys(database_url: str, answered: dict[str, int], cur: Cursor | None = None) -> dict[str, Any]:
    """The keys stored are exactly the ones answered, each with the 202 and the task its client got;
    no two keys name one task, and the tasks of the posted types are exactly the ones the keys name.
    Returns figures for the report."""
    with _cursor(database_url, cur) as cur:
        cur.execute("SELECT key, response_status, response_body FROM idempotency_keys")
        rows = cur.fetchall()
        cur.execute("SELECT id FROM tasks WHERE type = ANY(%s)", (list(POSTED_TYPES),))
        posted = {row[0] for row in cur.fetchall()}
        cur.execute("SELECT type, status, count(*) FROM tasks GROUP BY type, status ORDER BY 1, 2")
        by_type = {f"{kind} {status}": count for kind, status, count in cur.fetchall()}
    without_answer = [key for key, _, body in rows if body is None]
    assert not without_answer, f"keys committed without their answer: {without_answer[:5]}"
    stored = {key: (status, int(json.loads(body)["id"])) for key, status, body in rows}
    assert set(stored) == set(answered), (
        f"keys stored but never answered: {sorted(set(stored) - set(answered))[:5]}, "
        f"answered but not stored: {sorted(set(answered) - set(stored))[:5]}"
    )
    wrong = [(key, stored[key], task_id) for key, task_id in answered.items() if stored[key] != (202, task_id)]
    assert not wrong, f"keys whose stored answer is not the 202 the client got (key, stored, got): {wrong[:5]}"
    key_tasks = [task_id for _, task_id in stored.values()]
    assert len(key_tasks) == len(set(key_tasks)), "two keys name one task"
    assert set(key_tasks) == posted, (
        f"tasks without a key: {sorted(posted - set(key_tasks))[:10]}, "
        f"keys without a task: {sorted(set(key_tasks) - posted)[:10]}"
    )
    return {"keys": len(stored), "tasks_posted": len(posted), "tasks": by_type}


async def wait_settled(database_url: str, timeout: float = 60.0) -> float:
    """Wait until no task is pending and no hold is left that the deadline timer is yet to release
    (short holds expire within seconds, the others in an hour), so that the checks read a database
    nobody changes any more; returns the seconds it took."""

    def settled() -> bool:
        conn = admin_connection(database_url)
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute(
                "SELECT (SELECT count(*) FROM tasks WHERE status = 'pending')"
                " + (SELECT count(*) FROM holds WHERE status = 'active' AND expires_at < now() + interval '10 minutes')"
            )
            return int(cur.fetchone()[0]) == 0

    started = time.monotonic()
    await poll(settled, timeout=timeout, interval=0.1, what="no task pending and no hold past its deadline")
    return time.monotonic() - started


def draw_seed() -> int:
    """FAULTS_SEED if given (to replay a run), else a new seed; the scenarios print and report it."""
    given = os.environ.get("FAULTS_SEED")
    return int(given) if given else random.SystemRandom().randrange(1_000_000)


# -- a TCP fault proxy -----------------------------------------------------------------------------------

# What the proxy does to a new connection (FaultProxy.accepting).
PASS, CLOSE, HANDSHAKE_CLOSE, RESET, REFUSE, SILENT = "pass", "close", "handshake-close", "reset", "refuse", "silent"
CONNECT_FAULTS = (CLOSE, HANDSHAKE_CLOSE, RESET, REFUSE, SILENT)


class FaultProxy:
    """TCP on 127.0.0.1 in front of PostgreSQL (its Unix socket path, or "host:port"), the tests' own
    (the kernel here has no netem, and no third-party binary is used).

    What happens to a new connection is `accepting`, set with `set_accepting()`: PASS forwards it;
    CLOSE accepts and closes at once; HANDSHAKE_CLOSE lets the start-up begin (the client's first
    bytes, and then 0-2 answers of the server) and closes it mid-way; RESET accepts and answers
    with a TCP reset; REFUSE stops listening (the kernel refuses: ECONNREFUSED); SILENT accepts and
    swallows everything. On the connections already open: `stall()` makes them black holes (bytes
    swallowed both ways, nothing closed, as when the path to a host dies) and new ones SILENT,
    `heal()` lets new ones through again (the stalled ones stay dead); `reset_all()` resets every
    one of them; `latency` seconds delay every chunk each way."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        self._upstream = upstream
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._frozen: set[int] = set()  # ids of connection pairs that stalled
        self._pairs = 0
        self._rng = random.Random(seed)
        self.accepting = PASS
        self.latency = 0.0
        self.port = 0
        self.connections: Counter[str] = Counter()  # new connections by what was done to them

    @property
    def stalled(self) -> bool:
        return self.accepting == SILENT

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def set_accepting(self, mode: str) -> None:
        self.accepting = mode
        if mode == REFUSE:
            if self._server is not None:
                self._server.close()  # stops listening; the connections open stay
                self._server = None
        else:
            await self.start()

    def stall(self) -> None:
        self.accepting = SILENT
        self._frozen.update(range(self._pairs))

    def heal(self) -> None:
        self.accepting = PASS

    async def cycle(self, seconds: float, *, seed: int, pause: tuple[float, float] = (0.02, 0.2)) -> Counter[str]:
        """Change what happens to connections every 20-200 ms for `seconds`, at random (seeded):
        let them through, reset all the open ones, stall them, or one of CONNECT_FAULTS for the new
        ones; then let them through again. Returns how often each was done."""
        rng = random.Random(seed)
        done: Counter[str] = Counter()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            draw = rng.random()
            if draw < 0.3:
                await self.set_accepting(PASS)
                done[PASS] += 1
            elif draw < 0.45:
                self.reset_all()
                done["reset-all"] += 1
            elif draw < 0.5:
                self.stall()
                done["stall"] += 1
            else:
                mode = rng.choice(CONNECT_FAULTS)
                await self.set_accepting(mode)
                done[mode] += 1
            await asyncio.sleep(rng.uniform(*pause))
        await self.set_accepting(PASS)
        return done

    def reset_all(self) -> int:
        """Reset every open connection, both sides; returns how many sockets were reset."""
        writers = list(self._writers)
        for writer in writers:
            _reset(writer)
        self._writers.clear()
        return len(writers)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._live):
            task.cancel()
        await asyncio.gather(*self._live, return_exceptions=True)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._upstream.startswith("/"):
            return await asyncio.open_unix_connection(self._upstream)
        host, port = self._upstream.rsplit(":", 1)
        return await asyncio.open_connection(host, int(port))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._live.add(task)
        self._writers.add(writer)
        pair = self._pairs
        self._pairs += 1
        mode = self.accepting
        self.connections[mode] += 1
        try:
            if mode == SILENT:
                self._frozen.add(pair)
                await self._swallow(reader)
            elif mode == RESET:
                _reset(writer)
            elif mode in (PASS, HANDSHAKE_CLOSE):
                answers = self._rng.randrange(3) if mode == HANDSHAKE_CLOSE else None
                up_reader, up_writer = await self._open_upstream()
                self._writers.add(up_writer)
                try:
                    await asyncio.gather(
                        self._pump(reader, up_writer, pair, None),
                        self._pump(up_reader, writer, pair, answers),
                    )
                finally:
                    self._writers.discard(up_writer)
                    up_writer.close()
            # CLOSE, or REFUSE while a connection was being accepted: closed at once.
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self._live.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, pair: int, chunks: int | None
    ) -> None:
        """Forward `source` to `sink`, each chunk `latency` late, in order; with `chunks`, close
        both ways after that many (a connection cut during its start-up)."""
        forwarded = 0
        while chunks is None or forwarded < chunks:
            data = await source.read(65536)
            if not data:
                break
            if pair in self._frozen:
                continue  # swallowed, as by a dead link
            if self.latency:
                await asyncio.sleep(self.latency)
            sink.write(data)
            await sink.drain()
            forwarded += 1
        if pair not in self._frozen:
            sink.close()  # pass the close on; a dead link would not
        if chunks is not None:
            raise ConnectionResetError("closed during the start-up")  # ends the other direction too

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not a FIN: SO_LINGER 0, then drop the socket."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
