"""Fixtures of the fault suite: server subprocesses that are always killed at teardown, and the
report of what every scenario saw (the PostgreSQL the suite owns is tests/conftest.py's owned_pg).

The report goes to $FAULTS_REPORT if set, else faults-report.json in pytest's temporary
directory, and is printed at the end of the run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Outcome, ServerProcess, server_factory
from .report import ScenarioReport, columns


@pytest.fixture
def servers(
    tmp_path: Path, database_url: str, pool_url: Callable[[str], str]
) -> Iterator[Callable[..., ServerProcess]]:
    """Make ServerProcess objects (not started) on the test's database (the pool through PgBouncer
    under make test-pgbouncer); all are killed afterwards."""
    with server_factory(tmp_path, database_url, pool_url) as make:
        yield make


def _order(outcome: Outcome) -> tuple[int, str]:
    """By scenario number (10 after 9), then name."""
    number = outcome.scenario.split(" ", 1)[0]
    return (int(number) if number.isdigit() else 0, outcome.scenario)


REPORT = ScenarioReport(
    "fault scenarios",
    "FAULTS_REPORT",
    "faults-report.json",
    [columns("scenario:34 sent:6 ack=acknowledged:6 applied:7 lost:4 twice=applied_twice:5 s=seconds:5")],
    order=_order,
)
record = REPORT.fixture()
pytest_sessionfinish = REPORT.sessionfinish
pytest_terminal_summary = REPORT.terminal_summary
