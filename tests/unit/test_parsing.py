import pytest

from message_broker.db.queries import parse
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
    queries = parse("-- name: a\nSELECT 1;\n-- a comment\n\n-- name: b\nSELECT 2;")
    assert queries == {"a": "SELECT 1;\n-- a comment", "b": "SELECT 2;"}
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
