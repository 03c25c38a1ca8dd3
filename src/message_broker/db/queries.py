"""Named SQL queries from sql/queries.sql, parsed once at import."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a file of "-- name: x" blocks into {name: sql}. Lines that are only a comment are left
    out: they are for the reader of the file, and sent they would fill what pg_stat_activity and
    the server's log show of a statement (1 kB by default) before the statement itself."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        sql = "\n".join(line for line in body.strip().splitlines() if not line.lstrip().startswith("--")).strip()
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = sql
    return queries


def sql_dir() -> Traversable:
    """The project's sql/ directory: beside src/ in a checkout (and editable installs), or the
    package data `message_broker.sql` in a regular install."""
    checkout = Path(__file__).resolve().parents[3] / "sql"
    if (checkout / "queries.sql").is_file():
        return checkout
    return resources.files("message_broker.sql")


@cache
def named_queries(file: str = "queries.sql") -> dict[str, str]:
    """The named queries of one file of sql/: the service's (queries.sql) or the benchmark's."""
    return parse((sql_dir() / file).read_text(encoding="utf-8"))


def all_queries() -> dict[str, str]:
    return named_queries("queries.sql")


def query(name: str) -> str:
    return all_queries()[name]
