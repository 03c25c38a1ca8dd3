"""Failover on a real HA cluster (Patroni + etcd + HAProxy, synchronous replication in strict mode):
the real service (`python -m message_broker serve`) on the HAProxy endpoint while 32 clients
(tests/faults/harness.py KeyedClients) post top-ups, write-offs, transfers, holds (half of them
expiring within 1-3 s, so that releases at the deadline fall around the failover), captures and
voids, each with its own Idempotency-Key and retried with it until a 2xx answer.

a. a planned switchover (`patronictl switchover --force`);
b. the leader node dies (kill -9 of its Patroni and its postmaster);
c. that, and then the old leader comes back and rejoins as a replica.

Each ends with the same checks (`_final_checks`): those of the fault suite's random scenario
(`final_check_keyed`: every ledger explained by its finished tasks, transfers paired, holds resolved
once, money conserved, every key mapped to exactly one task and every posted task to one key, no
acknowledged task lost, no HTTP 5xx but 503), none heard applied twice, /ready back to 200, writes
back within the target, and tasks accepted (and holds falling due) after the failover applied
within seconds although the safety sweep runs only every 600 s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from ..faults.harness import (
    KeyedClients,
    KeyedStats,
    Outcome,
    ServerProcess,
    create_users,
    draw_seed,
    final_check_keyed,
    poll,
    wait_settled,
)
from ..helpers import call, samples
from ..pg import admin_connection
from . import cluster
from .observer import ReconnectingObserver

pytestmark = pytest.mark.ha

CLIENTS = 32
USERS = 16
QUIET_USERS = 4  # never loaded: a task for one is applied only if the new LISTEN connection hears of it
BEFORE_S = 3.0  # load before the fault
AFTER_S = 3.0  # load after writes are back
SWITCHOVER_TARGET_S = 5.0
REJOIN_TARGET_S = 5.0  # the longest write gap while the old leader rejoins
APPLIED_AFTER_FAILOVER_S = 3.0  # "within a couple of seconds", against a sweep every 600 s
# Retries wait 0.1-0.2 s, not Retry-After (1 s): the longest gap without writes measures the service.
RETRY_PAUSE_S = (0.1, 0.2)

# The service's settings for these scenarios (the rest as in tests/faults: FAST).
SERVICE_ENV = {
    # Only the rescan after a LISTEN reconnect may find work: the sweep never runs in a scenario.
    "SWEEP_INTERVAL": "600",
    # Above HAProxy's `timeout connect` (2 s), which holds a new connection that long while no node
    # is up: the driver should see HAProxy give up, not give up itself first.
    "CONNECT_TIMEOUT": "3",
    # More settings, or other values, for a run: HA_SERVICE_ENV="RECONNECT_MAX_BACKOFF=5 PROBE_INTERVAL=5".
    **dict(pair.split("=", 1) for pair in os.environ.get("HA_SERVICE_ENV", "").split()),
}


@dataclass
class HaOutcome(Outcome):
    """What one failover scenario saw: Outcome's figures (`sent` counts attempts, `acknowledged` the
    operations answered 2xx) and these."""

    operations: int = 0  # idempotency keys used (operations begun)
    retries: int = 0  # attempts beyond each operation's first
    connection_errors: int = 0
    answers_503: int = 0
    answers_500: int = 0  # 5xx other than 503
    write_gap_s: float = 0.0  # the longest time between consecutive 2xx answers
    target_gap_s: float = 0.0


# Blocking calls (HTTP to Patroni, psycopg2, subprocesses) run in asyncio.to_thread, off the event
# loop the clients run on.


@dataclass
class Scenario:
    """What a fault function gets: the cluster, the load, and the notes it fills in."""

    ha: cluster.Layout
    load: KeyedClients
    notes: dict[str, Any] = field(default_factory=dict)
    leader_before: str = ""
    fault_at: float = 0.0  # time.monotonic()
    writable_at: float = 0.0  # when Patroni had a new leader (the fault function sets it)
    extra_phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (start, end)


async def _wait_new_leader(sc: Scenario, timeout: float) -> str:
    async def new_leader() -> str | None:
        leader = await asyncio.to_thread(cluster.leader_name, sc.ha)
        return leader if leader and leader != sc.leader_before else None

    leader = await poll(new_leader, timeout=timeout, interval=0.1, what="a new leader in Patroni")
    sc.writable_at = time.monotonic()
    sc.notes["new_leader"] = leader
    sc.notes["fault_to_new_leader_s"] = round(sc.writable_at - sc.fault_at, 2)
    return str(leader)


async def switchover(sc: Scenario) -> None:
    candidates = await asyncio.to_thread(cluster.sync_standbys, sc.ha)
    assert candidates, "no synchronous standby to switch over to"
    sc.notes["candidate"] = candidates[0]
    sc.fault_at = time.monotonic()
    await asyncio.to_thread(
        cluster.patronictl, sc.ha, "switchover", "--leader", sc.leader_before, "--candidate", candidates[0], "--force"
    )
    sc.notes["patronictl_s"] = round(time.monotonic() - sc.fault_at, 2)
    assert await _wait_new_leader(sc, 30) == candidates[0]


async def leader_dies(sc: Scenario) -> None:
    sc.fault_at = time.monotonic()
    sc.notes["killed"] = await asyncio.to_thread(cluster.kill_node, sc.ha, sc.leader_before)
    await _wait_new_leader(sc, sc.ha.ttl + 30)


async def leader_dies_and_rejoins(sc: Scenario) -> None:
    await leader_dies(sc)
    # Writes must be back before the old leader returns: its return is a phase of its own.
    await poll(
        lambda: sc.load.stats.answered_after(sc.writable_at) > 0, timeout=30, what="writes back after the failover"
    )
    node = sc.ha.node(sc.leader_before)
    log_offset = node.log.stat().st_size
    started = time.monotonic()
    assert await asyncio.to_thread(cluster.start_node, sc.ha, sc.leader_before), "the old leader was still running"
    await poll(
        lambda: asyncio.to_thread(cluster.healthy, sc.ha), timeout=120, interval=0.2, what="three healthy members"
    )
    sc.notes["rejoin_s"] = round(time.monotonic() - started, 2)
    sc.extra_phases["rejoin"] = (started, time.monotonic())
    members = {m["name"]: m for m in await asyncio.to_thread(cluster.cluster_members, sc.ha)}
    assert members[sc.leader_before]["role"] in ("replica", "sync_standby"), members
    sc.notes["members_after"] = {name: m["role"] for name, m in sorted(members.items())}
    with node.log.open() as log:
        log.seek(log_offset)
        rejoin_log = log.read()
    sc.notes["pg_rewind"] = bool(re.search(r"running pg_rewind|pg_rewind exited", rejoin_log, re.I))


async def _run(
    ha: cluster.Layout,
    database_url: str,
    servers: Callable[..., ServerProcess],
    record: Callable[[HaOutcome], None],
    outcome: HaOutcome,
    fault: Callable[[Scenario], Awaitable[None]],
) -> None:
    server = servers(**SERVICE_ENV)
    await server.start_ready(timeout=60)  # it migrates the fresh database
    balances = [500] * USERS + [0] * QUIET_USERS
    initial = create_users(database_url, balances, prefix="ha")
    ids = list(initial)
    loaded, quiet = ids[:USERS], ids[USERS:]
    seed = draw_seed()
    outcome.notes["seed"] = seed
    print(f"\n{outcome.scenario}: the clients' FAULTS_SEED={seed}")
    wall_offset = time.time() - time.monotonic()
    with ReconnectingObserver(database_url) as observer:
        async with (
            KeyedClients(server.url, loaded, CLIENTS, seed=seed, retry_pause=RETRY_PAUSE_S) as load,
            HealthWatch(server.url) as health,
        ):
            load_started = time.monotonic()
            await load.until_answered(100)
            await asyncio.sleep(BEFORE_S)  # the scenario: load before the fault
            sc = Scenario(ha, load, leader_before=await asyncio.to_thread(cluster.leader_name, ha))
            sc.notes["old_leader"] = sc.leader_before
            await fault(sc)
            await poll(
                lambda: load.stats.answered_after(sc.writable_at) > 0, timeout=30, what="writes back after the fault"
            )
            probes = await _probe_quiet_users(load, quiet)
            await asyncio.sleep(AFTER_S)  # the scenario: load after writes are back
            stats = await load.finish(timeout=60)
            load_ended = time.monotonic()
        # Every task applied, and every hold of the short ones released at its deadline.
        sc.notes["settle_s"] = round(await wait_settled(database_url, timeout=60), 2)
    ready_s = round(await server.wait_ready(timeout=15), 2)
    metrics = samples((await call("GET", server.url + "/metrics"))[1])
    _fill_outcome(outcome, stats, sc, load_started, load_ended)
    outcome.notes["slowest_health_s"] = round(health.slowest, 2)
    outcome.notes["slowest_health_at_s"] = round(health.slowest_at - sc.fault_at, 2)
    outcome.notes.update(sc.notes)
    outcome.notes["ready_after_s"] = ready_s
    outcome.notes["listen_reconnects"] = metrics.get(("message_broker_listen_reconnects_total", ()))
    outcome.notes["sweeps_found_missed_work"] = metrics.get(("message_broker_sweeps_found_missed_work_total", ()))
    outcome.notes["observer_connects"] = observer.connects
    log = server.log_text()
    outcome.notes["server_log"] = {
        "tracebacks": log.count("Traceback"),
        "status_500_lines": len(re.findall(r"status=500", log)),
        "status_503_lines": len(re.findall(r"status=503", log)),
    }
    try:
        _final_checks(database_url, initial, stats, observer, outcome, probes, sc, wall_offset)
    except AssertionError:
        print(f"server log, without 503 lines and tracebacks ({server.log_path}):\n{_log_digest(log)}")
        if outcome.answers_500:
            print(f"the first 5xx other than 503, with their tracebacks:\n{_log_errors(log)}")
        raise
    finally:
        record(outcome)


def _fill_outcome(outcome: HaOutcome, stats: KeyedStats, sc: Scenario, started: float, ended: float) -> None:
    outcome.operations = stats.operations
    outcome.sent = stats.attempts
    outcome.acknowledged = len(stats.answered)
    outcome.retries = stats.retries
    outcome.connection_errors = stats.connection_errors
    outcome.answers_503 = stats.statuses[503]
    outcome.answers_500 = sum(n for status, n in stats.statuses.items() if status >= 500 and status != 503)
    outcome.answers = stats.answers()
    gap, gap_end = stats.longest_gap(started, ended)
    outcome.write_gap_s = round(gap, 2)
    outcome.notes["gap_ended_after_fault_s"] = round(gap_end - sc.fault_at, 2)
    outcome.notes["writes_back_after_new_leader_s"] = round(
        (stats.first_answer_after(sc.writable_at) or ended) - sc.writable_at, 2
    )
    between = [t for t in stats.answered_at if sc.fault_at < t < sc.writable_at]
    outcome.notes["acks_between_fault_and_new_leader"] = len(between)
    outcome.notes["last_of_those_after_fault_s"] = round(max(between) - sc.fault_at, 2) if between else None
    for name, (start, end) in sc.extra_phases.items():
        outcome.notes[f"{name}_write_gap_s"] = round(stats.longest_gap(start, end)[0], 2)
    outcome.notes["load_s"] = round(ended - started, 1)


class HealthWatch:
    """GET /health every 100 ms: the slowest answer shows how long the server's event loop stalled."""

    def __init__(self, url: str) -> None:
        self._url = url + "/health"
        self.slowest = 0.0
        self.slowest_at = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            while True:
                started = time.monotonic()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self._url) as response:
                        await response.read()
                took = time.monotonic() - started
                if took > self.slowest:
                    self.slowest, self.slowest_at = took, started
                await asyncio.sleep(0.1)  # the sampling period


async def _probe_quiet_users(load: KeyedClients, quiet: list[int]) -> list[int]:
    """One task for each user without a loop of its own, right after writes came back: only the
    LISTEN connection (re-established on the new primary) or its rescan can start that user's loop.
    Posted like the clients' operations (a key each, retried until a 2xx); returns their task ids."""
    body = {"type": "replenishment", "amount": 7}
    posted = await asyncio.gather(*(load.post("replenishment", f"/api/v1/user/{user}/amount/", body) for user in quiet))
    assert all(task_id is not None for task_id in posted), f"a probe was refused: {load.stats.unexpected[-3:]}"
    return [task_id for task_id in posted if task_id is not None]


def _log_digest(log: str, limit: int = 60) -> str:
    lines = [line for line in log.splitlines() if line.startswith("20") and "status=503" not in line]
    return "\n".join(line[:240] for line in lines[-limit:])


def _log_errors(log: str, entries: int = 2) -> str:
    """The first `entries` log records of a 500, each with its whole traceback."""
    out: list[str] = []
    taken = 0
    inside = False
    for line in log.splitlines():
        if line.startswith("20"):  # a new record
            if taken >= entries:
                break
            inside = "status=500" in line
            taken += inside
        if inside:
            out.append(line)
    return "\n".join(out)


def _final_checks(
    database_url: str,
    initial: dict[int, int],
    stats: KeyedStats,
    observer: ReconnectingObserver,
    outcome: HaOutcome,
    probes: list[int],
    sc: Scenario,
    wall_offset: float,
) -> None:
    # The ledger check over every user (transfers paired, holds resolved once, money conserved),
    # every acknowledged task stored and finished, every key naming exactly one task and every
    # posted task one key, the one each 2xx named; no 5xx but 503, nothing refused or unanswered.
    final_check_keyed(database_url, initial, stats, outcome)
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(
            "SELECT id, status, extract(epoch FROM created_at)::float8, extract(epoch FROM processed_at)::float8,"
            " user_id FROM tasks"
        )
        tasks = {row[0]: row[1:] for row in cur.fetchall()}
        cur.execute(
            "SELECT h.id, extract(epoch FROM h.expires_at)::float8, extract(epoch FROM t.processed_at)::float8"
            " FROM holds AS h JOIN tasks AS t ON t.id = h.resolved_by WHERE t.type = 'release'"
        )
        releases = cur.fetchall()
    # Applied twice: each task's row is finished once (a guarded UPDATE), and check_database proved
    # every balance equals the initial one plus the finished tasks, each counted once; the observer
    # adds that no task was heard finishing twice.
    outcome.applied_twice = len(observer.twice)
    outcome.notes["observer_heard"] = f"{len(observer.seen)}/{len(tasks)}"
    assert observer.last_heard > sc.writable_at, "the observer heard nothing from the new primary"
    assert not observer.twice, f"tasks heard finishing twice: {observer.twice[:20]}"

    # No task waited for the sweep: tasks accepted after writes came back were applied at once.
    resumed_wall = wall_offset + min(t for t in stats.answered_at if t > sc.writable_at)
    fault_wall = wall_offset + sc.fault_at
    waits = [processed - max(created, resumed_wall) for _, created, processed, _ in tasks.values()]
    outcome.notes["longest_apply_wait_after_writes_back_s"] = round(max(waits), 2)
    probe_waits = [tasks[task_id][2] - tasks[task_id][1] for task_id in probes]
    outcome.notes["quiet_user_probe_apply_s"] = [round(w, 2) for w in probe_waits]
    outcome.notes["quiet_users_slowest_s"] = round(max(probe_waits), 2)
    assert max(probe_waits) <= APPLIED_AFTER_FAILOVER_S, f"probe tasks applied after {probe_waits} s"
    slow = sorted(
        (round(processed - max(created, resumed_wall), 2), task_id, user, round(created - resumed_wall, 2))
        for task_id, (_, created, processed, user) in tasks.items()
        if processed - max(created, resumed_wall) > APPLIED_AFTER_FAILOVER_S
    )
    assert not slow, (
        f"{len(slow)} tasks waited over {APPLIED_AFTER_FAILOVER_S} s after writes came back "
        f"(wait s, task, user, created s after writes came back): {slow[-10:]}"
    )

    # Holds released at their deadline, and those that fell due while writes were impossible as
    # soon as writes were back (the deadline timer re-reads the next deadline after a reconnect);
    # a release applied after the fault is measured from its deadline or from writes coming back.
    late = sorted(
        (round(processed - (max(expires, resumed_wall) if processed > fault_wall else expires), 2), hold_id)
        for hold_id, expires, processed in releases
    )
    outcome.notes["holds_released_at_deadline"] = len(releases)
    outcome.notes["holds_due_during_failover"] = sum(fault_wall <= due <= resumed_wall for _, due, _ in releases)
    outcome.notes["longest_release_after_deadline_s"] = late[-1][0] if late else None
    outcome.notes["mix"] = _mix(stats, len(releases))
    assert releases, "no hold was released at its deadline: the scenario did not test releases"
    assert late[-1][0] <= APPLIED_AFTER_FAILOVER_S, (
        f"holds released more than {APPLIED_AFTER_FAILOVER_S} s after their deadline or writes coming back "
        f"(s, hold): {[x for x in late if x[0] > APPLIED_AFTER_FAILOVER_S][-10:]}"
    )

    assert outcome.write_gap_s <= outcome.target_gap_s, (
        f"writes stopped for {outcome.write_gap_s} s (target {outcome.target_gap_s} s)"
    )
    for name in sc.extra_phases:
        gap = outcome.notes[f"{name}_write_gap_s"]
        assert gap <= REJOIN_TARGET_S, f"writes stopped for {gap} s during {name}"


def _mix(stats: KeyedStats, released: int) -> str:
    """The operations answered, by kind, and how many holds the service released at the deadline."""
    k = stats.kinds
    return (
        f"{k['replenishment']} top-ups, {k['write-off']} write-offs, {k['transfer']} transfers, {k['hold']} holds"
        f" ({released} released at the deadline), {k['capture']} captures, {k['void']} voids"
    )


async def test_switchover(
    healthy_cluster: cluster.Layout,
    ha_database: str,
    servers: Callable[..., ServerProcess],
    record: Callable[[HaOutcome], None],
) -> None:
    """a. patronictl switchover to the synchronous standby: writes back within 5 s."""
    outcome = HaOutcome("a switchover", "patronictl switchover --force to the sync standby, under load")
    outcome.target_gap_s = SWITCHOVER_TARGET_S
    await _run(healthy_cluster, ha_database, servers, record, outcome, switchover)


async def test_leader_node_dies(
    healthy_cluster: cluster.Layout,
    ha_database: str,
    servers: Callable[..., ServerProcess],
    record: Callable[[HaOutcome], None],
) -> None:
    """b. kill -9 of the leader's Patroni and postmaster: writes back within the TTL + 5 s."""
    outcome = HaOutcome("b leader dies", "kill -9 of the leader's Patroni and postmaster, under load")
    outcome.target_gap_s = healthy_cluster.ttl + 5.0
    await _run(healthy_cluster, ha_database, servers, record, outcome, leader_dies)


async def test_old_leader_rejoins(
    healthy_cluster: cluster.Layout,
    ha_database: str,
    servers: Callable[..., ServerProcess],
    record: Callable[[HaOutcome], None],
) -> None:
    """c. b, then the old leader's Patroni started again: it rejoins as a replica (pg_rewind where
    needed), the cluster is whole again, and writes go on throughout."""
    outcome = HaOutcome("c old leader rejoins", "b, then the old leader's Patroni started again, under load")
    outcome.target_gap_s = healthy_cluster.ttl + 5.0
    await _run(healthy_cluster, ha_database, servers, record, outcome, leader_dies_and_rejoins)
