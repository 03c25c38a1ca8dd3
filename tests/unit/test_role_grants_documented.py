"""The README's table of the least-privilege role's grants says what create-role grants."""

from __future__ import annotations

import re
from pathlib import Path

from message_broker.db.roles import SEQUENCE_PRIVILEGES, TABLE_PRIVILEGES

README = Path(__file__).resolve().parents[2] / "README.md"


def expected_table() -> str:
    rows = ["| object | grants |", "|---|---|"]
    rows += [f"| table `{table}` | `{', '.join(grants)}` |" for table, grants in TABLE_PRIVILEGES.items()]
    rows += [f"| sequence `{seq}` | `{', '.join(grants)}` |" for seq, grants in SEQUENCE_PRIVILEGES.items()]
    return "\n".join(rows)


def test_readme_lists_exactly_the_grants_of_create_role() -> None:
    match = re.search(r"<!-- role-grants:[^>]*-->\n(.*?)\n<!-- /role-grants -->", README.read_text(), re.S)
    assert match is not None, "the README's role-grants table is missing"
    assert match.group(1) == expected_table(), "update the README's Security table to:\n" + expected_table()
