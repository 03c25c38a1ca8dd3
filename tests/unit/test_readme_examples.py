"""The README-examples rule reads what the README shows, and finds a difference when there is one."""

from __future__ import annotations

import pytest

from tests import readme_examples as rx

BLOCK = """curl -s -X POST localhost:3333/api/v1/user/ \\
     -d '{"username": "A", "balance": 5}'
# 201 {"id": "1", "username": "A", ...,
#      "created_at": "2026-11-28T19:43:04.554573+00:00"}   Location: /api/v1/user/1
# or 409 {"error": {"code": "username_taken", ...}}
curl -s localhost:3333/api/v1/user/9   # a comment on the line
# 404 user_not_found: nothing there
curl -s localhost:3333/api/v1/user/
"""


def test_commands_and_their_answers_are_read() -> None:
    first, second, third = rx.commands(BLOCK, 10)
    assert first.line == 10 and first.calls_curl and first.expected is not None
    assert first.expected.status == 201
    assert first.expected.body == {"id": "1", "username": "A", "created_at": "2026-11-28T19:43:04.554573+00:00"}
    assert first.expected.headers == {"Location": "/api/v1/user/1"}
    assert second.expected is not None and second.expected.error_code == "user_not_found"
    assert third.expected is None


def test_a_difference_is_found() -> None:
    expected = rx.loads_partial('{"id": "7", ..., "status": "done", "items": [{"a": 1}, ...], "name": "..."}')
    actual = {"id": "7", "status": "done", "items": [{"a": 1, "b": 2}], "name": "x", "more": 1}
    assert rx.mismatches(expected, actual) == []
    assert rx.mismatches(expected, {**actual, "status": "cancelled"}) == [
        ".status: README shows 'done', got 'cancelled'"
    ]
    assert rx.mismatches(expected, {**actual, "items": []})
    assert rx.mismatches({"n": 1}, {"n": "1"})  # a string is not the number shown
    assert rx.mismatches({"t": "2026-11-28T19:43:04+00:00"}, {"t": "soon"})


def test_a_second_status_line_is_refused() -> None:
    with pytest.raises(ValueError, match="a second status line"):
        rx.commands("curl -s x\n# 200 {}\n# 404 {}\n", 1)
