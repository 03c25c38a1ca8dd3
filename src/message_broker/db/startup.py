"""Reaching the database at start-up, however long it takes to appear (a whole stack booting, a
failover, a rolling deploy).

In order, each step once it has succeeded: the embedded server started (when DATABASE_URL is not
set); the database created if it is missing; the migrations applied (migrate's advisory lock makes
that once across processes starting together); the pool opened. An attempt that cannot reach the
server is logged (one WARNING line, which logs.RepeatSummarizer condenses when it repeats) and
tried again after the pause of the retry loops elsewhere (doubling up to RECONNECT_MAX_BACKOFF),
until the deadline; then StartupFailed says, in one line, what could not be reached.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
from dataclasses import dataclass

from ..aio import Backoff
from ..config import Settings
from .driver import Pool
from .embedded import EmbeddedServer, EmbeddedUnavailable, start_embedded
from .errors import DatabaseError, DatabaseUnavailable, StatementPooling
from .migrate import create_database_if_missing, migrate
from .options import ConnectionOptions, dsn_parameters

log = logging.getLogger(__name__)

# The first pause after a failed attempt; the pauses double up to RECONNECT_MAX_BACKOFF.
FIRST_PAUSE = 0.1


class StartupFailed(Exception):
    """The database was not reached in time (the message is one line, for the log)."""


@dataclass(frozen=True)
class Reached:
    settings: Settings  # with database_url set (the embedded server's, if it was started)
    pool: Pool | None  # None when not asked for (the migrate command)
    embedded: EmbeddedServer | None  # keeps the embedded server up while the process runs


def one_line(exc: BaseException) -> str:
    """An error's message on one line (libpq's span several lines)."""
    return "; ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def describe(settings: Settings) -> str:
    """Where the database is, for people: 'PostgreSQL at 127.0.0.1:5432, database x'."""
    if not settings.database_url:
        return f"the embedded PostgreSQL in {settings.embedded_data_dir}"
    params = dsn_parameters(settings.database_url)
    host, port = params.get("host", ""), params.get("port") or "5432"
    if host and not host.startswith("/"):
        where = f"{host}:{port}"
    else:
        where = f"the Unix socket in {host or 'the default directory'} (port {port})"
    database = params.get("dbname") or params.get("user") or "(default)"
    return f"PostgreSQL at {where}, database {database}"


async def prepare_database(options: ConnectionOptions) -> None:
    """Create the database if it is missing, then apply pending migrations (one attempt)."""
    unreachable: DatabaseUnavailable | None = None
    try:
        await create_database_if_missing(options)
    except DatabaseUnavailable as exc:
        # Either the server is away (then migrate fails too, and the caller retries) or only the
        # maintenance database is off limits (then migrate's success shows the database exists).
        unreachable = exc
    except DatabaseError as exc:
        log.info("could not check or create the database (%s); assuming it exists", one_line(exc))
    applied = await migrate(options)
    if unreachable is not None:
        log.info("could not check the database through the maintenance database (%s); it exists", one_line(unreachable))
    log.info("database schema up to date (%d migrations applied now)", len(applied))


async def reach_database(settings: Settings, *, timeout: float, open_pool: bool = True) -> Reached:
    """Every step of start-up that needs the database, retried until done or `timeout` seconds
    have passed (0: no limit); the pool only if `open_pool`. Raises StartupFailed, or
    EmbeddedUnavailable (nothing to wait for), or DatabaseError when the database answered and
    refused (a migration failed, say)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout > 0 else None
    backoff = Backoff(FIRST_PAUSE, settings.reconnect_max_backoff)
    embedded: EmbeddedServer | None = None
    migrated = False
    attempt, last = 0, "no attempt finished"
    while True:
        if attempt and deadline is not None and loop.time() >= deadline:
            raise StartupFailed(
                f"could not reach {describe(settings)} within STARTUP_TIMEOUT={timeout:g} s "
                f"({attempt} attempts; the last said: {last}); giving up"
            )
        attempt += 1
        try:
            async with asyncio.timeout_at(deadline):
                if not settings.database_url:
                    embedded = await asyncio.to_thread(start_embedded, settings.embedded_data_dir)
                    settings = dataclasses.replace(settings, database_url=embedded.dsn)
                options = ConnectionOptions.from_settings(settings)
                if not migrated:
                    await prepare_database(options)
                    migrated = True
                if not open_pool:
                    return Reached(settings, None, embedded)
                pool = await Pool.open(
                    options,
                    min_size=settings.pool_min_size,
                    max_size=settings.pool_max_size,
                    acquire_timeout=settings.pool_acquire_timeout,
                )
                return Reached(settings, pool, embedded)
        except (EmbeddedUnavailable, StatementPooling):
            raise  # nothing to wait for: a setting to change
        except (DatabaseUnavailable, OSError, subprocess.SubprocessError) as exc:
            # OSError and SubprocessError: the embedded server's pg_ctl failed.
            last = one_line(exc)
        except TimeoutError:
            # The deadline passed in the middle of an attempt (a connect into a dead path).
            last = f"{last}; the last attempt was still waiting for an answer"
        pause = backoff.pause()
        if deadline is not None:  # the deadline ends the wait, not a pause past it
            pause = min(pause, max(0.0, deadline - loop.time()))
            if pause <= 0:
                continue
        log.warning(
            "startup waiting_for_database=%r error=%r attempt=%d retry_in_s=%.1f",
            describe(settings),
            last,
            attempt,
            pause,
        )
        await asyncio.sleep(pause)
