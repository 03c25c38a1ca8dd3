"""Fixtures of the failover scenarios: the HA cluster (`make ha-up`; `make faults-ha` brings it up
itself), restored to three healthy members around every scenario, a fresh database on it per
scenario, server subprocesses that are always killed at teardown, and the report of every scenario's
figures (a JSON line each, tables at the end; $FAULTS_HA_REPORT keeps them as JSON)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..faults.harness import ServerProcess, server_factory
from ..faults.report import ScenarioReport, columns
from ..pg import fresh_database
from . import cluster


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
    cluster.wait_healthy(layout)


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
    with server_factory(tmp_path, ha_database) as make:
        yield make


REPORT = ScenarioReport(
    "failover scenarios",
    "FAULTS_HA_REPORT",
    "faults-ha-report.json",
    [
        columns(
            "scenario:30 ops=operations:5 attempts=sent:8 ack=acknowledged:5 lost:4 twice=applied_twice:5"
            " gap_s=write_gap_s:6 target=target_gap_s:6 503=answers_503:4 500=answers_500:3 retries:7"
            " conn_err=connection_errors:8 s=seconds:5"
        ),
        columns(
            "scenario:30 new_leader_s=notes.fault_to_new_leader_s:12"
            " writes_back_s=notes.writes_back_after_new_leader_s:13"
            " apply_wait_s=notes.longest_apply_wait_after_writes_back_s:12"
            " quiet_users_s=notes.quiet_users_slowest_s:13"
            " release_s=notes.longest_release_after_deadline_s:9"
            " rejoin_s=notes.rejoin_s:8 rewind=notes.pg_rewind:6 slowest_health_s=notes.slowest_health_s:16"
        ),
        columns("scenario:30 operations_answered_by_kind=notes.mix:1"),
    ],
    legend=[
        "new leader: fault to a new leader in Patroni; writes back: from then to the first 2xx; apply wait: the",
        "longest a task waited to be applied after writes came back; quiet users: task accepted -> applied for",
        "users with no loop running (woken only through the new LISTEN connection); release: the longest a hold",
        "waited past its deadline, or past writes coming back, to be released; slowest /health: server stall",
    ],
)
record = REPORT.fixture()
pytest_sessionfinish = REPORT.sessionfinish
pytest_terminal_summary = REPORT.terminal_summary
