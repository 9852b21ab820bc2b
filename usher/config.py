"""Reading settings from the environment: typed, with the variable named in every error."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["ConfigError", "env_bool", "env_float", "env_int", "env_list", "env_str"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable."""


def _get(name: str, default: T, parse: Callable[[str], T], env: Mapping[str, str] | None) -> T:
    raw = (os.environ if env is None else env).get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from None


def env_str(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    return _get(name, default, str, env)


def env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    return _get(name, default, int, env)


def env_float(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    return _get(name, default, float, env)


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true/false")


def env_bool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    return _get(name, default, _parse_bool, env)


def env_list(name: str, default: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    return _get(name, default, lambda raw: [p.strip() for p in raw.split(",") if p.strip()], env)
