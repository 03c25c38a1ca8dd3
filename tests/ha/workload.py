"""Load for the failover scenarios: clients that post operations the way a careful client does.

Every operation gets its own `Idempotency-Key` and is retried with that same key after a 503, a 500,
a broken connection or a timeout, until a 2xx answer comes: so every operation ends with exactly one
acknowledged outcome, and the database must hold exactly one task for it.

What an operation is comes from a request kind: a function that, given the client's random
generator and the users, returns (path, JSON body). Balance changes are the first kind; transfers and
holds will be more (`Workload(kinds=[(weight, kind), ...])`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

RequestKind = Callable[[random.Random, Sequence[int]], tuple[str, dict[str, Any]]]


def balance_change(rng: random.Random, users: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """A replenishment or a write-off of a random user; write-offs are frequent enough that some
    are cancelled for insufficient funds."""
    user_id = rng.choice(users)
    body = {"type": "write-off" if rng.random() < 0.45 else "replenishment", "amount": rng.randint(1, 60)}
    return f"/api/v1/user/{user_id}/amount/", body


@dataclass
class Operation:
    """One intended operation: its key, what was asked, and how it ended."""

    key: str
    path: str
    body: dict[str, Any]
    attempts: int = 0
    status: int | None = None  # the 2xx that ended it
    response: Any = None
    acknowledged_at: float | None = None  # time.monotonic() of the 2xx


@dataclass
class WorkloadStats:
    attempts: int = 0  # HTTP requests sent, retries included
    statuses: Counter[int] = field(default_factory=Counter)  # answers by HTTP status
    errors: Counter[str] = field(default_factory=Counter)  # no answer: exception name -> count
    bodies_500: list[str] = field(default_factory=list)  # 5xx other than 503, with their bodies
    unexpected: list[str] = field(default_factory=list)  # 4xx answers (nothing here should be refused)
    ack_times: list[float] = field(default_factory=list)  # time.monotonic() of every 2xx, in order

    @property
    def connection_errors(self) -> int:
        return sum(self.errors.values())


class Workload:
    """`clients` concurrent clients posting operations one after another until stopped."""

    def __init__(
        self,
        base_url: str,
        users: Sequence[int],
        *,
        clients: int = 32,
        kinds: Sequence[tuple[float, RequestKind]] = ((1.0, balance_change),),
        seed: int = 1,
        key_prefix: str = "ha",
        attempt_timeout: float = 10.0,
        retry_pause: float = 0.1,
        finish_timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url
        self.users = list(users)
        self.clients = clients
        self.kinds = [kind for _, kind in kinds]
        self.weights = [weight for weight, _ in kinds]
        self.operations: list[Operation] = []
        self.stats = WorkloadStats()
        self._seed = seed
        self._prefix = f"{key_prefix}-{uuid.uuid4().hex[:8]}"
        self._attempt_timeout = attempt_timeout
        self._retry_pause = retry_pause
        self._finish_timeout = finish_timeout
        self._stop = asyncio.Event()
        self._stopped_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Workload:
        # A new connection per request: a request never rides on a connection the fault broke.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=self._attempt_timeout),
        )
        self._tasks = [asyncio.create_task(self._client(i), name=f"ha-client-{i}") for i in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.finish()

    async def finish(self) -> None:
        """Stop starting operations; each client still retries its current one to a 2xx."""
        if not self._stop.is_set():
            self._stopped_at = time.monotonic()
            self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- figures -------------------------------------------------------------------------------------

    @property
    def acknowledged(self) -> list[Operation]:
        return [op for op in self.operations if op.status is not None]

    @property
    def unfinished(self) -> list[Operation]:
        return [op for op in self.operations if op.status is None]

    @property
    def retries(self) -> int:
        return self.stats.attempts - len(self.operations)

    def acks_after(self, moment: float) -> int:
        return sum(t > moment for t in self.stats.ack_times)

    def longest_gap(self, start: float | None = None, end: float | None = None) -> tuple[float, float]:
        """(seconds, when it ended): the longest time without a 2xx answer, between consecutive ones
        (within [start, end] if given, the edges counting as answers)."""
        times = sorted(self.stats.ack_times)
        if start is not None:
            times = [start, *(t for t in times if t > start)]
        if end is not None:
            times = [*(t for t in times if t < end), end]
        best, ended = 0.0, times[0] if times else 0.0
        for before, after in itertools.pairwise(times):
            if after - before > best:
                best, ended = after - before, after
        return best, ended

    # -- clients -------------------------------------------------------------------------------------

    async def _client(self, index: int) -> None:
        rng = random.Random(self._seed * 1000 + index)
        n = 0
        while not self._stop.is_set():
            kind = rng.choices(self.kinds, self.weights)[0]
            path, body = kind(rng, self.users)
            op = Operation(f"{self._prefix}-{index}-{n}", path, body)
            n += 1
            self.operations.append(op)
            await self.run(op, rng)

    async def run(self, op: Operation, rng: random.Random | None = None) -> Operation:
        """Post `op` until a 2xx answer; retries keep the key. Fails the operation (leaves it
        unacknowledged) only past `finish_timeout` after the load was stopped."""
        assert self._session is not None
        rng = rng or random.Random()
        headers = {"Idempotency-Key": op.key}
        while True:
            op.attempts += 1
            self.stats.attempts += 1
            try:
                async with self._session.post(self.base_url + op.path, json=op.body, headers=headers) as response:
                    text = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.stats.errors[type(exc).__name__] += 1
            else:
                self.stats.statuses[status] += 1
                if 200 <= status < 300:
                    op.status = status
                    op.response = json.loads(text)
                    op.acknowledged_at = time.monotonic()
                    self.stats.ack_times.append(op.acknowledged_at)
                    return op
                if status >= 500 and status != 503:
                    self.stats.bodies_500.append(f"{status} {op.path} {text[:500]}")
                elif status < 500:
                    # Nothing the load sends may be refused; a 4xx stores nothing, so stop here.
                    self.stats.unexpected.append(f"{status} {op.path} {json.dumps(op.body)} {text[:300]}")
                    return op
            if self._stop.is_set() and time.monotonic() - self._stopped_at > self._finish_timeout:
                return op
            await asyncio.sleep(self._retry_pause * (1 + rng.random()))
