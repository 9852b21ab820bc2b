"""Settings from the environment, declared once per service with pydantic-settings.

A service's settings are a frozen model whose fields are its variables: the name is
``USHER_`` + the field's name unless the field names its variable(s) (``validation_alias``,
first one set wins, e.g. ``USHER_REDIS_URL`` then ``REDIS_URL``); types, bounds (``ge``,
``gt``) and choices are the field's. An empty variable means the default. A bad value is a
``ConfigError`` naming the variable and the value, the way operators read it in a pod's
logs::

    USHER_POSITION_INTERVAL_SECONDS='-1': Input should be greater than 0

``from_env(env)`` reads a mapping instead of the process environment (tests do); a
settings file, when a service has one, lies below the environment (``from_env(env,
file=...)``). Constructing a model directly takes only the values given (and the defaults):
the environment is read by ``from_env`` alone, so code and tests that build settings get
exactly what they wrote. Either way a bad value is a ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from usher.config import ConfigError
from usher.principals import Principal

__all__ = [
    "LogLevel",
    "ServiceSettings",
    "SettingsFile",
    "UsherSettings",
    "comma_list",
    "lowercase",
    "replaced",
    "variables",
]

PREFIX = "USHER_"
ModelT = TypeVar("ModelT", bound=BaseModel)
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


@dataclass(frozen=True)
class SettingsFile:
    """Values read from a settings file (keys are field names), below the environment;
    ``name`` (its path) starts every error about a value it gave."""

    name: str
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Reading:
    env: Mapping[str, str]
    file: SettingsFile | None


#: What ``from_env`` reads; None while a model is constructed directly (given values only).
_READING: ContextVar[_Reading | None] = ContextVar("usher_settings_reading", default=None)


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


def lowercase(value: object) -> object:
    """A before-validator: choices are matched without regard to case or spaces."""
    return value.strip().lower() if isinstance(value, str) else value


def comma_list(value: object) -> object:
    """A before-validator: ``a, b,c`` from the environment → ``["a", "b", "c"]``."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


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

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(type(self), exc, _READING.get())) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        reading = _READING.get()
        if reading is None:
            return (init_settings,)
        # Values passed in code win over the environment, as a test's or a caller's would;
        # the environment wins over a file (one ConfigMap, a per-pod override).
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _MappingSource(settings_cls, reading.env),
        ]
        if reading.file is not None:
            sources.append(InitSettingsSource(settings_cls, dict(reading.file.values)))
        return tuple(sources)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, file: SettingsFile | None = None, **given: Any
    ) -> Self:
        """The settings from ``env`` (default: the process environment) over ``file``;
        ``given`` values are taken as they are. ConfigError names the variable at fault."""
        with _reading(_Reading(os.environ if env is None else dict(env), file)):
            return cls(**given)

    def replace(self, **changes: Any) -> Self:
        return replaced(self, changes)


def replaced(model: ModelT, changes: Mapping[str, Any]) -> ModelT:
    """A copy of ``model`` with ``changes``, validated again (as ``dataclasses.replace``)."""
    current = {name: getattr(model, name) for name in type(model).model_fields}
    return type(model)(**{**current, **changes})


@contextmanager
def _reading(reading: _Reading) -> Iterator[None]:
    token = _READING.set(reading)
    try:
        yield
    finally:
        _READING.reset(token)


def _describe(cls: type[UsherSettings], exc: ValidationError, reading: _Reading | None) -> str:
    """The first error as ``VARIABLE='value': what is wrong`` (``field=value: ...`` for a
    value given in code, ``file: field: ...`` for one from a settings file)."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a rule across fields: its message names the variables
        return message
    # Sources hand values over under a field's first variable: back to the field.
    by_variable = {v: n for n, f in cls.model_fields.items() for v in variables(n, f)}
    name = by_variable.get(str(error["loc"][0]), str(error["loc"][0]))
    field = cls.model_fields.get(name)
    env = reading.env if reading is not None else {}
    names = variables(name, field) if field is not None else ()
    variable = next((n for n in names if env.get(n, "").strip()), None)
    if variable is not None:
        return f"{variable}={env[variable]!r}: {message}"
    where = ".".join([name, *(str(part) for part in error["loc"][1:])])
    value = error.get("input")
    scalar = isinstance(value, str | int | float) and len(error["loc"]) == 1
    shown = f"={value!r}" if scalar else ""
    if reading is not None and reading.file is not None and name in reading.file.values:
        return f"{reading.file.name}: {where}{shown}: {message}"
    return f"{where}{shown}: {message}"


class ServiceSettings(UsherSettings):
    """What every gRPC service reads the same way."""

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("USHER_REDIS_URL", "REDIS_URL")
    )
    #: API keys (USHER_API_TOKENS / _FILE): their own syntax, read by ``from_env``.
    tokens: Annotated[Mapping[str, Principal], NoDecode] = Field(
        default_factory=dict, exclude=True, validation_alias="USHER_API_TOKENS"
    )
    #: How long in-flight work may finish after SIGTERM.
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    #: Port of the Prometheus /metrics endpoint; 0 = off.
    metrics_port: int = Field(0, ge=0, le=65535)
    log_level: LogLevel = "info"

    _lowercase = field_validator("log_level", mode="before")(lowercase)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, file: SettingsFile | None = None, **given: Any
    ) -> Self:
        # The API keys have their own syntax and file (usher.auth, whose settings build on
        # this module: imported here, where they are read).
        from usher.auth import load_token_map

        return super().from_env(env, file=file, **{"tokens": load_token_map(env), **given})
