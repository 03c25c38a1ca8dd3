"""Everything that talks to PostgreSQL. Only `connector` imports the driver (aiopg/psycopg2)."""
