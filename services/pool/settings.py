"""The Pool's settings: the fleet of instances and the policies that route and place models.

Where settings come from, lowest precedence first:

1. Defaults: one Ollama at ``http://127.0.0.1:11434``.
2. A YAML file (or JSON, which YAML reads) named by ``USHER_POOL_CONFIG``: keys are
   ``PoolSettings`` field names, plus ``instances``, a ``circuit`` block and
   ``default_memory_budget``; an unknown key is an error, so a typo does not silently fall
   back to a default.
3. Environment variables: they override the file, as deployments expect (one ConfigMap,
   a per-pod override). Each field's (``PoolSettings``: ``USHER_`` + its name unless it
   names its variable), among them ``USHER_POOL_STRATEGY``, ``USHER_REDIS_URL`` (or
   ``REDIS_URL``),
   ``USHER_API_TOKENS`` (``token=user@org[:role+role],...``, only from the environment),
   ``USHER_FALLBACK_MODELS`` (``big=small+smaller,...``), ``USHER_EXTERNAL_MODELS``
   (``llama3.2=gpt-4o-mini,...``), ``MAX_MODEL_MEMORY_GB`` and
   ``MODEL_POOL_AUTO_UNLOAD_MINUTES`` (the PRD's names; ``USHER_POOL_IDLE_UNLOAD_SECONDS``
   wins over the latter).

Instances come from exactly one place: the file's ``instances``, else ``USHER_INSTANCES``,
else ``OLLAMA_HOST``, else the default. Both the file and ``USHER_INSTANCES`` naming
instances is an error (which one was meant?). ``OLLAMA_HOST`` is only a fallback, because
it is often exported for ``ollama serve`` itself (``OLLAMA_HOST=0.0.0.0``).

``USHER_INSTANCES`` is a compact one-line fleet::

    USHER_INSTANCES="gpu1=http://10.0.0.5:11434;weight=2;parallel=auto,gpu2=10.0.0.6"
    USHER_INSTANCES="vllm=http://h2:8000;kind=openai;roles=chat;allowed=qwen2.5+llama3.1:8b"

Entries are separated by ``,``; each is ``[id=]url`` then ``;key=value`` options with the
YAML key names (aliases: ``memory`` = ``memory_budget``, ``max_loaded`` =
``max_loaded_models``, ``allowed`` = ``allowed_models``); list values are joined with ``+``.
Without ``id=`` the id is the URL's ``host:port``.

URLs follow ``OLLAMA_HOST``'s rules (as Ollama's ``envconfig.Host``): no scheme means
``http``, an Ollama instance without a port gets 11434 (an explicit ``http://`` keeps the
scheme's port), ``:11434`` and ``0.0.0.0`` mean this machine (a client cannot connect to
"every interface", so we connect to loopback). Only http and https are accepted.

``parallel: auto`` (requests one model runs at once) follows Ollama's former automatic
``OLLAMA_NUM_PARALLEL``: 4 with at least 16 GiB of memory, 2 with 8 GiB, else 1. Only a
local instance (host ``localhost`` or a loopback address) is measured, with this machine's
total memory (psutil); a remote one resolves to 1, because sending it more concurrent
requests than it runs would only queue them in its FIFO, out of our fair order. Set
``parallel`` to the server's ``OLLAMA_NUM_PARALLEL`` (or vLLM's batch size) to use more.

Memory sizes: a number of bytes, or a number with a unit: ``KB MB GB TB`` (powers of
1000) or ``KiB MiB GiB TiB`` (powers of 1024); the ``B`` may be left out (``16G``,
``24Gi``). ``MAX_MODEL_MEMORY_GB`` (a plain number means gigabytes) is the budget of local
instances that set none.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from services.pool.circuit import CircuitConfig
from services.pool.routing import Strategy
from usher.config import ConfigError
from usher.modelservers import auto_parallel
from usher.settings import ServiceSettings, SettingsFile, lowercase, replaced
from usher.v1 import pool_pb2

__all__ = [
    "DEFAULT_OLLAMA_URL",
    "GIB",
    "KINDS",
    "KIND_OLLAMA",
    "KIND_OPENAI",
    "NOT_PLACED",
    "OLLAMA_DEFAULT_PORT",
    "ROLES",
    "ROLE_CHAT",
    "ROLE_EMBEDDING",
    "UPSTREAM_KEY_PREFIX",
    "InstanceSpec",
    "PoolSettings",
    "is_local_url",
    "load_pool_settings",
    "normalize_base_url",
    "parse_instances",
    "parse_memory",
    "upstream_api_key",
]

GIB = 1 << 30
#: Why a key only placement reads is refused on an instance it does not place on.
NOT_PLACED = (
    "the Pool places models on Ollama instances of the fleet's own only (not an "
    "OpenAI-compatible server, which loads its own, nor the external provider)"
)
Kind = Literal["ollama", "openai"]
KIND_OLLAMA: Kind = "ollama"
KIND_OPENAI: Kind = "openai"
KINDS = (KIND_OLLAMA, KIND_OPENAI)
ROLE_CHAT = "chat"
ROLE_EMBEDDING = "embedding"
ROLES = (ROLE_CHAT, ROLE_EMBEDDING)
OLLAMA_DEFAULT_PORT = 11434
DEFAULT_OLLAMA_URL = f"http://127.0.0.1:{OLLAMA_DEFAULT_PORT}"
#: Id of the single instance named by OLLAMA_HOST or the default.
DEFAULT_INSTANCE_ID = "ollama"

_KIND_TO_PROTO: dict[Kind, pool_pb2.InstanceKind.ValueType] = {
    KIND_OLLAMA: pool_pb2.INSTANCE_KIND_OLLAMA,
    KIND_OPENAI: pool_pb2.INSTANCE_KIND_OPENAI,
}
_ID_FORBIDDEN = re.compile(r"[\s,;=/{}]")
#: The only variables an instance's ``api_key_env`` may name: an admin registering an
#: instance at runtime must not be able to send the Pool's own secrets (USHER_API_TOKENS,
#: USHER_ENCRYPTION_KEYS, ...) as a bearer token to a URL of their choosing.
UPSTREAM_KEY_PREFIX = "USHER_UPSTREAM_KEY_"
_UPSTREAM_KEY_NAME = re.compile(UPSTREAM_KEY_PREFIX + r"[A-Za-z0-9_]+")
_MEMORY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?)b?", re.IGNORECASE)
_UNIT_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_memory(value: object) -> int:
    """Bytes from ``8GiB``, ``16GB``, ``16G``, ``512MiB``, ``1.5GiB`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 8GiB, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a non-negative size, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 8GiB, got {value!r}")
    match = _MEMORY.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"cannot read {value!r} as a size (e.g. 8GiB, 16GB, 4096)")
    number, unit, binary = match.groups()
    if binary and not unit:
        raise ValueError(f"cannot read {value!r} as a size (e.g. 8GiB, 16GB, 4096)")
    base = 1024 if binary else 1000
    return int(float(number) * base ** _UNIT_POWER[unit.lower()])


def _split_host_port(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"malformed host {hostport!r}")
        port_text = rest[1:] if rest else ""
    elif hostport.count(":") > 1:  # a bare IPv6 address
        host, port_text = hostport, ""
    else:
        host, _, port_text = hostport.partition(":")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def normalize_base_url(raw: str, *, default_port: int | None = OLLAMA_DEFAULT_PORT) -> str:
    """A canonical ``scheme://host[:port][/path]`` from an OLLAMA_HOST-style address.

    ``default_port`` applies only when no scheme is given (Ollama: 11434; None leaves the
    port out). Wildcard hosts (empty, ``0.0.0.0``, ``::``) become loopback.
    """
    text = raw.strip()
    # Printable ASCII only (an internationalized host is given in its xn-- form): anything
    # else is no URL an HTTP client will send, and fails later where no field is named.
    if not text or any(not "!" <= ch <= "~" for ch in text):
        raise ValueError(f"expected a URL such as http://host:11434, got {raw[:80]!r}")
    scheme, sep, rest = text.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme {scheme!r} is not http or https")
        port_default: int | None = None
    else:
        scheme, rest, port_default = "http", text, default_port
    hostport, _, path = rest.partition("/")
    host, port = _split_host_port(hostport)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if port is None:
        port = port_default
    if (scheme, port) in (("http", 80), ("https", 443)):
        port = None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    path = path.strip("/")
    return f"{scheme}://{netloc}" + (f"/{path}" if path else "")


def is_local_url(url: str) -> bool:
    """The URL's host is this machine: ``localhost`` or a loopback address."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- One instance ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceContext:
    """What resolving a configured instance needs beyond its own entry: this machine's
    memory (for ``parallel: auto``, read once and only if needed) and the memory budget of
    local instances that set none."""

    total_memory: Callable[[], int] = field(default_factory=lambda: _memory_reader(None))
    default_memory_budget: int = 0


#: The context instances are validated in (``resolving``); the default measures this machine.
_CONTEXT: ContextVar[InstanceContext | None] = ContextVar("usher_pool_instances", default=None)


@contextmanager
def resolving(context: InstanceContext) -> Iterator[None]:
    token = _CONTEXT.set(context)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


#: Other spellings of an instance's keys (USHER_INSTANCES' short ones among them).
_KEY_ALIASES = {
    "url": "base_url",
    "memory": "memory_budget_bytes",
    "memory_budget": "memory_budget_bytes",
    "max_loaded": "max_loaded_models",
    "allowed": "allowed_models",
    "request_timeout": "request_timeout_seconds",
}


def _names(value: object) -> object:
    """A list of names: a YAML list, or text separated by ``+`` or ``,``."""
    if isinstance(value, str):
        return [name.strip() for name in re.split(r"[+,]", value) if name.strip()]
    return () if value is None else value


def _model_name(name: str) -> str:
    if not name or name != name.strip():
        raise ValueError(f"bad model name {name!r}")
    return name


ModelName = Annotated[str, AfterValidator(_model_name)]
#: Bytes, from a number or a size such as ``8GiB`` (see ``parse_memory``).
MemorySize = Annotated[int, BeforeValidator(parse_memory), Field(ge=0)]


class InstanceSpec(BaseModel):
    """One model server as configured. Construction validates (ConfigError naming the field)
    and canonicalizes ``base_url``; ``parallel`` is resolved here (``auto`` by memory).

    The same model reads a YAML entry, a USHER_INSTANCES entry and values given in code:
    keys may use their short spellings (``url``, ``memory``, ...); lists may be text joined
    with ``+``; an entry without ``memory_budget`` gets the context's default budget when it
    is local (see ``resolving``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    kind: Kind = KIND_OLLAMA
    base_url: str = DEFAULT_OLLAMA_URL
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    #: "chat", "embedding"; empty = both.
    roles: frozenset[Literal["chat", "embedding"]] = frozenset()
    parallel: int = Field(1, ge=1)
    #: 0 = unlimited.
    memory_budget_bytes: MemorySize = 0
    #: 0 = no limit beyond memory.
    max_loaded_models: int = Field(0, ge=0)
    preload: tuple[ModelName, ...] = ()
    #: Empty = every model the server has.
    allowed_models: frozenset[ModelName] = frozenset()
    external: bool = False
    #: Name of the environment variable holding the API key (never the key itself).
    api_key_env: str = ""
    #: Longest one request may run here; 0 = the Pool's request_timeout_seconds.
    request_timeout_seconds: float = Field(0.0, ge=0, allow_inf_nan=False)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_instance_error(values, exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _entry(cls, raw: object) -> object:
        """Canonical keys, ``parallel: auto`` and the default memory budget resolved."""
        if not isinstance(raw, Mapping):
            return raw
        values = {_KEY_ALIASES.get(k, k): v for k, v in ((_key(k), v) for k, v in raw.items())}
        placed = _placed_entry(values)
        if not placed and _nonzero_memory(values.get("memory_budget_bytes", 0)):
            raise ValueError(f"memory_budget: {NOT_PLACED}")
        if values.get("parallel", "") != "auto" and "memory_budget_bytes" in values:
            return values
        context = _CONTEXT.get() or InstanceContext()
        local = _local_entry(values)
        if isinstance(values.get("parallel"), str) and values["parallel"].lower() == "auto":
            values["parallel"] = auto_parallel(context.total_memory()) if local else 1
        budget = context.default_memory_budget if local and placed else 0
        values.setdefault("memory_budget_bytes", budget)
        return values

    @field_validator("id")
    @classmethod
    def _id(cls, ident: str) -> str:
        if not ident or len(ident) > 128 or _ID_FORBIDDEN.search(ident):
            raise ValueError("must be 1-128 characters without spaces or , ; = / { }")
        return ident

    _kind = field_validator("kind", mode="before")(lowercase)

    @field_validator("base_url")
    @classmethod
    def _canonical_url(cls, url: str, info: ValidationInfo) -> str:
        return normalize_base_url(url, default_port=_default_port(info.data.get("kind")))

    @field_validator("roles", mode="before")
    @classmethod
    def _roles(cls, value: object) -> object:
        names = _names(value)
        return [lowercase(n) for n in names] if isinstance(names, list | tuple | set) else names

    _lists = field_validator("preload", "allowed_models", mode="before")(_names)

    @field_validator("api_key_env")
    @classmethod
    def _allow_listed(cls, name: str) -> str:
        if name and not _UPSTREAM_KEY_NAME.fullmatch(name):
            raise ValueError(
                f"must name a variable {UPSTREAM_KEY_PREFIX}<NAME> (letters, digits, _), "
                f"set in the environment or in USHER_UPSTREAM_KEYS_FILE"
            )
        return name

    @model_validator(mode="after")
    def _preload_is_allowed(self) -> Self:
        if self.preload and not self.placed:
            raise ValueError(f"preload: {NOT_PLACED}")
        if len(set(self.preload)) != len(self.preload):
            raise ValueError("preload: lists a model twice")
        outside = [m for m in self.preload if self.allowed_models and m not in self.allowed_models]
        if outside:
            raise ValueError(f"preload: {outside[0]!r} is not in allowed_models")
        return self

    def replace(self, **changes: Any) -> Self:
        return replaced(self, changes)

    @property
    def concurrent_calls(self) -> int:
        """The generations its slots let run at once: ``parallel`` for one model, times
        ``max_loaded_models`` when that bounds the models loaded together."""
        return self.parallel * max(1, self.max_loaded_models)

    @property
    def placed(self) -> bool:
        """The Pool loads and unloads its models (by demand and memory: placer.py): an
        Ollama of the fleet's own. An OpenAI-compatible server loads its own, and the
        external provider serves only the requests handed to it."""
        return _placed(self.kind, self.external)

    @property
    def local(self) -> bool:
        """Runs on this machine (so its memory is psutil's to measure)."""
        return is_local_url(self.base_url)

    def serves_role(self, role: str) -> bool:
        return not self.roles or role in self.roles

    def to_proto(self) -> pool_pb2.InstanceConfig:
        config = pool_pb2.InstanceConfig(
            id=self.id,
            base_url=self.base_url,
            kind=_KIND_TO_PROTO[self.kind],
            weight=self.weight,
            roles=sorted(self.roles),
            parallel=self.parallel,
            memory_budget_bytes=self.memory_budget_bytes,
            max_loaded_models=self.max_loaded_models,
            preload=list(self.preload),
            allowed_models=sorted(self.allowed_models),
            external=self.external,
            api_key_env=self.api_key_env,
        )
        if self.request_timeout_seconds:
            config.request_timeout.FromMilliseconds(round(self.request_timeout_seconds * 1000))
        return config

    @classmethod
    def from_proto(
        cls, config: pool_pb2.InstanceConfig, *, total_memory_bytes: int | None = None
    ) -> InstanceSpec:
        """The spec a RegisterInstance call (or a stored registration) describes.

        Proto3 zeros mean defaults: kind UNSPECIFIED → ollama, weight 0 → 1, parallel 0 →
        auto (resolved as in the config file; ``total_memory_bytes`` defaults to psutil's).
        """
        kinds = {v: k for k, v in _KIND_TO_PROTO.items()}
        if config.kind != pool_pb2.INSTANCE_KIND_UNSPECIFIED and config.kind not in kinds:
            raise ConfigError(f"instance {config.id!r}: kind: unknown kind {config.kind}")
        kind = kinds.get(config.kind, KIND_OLLAMA)
        if config.parallel < 0:
            raise ConfigError(f"instance {config.id!r}: parallel: must be at least 1 or 0 (auto)")
        with resolving(InstanceContext(_memory_reader(total_memory_bytes))):
            return cls(
                id=config.id,
                base_url=config.base_url,
                kind=kind,
                weight=config.weight or 1.0,
                roles=frozenset(config.roles),
                parallel=config.parallel or "auto",
                # One stored with a default budget before budgets were the placed ones' alone
                # loads still (a RegisterInstance that sets one there is refused first).
                memory_budget_bytes=config.memory_budget_bytes
                if _placed(kind, config.external)
                else 0,
                max_loaded_models=config.max_loaded_models,
                preload=tuple(config.preload),
                allowed_models=frozenset(config.allowed_models),
                external=config.external,
                api_key_env=config.api_key_env,
                request_timeout_seconds=config.request_timeout.ToMilliseconds() / 1000,
            )


def _key(key: object) -> str:
    return str(key).strip().lower().replace("-", "_")


def _default_port(kind: object) -> int | None:
    """Ollama's port when none is given; an OpenAI-compatible server has no usual one."""
    return OLLAMA_DEFAULT_PORT if kind in (None, KIND_OLLAMA) else None


def _local_entry(values: Mapping[str, object]) -> bool:
    """A raw entry names a server on this machine that is not the external lane (whose
    memory ``auto`` and the default budget are about); a bad URL is no local one."""
    kind = lowercase(values.get("kind", KIND_OLLAMA))
    try:
        url = normalize_base_url(
            str(values.get("base_url", DEFAULT_OLLAMA_URL)), default_port=_default_port(kind)
        )
    except ValueError:
        return False  # the field's own validator names the problem
    return is_local_url(url) and _entry_external(values) is False


def _nonzero_memory(value: object) -> bool:
    try:
        return parse_memory(value) != 0
    except (TypeError, ValueError):
        return False  # the field's own validator names the problem


def _placed(kind: object, external: bool) -> bool:
    return kind == KIND_OLLAMA and not external


def _entry_external(values: Mapping[str, object]) -> bool | None:
    """A raw entry's ``external`` flag; None when it is no flag (its validator says so)."""
    try:
        return TypeAdapter(bool).validate_python(values.get("external", False))
    except ValidationError:
        return None


def _placed_entry(values: Mapping[str, object]) -> bool:
    """A raw entry is one the Pool places models on (``InstanceSpec.placed``); a bad kind
    or flag is left to its field's own validator."""
    return _placed(lowercase(values.get("kind", KIND_OLLAMA)), bool(_entry_external(values)))


def _instance_error(values: Mapping[str, object], exc: ValidationError) -> str:
    """``instance 'id': field: what is wrong`` for the first error."""
    error = exc.errors()[0]
    ident = values.get("id")
    label = f"instance {ident!r}: " if isinstance(ident, str) else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a rule across fields names its field
        return label + message
    return f"{label}{error['loc'][0]}: {message}"


def _memory_reader(total_memory_bytes: int | None) -> Callable[[], int]:
    if total_memory_bytes is not None:
        return lambda: total_memory_bytes
    cache: list[int] = []

    def read() -> int:
        if not cache:
            cache.append(_system_memory())
        return cache[0]

    return read


def _system_memory() -> int:
    # Imported here: only "auto" on a local instance needs it. (psutil ships no stubs.)
    import psutil  # type: ignore[import-untyped]

    return int(psutil.virtual_memory().total)


# --- The Pool ------------------------------------------------------------------------------------


class PoolSettings(ServiceSettings):
    #: Set by ``load_pool_settings`` from exactly one place (see the module docstring).
    instances: Annotated[tuple[InstanceSpec, ...], NoDecode] = (
        InstanceSpec(id=DEFAULT_INSTANCE_ID),
    )
    strategy: Strategy = Field(Strategy.AFFINITY, validation_alias="USHER_POOL_STRATEGY")
    listen: str = Field("127.0.0.1:50052", validation_alias="USHER_POOL_LISTEN")
    health_interval_seconds: float = Field(
        2.0, gt=0, validation_alias="USHER_POOL_HEALTH_INTERVAL_SECONDS"
    )
    health_timeout_seconds: float = Field(
        3.0, gt=0, validation_alias="USHER_POOL_HEALTH_TIMEOUT_SECONDS"
    )
    #: Failed health checks in a row before an instance leaves rotation.
    unhealthy_after_failures: int = Field(
        1, ge=1, validation_alias="USHER_POOL_UNHEALTHY_AFTER_FAILURES"
    )
    #: Longest one upstream call may take (a whole generation, not the first token).
    request_timeout_seconds: float = Field(
        600.0, gt=0, validation_alias="USHER_POOL_REQUEST_TIMEOUT_SECONDS"
    )
    circuit_failure_threshold: int = Field(5, ge=1)
    circuit_failure_window_seconds: float = Field(30.0, gt=0)
    circuit_open_seconds: float = Field(10.0, gt=0)
    circuit_half_open_max_calls: int = Field(1, ge=1)
    circuit_backoff_multiplier: float = Field(2.0, ge=1)
    circuit_max_open_seconds: float = Field(300.0, gt=0)
    #: Unload a model idle this long (PRD MODEL_POOL_AUTO_UNLOAD_MINUTES=10); 0 = never.
    idle_unload_seconds: float = Field(
        600.0, ge=0, validation_alias="USHER_POOL_IDLE_UNLOAD_SECONDS"
    )
    #: Load a model on one more instance when its queue is at least this long per
    #: instance serving it; 0 = never scale out.
    scale_out_queue_length: int = Field(
        8, ge=0, validation_alias="USHER_POOL_SCALE_OUT_QUEUE_LENGTH"
    )
    placement_interval_seconds: float = Field(
        5.0, gt=0, validation_alias="USHER_POOL_PLACEMENT_INTERVAL_SECONDS"
    )
    #: How long a reserved slot is held for its Generate call.
    slot_lease_seconds: float = Field(30.0, gt=0, validation_alias="USHER_POOL_SLOT_LEASE_SECONDS")
    #: model → models to try instead, in order (e.g. a smaller one when it cannot load);
    #: from the environment ``big=small+smaller,...``.
    fallback_models: Annotated[Mapping[str, tuple[ModelName, ...]], NoDecode] = Field(
        default_factory=dict, validation_alias="USHER_FALLBACK_MODELS"
    )
    #: model → the external provider's model for requests sent to the external lane; from
    #: the environment ``llama3.2=gpt-4o-mini,...``.
    external_models: Annotated[Mapping[ModelName, ModelName], NoDecode] = Field(
        default_factory=dict, validation_alias="USHER_EXTERNAL_MODELS"
    )

    @field_validator("instances")
    @classmethod
    def _unique_ids(cls, instances: tuple[InstanceSpec, ...]) -> tuple[InstanceSpec, ...]:
        ids = [spec.id for spec in instances]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate is not None:
            raise ValueError(f"duplicate id {duplicate!r}")
        return instances

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value: object) -> object:
        return Strategy.parse(value) if isinstance(value, str) else value

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, listen: str) -> str:
        _, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected host:port")
        return listen

    @field_validator("fallback_models", mode="before")
    @classmethod
    def _fallback_pairs(cls, value: object) -> object:
        if isinstance(value, str):  # "a=b+c,d=e"
            return {model: _names(rest) for model, rest in _pairs(value, "fallback+fallback")}
        if isinstance(value, Mapping):  # one fallback may be written without a list
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("fallback_models")
    @classmethod
    def _no_cycle(cls, graph: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
        for model in graph:
            _model_name(model)
        cycle = _find_cycle(graph)
        if cycle:
            raise ValueError(f"cycle {' -> '.join(cycle)}")
        return graph

    @field_validator("external_models", mode="before")
    @classmethod
    def _external_pairs(cls, value: object) -> object:
        return dict(_pairs(value, "provider_model")) if isinstance(value, str) else value

    def replace(self, **changes: Any) -> Self:
        return replaced(self, changes)

    @property
    def circuit(self) -> CircuitConfig:
        return CircuitConfig(
            failure_threshold=self.circuit_failure_threshold,
            failure_window_seconds=self.circuit_failure_window_seconds,
            open_seconds=self.circuit_open_seconds,
            half_open_max_calls=self.circuit_half_open_max_calls,
            backoff_multiplier=self.circuit_backoff_multiplier,
            max_open_seconds=self.circuit_max_open_seconds,
        )

    def instance(self, instance_id: str) -> InstanceSpec | None:
        return next((s for s in self.instances if s.id == instance_id), None)

    def run_time_limit(self, spec: InstanceSpec, requested_seconds: float = 0.0) -> float:
        """Seconds one request may run on ``spec``: the instance's limit (else the Pool's
        default), shortened by the request's own when it asks for less."""
        limit = spec.request_timeout_seconds or self.request_timeout_seconds
        return min(limit, requested_seconds) if requested_seconds > 0 else limit

    def keep_alive_for(self, spec: InstanceSpec, model: str, held_for: float = 0.0) -> float:
        """The ``keep_alive`` sent with every call to (and load of) ``model`` on ``spec``, so
        the model server never unloads before Usher does: a preload stays for ever (-1), as
        does everything when idle unloads are off; other models outlive Usher's own idle
        unload by two placement passes (Ollama's timer is only a safety net for when no
        Pool is running), and a model an operator holds loaded (``held_for`` seconds more,
        -1: for ever; LoadModel's keep_alive) at least as long as that."""
        if model in spec.preload or self.idle_unload_seconds <= 0 or held_for < 0:
            return -1.0
        return max(held_for, self.idle_unload_seconds + 2 * self.placement_interval_seconds)

    def fallback_chain(self, model: str) -> tuple[str, ...]:
        """Models to try after ``model``, in order, following fallbacks of fallbacks."""
        chain: list[str] = []
        seen = {model}

        def visit(name: str) -> None:
            for nxt in self.fallback_models.get(name, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    chain.append(nxt)
                    visit(nxt)

        visit(model)
        return tuple(chain)


def _pairs(text: str, right: str) -> list[tuple[str, str]]:
    """``model=value,...`` from the environment."""
    pairs = []
    for entry in (e.strip() for e in text.split(",")):
        model, sep, value = entry.partition("=")
        if not entry:
            continue
        if not sep or not model.strip():
            raise ValueError(f"expected model={right}, got {entry!r}")
        pairs.append((model.strip(), value.strip()))
    return pairs


def _find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """A cycle in the fallback graph as a path (a, b, a), or None (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in graph.get(node, ()):
            found = visit(nxt, path)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for root in sorted(graph):
        found = visit(root, [])
        if found:
            return found
    return None


# --- Loading -------------------------------------------------------------------------------------

_CIRCUIT_KEYS = {
    "failure_threshold",
    "failure_window_seconds",
    "open_seconds",
    "half_open_max_calls",
    "backoff_multiplier",
    "max_open_seconds",
}
#: Keys of the file that are no field of PoolSettings as they stand.
_FILE_ONLY_KEYS = {"instances", "circuit", "default_memory_budget"}


def load_pool_settings(
    env: Mapping[str, str] | None = None, *, total_memory_bytes: int | None = None
) -> PoolSettings:
    """Settings from ``USHER_POOL_CONFIG`` and the environment (see the module docstring).

    ``env`` defaults to ``os.environ``; ``total_memory_bytes`` to psutil's reading (used
    only to resolve ``parallel: auto`` on local instances).
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    path = environ.get("USHER_POOL_CONFIG", "").strip()
    data = _read_file(path) if path else {}
    source = path or "settings"  # names the file in errors about its contents
    context = InstanceContext(
        _memory_reader(total_memory_bytes), _default_memory_budget(data, source, environ)
    )
    given: dict[str, Any] = {"instances": _load_instances(data, source, environ, context)}
    minutes = environ.get("MODEL_POOL_AUTO_UNLOAD_MINUTES", "").strip()
    if minutes and not environ.get("USHER_POOL_IDLE_UNLOAD_SECONDS", "").strip():
        given["idle_unload_seconds"] = _number("MODEL_POOL_AUTO_UNLOAD_MINUTES", minutes) * 60
    file = SettingsFile(source, _file_settings(data, source))
    return PoolSettings.from_env(environ, file=file, **given)


def _read_file(path: str) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"USHER_POOL_CONFIG={path!r}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return {str(k): v for k, v in data.items()}


def _file_settings(data: Mapping[str, object], source: str) -> dict[str, object]:
    """The file's values of PoolSettings fields (its ``circuit`` block flattened; a flat
    ``circuit_*`` key wins); an unknown key is an error, so a typo falls back to nothing."""
    unknown = sorted(set(data) - set(PoolSettings.model_fields) - _FILE_ONLY_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]!r}")
    if "tokens" in data:
        raise ConfigError(f"{source}: tokens: set USHER_API_TOKENS in the environment instead")
    values = {k: v for k, v in data.items() if k not in _FILE_ONLY_KEYS}
    circuit = data.get("circuit") or {}
    if not isinstance(circuit, dict):
        raise ConfigError(f"{source}: circuit: expected a mapping")
    for key, value in circuit.items():
        if key not in _CIRCUIT_KEYS:
            raise ConfigError(f"{source}: circuit: unknown setting {key!r}")
        values.setdefault(f"circuit_{key}", value)
    return values


def _default_memory_budget(
    data: Mapping[str, object], source: str, environ: Mapping[str, str]
) -> int:
    """MAX_MODEL_MEMORY_GB (a plain number is gigabytes, the variable's name; ``24GiB``
    etc. also work), else the file's ``default_memory_budget``, else none."""
    raw = environ.get("MAX_MODEL_MEMORY_GB", "").strip()
    where, value = f"MAX_MODEL_MEMORY_GB={raw!r}", data.get("default_memory_budget", 0)
    if raw:
        value = f"{raw}GB" if _is_number(raw) else raw
    elif "default_memory_budget" in data:
        where = f"{source}: default_memory_budget"
    try:
        return parse_memory(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _load_instances(
    data: Mapping[str, object],
    source: str,
    environ: Mapping[str, str],
    context: InstanceContext,
) -> tuple[InstanceSpec, ...]:
    """The file's ``instances``, else USHER_INSTANCES, else OLLAMA_HOST, else the default."""
    env_instances = environ.get("USHER_INSTANCES", "").strip()
    if "instances" in data and env_instances:
        raise ConfigError(
            f"instances are set in both {source} and USHER_INSTANCES; keep one of them"
        )
    if env_instances:
        return _parse_instances(env_instances, context)
    if "instances" not in data:
        host = environ.get("OLLAMA_HOST", "").strip()
        where = f"OLLAMA_HOST={host!r}" if host else "default instance"
        entry = {"id": DEFAULT_INSTANCE_ID, "base_url": host or DEFAULT_OLLAMA_URL}
        return (_instance(entry, where, context),)
    raw = data["instances"] or []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: instances: expected a list")
    return tuple(
        _instance(entry, f"{source}: instances[{index}]", context)
        for index, entry in enumerate(raw)
    )


def _instance(entry: object, where: str, context: InstanceContext) -> InstanceSpec:
    """An instance of the configuration: ``parallel`` is ``auto`` unless it says otherwise."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    with resolving(context):
        try:
            return InstanceSpec(**{"parallel": "auto", **{_key(k): v for k, v in entry.items()}})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def parse_instances(
    spec: str,
    *,
    total_memory_bytes: int | None = None,
    default_memory_budget: int = 0,
) -> tuple[InstanceSpec, ...]:
    """Instances from the one-line ``USHER_INSTANCES`` syntax (see the module docstring)."""
    context = InstanceContext(_memory_reader(total_memory_bytes), default_memory_budget)
    return _parse_instances(spec, context)


def _parse_instances(spec: str, context: InstanceContext) -> tuple[InstanceSpec, ...]:
    out: list[InstanceSpec] = []
    for position, entry in enumerate(e.strip() for e in spec.split(",")):
        if entry:
            where = f"USHER_INSTANCES entry {position + 1}"
            out.append(_instance(_entry(entry, where), where, context))
    return tuple(out)


def _entry(text: str, where: str) -> dict[str, object]:
    """``[id=]url;key=value;...`` → its keys; the id defaults to the URL's ``host:port``."""
    head, *options = (part.strip() for part in text.split(";"))
    name, sep, url = head.partition("=")
    raw: dict[str, object] = {}
    if sep and "/" not in name and ":" not in name:
        raw["id"], raw["base_url"] = name.strip(), url.strip()
    else:
        raw["base_url"] = head
    for option in filter(None, options):
        key, eq, value = option.partition("=")
        if not eq:
            raise ConfigError(f"{where}: expected key=value, got {option!r}")
        raw[_key(key)] = value.strip()
    if "id" not in raw:
        kind = lowercase(raw.get("kind", KIND_OLLAMA))
        try:
            raw["id"] = urlsplit(normalize_base_url(head, default_port=_default_port(kind))).netloc
        except ValueError as exc:
            raise ConfigError(f"{where}: base_url: {exc}") from None
    return raw


def _number(variable: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{variable}={text!r}: expected a number") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def upstream_api_key(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of an allow-listed upstream key ``name`` (``USHER_UPSTREAM_KEY_*``): from
    the environment, else from the file named by ``USHER_UPSTREAM_KEYS_FILE`` (lines
    ``NAME=value``, e.g. a mounted Secret). None when unset or not allow-listed."""
    if not name or not _UPSTREAM_KEY_NAME.fullmatch(name):
        return None
    source = os.environ if env is None else env
    value = source.get(name)
    if value:
        return value
    path = source.get("USHER_UPSTREAM_KEYS_FILE", "")
    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, found = line.strip().partition("=")
        if sep and key.strip() == name and not line.lstrip().startswith("#"):
            return found.strip() or None
    return None
