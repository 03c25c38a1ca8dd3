"""Fixtures of the fault suite: server subprocesses that are always killed at teardown, a
PostgreSQL the suite owns, and the report of what every scenario saw.

The report goes to $FAULTS_REPORT if set, else faults-report.json in pytest's temporary
directory, and is printed at the end of the run."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..pg import OwnedPostgres
from .harness import Outcome, ServerProcess

_OUTCOMES = pytest.StashKey[list[Outcome]]()
_REPORT_PATH = pytest.StashKey[Path]()
_BASE_TEMP = pytest.StashKey[Path]()


@pytest.fixture(scope="session", autouse=True)
def _remember_temp_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> None:
    request.config.stash[_BASE_TEMP] = tmp_path_factory.getbasetemp()


@pytest.fixture
def servers(tmp_path: Path, database_url: str) -> Iterator[Callable[..., ServerProcess]]:
    """Make ServerProcess objects (not started) on the test's database; all are killed afterwards."""
    made: list[ServerProcess] = []

    def make(name: str = "server", url: str | None = None, **env: str) -> ServerProcess:
        server = ServerProcess(url or database_url, tmp_path, name=f"{name}{len(made)}", **env)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture(scope="session")
def owned_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnedPostgres]:
    """An embedded PostgreSQL for scenarios that stop it or put a proxy in front of it."""
    server = OwnedPostgres(tmp_path_factory.mktemp("owned-pg"))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[Callable[[Outcome], None]]:
    """Record a scenario's outcome for the report (only scenarios that pass are recorded)."""
    started = time.monotonic()
    holder: list[Outcome] = []
    yield holder.append
    for outcome in holder:
        outcome.seconds = round(time.monotonic() - started, 1)
        request.config.stash.setdefault(_OUTCOMES, []).append(outcome)
        print("\n" + json.dumps(dataclasses.asdict(outcome)))


def _order(outcome: Outcome) -> tuple[int, str]:
    """By scenario number (10 after 9), then name."""
    number = outcome.scenario.split(" ", 1)[0]
    return (int(number) if number.isdigit() else 0, outcome.scenario)


def pytest_sessionfinish(session: pytest.Session) -> None:
    outcomes = session.config.stash.get(_OUTCOMES, [])
    if not outcomes:
        return
    path = os.environ.get("FAULTS_REPORT")
    target = Path(path) if path else session.config.stash[_BASE_TEMP] / "faults-report.json"
    ordered = sorted(outcomes, key=_order)
    target.write_text(json.dumps([dataclasses.asdict(o) for o in ordered], indent=2) + "\n")
    session.config.stash[_REPORT_PATH] = target


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    outcomes = config.stash.get(_OUTCOMES, [])
    if not outcomes:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault scenarios")
    write(f"{'scenario':<34} {'sent':>6} {'ack':>6} {'applied':>7} {'lost':>4} {'twice':>5} {'s':>5}")
    for o in sorted(outcomes, key=_order):
        write(
            f"{o.scenario:<34} {o.sent:>6} {o.acknowledged:>6} {o.applied:>7} {o.lost:>4} {o.applied_twice:>5}"
            f" {o.seconds:>5}"
        )
    if _REPORT_PATH in config.stash:
        write(f"report: {config.stash[_REPORT_PATH]}")
