"""Settings from the environment (usher/settings.py): names, aliases, bounds, and errors
that name the variable, as a service's settings declare them."""

from __future__ import annotations

import pytest

from services.notifier.app import NotifierSettings
from usher.config import ConfigError


def test_defaults_the_usher_prefix_and_named_variables() -> None:
    assert NotifierSettings.from_env({}).listen == "127.0.0.1:50053"
    settings = NotifierSettings.from_env(
        {
            "USHER_NOTIFIER_LISTEN": "0.0.0.0:7000",
            "USHER_POSITION_INTERVAL_SECONDS": "0.5",
            "USHER_NOTIFIER_HEAP_FREEZE_SECONDS": "0",
            "USHER_LOG_LEVEL": "DEBUG",
            "USHER_METRICS_PORT": "",  # empty: the default
            "USHER_API_TOKENS": "k=alice@acme",
        }
    )
    assert settings.listen == "0.0.0.0:7000"
    assert settings.position_interval_seconds == 0.5
    assert settings.heap_freeze_seconds == 0
    assert settings.log_level == "debug"
    assert settings.metrics_port == 0
    assert settings.tokens["k"].user == "alice"


def test_usher_redis_url_wins_over_redis_url() -> None:
    both = {"REDIS_URL": "redis://a:1/0", "USHER_REDIS_URL": "redis://b:2/0"}
    assert NotifierSettings.from_env(both).redis_url == "redis://b:2/0"
    assert NotifierSettings.from_env({"REDIS_URL": "redis://a:1/0"}).redis_url == "redis://a:1/0"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"USHER_POSITION_INTERVAL_SECONDS": "-1"}, "USHER_POSITION_INTERVAL_SECONDS='-1'"),
        ({"USHER_METRICS_PORT": "many"}, "USHER_METRICS_PORT='many'"),
        ({"USHER_NOTIFIER_HEAP_FREEZE_SECONDS": "-2"}, "USHER_NOTIFIER_HEAP_FREEZE_SECONDS='-2'"),
        ({"USHER_LOG_LEVEL": "loud"}, "USHER_LOG_LEVEL='loud'"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        NotifierSettings.from_env(env)


def test_the_process_environment_is_read_when_no_mapping_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("USHER_BADGE_INTERVAL_SECONDS", "3")
    assert NotifierSettings.from_env().badge_interval_seconds == 3
