import pytest

from message_broker.__main__ import check_database_url
from message_broker.config import ConfigError, Settings


def test_defaults_and_environment() -> None:
    settings = Settings.from_env({"PORT": "4000", "SWEEP_INTERVAL": "2.5", "DATABASE_URL": "postgresql:///x"})
    assert (settings.port, settings.sweep_interval, settings.host) == (4000, 2.5, "127.0.0.1")
    assert Settings.from_env({}).port == 3333


def test_limits_at_their_edges() -> None:
    settings = Settings.from_env({"STATEMENT_TIMEOUT_MS": "0", "IDLE_IN_TRANSACTION_TIMEOUT_MS": "2147483647"})
    assert (settings.statement_timeout_ms, settings.idle_in_transaction_timeout_ms) == (0, 2147483647)
    assert Settings.from_env({"SHUTDOWN_TIMEOUT": "0"}).shutdown_timeout == 0
    assert Settings.from_env({"EVENT_RETENTION": "315576000"}).event_retention == 315576000  # ten years


def test_log_level_in_any_case() -> None:
    assert Settings.from_env({"LOG_LEVEL": "debug"}).log_level == "debug"
    assert Settings.from_env({"LOG_LEVEL": "WARNING"}).log_level == "WARNING"


def test_startup_timeout() -> None:
    assert Settings.from_env({}).startup_timeout == 60
    assert Settings.from_env({"STARTUP_TIMEOUT": "0"}).startup_timeout == 0  # wait for ever
    assert Settings.from_env({"STARTUP_TIMEOUT": "2.5"}).startup_timeout == 2.5


def test_webhook_give_way() -> None:
    assert Settings.from_env({}).webhook_give_way == 5.0
    assert Settings.from_env({"WEBHOOK_GIVE_WAY": "0"}).webhook_give_way == 0  # never held back
    assert Settings.from_env({"WEBHOOK_GIVE_WAY": "0.5"}).webhook_give_way == 0.5


@pytest.mark.parametrize(
    "env",
    [
        {"PORT": "abc"},
        {"PORT": "0"},
        {"POOL_MAX_SIZE": "1"},
        {"SWEEP_INTERVAL": "-1"},
        {"STARTUP_TIMEOUT": "-1"},
        {"STARTUP_TIMEOUT": "nan"},
        {"WEBHOOK_GIVE_WAY": "-1"},
        {"WEBHOOK_GIVE_WAY": "nan"},
        {"WEBHOOK_GIVE_WAY": "inf"},
        {"LOG_LEVEL": "verbose"},  # was a traceback from logging at start-up, exit 1
        {"LOG_LEVEL": "5"},
        # NaN passed every "must be positive" check; each of these was a traceback at start-up or in
        # a loop, a 500 (IDEMPOTENCY_RETENTION=inf on every keyed POST), or a purge failing for ever.
        {"POOL_ACQUIRE_TIMEOUT": "nan"},
        {"SWEEP_INTERVAL": "nan"},
        {"USER_IDLE_TIMEOUT": "nan"},
        {"CONNECT_TIMEOUT": "nan"},
        {"CONNECT_TIMEOUT": "0"},
        {"SHUTDOWN_TIMEOUT": "nan"},
        {"SHUTDOWN_TIMEOUT": "-1"},
        {"RECONNECT_MAX_BACKOFF": "0"},
        {"RECONNECT_MAX_BACKOFF": "nan"},
        {"IDEMPOTENCY_RETENTION": "inf"},
        {"EVENT_RETENTION": "1e300"},
        {"WEBHOOK_RETENTION": "inf"},
        {"WEBHOOK_TIMEOUT": "inf"},
        {"STATEMENT_TIMEOUT_MS": "-1"},  # PostgreSQL refused it in the first transaction: a traceback
        {"STATEMENT_TIMEOUT_MS": "99999999999"},
        {"IDLE_IN_TRANSACTION_TIMEOUT_MS": "-1"},
        {"MAX_BODY_BYTES": "0"},
    ],
)
def test_bad_values_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_security_settings() -> None:
    settings = Settings.from_env({"API_TOKEN": "t" * 16, "API_TOKEN_PROTECT_READS": "true", "MAX_HEADERS": "10"})
    assert (settings.api_token, settings.api_token_protect_reads, settings.max_headers) == ("t" * 16, True, 10)
    assert Settings.from_env({"API_TOKEN_PROTECT_READS": "0"}).api_token_protect_reads is False
    assert Settings.from_env({}).api_token is None


@pytest.mark.parametrize(
    "env",
    [
        {"API_TOKEN": "short"},
        {"API_TOKEN": "has a space in the middle"},
        {"API_TOKEN": "ünïcode-token-of-some-length"},
        {"API_TOKEN_PROTECT_READS": "maybe"},
        {"MAX_HEADER_BYTES": "0"},
        {"REQUEST_BODY_TIMEOUT": "0"},
    ],
)
def test_bad_security_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "env",
    [
        {"DATABASE_URL": "garbage"},  # was psycopg2's ProgrammingError with a traceback, exit 1
        {"DATABASE_URL": "postgresql://root@127.0.0.1:5432/x?no_such_parameter=1"},
        {"LISTEN_DATABASE_URL": "garbage"},  # was a service that started and never heard a notification
    ],
)
def test_an_unreadable_database_url_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="is not a libpq URI"):
        check_database_url(Settings.from_env(env))
    check_database_url(Settings.from_env({"DATABASE_URL": "postgresql://root@127.0.0.1:5432/x"}))
    check_database_url(Settings.from_env({"DATABASE_URL": "host=/tmp dbname=x"}))
