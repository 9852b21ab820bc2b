"""Settings from the environment (usher/settings.py): names, aliases, bounds, and errors
that name the variable, as a service's settings declare them."""

from __future__ import annotations

import pytest

from services.notifier.settings import NotifierSettings
from services.scheduler.quotas import Limits
from services.scheduler.settings import FALLBACK_POLICIES, SchedulerSettings
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


# --- The Scheduler's settings --------------------------------------------------------------------


def test_scheduler_defaults_and_variables() -> None:
    defaults = SchedulerSettings.from_env({})
    assert (defaults.listen, defaults.max_queue_size, defaults.default_fallback) == (
        "127.0.0.1:50051",
        100,
        1,
    )
    assert defaults.tenant_limits.unlimited
    settings = SchedulerSettings.from_env(
        {
            "USHER_SCHEDULER_LISTEN": "0.0.0.0:7001",
            "USHER_QUEUE_MAX_SIZE": "7",
            "USHER_QUEUE_TIMEOUT_SECONDS": "2.5",
            "USHER_DEFAULT_PARALLEL": "3",
            "USHER_PRIORITY_LEAD_TOKENS": "50",
            "USHER_ALLOWED_MODELS": " llama3.2, qwen2.5 ,",
            "USHER_DEDUP": "Always",
            "USHER_TENANT_REQUESTS_PER_MINUTE": "60",
            "USHER_TENANT_MAX_CONCURRENT": "2",
            "USHER_FALLBACK_POLICY": "local-only",
            "REDIS_URL": "redis://r:1/0",
        }
    )
    assert settings.listen == "0.0.0.0:7001"
    assert (settings.max_queue_size, settings.queue_timeout_seconds) == (7, 2.5)
    assert (settings.parallel, settings.priority_lead) == (3, 50.0)
    assert settings.allowed_models == frozenset({"llama3.2", "qwen2.5"})
    assert settings.dedup == "always"
    assert settings.tenant_limits == Limits(requests_per_minute=60, max_concurrent=2)
    assert settings.default_fallback == FALLBACK_POLICIES["local_only"]
    assert settings.redis_url == "redis://r:1/0"


@pytest.mark.parametrize(
    ("env", "policy"),
    [
        ({"QUEUE_AUTO_FALLBACK_ENABLED": "true"}, "after_timeout"),
        ({"QUEUE_AUTO_FALLBACK_ENABLED": "false"}, "none"),
        ({"QUEUE_AUTO_FALLBACK_ENABLED": "yes", "USHER_FALLBACK_POLICY": "none"}, "none"),
    ],
)
def test_the_prds_auto_fallback_variable(env: dict[str, str], policy: str) -> None:
    assert SchedulerSettings.from_env(env).default_fallback == FALLBACK_POLICIES[policy]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"USHER_QUEUE_MAX_SIZE": "0"}, "USHER_QUEUE_MAX_SIZE='0'"),
        ({"USHER_MAX_ATTEMPTS": "many"}, "USHER_MAX_ATTEMPTS='many'"),
        ({"USHER_LEASE_SECONDS": "0"}, "USHER_LEASE_SECONDS='0'"),
        ({"USHER_FALLBACK_POLICY": "sometimes"}, "USHER_FALLBACK_POLICY='sometimes'"),
        ({"QUEUE_AUTO_FALLBACK_ENABLED": "maybe"}, "QUEUE_AUTO_FALLBACK_ENABLED='maybe'"),
        ({"USHER_DEDUP": "never"}, "USHER_DEDUP='never'"),
        ({"USHER_DISPATCH_CONCURRENCY": "0"}, "USHER_DISPATCH_CONCURRENCY='0'"),
        ({"USHER_POOL_ADDRESS": "pool:50052"}, "USHER_SERVICE_TOKEN is needed"),
        ({"USHER_TENANT_MAX_STORED_BYTES": "1000"}, "must exceed USHER_MAX_PROMPT_CHARS"),
    ],
)
def test_a_bad_scheduler_value_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        SchedulerSettings.from_env(env)


def test_settings_built_in_code_take_only_what_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USHER_QUEUE_MAX_SIZE", "9")
    assert SchedulerSettings().max_queue_size == 100
    assert SchedulerSettings.from_env().max_queue_size == 9
    with pytest.raises(ConfigError, match="max_queue_size=0"):
        SchedulerSettings(max_queue_size=0)
    changed = SchedulerSettings(listen="127.0.0.1:1").replace(max_queue_size=5)
    assert (changed.listen, changed.max_queue_size) == ("127.0.0.1:1", 5)
    with pytest.raises(ConfigError, match="max_queue_size"):
        changed.replace(max_queue_size=-1)
