"""The `message-broker` command: `serve`, `migrate`, `listen`, `psql`, `create-role` and `token`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import shutil
import subprocess
import sys

from . import token_command
from .config import ConfigError, Settings
from .db.driver import ListenConnection
from .db.embedded import EmbeddedServer, EmbeddedUnavailable, packaged_binary, start_embedded
from .db.errors import DatabaseError
from .db.migrate import create_database_if_missing, migrate
from .db.options import ConnectionOptions, dsn_hosts
from .db.roles import create_role
from .logs import configure_logging

log = logging.getLogger("message_broker")


def resolve_database(settings: Settings) -> tuple[Settings, EmbeddedServer | None]:
    """Use DATABASE_URL, or start the embedded server; returns the settings with a DSN and the
    embedded server handle (kept alive for as long as the process runs)."""
    if settings.database_url:
        if len(dsn_hosts(settings.database_url)) > 1:
            raise ConfigError(
                "DATABASE_URL names several hosts; aiopg cannot connect with a multi-host DSN "
                "(aio-libs/aiopg issue 647). Point it at one endpoint that follows the primary: HAProxy with "
                "Patroni's health checks, or your provider's writer endpoint (README: High availability)"
            )
        return settings, None
    server = start_embedded(settings.embedded_data_dir)
    return dataclasses.replace(settings, database_url=server.dsn), server


async def prepare_database(settings: Settings) -> None:
    options = ConnectionOptions(settings.database_url or "", connect_timeout=settings.connect_timeout)
    try:
        await create_database_if_missing(options)
    except DatabaseError as exc:
        # Not fatal: the database may exist and only the maintenance database be off limits.
        log.info("could not check or create the database (%s); assuming it exists", exc)
    applied = await migrate(options)
    log.info("database schema up to date (%d migrations applied now)", len(applied))


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (and wanted), else asyncio's."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using asyncio's event loop")
        else:
            return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


async def freeze_startup_objects(_app: object) -> None:
    """Hide what start-up allocated (modules, schemas, routes, the pool) from the cyclic garbage
    collector: it lives as long as the process, and walking it again in every full collection
    cost ~10 % of the CPU under load. Collecting every 10,000 allocations rather than 700 trims
    the per-request collections further (gc.freeze's documented use)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def serve(settings: Settings) -> None:
    from aiohttp import web

    from .http.app import create_app

    asyncio.run(prepare_database(settings))
    log.info("serving on http://%s:%s", settings.host, settings.port)
    app = create_app(settings)
    app.on_startup.append(freeze_startup_objects)  # after every resource is open
    web.run_app(
        app,
        loop=new_event_loop(settings.event_loop),
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        access_log=None,
        print=None,
    )
    log.info("stopped")


async def listen(settings: Settings) -> None:
    conn = await ListenConnection.open(
        ConnectionOptions(settings.database_url or ""), ["task_created", "task_processed"]
    )
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
    asyncio.run(prepare_database(settings))
    found = shutil.which("psql") or packaged_binary("psql")
    if found is None:
        print(
            "message-broker: no psql found: install PostgreSQL's client (apt install postgresql-client)",
            file=sys.stderr,
        )
        return 1
    return subprocess.run([found, "--dbname", settings.database_url or "", *args], check=False).returncode


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
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        settings, _embedded = resolve_database(settings)
    except ConfigError as exc:
        print(f"message-broker: {exc}", file=sys.stderr)
        return 2
    except EmbeddedUnavailable as exc:
        log.error("%s", exc)
        return 1
    try:
        if args.command == "serve":
            serve(settings)
        elif args.command == "migrate":
            asyncio.run(prepare_database(settings))
        elif args.command == "listen":
            asyncio.run(listen(settings))
        elif args.command == "psql":
            return psql(settings, extra)
        elif args.command == "token":
            asyncio.run(prepare_database(settings))
            options = ConnectionOptions(settings.database_url or "", connect_timeout=settings.connect_timeout)
            return asyncio.run(token_command.run(args, options))
        elif args.command == "create-role":
            name = args.name or settings.app_db_role
            if not name:
                print("message-broker: give a role name or set APP_DB_ROLE", file=sys.stderr)
                return 2
            options = ConnectionOptions(settings.database_url or "", connect_timeout=settings.connect_timeout)
            asyncio.run(create_role(options, name, settings.app_db_password))
    except DatabaseError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
