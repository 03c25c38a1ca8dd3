import pytest

from message_broker.config import ConfigError, Settings


def test_performance_settings_from_the_environment() -> None:
    env = {"ENQUEUE_MAX_BATCH": "100", "ENQUEUE_MAX_IN_FLIGHT": "3", "APPLY_MAX_USERS": "20", "EVENT_LOOP": "asyncio"}
    settings = Settings.from_env(env)
    assert (settings.enqueue_max_batch, settings.enqueue_max_in_flight) == (100, 3)
    assert (settings.apply_max_users, settings.event_loop) == (20, "asyncio")


@pytest.mark.parametrize(
    "env",
    [
        {"ENQUEUE_MAX_BATCH": "0"},
        {"ENQUEUE_MAX_IN_FLIGHT": "0"},
        {"ENQUEUE_MAX_IN_FLIGHT": "10", "POOL_MAX_SIZE": "10"},
        {"APPLY_MAX_USERS": "0"},
        {"EVENT_LOOP": "tokio"},
    ],
)
def test_bad_performance_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_only_lists_of_ints_or_of_strings_become_array_literals() -> None:
    from message_broker.db.driver import array_literal

    assert array_literal([1, 2, 3]) == "{1,2,3}"
    assert array_literal(["a", None]) == '{"a",NULL}'
    # Left to the driver: bools (an int subclass bigint[] rejects), floats, mixed lists.
    assert array_literal([True, False]) is None
    assert array_literal([1.5]) is None
    assert array_literal([1, "a"]) is None
