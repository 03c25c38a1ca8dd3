"""`message-broker token create|list|revoke`: manage API tokens from the shell, straight in the
database (running servers hear of every change through the api_tokens_changed notification).

    message-broker token create --name shop --scopes read,write [--expires-in 90d]
    message-broker token list
    message-broker token revoke shop
"""

from __future__ import annotations

import argparse
import getpass
import logging
import re
import sys
from datetime import datetime

from .db import tokens
from .db.driver import connect
from .db.options import ConnectionOptions
from .logs import AUDIT
from .scopes import Scope, parse_scopes

log = logging.getLogger("message_broker.tokens")

_DURATION = re.compile(r"([0-9]{1,12})([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds from `3600`, `90s`, `15m`, `12h` or `90d`; ValueError otherwise."""
    found = _DURATION.fullmatch(text.strip())
    if found is None or int(found[1]) == 0:
        raise ValueError(f"{text!r} is not a duration: a whole number of seconds, or one with s, m, h or d (90d)")
    return int(found[1]) * _UNIT_SECONDS[found[2]]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="create, list or revoke API tokens")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a token and print its secret (shown this once)")
    create.add_argument("--name", required=True, help="unique, 1-64 characters")
    create.add_argument("--scopes", required=True, help="comma-separated: read, write, admin")
    create.add_argument("--expires-in", help="seconds, or a number with s, m, h or d (90d); default: never")
    actions.add_parser("list", help="every token (never the secrets)")
    revoke = actions.add_parser("revoke", help="revoke a token by name: every server refuses it within a second")
    revoke.add_argument("name")


def _acting() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = "unknown"
    return f"cli ({user})"


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at else "-"


def create_arguments(args: argparse.Namespace) -> tuple[tuple[Scope, ...], int | None]:
    """`create`'s scopes and lifetime in seconds, checked with its name; ValueError says what is
    wrong. main() calls it before the database is reached: a typo is refused at once, not after
    STARTUP_TIMEOUT, nor after starting the embedded server."""
    tokens.check_name(args.name)
    scopes = parse_scopes(s.strip() for s in args.scopes.split(",") if s.strip())
    expires_in = None if args.expires_in is None else parse_duration(args.expires_in)
    if expires_in is not None:
        tokens.check_expires_in(expires_in)
    return scopes, expires_in


async def run(args: argparse.Namespace, options: ConnectionOptions) -> int:
    """The `token` command; its exit status."""
    if args.action == "create":
        try:
            scopes, expires_in = create_arguments(args)
        except ValueError as exc:
            print(f"message-broker: {exc}", file=sys.stderr)
            return 2
    conn = await connect(options)
    try:
        if args.action == "create":
            try:
                token, secret = await tokens.create_token(conn, args.name, scopes, expires_in)
            except tokens.TokenNameTaken:
                print(f"message-broker: a token named {args.name!r} exists already", file=sys.stderr)
                return 1
            log.warning(
                "api_token created id=%s name=%r scopes=%s expires_at=%s by=%r",
                token.id,
                token.name,
                ",".join(scopes),
                _when(token.expires_at),
                _acting(),
                extra=AUDIT,
            )
            print(secret)
        elif args.action == "list":
            print(f"{'ID':>5}  {'NAME':<24} {'SCOPES':<17} {'CREATED':<25} {'EXPIRES':<25} {'LAST USED':<25} REVOKED")
            for token in await tokens.list_tokens(conn):
                print(
                    f"{token.id:>5}  {token.name:<24} {','.join(token.scopes):<17} {_when(token.created_at):<25} "
                    f"{_when(token.expires_at):<25} {_when(token.last_used_at):<25} {_when(token.revoked_at)}"
                )
        else:
            found = await tokens.revoke_token_by_name(conn, args.name)
            if found is None:
                print(f"message-broker: no token named {args.name!r}", file=sys.stderr)
                return 1
            log.warning("api_token revoked id=%s name=%r by=%r", found.id, found.name, _acting(), extra=AUDIT)
            print(f"revoked {found.name!r} at {_when(found.revoked_at)}")
    finally:
        conn.close()
    return 0
