"""Fixtures of the failover scenarios: the HA cluster (`make ha-up`; `make faults-ha` brings it up
itself), restored to three healthy members around every scenario, a fresh database on it per
scenario, server subprocesses that are always killed at teardown, and the report of every scenario's
figures (a JSON line each, a table at the end; $FAULTS_HA_REPORT keeps them as JSON)."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..faults.harness import ServerProcess, fresh_database
from . import cluster

_OUTCOMES = pytest.StashKey[list["HaOutcome"]]()
_BASE_TEMP = pytest.StashKey[Path]()


@dataclasses.dataclass
class HaOutcome:
    """What one failover scenario saw."""

    scenario: str
    injected: str
    operations: int = 0  # idempotency keys used (intended operations)
    attempts: int = 0  # HTTP requests, retries included
    acknowledged: int = 0  # operations answered 2xx
    applied: int = 0  # acknowledged tasks found finished
    lost: int = 0
    applied_twice: int = 0
    write_gap_s: float = 0.0  # the longest time between consecutive 2xx answers
    target_gap_s: float = 0.0
    answers_503: int = 0
    answers_500: int = 0
    retries: int = 0
    connection_errors: int = 0
    answers: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


@pytest.fixture(scope="session", autouse=True)
def _remember_temp_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> None:
    request.config.stash[_BASE_TEMP] = tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def ha() -> cluster.Layout:
    """The cluster `make ha-up` started (ports and paths from the same environment)."""
    layout = cluster.Layout()
    announced = os.environ.get("PATRONI_URLS")
    if announced and announced.split(",") != layout.patroni_urls:
        pytest.fail(f"PATRONI_URLS={announced} is not the cluster of HA_PORT_BASE ({layout.patroni_urls})")
    if not cluster.running(layout):
        pytest.fail("no HA cluster is running: `make faults-ha` starts one, or `make ha-up`")
    return layout


@pytest.fixture(scope="session")
def ha_url(ha: cluster.Layout) -> str:
    """The HAProxy endpoint (DATABASE_URL as `make ha-up` printed it, when exported)."""
    return os.environ.get("DATABASE_URL") if os.environ.get("PATRONI_URLS") else ha.database_url  # type: ignore[return-value]


def restore(layout: cluster.Layout) -> None:
    """Three running members, a leader and a synchronous standby, and the endpoint on the primary."""
    for node in layout.nodes:
        cluster.start_node(layout, node.name)
    cluster.wait_for(lambda: cluster.healthy(layout), 120, "a healthy cluster", interval=0.5)
    cluster.wait_for(lambda: cluster.endpoint_is_primary(layout), 30, "the primary through HAProxy")


@pytest.fixture
def healthy_cluster(ha: cluster.Layout) -> Iterator[cluster.Layout]:
    """The cluster healthy before the scenario, and made healthy again after it (a killed node restarted)."""
    restore(ha)
    yield ha
    restore(ha)


@pytest.fixture
def ha_database(healthy_cluster: cluster.Layout, ha_url: str) -> Iterator[str]:
    """A fresh, empty database on the cluster, through HAProxy (the service migrates it at start)."""
    with fresh_database(ha_url, f"mb_ha_{uuid.uuid4().hex[:10]}") as dsn:
        yield dsn


@pytest.fixture
def servers(tmp_path: Path, ha_database: str) -> Iterator[Callable[..., ServerProcess]]:
    """Make ServerProcess objects (not started) on the scenario's database; all are killed afterwards."""
    made: list[ServerProcess] = []

    def make(name: str = "server", **env: str) -> ServerProcess:
        server = ServerProcess(ha_database, tmp_path, name=f"{name}{len(made)}", **env)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[Callable[[HaOutcome], None]]:
    """Record a scenario's figures (recorded before its assertions run, so a failure shows them too)."""
    import time

    started = time.monotonic()
    holder: list[HaOutcome] = []
    yield holder.append
    for outcome in holder:
        outcome.seconds = round(time.monotonic() - started, 1)
        request.config.stash.setdefault(_OUTCOMES, []).append(outcome)
        print("\n" + json.dumps(dataclasses.asdict(outcome)))


def pytest_sessionfinish(session: pytest.Session) -> None:
    outcomes = session.config.stash.get(_OUTCOMES, [])
    if not outcomes:
        return
    path = os.environ.get("FAULTS_HA_REPORT")
    target = Path(path) if path else session.config.stash[_BASE_TEMP] / "faults-ha-report.json"
    target.write_text(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=2) + "\n")
    if path:
        print(f"\nreport: {target}")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    outcomes = config.stash.get(_OUTCOMES, [])
    if not outcomes:
        return
    write = terminalreporter.write_line
    terminalreporter.section("failover scenarios")
    write(
        f"{'scenario':<30} {'ops':>5} {'ack':>5} {'lost':>4} {'twice':>5} {'gap s':>6} {'target':>6}"
        f" {'503':>4} {'500':>3} {'retries':>7} {'conn err':>8} {'s':>5}"
    )
    for o in sorted(outcomes, key=lambda o: o.scenario):
        write(
            f"{o.scenario:<30} {o.operations:>5} {o.acknowledged:>5} {o.lost:>4} {o.applied_twice:>5}"
            f" {o.write_gap_s:>6.2f} {o.target_gap_s:>6.1f} {o.answers_503:>4} {o.answers_500:>3} {o.retries:>7}"
            f" {o.connection_errors:>8} {o.seconds:>5}"
        )
    write("")
    write(
        f"{'scenario':<30} {'new leader s':>12} {'writes back s':>13} {'apply wait s':>12} {'quiet users s':>13}"
        f" {'rejoin s':>8} {'rewind':>6} {'slowest /health':>15}"
    )
    for o in sorted(outcomes, key=lambda o: o.scenario):
        n = o.notes
        probes = n.get("quiet_user_probe_apply_s") or [None]
        write(
            f"{o.scenario:<30} {n.get('fault_to_new_leader_s', '-')!s:>12}"
            f" {n.get('writes_back_after_new_leader_s', '-')!s:>13}"
            f" {n.get('longest_apply_wait_after_writes_back_s', '-')!s:>12} {max(probes, key=lambda p: p or 0)!s:>13}"
            f" {n.get('rejoin_s', '-')!s:>8} {n.get('pg_rewind', '-')!s:>6} {n.get('slowest_health_s', '-')!s:>15}"
        )
    write("new leader: fault to a new leader in Patroni; writes back: from then to the first 2xx; apply wait: the")
    write("longest a task waited to be applied after writes came back; quiet users: task accepted -> applied for")
    write("users with no loop running (woken only through the new LISTEN connection); slowest /health: server stall")
