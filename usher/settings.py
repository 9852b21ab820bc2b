"""Settings from the environment, declared once per service with pydantic-settings.

A service's settings are a frozen model whose fields are its variables: the name is
``USHER_`` + the field's name unless the field names its variable(s) (``validation_alias``,
first one set wins, e.g. ``USHER_REDIS_URL`` then ``REDIS_URL``); types, bounds (``ge``,
``gt``) and choices are the field's. An empty variable means the default. A bad value is a
``ConfigError`` naming the variable and the value, the way operators read it in a pod's
logs::

    USHER_POSITION_INTERVAL_SECONDS='-1': Input should be greater than 0

``from_env(env)`` reads a mapping instead of the process environment (tests do).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, Self

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from usher.config import ConfigError

__all__ = ["LogLevel", "ServiceSettings", "UsherSettings", "variables"]

PREFIX = "USHER_"
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

#: The environment ``from_env`` reads (None: the process's).
_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("usher_env", default=None)


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' own environment source, over a given mapping."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Blank counts as unset, as it always has for Usher's variables.
        return {name.lower(): value.strip() for name, value in self._given.items() if value.strip()}


def variables(field_name: str, field: FieldInfo) -> tuple[str, ...]:
    """The variables that set a field, in the order they are looked at."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return (alias,)
    if isinstance(alias, AliasChoices):
        return tuple(str(choice) for choice in alias.choices)
    return (PREFIX + field_name.upper(),)


class UsherSettings(BaseSettings):
    """The base of every service's settings (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        case_sensitive=False,
        env_ignore_empty=True,
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = _ENVIRONMENT.get()
        # Values passed in code win over the environment, as a test's or a caller's would.
        return (
            init_settings,
            env_settings if given is None else _MappingSource(settings_cls, given),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **given: Any) -> Self:
        """The settings from ``env`` (default: the process environment); ``given`` values
        are taken as they are. ConfigError names the variable at fault."""
        with _reading(env):
            try:
                return cls(**given)
            except ValidationError as exc:
                raise ConfigError(_describe(cls, exc, env)) from None


@contextmanager
def _reading(env: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRONMENT.set(None if env is None else dict(env))
    try:
        yield
    finally:
        _ENVIRONMENT.reset(token)


def _describe(cls: type[UsherSettings], exc: ValidationError, env: Mapping[str, str] | None) -> str:
    """The first error as ``VARIABLE='value': what is wrong``."""
    source = os.environ if env is None else env
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a rule across fields: its message names the variables
        return message
    name = str(error["loc"][0])
    field = cls.model_fields.get(name)
    names = variables(name, field) if field is not None else (name,)
    variable = next((n for n in names if source.get(n, "").strip()), names[0])
    value = source.get(variable)
    shown = f"={value!r}" if value is not None else ""
    return f"{variable}{shown}: {message}"


class ServiceSettings(UsherSettings):
    """What every gRPC service reads the same way."""

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("USHER_REDIS_URL", "REDIS_URL")
    )
    #: How long in-flight work may finish after SIGTERM.
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    #: Port of the Prometheus /metrics endpoint; 0 = off.
    metrics_port: int = Field(0, ge=0, le=65535)
    log_level: LogLevel = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value
