import pytest

from message_broker.db.options import ConnectionOptions
from message_broker.db.queries import all_queries, parse, query
from message_broker.http.errors import ApiError
from message_broker.http.parsing import decode_json


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"  ",
        b"{",
        b'{"a": 1, "a": 2}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b"\xff\xfe",
        b'{"a": ' + b"9" * 5000 + b"}",
        b"[" * 100000,
    ],
)
def test_decode_json_rejects(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        decode_json(raw)
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_decode_json_accepts_plain_objects() -> None:
    assert decode_json('{"username": "Łukasz \\"q\\"", "n": 5}'.encode()) == {"username": 'Łukasz "q"', "n": 5}


def test_named_queries_parse() -> None:
    queries = parse("-- name: a\n-- why\nSELECT 1; -- kept\n  -- a comment\nSELECT 3;\n\n-- name: b\nSELECT 2;")
    assert queries == {"a": "SELECT 1; -- kept\nSELECT 3;", "b": "SELECT 2;"}
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(ValueError, match="empty"):
        parse("-- name: a\n-- only a comment\n")


def test_what_is_sent_before_a_statement_leaves_it_visible_in_pg_stat_activity() -> None:
    """pg_stat_activity keeps the first 1 kB of a message (track_activity_query_size): a
    transaction's limits and the start of the hot path's statements fit in it."""
    limits = ConnectionOptions("dbname=x").transaction_limits()
    for name in ("insert_tasks", "lock_and_read_pending", "finish_as_remembered"):
        sent = f"BEGIN ISOLATION LEVEL READ COMMITTED;{limits}{query(name)}"
        assert f"{name}(" in sent[:1024], sent[:1024]
    assert not any(line.lstrip().startswith("--") for sql in all_queries().values() for line in sql.splitlines())
