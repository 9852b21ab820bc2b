"""USHER_PRODUCTION=true: every service refuses to start with the templates' placeholder
secrets or short ones, naming the variable and never the value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from usher.config import ConfigError
from usher.production import MIN_SECRET_LENGTH, require_production_ready, secret_problems

GOOD = "x" * MIN_SECRET_LENGTH
#: The values of deploy/k8s/base/config/usher-*.env.
TEMPLATE = {
    "USHER_API_TOKENS": "CHANGE-ME-admin-token=admin@example:admin,"
    "CHANGE-ME-service-token=scheduler@usher:service,CHANGE-ME-user-token=alice@example",
    "USHER_SERVICE_TOKEN": "CHANGE-ME-service-token",
    "USHER_REDIS_URL": "redis://:CHANGE-ME-redis-password@usher-redis:6379/0",
    "REDIS_PASSWORD": "CHANGE-ME-redis-password",
}
SOUND = {
    "USHER_API_TOKENS": f"{GOOD}a=admin@example:admin,{GOOD}s=scheduler@usher:service",
    "USHER_SERVICE_TOKEN": f"{GOOD}s",
    "USHER_REDIS_URL": f"redis://:{GOOD}%40@usher-redis:6379/0",
    "REDIS_PASSWORD": f"{GOOD}@",
}


def test_sound_secrets_pass() -> None:
    assert secret_problems(SOUND) == []
    require_production_ready({**SOUND, "USHER_PRODUCTION": "true"})


def test_every_placeholder_is_named_without_its_value() -> None:
    problems = secret_problems(TEMPLATE)
    assert len(problems) == 6  # three API keys, the service token, the URL, the password
    assert all("placeholder" in p for p in problems)
    assert not any("admin-token" in p or "redis-password" in p for p in problems)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("USHER_SERVICE_TOKEN", "short"),
        ("USHER_JWT_SECRET", "s3cret"),
        ("USHER_GATEWAY_ADMIN_TOKEN", "change-me-please-" + GOOD),
        ("USHER_REDIS_URL", "redis://usher-redis:6379/0"),
        ("USHER_ENCRYPTION_KEYS", "k1:CHANGE-ME-base64-of-32-bytes"),
    ],
)
def test_a_weak_secret_is_named(variable: str, value: str) -> None:
    problems = secret_problems({**SOUND, variable: value})
    assert len(problems) == 1
    assert variable in problems[0]


def test_open_access_is_refused() -> None:
    assert secret_problems({**SOUND, "USHER_AUTH_OPEN": "true"}) == [
        "USHER_AUTH_OPEN=true admits anyone (usher/auth.py)"
    ]


def test_no_credentials_at_all_is_refused() -> None:
    assert secret_problems({}) == ["no credentials: set USHER_API_TOKENS(_FILE) or USHER_JWT_*"]


def test_off_unless_asked() -> None:
    require_production_ready(TEMPLATE)
    require_production_ready({**TEMPLATE, "USHER_PRODUCTION": "false"})
    with pytest.raises(ConfigError, match="USHER_SERVICE_TOKEN"):
        require_production_ready({**TEMPLATE, "USHER_PRODUCTION": "true"})


@pytest.mark.parametrize(
    "module", ["services.scheduler", "services.pool", "services.notifier", "services.gateway"]
)
def test_each_service_refuses_to_start(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USHER_")}
    env.update(TEMPLATE, USHER_PRODUCTION="true", USHER_INSTANCES="http://127.0.0.1:9")
    done = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "USHER_PRODUCTION=true refuses to start" in done.stderr
    assert "USHER_SERVICE_TOKEN is a placeholder" in done.stderr
    assert "CHANGE-ME-service-token" not in done.stderr
