"""Everything that talks to PostgreSQL. Only `driver` and `options` import the driver (aiopg/psycopg2)."""
