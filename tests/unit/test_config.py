import pytest

from message_broker.config import ConfigError, Settings


def test_defaults_and_environment() -> None:
    settings = Settings.from_env({"PORT": "4000", "SWEEP_INTERVAL": "2.5", "DATABASE_URL": "postgresql:///x"})
    assert (settings.port, settings.sweep_interval, settings.host) == (4000, 2.5, "127.0.0.1")
    assert Settings.from_env({}).port == 3333


@pytest.mark.parametrize("env", [{"PORT": "abc"}, {"PORT": "0"}, {"POOL_MAX_SIZE": "1"}, {"SWEEP_INTERVAL": "-1"}])
def test_bad_values_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)
