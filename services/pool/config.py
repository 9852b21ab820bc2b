"""The Pool's settings: the fleet of instances and the policies that route and place models.

Where settings come from, lowest precedence first:

1. Defaults: one Ollama at ``http://127.0.0.1:11434``.
2. A YAML file named by ``USHER_POOL_CONFIG`` (keys are ``PoolSettings`` field names, plus
   ``instances``, a ``circuit`` block and ``default_memory_budget``; an unknown key is an
   error, so a typo does not silently fall back to a default).
3. Environment variables: they override the file, as deployments expect (one ConfigMap,
   a per-pod override). Those of ``ENV_FLOATS``, ``ENV_INTS`` and ``ENV_STRINGS`` below,
   and ``USHER_POOL_STRATEGY``, ``USHER_REDIS_URL`` (or ``REDIS_URL``),
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from services.pool.circuit import CircuitConfig
from services.pool.routing import Strategy
from usher.auth import Principal, load_token_map
from usher.config import ConfigError, env_float, env_int, env_str
from usher.modelservers import auto_parallel
from usher.v1 import pool_pb2

__all__ = [
    "DEFAULT_OLLAMA_URL",
    "GIB",
    "KINDS",
    "KIND_OLLAMA",
    "KIND_OPENAI",
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
KIND_OLLAMA = "ollama"
KIND_OPENAI = "openai"
KINDS = (KIND_OLLAMA, KIND_OPENAI)
ROLE_CHAT = "chat"
ROLE_EMBEDDING = "embedding"
ROLES = (ROLE_CHAT, ROLE_EMBEDDING)
OLLAMA_DEFAULT_PORT = 11434
DEFAULT_OLLAMA_URL = f"http://127.0.0.1:{OLLAMA_DEFAULT_PORT}"
#: Id of the single instance named by OLLAMA_HOST or the default.
DEFAULT_INSTANCE_ID = "ollama"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_KIND_TO_PROTO: dict[str, pool_pb2.InstanceKind.ValueType] = {
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


@dataclass(frozen=True)
class InstanceSpec:
    """One model server as configured. Construction validates (ConfigError naming the field)
    and canonicalizes ``base_url``; ``parallel`` is already resolved here (never "auto")."""

    id: str
    base_url: str = DEFAULT_OLLAMA_URL
    kind: str = KIND_OLLAMA
    weight: float = 1.0
    #: "chat", "embedding"; empty = both.
    roles: frozenset[str] = frozenset()
    parallel: int = 1
    #: 0 = unlimited.
    memory_budget_bytes: int = 0
    #: 0 = no limit beyond memory.
    max_loaded_models: int = 0
    preload: tuple[str, ...] = ()
    #: Empty = every model the server has.
    allowed_models: frozenset[str] = frozenset()
    external: bool = False
    #: Name of the environment variable holding the API key (never the key itself).
    api_key_env: str = ""
    #: Longest one request may run here; 0 = the Pool's request_timeout_seconds.
    request_timeout_seconds: float = 0.0

    def __post_init__(self) -> None:
        def bad(field_name: str, problem: str) -> ConfigError:
            return ConfigError(f"instance {self.id!r}: {field_name}: {problem}")

        if not self.id or len(self.id) > 128 or _ID_FORBIDDEN.search(self.id):
            raise bad("id", "must be 1-128 characters without spaces or , ; = / { }")
        if self.kind not in KINDS:
            raise bad("kind", f"unknown kind {self.kind!r} (one of {', '.join(KINDS)})")
        default_port = OLLAMA_DEFAULT_PORT if self.kind == KIND_OLLAMA else None
        try:
            url = normalize_base_url(self.base_url, default_port=default_port)
        except ValueError as exc:
            raise bad("base_url", str(exc)) from None
        object.__setattr__(self, "base_url", url)
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise bad("weight", f"must be positive, got {self.weight!r}")
        unknown_roles = sorted(self.roles - set(ROLES))
        if unknown_roles:
            raise bad("roles", f"unknown role {unknown_roles[0]!r} (one of {', '.join(ROLES)})")
        if self.parallel < 1:
            raise bad("parallel", f"must be at least 1 or auto, got {self.parallel!r}")
        if self.memory_budget_bytes < 0:
            raise bad("memory_budget", "must not be negative")
        if self.max_loaded_models < 0:
            raise bad("max_loaded_models", "must not be negative (0 = no limit)")
        for name in (*self.preload, *self.allowed_models):
            if not name or name != name.strip():
                raise bad("preload/allowed_models", f"bad model name {name!r}")
        if len(set(self.preload)) != len(self.preload):
            raise bad("preload", "lists a model twice")
        outside = [m for m in self.preload if self.allowed_models and m not in self.allowed_models]
        if outside:
            raise bad("preload", f"{outside[0]!r} is not in allowed_models")
        if not math.isfinite(self.request_timeout_seconds) or self.request_timeout_seconds < 0:
            raise bad("request_timeout_seconds", "must be positive (or 0: the Pool's default)")
        if self.api_key_env and not _UPSTREAM_KEY_NAME.fullmatch(self.api_key_env):
            raise bad(
                "api_key_env",
                f"must name a variable {UPSTREAM_KEY_PREFIX}<NAME> (letters, digits, _), "
                f"set in the environment or in USHER_UPSTREAM_KEYS_FILE",
            )

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
        if config.kind == pool_pb2.INSTANCE_KIND_UNSPECIFIED:
            kind = KIND_OLLAMA
        elif config.kind in kinds:
            kind = kinds[config.kind]
        else:
            raise ConfigError(f"instance {config.id!r}: kind: unknown kind {config.kind}")
        if config.parallel < 0:
            raise ConfigError(f"instance {config.id!r}: parallel: must be at least 1 or 0 (auto)")
        base_url = config.base_url
        if config.parallel == 0:
            default_port = OLLAMA_DEFAULT_PORT if kind == KIND_OLLAMA else None
            try:
                local = is_local_url(normalize_base_url(base_url, default_port=default_port))
            except ValueError:
                local = False  # the constructor names the bad base_url
            parallel = _auto_parallel_for(local and not config.external, total_memory_bytes)
        else:
            parallel = config.parallel
        return cls(
            id=config.id,
            base_url=base_url,
            kind=kind,
            weight=config.weight or 1.0,
            roles=frozenset(config.roles),
            parallel=parallel,
            memory_budget_bytes=config.memory_budget_bytes,
            max_loaded_models=config.max_loaded_models,
            preload=tuple(config.preload),
            allowed_models=frozenset(config.allowed_models),
            external=config.external,
            api_key_env=config.api_key_env,
            request_timeout_seconds=config.request_timeout.ToMilliseconds() / 1000,
        )


def _system_memory() -> int:
    # Imported here: only "auto" on a local instance needs it. (psutil ships no stubs.)
    import psutil  # type: ignore[import-untyped]

    return int(psutil.virtual_memory().total)


def _auto_parallel_for(local: bool, total_memory_bytes: int | None) -> int:
    if not local:
        return 1
    return auto_parallel(_system_memory() if total_memory_bytes is None else total_memory_bytes)


@dataclass(frozen=True)
class PoolSettings:
    instances: tuple[InstanceSpec, ...] = (InstanceSpec(DEFAULT_INSTANCE_ID),)
    strategy: Strategy = Strategy.AFFINITY
    listen: str = "127.0.0.1:50052"
    redis_url: str = "redis://127.0.0.1:6379/0"
    tokens: Mapping[str, Principal] = field(default_factory=dict)
    log_level: str = "info"
    health_interval_seconds: float = 2.0
    health_timeout_seconds: float = 3.0
    #: Failed health checks in a row before an instance leaves rotation.
    unhealthy_after_failures: int = 1
    #: Longest one upstream call may take (a whole generation, not the first token).
    request_timeout_seconds: float = 600.0
    circuit_failure_threshold: int = 5
    circuit_failure_window_seconds: float = 30.0
    circuit_open_seconds: float = 10.0
    circuit_half_open_max_calls: int = 1
    circuit_backoff_multiplier: float = 2.0
    circuit_max_open_seconds: float = 300.0
    #: Unload a model idle this long (PRD MODEL_POOL_AUTO_UNLOAD_MINUTES=10); 0 = never.
    idle_unload_seconds: float = 600.0
    #: Load a model on one more instance when its queue is at least this long per
    #: instance serving it; 0 = never scale out.
    scale_out_queue_length: int = 8
    placement_interval_seconds: float = 5.0
    #: How long a reserved slot is held for its Generate call.
    slot_lease_seconds: float = 30.0
    #: On SIGTERM, how long in-flight calls may take before they are cut off.
    shutdown_grace_seconds: float = 10.0
    #: Port of the Prometheus /metrics endpoint; 0 = off.
    metrics_port: int = 0
    #: model → models to try instead, in order (e.g. a smaller one when it cannot load).
    fallback_models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: model → the external provider's model for requests sent to the external lane.
    external_models: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

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

    def keep_alive_for(self, spec: InstanceSpec, model: str) -> float:
        """The ``keep_alive`` sent with every call to (and load of) ``model`` on ``spec``, so
        the model server never unloads before Usher does: a preload stays for ever (-1), as
        does everything when idle unloads are off; other models outlive Usher's own idle
        unload by two placement passes (Ollama's timer is only a safety net for when no
        Pool is running)."""
        if model in spec.preload or self.idle_unload_seconds <= 0:
            return -1.0
        return self.idle_unload_seconds + 2 * self.placement_interval_seconds

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

    def check(self) -> None:
        """Raise ConfigError naming the first bad field."""
        seen: set[str] = set()
        for spec in self.instances:
            if spec.id in seen:
                raise ConfigError(f"instances: duplicate id {spec.id!r}")
            seen.add(spec.id)
        positive = (
            "health_interval_seconds",
            "health_timeout_seconds",
            "request_timeout_seconds",
            "circuit_failure_window_seconds",
            "circuit_open_seconds",
            "placement_interval_seconds",
            "slot_lease_seconds",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)!r}")
        at_least_one = (
            "unhealthy_after_failures",
            "circuit_failure_threshold",
            "circuit_half_open_max_calls",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)!r}")
        for name in ("idle_unload_seconds", "scale_out_queue_length", "shutdown_grace_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative (0 = off)")
        if self.circuit_backoff_multiplier < 1:
            raise ConfigError("circuit_backoff_multiplier: must be at least 1")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        _, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"listen: expected host:port, got {self.listen!r}")
        for model, fallbacks in self.fallback_models.items():
            for name in (model, *fallbacks):
                if not isinstance(name, str) or not name.strip():
                    raise ConfigError(f"fallback_models: bad model name {name!r} for {model!r}")
        cycle = _find_cycle(self.fallback_models)
        if cycle:
            raise ConfigError(f"fallback_models: cycle {' -> '.join(cycle)}")
        for model, target in self.external_models.items():
            if not model.strip() or not isinstance(target, str) or not target.strip():
                raise ConfigError(f"external_models: bad entry {model!r}: {target!r}")


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


# --- Reading raw values (YAML or strings from the environment) ------------------------------


def _as_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected text, got {value!r} (quote it)")
    return value.strip()


def _as_names(value: object, what: str) -> tuple[str, ...]:
    """A list of names: a YAML list, or text separated by ``+`` or ``,``."""
    if isinstance(value, str):
        items: Iterable[object] = re.split(r"[+,]", value)
    elif isinstance(value, list | tuple):
        items = value
    elif value is None:
        return ()
    else:
        raise ConfigError(f"{what}: expected a list, got {value!r}")
    names = tuple(_as_str(item, what) for item in items)
    return tuple(n for n in names if n)


def _as_float(value: object, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    try:
        result = float(value) if isinstance(value, int | float | str) else math.nan
    except ValueError:
        result = math.nan
    if not math.isfinite(result):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    return result


def _as_int(value: object, what: str) -> int:
    number = _as_float(value, what)
    if number != int(number):
        raise ConfigError(f"{what}: expected a whole number, got {value!r}")
    return int(number)


def _as_bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{what}: expected true or false, got {value!r}")


_INSTANCE_KEYS = {
    "id": "id",
    "base_url": "base_url",
    "url": "base_url",
    "kind": "kind",
    "weight": "weight",
    "roles": "roles",
    "parallel": "parallel",
    "memory_budget": "memory_budget",
    "memory_budget_bytes": "memory_budget",
    "memory": "memory_budget",
    "max_loaded_models": "max_loaded_models",
    "max_loaded": "max_loaded_models",
    "preload": "preload",
    "allowed_models": "allowed_models",
    "allowed": "allowed_models",
    "external": "external",
    "api_key_env": "api_key_env",
    "request_timeout_seconds": "request_timeout_seconds",
    "request_timeout": "request_timeout_seconds",
}


@dataclass(frozen=True)
class _Context:
    """What resolving an instance needs beyond its own entry."""

    total_memory: Callable[[], int]
    default_memory_budget: int = 0


def _instance(raw: Mapping[str, object], where: str, ctx: _Context) -> InstanceSpec:
    """An InstanceSpec from a YAML mapping or a parsed USHER_INSTANCES entry."""
    values: dict[str, object] = {}
    for key, value in raw.items():
        canonical = _INSTANCE_KEYS.get(str(key).strip().lower().replace("-", "_"))
        if canonical is None:
            raise ConfigError(f"{where}: unknown field {key!r}")
        values[canonical] = value
    if "id" not in values:
        raise ConfigError(f"{where}: id: missing")
    ident = _as_str(values["id"], f"{where}: id")
    label = f"{where}: instance {ident!r}"

    def field_name(name: str) -> str:
        return f"{label}: {name}"

    kind = _as_str(values.get("kind", KIND_OLLAMA), field_name("kind")).lower()
    if kind not in KINDS:
        raise ConfigError(
            f"{field_name('kind')}: unknown kind {kind!r} (one of {', '.join(KINDS)})"
        )
    default_port = OLLAMA_DEFAULT_PORT if kind == KIND_OLLAMA else None
    raw_url = _as_str(values.get("base_url", DEFAULT_OLLAMA_URL), field_name("base_url"))
    try:
        base_url = normalize_base_url(raw_url, default_port=default_port)
    except ValueError as exc:
        raise ConfigError(f"{field_name('base_url')}: {exc}") from None
    local = is_local_url(base_url)
    external = _as_bool(values.get("external", False), field_name("external"))

    if "memory_budget" in values:
        try:
            memory = parse_memory(values["memory_budget"])
        except ValueError as exc:
            raise ConfigError(f"{field_name('memory_budget')}: {exc}") from None
    else:
        memory = ctx.default_memory_budget if local and not external else 0

    raw_parallel = values.get("parallel", "auto")
    if isinstance(raw_parallel, str) and raw_parallel.strip().lower() == "auto":
        parallel = auto_parallel(ctx.total_memory()) if local and not external else 1
    else:
        parallel = _as_int(raw_parallel, field_name("parallel"))
        if parallel < 1:
            raise ConfigError(f"{field_name('parallel')}: must be at least 1 or auto")

    try:
        return InstanceSpec(
            id=ident,
            base_url=base_url,
            kind=kind,
            weight=_as_float(values.get("weight", 1.0), field_name("weight")),
            roles=frozenset(r.lower() for r in _as_names(values.get("roles"), field_name("roles"))),
            parallel=parallel,
            memory_budget_bytes=memory,
            max_loaded_models=_as_int(
                values.get("max_loaded_models", 0), field_name("max_loaded_models")
            ),
            preload=_as_names(values.get("preload"), field_name("preload")),
            allowed_models=frozenset(
                _as_names(values.get("allowed_models"), field_name("allowed_models"))
            ),
            external=external,
            api_key_env=_as_str(values.get("api_key_env", ""), field_name("api_key_env")),
            request_timeout_seconds=_as_float(
                values.get("request_timeout_seconds", 0.0), field_name("request_timeout_seconds")
            ),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_instances(
    spec: str,
    *,
    total_memory_bytes: int | None = None,
    default_memory_budget: int = 0,
    source: str = "USHER_INSTANCES",
) -> tuple[InstanceSpec, ...]:
    """Instances from the one-line ``USHER_INSTANCES`` syntax (see the module docstring)."""
    ctx = _Context(_memory_reader(total_memory_bytes), default_memory_budget)
    out: list[InstanceSpec] = []
    for position, entry in enumerate(e.strip() for e in spec.split(",")):
        if not entry:
            continue
        head, *options = (part.strip() for part in entry.split(";"))
        name, sep, url = head.partition("=")
        raw: dict[str, object] = {}
        if sep and "/" not in name and ":" not in name:
            raw["id"], raw["base_url"] = name.strip(), url.strip()
        else:
            raw["base_url"] = head
        for option in options:
            if not option:
                continue
            key, eq, value = option.partition("=")
            if not eq:
                raise ConfigError(
                    f"{source} entry {position + 1}: expected key=value, got {option!r}"
                )
            raw[key.strip()] = value.strip()
        if "id" not in raw:
            kind = str(raw.get("kind", KIND_OLLAMA)).strip().lower()
            default_port = OLLAMA_DEFAULT_PORT if kind == KIND_OLLAMA else None
            try:
                netloc = urlsplit(normalize_base_url(head, default_port=default_port)).netloc
            except ValueError as exc:
                raise ConfigError(f"{source} entry {position + 1}: base_url: {exc}") from None
            raw["id"] = netloc
        out.append(_instance(raw, f"{source} entry {position + 1}", ctx))
    return tuple(out)


def _memory_reader(total_memory_bytes: int | None) -> Callable[[], int]:
    if total_memory_bytes is not None:
        return lambda: total_memory_bytes
    cache: list[int] = []

    def read() -> int:
        if not cache:
            cache.append(_system_memory())
        return cache[0]

    return read


# --- Loading -----------------------------------------------------------------------------

#: Environment variables that override the file (and the defaults), by field.
ENV_FLOATS = {
    "health_interval_seconds": "USHER_POOL_HEALTH_INTERVAL_SECONDS",
    "health_timeout_seconds": "USHER_POOL_HEALTH_TIMEOUT_SECONDS",
    "request_timeout_seconds": "USHER_POOL_REQUEST_TIMEOUT_SECONDS",
    "circuit_failure_window_seconds": "USHER_CIRCUIT_FAILURE_WINDOW_SECONDS",
    "circuit_open_seconds": "USHER_CIRCUIT_OPEN_SECONDS",
    "circuit_backoff_multiplier": "USHER_CIRCUIT_BACKOFF_MULTIPLIER",
    "circuit_max_open_seconds": "USHER_CIRCUIT_MAX_OPEN_SECONDS",
    "idle_unload_seconds": "USHER_POOL_IDLE_UNLOAD_SECONDS",
    "placement_interval_seconds": "USHER_POOL_PLACEMENT_INTERVAL_SECONDS",
    "slot_lease_seconds": "USHER_POOL_SLOT_LEASE_SECONDS",
    "shutdown_grace_seconds": "USHER_SHUTDOWN_GRACE_SECONDS",
}
ENV_INTS = {
    "unhealthy_after_failures": "USHER_POOL_UNHEALTHY_AFTER_FAILURES",
    "circuit_failure_threshold": "USHER_CIRCUIT_FAILURE_THRESHOLD",
    "circuit_half_open_max_calls": "USHER_CIRCUIT_HALF_OPEN_MAX_CALLS",
    "scale_out_queue_length": "USHER_POOL_SCALE_OUT_QUEUE_LENGTH",
    "metrics_port": "USHER_METRICS_PORT",
}
ENV_STRINGS = {
    "listen": "USHER_POOL_LISTEN",
    "log_level": "USHER_LOG_LEVEL",
}

_CIRCUIT_KEYS = {
    "failure_threshold",
    "failure_window_seconds",
    "open_seconds",
    "half_open_max_calls",
    "backoff_multiplier",
    "max_open_seconds",
}
_FILE_ONLY_KEYS = {"instances", "circuit", "default_memory_budget"}


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


def _fallbacks(value: object, where: str) -> dict[str, tuple[str, ...]]:
    if isinstance(value, str):  # env: "a=b+c,d=e"
        out: dict[str, tuple[str, ...]] = {}
        for entry in (e.strip() for e in value.split(",")):
            model, sep, rest = entry.partition("=")
            if not entry:
                continue
            if not sep or not model.strip():
                raise ConfigError(f"{where}: expected model=fallback+fallback, got {entry!r}")
            out[model.strip()] = _as_names(rest.replace(",", "+"), f"{where}: {model.strip()}")
        return out
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of model to fallback models")
    return {
        _as_str(k, where): _as_names([v] if isinstance(v, str) else v, f"{where}: {k}")
        for k, v in value.items()
    }


def _external_models(value: object, where: str) -> dict[str, str]:
    if isinstance(value, str):  # env: "llama3.2=gpt-4o-mini,..."
        pairs = [e.partition("=") for e in (e.strip() for e in value.split(",")) if e]
        if any(not sep for _, sep, _ in pairs):
            raise ConfigError(f"{where}: expected model=provider_model entries")
        return {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of model to provider model")
    return {_as_str(k, where): _as_str(v, f"{where}: {k}") for k, v in value.items()}


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
    known = {f.name for f in fields(PoolSettings)} | _FILE_ONLY_KEYS
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]!r}")
    if "tokens" in data:
        raise ConfigError(f"{source}: tokens: set USHER_API_TOKENS in the environment instead")

    values: dict[str, Any] = {}
    circuit = data.get("circuit") or {}
    if not isinstance(circuit, dict):
        raise ConfigError(f"{source}: circuit: expected a mapping")
    for key, value in circuit.items():
        if key not in _CIRCUIT_KEYS:
            raise ConfigError(f"{source}: circuit: unknown setting {key!r}")
        data.setdefault(f"circuit_{key}", value)
    for name, variable in ENV_FLOATS.items():
        if name in data:
            values[name] = _as_float(data[name], f"{source}: {name}")
        values[name] = env_float(variable, values.get(name, _DEFAULTS[name]), environ)
    if (
        "USHER_POOL_IDLE_UNLOAD_SECONDS" not in environ
        and "MODEL_POOL_AUTO_UNLOAD_MINUTES" in environ
    ):
        minutes = env_float("MODEL_POOL_AUTO_UNLOAD_MINUTES", 10.0, environ)
        values["idle_unload_seconds"] = minutes * 60.0
    for name, variable in ENV_INTS.items():
        if name in data:
            values[name] = _as_int(data[name], f"{source}: {name}")
        values[name] = env_int(variable, values.get(name, _DEFAULTS[name]), environ)
    for name, variable in ENV_STRINGS.items():
        if name in data:
            values[name] = _as_str(data[name], f"{source}: {name}")
        values[name] = env_str(variable, values.get(name, _DEFAULTS[name]), environ)
    values["log_level"] = values["log_level"].lower()

    redis_default = _as_str(data.get("redis_url", _DEFAULTS["redis_url"]), f"{source}: redis_url")
    values["redis_url"] = env_str(
        "USHER_REDIS_URL", env_str("REDIS_URL", redis_default, environ), environ
    )
    values["tokens"] = load_token_map(environ)

    strategy = env_str("USHER_POOL_STRATEGY", "", environ)
    strategy_source = "USHER_POOL_STRATEGY"
    if not strategy:
        strategy = _as_str(data.get("strategy", Strategy.AFFINITY.value), f"{source}: strategy")
        strategy_source = f"{source}: strategy"
    try:
        values["strategy"] = Strategy.parse(strategy)
    except ValueError as exc:
        raise ConfigError(f"{strategy_source}: {exc}") from None

    fallback_env = environ.get("USHER_FALLBACK_MODELS", "").strip()
    if fallback_env:
        values["fallback_models"] = _fallbacks(fallback_env, "USHER_FALLBACK_MODELS")
    elif "fallback_models" in data:
        values["fallback_models"] = _fallbacks(
            data["fallback_models"], f"{source}: fallback_models"
        )
    external_env = environ.get("USHER_EXTERNAL_MODELS", "").strip()
    if external_env:
        values["external_models"] = _external_models(external_env, "USHER_EXTERNAL_MODELS")
    elif "external_models" in data:
        values["external_models"] = _external_models(
            data["external_models"], f"{source}: external_models"
        )

    values["instances"] = _load_instances(data, source, environ, total_memory_bytes)
    try:
        return PoolSettings(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(PoolSettings) if not callable(f.default_factory)
}


def _load_instances(
    data: Mapping[str, object],
    source: str,
    environ: Mapping[str, str],
    total_memory_bytes: int | None,
) -> tuple[InstanceSpec, ...]:
    budget = 0
    raw_budget = environ.get("MAX_MODEL_MEMORY_GB", "").strip()
    if raw_budget:
        try:
            # A plain number is gigabytes (the variable's name); "24GiB" etc. also work.
            budget = parse_memory(f"{raw_budget}GB" if _is_number(raw_budget) else raw_budget)
        except ValueError as exc:
            raise ConfigError(f"MAX_MODEL_MEMORY_GB={raw_budget!r}: {exc}") from None
    elif "default_memory_budget" in data:
        try:
            budget = parse_memory(data["default_memory_budget"])
        except ValueError as exc:
            raise ConfigError(f"{source}: default_memory_budget: {exc}") from None
    ctx = _Context(_memory_reader(total_memory_bytes), budget)

    env_instances = environ.get("USHER_INSTANCES", "").strip()
    if "instances" in data:
        if env_instances:
            raise ConfigError(
                f"instances are set in both {source} and USHER_INSTANCES; keep one of them"
            )
        raw = data["instances"] or []
        if not isinstance(raw, list):
            raise ConfigError(f"{source}: instances: expected a list")
        specs = []
        for index, entry in enumerate(raw):
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: instances[{index}]: expected a mapping")
            specs.append(_instance(entry, f"{source}: instances[{index}]", ctx))
        return tuple(specs)
    if env_instances:
        return parse_instances(
            env_instances,
            total_memory_bytes=total_memory_bytes,
            default_memory_budget=budget,
        )
    host = environ.get("OLLAMA_HOST", "").strip()
    where = f"OLLAMA_HOST={host!r}" if host else "default instance"
    return (
        _instance({"id": DEFAULT_INSTANCE_ID, "base_url": host or DEFAULT_OLLAMA_URL}, where, ctx),
    )


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
