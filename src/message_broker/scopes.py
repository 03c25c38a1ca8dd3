"""What a token may do: its scopes, and which scopes each one includes.

    read   every GET and event stream
    write  create users, post every kind of task (and read)
    admin  manage tokens, webhooks, everything else (and write and read)

A route declares the one scope it needs (http/routes.py); PUBLIC routes (the probes, the
console's static files) need none.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from types import MappingProxyType


class Scope(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    # For routes only, never a token's: open to anyone, with or without a token.
    PUBLIC = "public"


TOKEN_SCOPES = (Scope.READ, Scope.WRITE, Scope.ADMIN)

# What each scope grants, itself included.
_GRANTS = MappingProxyType(
    {
        Scope.READ: frozenset({Scope.READ}),
        Scope.WRITE: frozenset({Scope.READ, Scope.WRITE}),
        Scope.ADMIN: frozenset({Scope.READ, Scope.WRITE, Scope.ADMIN}),
    }
)
EVERY_SCOPE = _GRANTS[Scope.ADMIN]


def granted(scopes: Iterable[Scope]) -> frozenset[Scope]:
    """Every scope the given ones grant (admin grants write and read; write grants read)."""
    found: frozenset[Scope] = frozenset()
    for scope in scopes:
        found |= _GRANTS[scope]
    return found


def parse_scopes(items: Iterable[str]) -> tuple[Scope, ...]:
    """Token scopes from their names, in the canonical order, without repeats; ValueError for an
    unknown one or none at all."""
    names = set(items)
    unknown = sorted(names - {s.value for s in TOKEN_SCOPES})
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}: choose from read, write, admin")
    if not names:
        raise ValueError("give at least one scope: read, write or admin")
    return tuple(s for s in TOKEN_SCOPES if s.value in names)
