"""The database errors the rest of the service handles, independent of the driver."""


class DatabaseError(Exception):
    """Something went wrong talking to PostgreSQL."""


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL cannot be reached, refused a connection, or no pooled connection came free in time."""


class QueryTimeout(DatabaseUnavailable):
    """A statement ran past its timeout (ours or the server's statement_timeout)."""


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
