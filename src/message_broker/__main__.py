"""The `message-broker` command: `serve`, `migrate`, `listen`, `psql`, `create-role`, `token` and `verify`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
import signal
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from . import token_command
from .audit import verify
from .config import ConfigError, Settings
from .db.driver import ListenConnection
from .db.embedded import EmbeddedServer, EmbeddedUnavailable, packaged_binary, start_embedded
from .db.errors import DatabaseError
from .db.migrate import SchemaTooNew
from .db.options import ConnectionOptions, dsn_hosts, dsn_is_readable
from .db.roles import create_role
from .db.startup import StartupFailed, one_line, reach_database
from .logs import configure_logging, flush_summaries

log = logging.getLogger("message_broker")


def check_database_url(settings: Settings) -> None:
    for name, dsn in (("DATABASE_URL", settings.database_url), ("LISTEN_DATABASE_URL", settings.listen_database_url)):
        if dsn and not dsn_is_readable(dsn):
            raise ConfigError(f"{name} is not a libpq URI (postgresql://user@host:5432/dbname) or key=value DSN")
    if settings.database_url and len(dsn_hosts(settings.database_url)) > 1:
        raise ConfigError(
            "DATABASE_URL names several hosts; aiopg cannot connect with a multi-host DSN "
            "(aio-libs/aiopg issue 647). Point it at one endpoint that follows the primary: HAProxy with "
            "Patroni's health checks, or your provider's writer endpoint (README: High availability)"
        )


def resolve_database(settings: Settings) -> tuple[Settings, EmbeddedServer | None]:
    """Use DATABASE_URL, or start the embedded server; returns the settings with a DSN and the
    embedded server handle (kept alive for as long as the process runs)."""
    if settings.database_url:
        return settings, None
    try:
        server = start_embedded(settings.embedded_data_dir)
    except OSError as exc:  # EMBEDDED_DATA_DIR is a file, or under one, or not writable, ...
        raise EmbeddedUnavailable(
            f"cannot start the embedded PostgreSQL in {settings.embedded_data_dir}: {exc}"
        ) from exc
    return dataclasses.replace(settings, database_url=server.dsn), server


# The signals that end a command as Ctrl-C does (SIGINT is asyncio.run's own): a supervisor,
# `timeout` or `kill` (SIGTERM), a closed terminal (SIGHUP).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")


def run_command(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), ended by a stop signal as by Ctrl-C: the main task is cancelled, its
    clean-up runs, and KeyboardInterrupt comes out. Not a KeyboardInterrupt raised wherever the
    signal lands: landing in a __del__ (aiopg's connection's, say), it was swallowed, and the
    command ran on (`listen` never ended on SIGTERM: in the CI of stop 36, and here 2 runs in 15)."""

    async def stopped_by_signals() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, task.cancel)
        return await main

    try:
        return asyncio.run(stopped_by_signals())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        # Closing the loop set them back to their default action (the process killed, no clean-up).
        interrupt_on_stop_signals()


def interrupt_on_stop_signals() -> None:
    """Out of the event loop (psql waiting for its child), a stop signal raises KeyboardInterrupt."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.default_int_handler)


def ignore_stop_signals() -> None:
    """Once a command has ended, its clean-up at exit (the embedded server stopped, when this was
    its last user) runs to its end: a second SIGTERM, as a process manager signalling make's
    process group sends (GNU make forwards it to its child), raised KeyboardInterrupt in it and
    cut the stop short. Ctrl-C and SIGKILL still end it."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def migrate_database(settings: Settings) -> None:
    """Create and migrate the database, waiting for it as `serve` does (up to STARTUP_TIMEOUT)."""
    await reach_database(settings, timeout=settings.startup_timeout, open_pool=False)


async def listen(settings: Settings) -> None:
    """Print notifications until stopped. The database is created and migrated first, as for
    psql: `make listen` may come before the first `make run`."""
    await migrate_database(settings)
    conn = await ListenConnection.open(ConnectionOptions.for_listener(settings), ["task_created", "task_processed"])
    print("listening on task_created and task_processed (Ctrl-C to stop)", flush=True)
    try:
        while True:
            notification = await conn.next_notification(timeout=3600)
            if notification is not None:
                print(f"{notification.channel}: {notification.payload}", flush=True)
    finally:
        conn.close()


def psql(settings: Settings, args: list[str]) -> int:
    """psql on the service's database (created and migrated if it is not yet): the machine's psql
    if there is one, else the one the embedded server's package ships. The embedded server stays up
    while this process runs."""
    try:
        run_command(migrate_database(settings))
    except SchemaTooNew as exc:  # what serve refuses, psql is the way to look at
        log.warning("%s", exc)
    found = shutil.which("psql") or packaged_binary("psql")
    if found is None:
        print(
            "message-broker: no psql found: install PostgreSQL's client (apt install postgresql-client)",
            file=sys.stderr,
        )
        return 1
    return subprocess.run([found, "--dbname", settings.database_url or "", *args], check=False).returncode


def _user_id(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 2**63):
        raise argparse.ArgumentTypeError(f"not a user id: {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="message-broker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="apply pending migrations, then serve the API and the workers")
    commands.add_parser("migrate", help="create the database if missing and apply pending migrations")
    commands.add_parser("listen", help="print task_created and task_processed notifications as they come")
    commands.add_parser(
        "psql",
        help="open psql on the service's database (DATABASE_URL, or the embedded server); further arguments go to psql",
    )
    role = commands.add_parser(
        "create-role", help="create or update the least-privilege role the service can run as (run as the owner)"
    )
    role.add_argument("name", nargs="?", help="role name (default: $APP_DB_ROLE); password from $APP_DB_PASSWORD")
    token_command.add_parser(commands)
    check = commands.add_parser(
        "verify",
        help="prove the balances from the history (balances, holds, transfer pairs, money conserved); "
        "one line per problem, exit 1 if there is any",
    )
    check.add_argument("--user", type=_user_id, help="check only this user")
    commands.add_parser(
        "send-webhooks", help="the webhook sender process `serve` starts (its settings come from `serve`)"
    )
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "send-webhooks":
        from .worker.sender_process import child_main

        return child_main()

    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        check_database_url(settings)
        # The arguments before the database: a bad one waited for it (up to STARTUP_TIMEOUT) or
        # started the embedded server, only to be refused then.
        if args.command == "token" and args.action == "create":
            try:
                token_command.create_arguments(args)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if args.command == "create-role" and not (args.name or settings.app_db_role):
            raise ConfigError("give a role name or set APP_DB_ROLE")
        if args.command == "serve":
            # It binds its port first, then starts or waits for the database itself.
            from .server import serve

            return serve(settings)
        settings, _embedded = resolve_database(settings)
        # The stop signals end these commands as Ctrl-C does, so that their clean-up runs: the
        # embedded server stops when the last process using it exits, and one killed by the
        # signal would stay on its list of users for ever. Inside the event loop, run_command
        # cancels instead; out of it (psql waiting for its child) this raises KeyboardInterrupt.
        interrupt_on_stop_signals()
    except ConfigError as exc:
        print(f"message-broker: {exc}", file=sys.stderr)
        return 2
    except EmbeddedUnavailable as exc:
        log.error("%s", exc)
        return 1
    try:
        if args.command == "migrate":
            run_command(migrate_database(settings))
        elif args.command == "listen":
            run_command(listen(settings))
        elif args.command == "psql":
            return psql(settings, extra)
        elif args.command == "token":
            run_command(migrate_database(settings))
            options = ConnectionOptions(settings.database_url or "", connect_timeout=settings.connect_timeout)
            return run_command(token_command.run(args, options))
        elif args.command == "create-role":
            name = args.name or settings.app_db_role  # one of them: checked above
            run_command(create_role(ConnectionOptions.from_settings(settings), name, settings.app_db_password))
        elif args.command == "verify":
            options = ConnectionOptions(settings.database_url or "", connect_timeout=settings.connect_timeout)
            report = run_command(verify(options, args.user, out=lambda line: print(line, flush=True)))
            return 1 if report.problems else 0
    except (DatabaseError, StartupFailed) as exc:
        # The held-back warnings first, so that the reason stays the last line, and on one line.
        flush_summaries()
        log.error("%s", one_line(exc))
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        ignore_stop_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
