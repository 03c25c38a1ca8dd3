"""d. The combined schedule: cluster faults, process faults and network faults together, at random
(seeded: FAULTS_SEED replays the draws), for HA_COMBINED_S seconds (5 minutes by default; CI runs 2).

Two service processes (`python -m message_broker serve`) reach the cluster's HAProxy endpoint
through the tests' fault proxy (tests/faults/harness.py FaultProxy); 2 x 16 clients (KeyedClients:
top-ups, write-offs, transfers, holds expiring within seconds or an hour, captures and voids, each
with its Idempotency-Key, retried until answered) use one process each. Every 8-15 s one fault:

- leader-kill: kill -9 of the Patroni leader's node (Patroni and postmaster); it is started again
  (and rejoins as a replica) 5-10 s after the new leader is up;
- switchover: patronictl switchover to the synchronous standby;
- kill-9 / sigterm: one service process killed, or stopped with SIGTERM (it must exit 0 within
  15 s), and started again at once;
- latency: 20 ms each way on every chunk through the proxy, for 10 s;
- silence: every open connection through the proxy goes silent (bytes swallowed, nothing closed);
  new connections get through;
- reset-all: every open connection reset, and new ones refused for 3 s.

The kinds come from a shuffled bag (each once in every seven draws, so even a short run has them all).

A cluster fault is drawn only while the cluster is whole (three members, a synchronous standby), so
that a second one cannot stop all writes in strict synchronous mode; otherwise another kind is drawn.

At the end everything is healed, the load stops (every operation answered), the database settles,
the processes are stopped (SIGTERM, exit 0), and then the checks read the ledger in one REPEATABLE
READ snapshot: every ledger explained by its finished tasks, transfers paired, holds resolved once,
users.held equal to the active holds, money conserved, every key one task and every posted task one
key, nothing acknowledged lost, no 5xx but 503; none heard applied twice; and no process exited on
its own or aborted (the harness fails the scenario otherwise)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import pytest

from message_broker.db.options import dsn_database

from ..faults.harness import (
    PASS,
    REFUSE,
    FaultProxy,
    KeyedClients,
    KeyedStats,
    ServerProcess,
    create_users,
    draw_seed,
    final_check_keyed,
    ledger_snapshot,
    poll,
    wait_settled,
)
from . import cluster
from .observer import ReconnectingObserver
from .test_failover import SERVICE_ENV, HaOutcome

pytestmark = pytest.mark.ha

DURATION_S = float(os.environ.get("HA_COMBINED_S", "300"))
CLIENTS_PER_PROCESS = 16
USERS = 16
BETWEEN_FAULTS_S = (8.0, 15.0)
LATENCY_S, LATENCY_FOR_S = 0.020, 10.0
REFUSE_FOR_S = 3.0
REJOIN_AFTER_S = (5.0, 10.0)
FAULTS = ("leader-kill", "switchover", "kill-9", "sigterm", "latency", "silence", "reset-all")
CLUSTER_FAULTS = ("leader-kill", "switchover")
RETRY_PAUSE_S = (0.1, 0.2)
# Two faults can add up (a silence leaves statements waiting out the 15 s query limit, a leader's
# death then costs the TTL and more): not a target, only proof that writes always come back.
MAX_GAP_S = 60.0


class Schedule:
    """Draws and injects the faults; remembers when each began (for the gap per type)."""

    def __init__(
        self, ha: cluster.Layout, proxy: FaultProxy, processes: list[ServerProcess], rng: random.Random
    ) -> None:
        self.ha = ha
        self.proxy = proxy
        self.processes = processes
        self.rng = rng
        self.injected: list[tuple[float, str, str]] = []  # (time.monotonic(), kind, detail)
        self._background: set[asyncio.Task[None]] = set()
        self._bag: list[str] = []

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(*BETWEEN_FAULTS_S))
            if time.monotonic() >= deadline:
                break
            kind = await self._draw()
            started = time.monotonic()
            detail = await getattr(self, "_" + kind.replace("-", "_"))()
            self.injected.append((started, kind, detail))
            print(f"{started:.1f} {kind}: {detail}", flush=True)
        await self.heal()

    async def _draw(self) -> str:
        """The next kind from a shuffled bag of all of them (every kind comes once in each seven);
        a cluster fault only while the cluster is whole, else it waits for a later draw."""
        if not self._bag:
            self._bag = list(FAULTS)
            self.rng.shuffle(self._bag)
        whole = await asyncio.to_thread(cluster.healthy, self.ha)
        kind = next((k for k in self._bag if whole or k not in CLUSTER_FAULTS), None)
        if kind is None:  # only cluster faults left and the cluster is not whole yet
            return self.rng.choice([k for k in FAULTS if k not in CLUSTER_FAULTS])
        self._bag.remove(kind)
        return kind

    async def heal(self) -> None:
        """Everything as it was: background steps done, no latency, connections through, three members."""
        await asyncio.gather(*self._background)
        self.proxy.latency = 0.0
        await self.proxy.set_accepting(PASS)
        for node in self.ha.nodes:
            await asyncio.to_thread(cluster.start_node, self.ha, node.name)
        await asyncio.to_thread(cluster.wait_healthy, self.ha)
        for process in self.processes:
            if process.proc is None or process.proc.poll() is not None:
                await process.start_ready(timeout=60)

    def _later(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _leader_kill(self) -> str:
        leader = await asyncio.to_thread(cluster.leader_name, self.ha)
        assert leader, "no leader to kill"
        await asyncio.to_thread(cluster.kill_node, self.ha, leader)

        async def rejoin() -> None:
            await poll(
                lambda: asyncio.to_thread(cluster.leader_name, self.ha),
                timeout=self.ha.ttl + 30,
                interval=0.2,
                what="a new leader",
            )
            await asyncio.sleep(self.rng.uniform(*REJOIN_AFTER_S))
            await asyncio.to_thread(cluster.start_node, self.ha, leader)

        self._later(rejoin())
        return leader

    async def _switchover(self) -> str:
        leader = await asyncio.to_thread(cluster.leader_name, self.ha)
        candidates = await asyncio.to_thread(cluster.sync_standbys, self.ha)
        assert leader and candidates, "no leader or synchronous standby for a switchover"
        await asyncio.to_thread(
            cluster.patronictl, self.ha, "switchover", "--leader", leader, "--candidate", candidates[0], "--force"
        )
        return f"{leader} -> {candidates[0]}"

    async def _kill_9(self) -> str:
        process = self.rng.choice(self.processes)
        process.kill()
        await process.start_ready(timeout=60)
        return process.name

    async def _sigterm(self) -> str:
        process = self.rng.choice(self.processes)
        code, took = await process.terminate(timeout=15)
        assert code == 0, f"{process.name} exited {code} after SIGTERM ({took:.1f} s):\n{process.log_tail()}"
        await process.start_ready(timeout=60)
        return f"{process.name} exit 0 in {took:.1f} s"

    async def _latency(self) -> str:
        self.proxy.latency = LATENCY_S

        async def restore() -> None:
            await asyncio.sleep(LATENCY_FOR_S)
            self.proxy.latency = 0.0

        self._later(restore())
        return f"{LATENCY_S * 1000:.0f} ms each way for {LATENCY_FOR_S:.0f} s"

    async def _silence(self) -> str:
        self.proxy.stall()
        self.proxy.heal()  # the open connections stay silent; new ones get through
        return "open connections silent"

    async def _reset_all(self) -> str:
        count = self.proxy.reset_all()
        await self.proxy.set_accepting(REFUSE)

        async def accept_again() -> None:
            await asyncio.sleep(REFUSE_FOR_S)
            await self.proxy.set_accepting(PASS)

        self._later(accept_again())
        return f"{count} sockets reset, new connections refused for {REFUSE_FOR_S:.0f} s"


def merged(*all_stats: KeyedStats) -> KeyedStats:
    """One KeyedStats of several clients' (their keys are distinct: each has a seed of its own)."""
    total = KeyedStats()
    for stats in all_stats:
        for f in fields(KeyedStats):
            mine, theirs = getattr(total, f.name), getattr(stats, f.name)
            if isinstance(mine, dict):  # Counters too
                mine.update(theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            elif f.name == "longest_s":
                total.longest_s = max(mine, theirs)
            else:
                setattr(total, f.name, mine + theirs)
    total.answered_at.sort()
    return total


def gaps_by_type(
    stats: KeyedStats, injected: list[tuple[float, str, str]], started: float, ended: float
) -> dict[str, float]:
    """For each kind of fault, the longest time without a 2xx answer that began under it: a gap is
    counted for the last fault begun before it (up to 0.5 s after: answers already on their way
    still arrive), even if it lasts into the next one (that is the point of combining them)."""
    found: dict[str, float] = defaultdict(float)
    times = [started, *(t for t in stats.answered_at if started < t < ended), ended]
    for before, after in itertools.pairwise(times):
        under = [kind for start, kind, _ in injected if start <= before + 0.5]
        kind = under[-1] if under else "none yet"
        found[kind] = round(max(found[kind], after - before), 2)
    return dict(sorted(found.items()))


async def test_combined_random_schedule(
    healthy_cluster: cluster.Layout,
    ha_database: str,
    servers: Callable[..., ServerProcess],
    record: Callable[[HaOutcome], None],
) -> None:
    seed = draw_seed()
    print(f"\ncombined schedule: FAULTS_SEED={seed} HA_COMBINED_S={DURATION_S:.0f}")
    outcome = HaOutcome(
        f"d combined {DURATION_S:.0f} s", "cluster, process and network faults at random, 2 processes, the whole API"
    )
    outcome.notes["seed"] = seed
    proxy = FaultProxy(f"127.0.0.1:{healthy_cluster.haproxy_port}", seed=seed)
    await proxy.start()
    via_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/{dsn_database(ha_database)}"
    processes = [servers(name=name, url=via_proxy, **SERVICE_ENV) for name in ("a", "b")]
    try:
        for process in processes:
            await process.start_ready(timeout=60)  # the first one migrates the fresh database
        initial = create_users(ha_database, [1_000] * USERS, prefix="combined")
        users = list(initial)
        schedule = Schedule(healthy_cluster, proxy, processes, random.Random(seed))
        with ReconnectingObserver(ha_database) as observer:
            loads = [
                KeyedClients(process.url, users, CLIENTS_PER_PROCESS, seed=seed * 10 + i, retry_pause=RETRY_PAUSE_S)
                for i, process in enumerate(processes)
            ]
            async with loads[0], loads[1]:
                started = time.monotonic()
                await poll(lambda: all(len(load.stats.answered) >= 50 for load in loads), timeout=60, what="load")
                await schedule.run(DURATION_S)
                healed = time.monotonic()
                answered = [len(load.stats.answered) for load in loads]
                await poll(
                    lambda: all(len(load.stats.answered) > n + 20 for load, n in zip(loads, answered, strict=True)),
                    timeout=60,
                    what="both processes answering after the schedule",
                )
                outcome.notes["writes_back_after_heal_s"] = round(time.monotonic() - healed, 2)
                stats = merged(*[await load.finish(timeout=60) for load in loads])
                ended = time.monotonic()
            outcome.notes["settle_s"] = round(await wait_settled(ha_database, timeout=120), 2)
        for process in processes:
            code, _ = await process.terminate(timeout=15)
            assert code == 0, f"{process.name} exited {code} at the end:\n{process.log_tail()}"
        aborts = {process.name: process.aborts() for process in processes}
        faults = Counter(kind for _, kind, _ in schedule.injected)
        outcome.operations = stats.operations
        outcome.acknowledged = len(stats.answered)
        outcome.retries = stats.retries
        outcome.connection_errors = stats.connection_errors
        outcome.answers_503 = stats.statuses[503]
        outcome.answers_500 = sum(n for status, n in stats.statuses.items() if status >= 500 and status != 503)
        outcome.write_gap_s = round(stats.longest_gap(started, ended)[0], 2)
        outcome.notes |= {
            "faults": dict(sorted(faults.items())),
            "longest_gap_by_fault_s": gaps_by_type(stats, schedule.injected, started, ended),
            "aborts": sum(aborts.values()),
            "starts": {process.name: process.starts for process in processes},
            "proxy_connections": dict(proxy.connections),
            "injected": [f"{t - started:.0f}s {kind} ({detail})" for t, kind, detail in schedule.injected],
            "observer_connects": observer.connects,
        }
        record(outcome)
        if len(schedule.injected) >= 2 * len(FAULTS):
            assert set(faults) == set(FAULTS), f"not every kind of fault was drawn: {faults}"
        assert not any(aborts.values()), aborts
        # Not a target, a bound: writes must come back after every combination of faults.
        assert outcome.write_gap_s <= MAX_GAP_S, f"no 2xx answer for {outcome.write_gap_s} s"
        assert not observer.twice, f"tasks heard finishing twice: {observer.twice[:20]}"
        outcome.applied_twice = len(observer.twice)
        with ledger_snapshot(ha_database) as cur:
            final_check_keyed(ha_database, initial, stats, outcome, cur)
    finally:
        await proxy.close()
