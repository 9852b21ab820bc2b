"""Production mode: refuse to start with placeholder or weak secrets.

``USHER_PRODUCTION=true`` (the Kubernetes manifests set it) makes every service check its
secrets before it starts: a value still holding the templates' ``CHANGE-ME`` marker, or
shorter than ``MIN_SECRET_LENGTH`` characters, stops the service with exit code 2 and the
variable named (never the value). Without it (local development, tests) nothing is
checked. Also refused in production: no credentials at all, open access
(``USHER_AUTH_OPEN``), and a Redis URL without a password.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from urllib.parse import unquote, urlsplit

from usher.auth import AuthSettings, load_token_map
from usher.config import ConfigError

__all__ = ["MIN_SECRET_LENGTH", "PLACEHOLDER", "require_production_ready", "secret_problems"]

#: 32 characters: `openssl rand -hex 16` (128 bits) is the shortest value accepted.
MIN_SECRET_LENGTH = 32
#: The marker of the templates' placeholder values (deploy/k8s/base/config/usher-*.env).
PLACEHOLDER = "CHANGE-ME"
#: Secrets read whole from one variable.
SINGLE_SECRETS = (
    "USHER_SERVICE_TOKEN",
    "USHER_JWT_SECRET",
    "USHER_GATEWAY_ADMIN_TOKEN",
    "USHER_GATEWAY_WATCH_SECRET",
    "REDIS_PASSWORD",
)


def _secrets(env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(where, value) of every secret set in ``env``."""
    for token, principal in load_token_map(env).items():
        yield f"USHER_API_TOKENS (the key of {principal.tenant})", token
    for name in SINGLE_SECRETS:
        if env.get(name, "").strip():
            yield name, env[name].strip()
    url = env.get("USHER_REDIS_URL", "").strip()
    if url:
        yield "USHER_REDIS_URL (its password)", unquote(urlsplit(url).password or "")
    for entry in env.get("USHER_ENCRYPTION_KEYS", "").split(","):
        if PLACEHOLDER in entry:  # the keys' length is checked by usher.crypto
            yield f"USHER_ENCRYPTION_KEYS ({entry.partition(':')[0]})", entry


def secret_problems(env: Mapping[str, str]) -> list[str]:
    """What would make these settings unsafe in production (values never included)."""
    problems = []
    for where, value in _secrets(env):
        if PLACEHOLDER.lower() in value.lower():
            problems.append(f"{where} is a placeholder ({PLACEHOLDER}...): set a real secret")
        elif len(value) < MIN_SECRET_LENGTH:
            problems.append(
                f"{where} has {len(value)} characters, at least {MIN_SECRET_LENGTH} are needed"
            )
    auth = AuthSettings.from_env(env)
    has_tokens = bool(auth.api_tokens or auth.api_tokens_file)
    has_jwt = bool(auth.jwt_secret or auth.jwt_public_key)
    if not has_tokens and not has_jwt:
        problems.append("no credentials: set USHER_API_TOKENS(_FILE) or USHER_JWT_*")
    if auth.auth_open:
        problems.append("USHER_AUTH_OPEN=true admits anyone (usher/auth.py)")
    return problems


def require_production_ready(env: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError naming every problem when ``USHER_PRODUCTION`` is true."""
    env = os.environ if env is None else env
    if not AuthSettings.from_env(env).production:
        return
    problems = secret_problems(env)
    if problems:
        raise ConfigError("USHER_PRODUCTION=true refuses to start: " + "; ".join(problems))
