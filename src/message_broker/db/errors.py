"""The database errors the rest of the service handles, independent of the driver."""


class DatabaseError(Exception):
    """Something went wrong talking to PostgreSQL."""


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL cannot be reached, refused a connection, or no pooled connection came free in time."""


class QueryTimeout(DatabaseUnavailable):
    """A statement ran past its timeout (ours or the server's statement_timeout)."""


class StatementPooling(DatabaseUnavailable):
    """The endpoint is a PgBouncer in statement pooling: it refuses every transaction of more than one
    statement (and closes the connection), which the service cannot work without. A setting to
    change, not a database to wait for: start-up refuses at once with this one line."""

    def __init__(self) -> None:
        super().__init__(
            "the database's endpoint is PgBouncer in statement pooling (pool_mode = statement), which refuses "
            "every transaction of more than one statement; the service needs pool_mode = transaction or "
            "session (PgBouncer said: transaction blocks not allowed in statement pooling mode)"
        )


class WriteCheckFailed(DatabaseError):
    """A statement's own check of what it wrote failed (SQLSTATE MB001, apply_lost_race in
    migration 0011); its transaction is aborted."""


class UniqueViolation(DatabaseError):
    """An INSERT or UPDATE hit a unique constraint."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(f"unique constraint {constraint} violated")
        self.constraint = constraint


class ForeignKeyViolation(DatabaseError):
    """A row refers to a row that does not exist."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(f"foreign key {constraint} violated")
        self.constraint = constraint
