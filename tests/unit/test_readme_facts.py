"""Facts the README states in more than one place say the same thing, and its Layout names the
newest migration."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _figures(pattern: str) -> set[str]:
    return set(re.findall(pattern, README))


def test_one_figure_per_fact() -> None:
    per_task = _figures(r"(\d+) bytes per task")
    assert len(per_task) == 1, per_task
    assert _figures(r"(\d+) per stream position") == _figures(r"(\d+)\s+bytes per position"), "bytes per position"
    assert _figures(r"about (\d+) MB per million tasks") == per_task  # 1 byte per task = 1 MB per million
    # The holds' deadline figure in the Holds section is the Performance table's.
    table = re.search(r"10,000 holds falling due at once: all released after\s*\|\s*([\d.]+) s", README)
    holds = re.search(r"holds falling due at once all released ([\d.]+) s after it", README)
    assert table and holds and table.group(1) == holds.group(1)


def test_layout_names_the_newest_migration() -> None:
    newest = max(path.name for path in (ROOT / "sql" / "migrations").glob("*.sql"))
    layout = README[README.index("## Layout") :]
    assert newest in layout, f"README Layout: list the migrations up to {newest}"


def test_a_client_reads_the_api_before_operations() -> None:
    headings = re.findall(r"(?m)^## (.+)$", README)
    client = [headings.index("The API"), headings.index("Task lifecycle for clients")]
    operations = [headings.index(name) for name in ("Configuration", "Reliability", "High availability", "Security")]
    assert max(client) < min(operations), headings
