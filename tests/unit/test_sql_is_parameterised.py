"""Every query is parameterised: values travel as bound parameters, never as text.

A static check of the source, so a new query built from strings fails here and gets reviewed:
SQL handed to execute/fetch_one/fetch_all is a named query, a literal, or an f-string whose every
interpolation is in the reviewed list below (identifiers through quote_ident, integers through
int, constants of our own). % formatting, + concatenation and .format() are refused outright.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import message_broker
from message_broker.db.queries import all_queries

SRC = Path(message_broker.__file__).parent
SQL_METHODS = {"execute", "fetch_one", "fetch_all", "commit_with"}

# file -> the interpolated expressions reviewed as safe there, and why.
REVIEWED: dict[str, set[str]] = {
    # the channel names are our constants, quoted all the same; stream(): a cursor name of our own
    # (quoted), a page size through int, and the caller's query (values bound as its params);
    # commit_with(): the caller's statements and named query, and the transaction limits (our own
    # integers, rendered once: ConnectionOptions.transaction_limits)
    "db/driver.py": {"conn.quote_ident(channel)", "cursor", "int(page_size)", "sql", "self._limits", "then"},
    "db/migrate.py": {"conn.quote_ident(name)"},
    # two named queries sent in one message (one implicit transaction)
    "db/history.py": {"query('wait_for_the_users_applies')", "query('state_before')"},
    "bench/__main__.py": {"conn.quote_ident(name)"},
    # name/database/schema/table_name/sequence_name are quote_ident() results (_in_format: with % doubled,
    # in a statement with bound parameters); privileges are our constants
    "db/roles.py": {
        "name",
        "database",
        "schema",
        "table_name",
        "sequence_name",
        "', '.join(privileges)",
        "_in_format(name)",
        "_in_format(database)",
    },
}


def _sql_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in SQL_METHODS
        and node.args
    ]


def test_sql_is_never_built_from_values() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        for call in _sql_calls(ast.parse(path.read_text(), filename=str(path))):
            sql = call.args[0]
            where = f"{relative}:{call.lineno}"
            if isinstance(sql, ast.JoinedStr):
                for part in sql.values:
                    if isinstance(part, ast.FormattedValue):
                        expression = ast.unparse(part.value)
                        if expression not in REVIEWED.get(relative, set()):
                            problems.append(f"{where}: f-string interpolates {expression!r}")
            elif isinstance(sql, ast.BinOp) or (
                isinstance(sql, ast.Call) and isinstance(sql.func, ast.Attribute) and sql.func.attr == "format"
            ):
                problems.append(f"{where}: SQL built with an operator or .format(): {ast.unparse(sql)[:80]}")
    assert not problems, "\n".join(problems)


def test_named_queries_use_only_bound_parameters() -> None:
    for name, sql in all_queries().items():
        code = re.sub(r"--[^\n]*", "", sql)
        placeholders = re.findall(r"%\(\w+\)s|%%|%\w?", code)
        assert all(p.startswith("%(") or p == "%%" for p in placeholders), (name, placeholders)
        assert "{" not in code, name
