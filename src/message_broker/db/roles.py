"""The least-privilege database role the service can run as.

The service only reads and writes rows: users and tasks (SELECT, INSERT, UPDATE; never DELETE
or TRUNCATE), idempotency keys (which it also purges), the finished-batch positions its triggers
write, and, at start-up, which migrations are applied. It needs no DDL and no other table or
sequence but the tasks' id sequence, which the batched enqueue draws from itself. Migrations, and this command,
run as the tables' owner. The triggers run with the caller's rights, so what they touch is here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType

from .driver import connect
from .options import ConnectionOptions
from .queries import query

log = logging.getLogger(__name__)

# Everything the service may do, per table. A table added by a later migration that the service
# uses must be added here too (tests/integration/test_role.py runs the service as this role).
TABLE_PRIVILEGES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "users": ("SELECT", "INSERT", "UPDATE"),
        "tasks": ("SELECT", "INSERT", "UPDATE"),
        "holds": ("SELECT", "INSERT", "UPDATE"),
        "idempotency_keys": ("SELECT", "INSERT", "UPDATE", "DELETE"),  # DELETE: the expiry purge
        # Written by the finishing triggers (0003); DELETE: the retention purge (0006).
        "task_batches": ("SELECT", "INSERT", "UPDATE", "DELETE"),
        "maintenance_runs": ("SELECT", "INSERT", "UPDATE"),  # the purges' turns
        "schema_migrations": ("SELECT",),
        # Webhooks (0010): endpoints the API manages; deliveries the finishing trigger writes, the
        # sender updates and the retention purge deletes (their attempts with them).
        "webhook_endpoints": ("SELECT", "INSERT", "UPDATE", "DELETE"),
        "webhook_deliveries": ("SELECT", "INSERT", "UPDATE", "DELETE"),
        "webhook_attempts": ("SELECT", "INSERT", "DELETE"),
        # Tokens are created, revoked and stamped with last_used_at, never deleted (0009).
        "api_tokens": ("SELECT", "INSERT", "UPDATE"),
    }
)
SEQUENCE_PRIVILEGES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "task_batch_positions": ("USAGE",),  # nextval() in the commit-time trigger (0003)
        "tasks_id_seq": ("USAGE",),  # the batched enqueue and the transfers draw task ids themselves
    }
)


def _in_format(identifier: str) -> str:
    """A quoted identifier placed in a statement with bound parameters, whose text psycopg2 reads
    as a format string: each % doubled (a role or database named with a %, "shop 100%" or one
    that needs URL-escaping, made create-role a TypeError traceback)."""
    return identifier.replace("%", "%%")


async def create_role(options: ConnectionOptions, role: str, password: str | None = None) -> bool:
    """Create `role` (LOGIN) if missing and give it exactly TABLE_PRIVILEGES on this database,
    plus CONNECT and USAGE on the schema; True if the role was created now. Running it again
    resets the grants to exactly these."""
    conn = await connect(options)
    try:
        # Role, database, schema, table and sequence names are identifiers: quoted into the DDL
        # below, as they cannot be bound parameters.
        name = conn.quote_ident(role)
        exists = await conn.fetch_one(query("role_exists"), {"role": role})
        if not exists:
            await conn.execute(f"CREATE ROLE {name} LOGIN")
        if password:
            # psycopg2 binds the value as a quoted literal: never spliced in as text.
            await conn.execute(f"ALTER ROLE {_in_format(name)} LOGIN PASSWORD %(password)s", {"password": password})
        where = await conn.fetch_one(query("current_database_and_schema"))
        assert where is not None
        database, schema = conn.quote_ident(where["db"]), conn.quote_ident(where["schema"])
        async with conn.transaction():
            await conn.execute(f"GRANT CONNECT ON DATABASE {database} TO {name}")
            await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {name}")
            # Start from nothing, so an earlier broader grant does not linger.
            await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {name}")
            await conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {name}")
            for table, privileges in TABLE_PRIVILEGES.items():
                table_name = f"{schema}.{conn.quote_ident(table)}"
                await conn.execute(f"GRANT {', '.join(privileges)} ON TABLE {table_name} TO {name}")
            for sequence, privileges in SEQUENCE_PRIVILEGES.items():
                sequence_name = f"{schema}.{conn.quote_ident(sequence)}"
                await conn.execute(f"GRANT {', '.join(privileges)} ON SEQUENCE {sequence_name} TO {name}")
            # The service's limits are per transaction (set_config, is_local), so that a pooler may
            # run each transaction anywhere; an error inside a transaction takes them away until
            # its ROLLBACK comes, and on a path gone silent that may never come: the backend would
            # wait, idle in an aborted transaction, for the server's TCP keepalives (hours). The
            # role's own default, applied at every login (through PgBouncer too), ends it.
            # The schema granted above as the role's search_path in this database: tables the owner
            # migrated into a schema of its own (its search_path) were out of the role's reach,
            # and the service refused to start as it.
            await conn.execute(f"ALTER ROLE {name} IN DATABASE {database} SET search_path = {schema}")
            await conn.execute(
                f"ALTER ROLE {_in_format(name)} IN DATABASE {_in_format(database)}"
                " SET idle_in_transaction_session_timeout = %(ms)s",
                {"ms": int(options.idle_in_transaction_timeout_ms)},
            )
        log.info("role %s %s with least privileges on %s", role, "created" if not exists else "updated", where["db"])
        return not exists
    finally:
        conn.close()
