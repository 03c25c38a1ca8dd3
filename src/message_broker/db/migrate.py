"""Numbered schema migrations (sql/migrations/NNNN_name.sql), each applied once, in order.

Several processes may start at once: the pending migrations are applied in one transaction that
first takes a transaction-level advisory lock, so one process applies them and the others wait,
then find them recorded. Nothing is held across transactions, so this works through PgBouncer in
transaction pooling as well as directly.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from .driver import Connection, Row, connect
from .errors import DatabaseError, UniqueViolation
from .options import ConnectionOptions, dsn_database, dsn_with_database
from .queries import query, sql_dir
from .roles import TABLE_PRIVILEGES

log = logging.getLogger(__name__)

# Any constant unique to this project; advisory lock keys are bigints.
MIGRATION_LOCK_KEY = 0x6D62_6D69_6772  # "mbmigr"
_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


class SchemaTooNew(DatabaseError):
    """The database records a migration this code does not have: a newer version migrated it."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in (sql_dir() / "migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a number: {versions}")
    return found


async def migrate(options: ConnectionOptions) -> list[Migration]:
    """Apply every migration not yet recorded; return those applied now."""
    # A migration may rewrite a large table, and another process may hold the lock while it does:
    # neither must be cut off by the service's per-statement limits.
    # No statement limit (a migration may build an index for long), but the idle-in-transaction
    # limit stays: the transaction holds the migrations' lock and its DDL's locks, and if the path
    # to the server dies silently mid-way, only that limit makes the server end it (TCP keepalives
    # take hours); the client sends its statements back to back, so a healthy migration never idles.
    conn = await connect(options.with_changes(statement_timeout_ms=0))
    applied: list[Migration] = []
    try:
        # One round trip for what the role's or database's settings could make wrong.
        settings = await conn.fetch_all(query("tables_in_reach"), {"names": list(TABLE_PRIVILEGES)})
        _check_triggers_fire(settings[0])
        _check_search_path(settings)
        # Without the lock first: an up-to-date schema (every start but the first) costs no wait.
        if not await _pending(conn):
            return applied
        # Every pending migration in one transaction: two round trips each (a new database's
        # twelve in about 30 in all, not 96: seconds saved at start-up when the database is far),
        # and the schema is the old one or the new one, never half-way.
        async with conn.transaction():
            await conn.execute(query("lock_migrations"), {"key": MIGRATION_LOCK_KEY})
            # Under the lock: another process may have applied some meanwhile.
            for migration in await _pending(conn, create_table=True):
                await conn.execute(migration.sql)
                await conn.execute(query("record_migration"), {"version": migration.version, "name": migration.name})
                applied.append(migration)
        for migration in applied:
            log.info("applied migration %04d_%s", migration.version, migration.name)
        return applied
    finally:
        conn.close()


class TriggersOff(DatabaseError):
    """session_replication_role keeps the service's triggers from firing (one line)."""


def _check_triggers_fire(row: Row) -> None:
    """Refuse to start when the role's or database's session_replication_role is not `origin`:
    ordinary triggers do not fire, and the service's are part of every write (a new user's opening
    balance: POST /api/v1/user/ was a 500; a task's wake-up and its batch)."""
    if row["replication_role"] != "origin":
        raise TriggersOff(
            f"session_replication_role is {row['replication_role']} for this role or database, so the service's "
            "triggers would not fire: set it back to origin (ALTER ROLE/DATABASE ... RESET session_replication_role)"
        )


class SearchPathMismatch(DatabaseError):
    """search_path does not take the service's table names to its own tables (one line)."""


def _check_search_path(rows: list[Row]) -> None:
    """Refuse to start when search_path (the role's or database's) does not lead to the service's
    own tables: the names are unqualified, so a path that misses the schema they are in made the
    migrations build a second, empty ledger in the first schema on it and serve that, and a table
    of the same name earlier on the path was read in place of the service's."""
    where = {row["name"]: row["schema"] for row in rows}
    first = rows[0]
    path, installed_in, creates_in = first["search_path"], first["installed_in"], first["creates_in"]
    home = where["schema_migrations"]
    if home is None and installed_in:
        raise SearchPathMismatch(
            f"the service's tables are in schema {', '.join(installed_in)} of this database, which "
            f"search_path ({path}) does not reach; refusing to create a second, empty set in "
            f"{creates_in or 'no schema'}: set the role's or database's search_path to reach it"
        )
    # Tables not created yet (by a pending migration) reach nowhere; any other place is astray.
    astray = sorted(f"{name} (in {schema})" for name, schema in where.items() if schema and schema != home)
    if astray:
        own = f"the service's are in {home}" if home else "the service has none yet"
        raise SearchPathMismatch(
            f"search_path ({path}) takes these names to tables that are not the service's: "
            f"{', '.join(astray)}; {own}: set the role's or database's search_path to reach its schema first"
        )


async def _pending(conn: Connection, *, create_table: bool = False) -> list[Migration]:
    """The migrations not yet recorded, in order."""
    # Create the table only when missing: even CREATE TABLE IF NOT EXISTS needs CREATE on the
    # schema, which the service's least-privilege role (db/roles.py) does not have.
    found = await conn.fetch_one(query("migrations_table_exists"))
    if not (found and found["present"]):
        if not create_table:
            return available_migrations()
        await conn.execute(query("create_migrations_table"))
    done = {row["version"] for row in await conn.fetch_all(query("applied_migrations"))}
    known = available_migrations()
    # A newer version of the service migrated this database (the code rolled back, an old process
    # restarted during a deploy): its statements may not fit that schema, and migrations are never
    # undone. Refused, as a failed migration is, rather than served as if up to date.
    unknown = sorted(done - {migration.version for migration in known})
    if unknown:
        newest = known[-1]
        raise SchemaTooNew(
            f"the database has migration{'s' * (len(unknown) > 1)} {', '.join(f'{v:04d}' for v in unknown)} "
            f"that this code does not know (its newest is {newest.version:04d}_{newest.name}): a newer "
            "version of message_broker migrated it; run that version"
        )
    return [migration for migration in known if migration.version not in done]


async def create_database_if_missing(options: ConnectionOptions, maintenance_db: str = "postgres") -> bool:
    """CREATE DATABASE for the DSN's database unless it exists; True if it was created."""
    name = dsn_database(options.dsn)
    if not name:
        return False
    # CREATE DATABASE cannot run inside a transaction block: no per-transaction limits before it.
    admin = ConnectionOptions(
        dsn_with_database(options.dsn, maintenance_db),
        connect_timeout=options.connect_timeout,
        per_transaction_limits=False,
    )
    conn = await connect(admin)
    try:
        if await conn.fetch_one(query("database_exists"), {"name": name}):
            return False
        try:
            # An identifier: it cannot be a bound parameter.
            await conn.execute(f"CREATE DATABASE {conn.quote_ident(name)}")
        except (UniqueViolation, DatabaseError):
            # Another process may have created it a moment ago; anything else is re-raised.
            if await conn.fetch_one(query("database_exists"), {"name": name}):
                return False
            raise
        log.info("created database %s", name)
        return True
    finally:
        conn.close()
