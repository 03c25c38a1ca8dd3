"""Scopes and the token command's durations."""

from __future__ import annotations

import pytest

from message_broker.db.tokens import check_name
from message_broker.scopes import Scope, granted, parse_scopes
from message_broker.token_command import parse_duration


def test_each_scope_grants_itself_and_those_below() -> None:
    assert granted([Scope.READ]) == {Scope.READ}
    assert granted([Scope.WRITE]) == {Scope.READ, Scope.WRITE}
    assert granted([Scope.ADMIN]) == {Scope.READ, Scope.WRITE, Scope.ADMIN}
    assert granted([]) == frozenset()


def test_scopes_are_parsed_in_order_without_repeats() -> None:
    assert parse_scopes(["write", "read", "write"]) == (Scope.READ, Scope.WRITE)
    for bad in ([], ["public"], ["READ"], ["read", "root"]):
        with pytest.raises(ValueError):
            parse_scopes(bad)


@pytest.mark.parametrize(
    ("text", "seconds"), [("3600", 3600), ("90s", 90), ("15m", 900), ("12h", 43200), ("90d", 7776000)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0d", "-5", "1.5h", "5w", "d", "1 d", "\uff19\uff10d", "1" * 13])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "  ", "a\nb", "nul\x00", "service", "API_TOKEN", "\ud800", "t ", " t", "\u00a0t", "caf\u0065\u0301"],
)
def test_bad_token_names(name: str) -> None:
    with pytest.raises(ValueError):
        check_name(name)


def test_good_token_names() -> None:
    # "café" as most keyboards type it (NFC); its decomposed twin, which every log and created_by
    # would show alike, is refused above.
    for name in ("shop", "x" * 64, "Support dashboard", "\u043a\u0430\u0441\u0441\u0430-1", "caf\u00e9"):
        check_name(name)
