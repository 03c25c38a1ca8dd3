"""The figures of a suite of scenarios (make faults, make faults-ha): each scenario's outcome, a
dataclass, printed as a JSON line when its test ends, all of them written to a JSON file at the end
of the run ($<env_var>, else <filename> in pytest's base temporary directory) and shown as tables in
the terminal summary.

A suite's conftest.py makes one ScenarioReport and hands pytest its parts:

    REPORT = ScenarioReport("fault scenarios", "FAULTS_REPORT", "faults-report.json",
                            tables=[columns("scenario:34 sent:6 ack=acknowledged:6 ...")])
    record = REPORT.fixture()
    pytest_sessionfinish = REPORT.sessionfinish
    pytest_terminal_summary = REPORT.terminal_summary
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# A table column: its header, its width, and its value for one outcome (the first column left-aligned).
Column = tuple[str, int, Callable[[Any], object]]


def columns(spec: str) -> list[Column]:
    """Table columns from "header=path:width ...": `path` is an attribute of the outcome, or
    notes.<key> for one of its notes ("-" when missing); without "=", the header is the path."""
    made: list[Column] = []
    for item in spec.split():
        named, _, width = item.rpartition(":")
        header, _, path = named.partition("=")
        made.append((header, int(width), _getter(path or header)))
    return made


def _getter(path: str) -> Callable[[Any], object]:
    if path.startswith("notes."):
        key = path.removeprefix("notes.")
        return lambda outcome: "-" if outcome.notes.get(key) is None else outcome.notes[key]
    return lambda outcome: getattr(outcome, path)


@dataclasses.dataclass
class ScenarioReport:
    title: str  # of the terminal summary's section
    env_var: str  # names the JSON file to write, if set
    filename: str  # else this, in pytest's base temporary directory
    tables: Sequence[Sequence[Column]]
    order: Callable[[Any], Any] = lambda outcome: outcome.scenario
    legend: Sequence[str] = ()  # lines under the tables
    _outcomes: pytest.StashKey[list[Any]] = dataclasses.field(default_factory=pytest.StashKey)
    _base_temp: pytest.StashKey[Path] = dataclasses.field(default_factory=pytest.StashKey)
    _path: pytest.StashKey[Path] = dataclasses.field(default_factory=pytest.StashKey)

    def fixture(self) -> Any:
        report = self

        @pytest.fixture
        def record(
            request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Callable[[Any], None]]:
            """Record a scenario's outcome for the report: the test calls record(outcome) after its
            checks (only scenarios that pass are reported) or before them (a failure reports its
            figures too); the figures go in when the test ends, with the seconds it took."""
            config = request.config
            config.stash[report._base_temp] = tmp_path_factory.getbasetemp()
            started = time.monotonic()
            holder: list[Any] = []
            yield holder.append
            for outcome in holder:
                outcome.seconds = round(time.monotonic() - started, 1)
                config.stash.setdefault(report._outcomes, []).append(outcome)
                print("\n" + json.dumps(dataclasses.asdict(outcome)))

        return record

    def sessionfinish(self, session: pytest.Session) -> None:
        outcomes = session.config.stash.get(self._outcomes, [])
        if not outcomes:
            return
        path = os.environ.get(self.env_var)
        target = Path(path) if path else session.config.stash[self._base_temp] / self.filename
        ordered = sorted(outcomes, key=self.order)
        target.write_text(json.dumps([dataclasses.asdict(o) for o in ordered], indent=2) + "\n")
        session.config.stash[self._path] = target

    def terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        outcomes = sorted(config.stash.get(self._outcomes, []), key=self.order)
        if not outcomes:
            return
        write = terminalreporter.write_line
        terminalreporter.section(self.title)
        for number, table in enumerate(self.tables):
            if number:
                write("")
            write(_row(table, [header for header, _, _ in table]))
            for outcome in outcomes:
                write(_row(table, [value(outcome) for _, _, value in table]))
        for line in self.legend:
            write(line)
        if self._path in config.stash:
            write(f"report: {config.stash[self._path]}")


def _row(table: Sequence[Column], cells: Sequence[object]) -> str:
    (_, first, _), *rest = table
    head, *tail = cells
    right = (f"{cell!s:>{width}}" for (_, width, _), cell in zip(rest, tail, strict=True))
    return " ".join([f"{head!s:<{first}}", *right])
