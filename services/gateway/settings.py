"""Gateway settings, from the environment (every name starts with USHER_).

* ``USHER_GATEWAY_LISTEN`` (``127.0.0.1:8080``): the HTTP address.
* ``USHER_SCHEDULER_ADDRESS`` (``127.0.0.1:50051``), ``USHER_NOTIFIER_ADDRESS``
  (``127.0.0.1:50053``), ``USHER_POOL_ADDRESS`` (``127.0.0.1:50052``): the services.
* ``USHER_SERVICE_TOKEN``: the gateway's own identity for Pool reads (model catalogue,
  fleet statistics).
* ``USHER_GATEWAY_ADMIN_TOKEN``: an admin token for the ``/queue/stats`` reads (the
  Scheduler's GetQueueStats is admin-only). Unset: ``/queue/stats`` forwards the caller's
  bearer token, which must then be an admin's. The ``/admin/*`` endpoints always use the
  caller's own token, so only admins can change anything.
* ``USHER_GATEWAY_DEFAULT_TOKEN``: the tenant token used when a client sends no
  ``Authorization`` header (see below).
* ``USHER_AUTH_OPEN`` (false): open access for one trusted machine (see ``usher.auth``):
  a call without ``Authorization`` goes on without credentials and the services, started
  the same way, admit it as ``local/anonymous``; any unconfigured key is its own tenant.
  Refused with ``USHER_PRODUCTION=true``. ``make up`` sets it.
* ``USHER_GATEWAY_RPC_TIMEOUT_SECONDS`` (10): deadline of each unary gRPC call.
* ``USHER_GATEWAY_MODEL_CACHE_SECONDS`` (2): how long the fleet's model list is reused.
* ``USHER_GATEWAY_MAX_BODY_BYTES`` (64 MiB): the largest body (images travel as base64).
* ``USHER_GATEWAY_OLLAMA_VERSION`` (``0.12.0``): what ``GET /api/version`` answers.
* ``USHER_DEFAULT_PARALLEL`` (1), ``USHER_QUEUE_MAX_SIZE`` (100): the defaults
  ``/queue/stats`` shows; the Scheduler's own variables, so one ConfigMap gives both.
* ``USHER_SHUTDOWN_GRACE_SECONDS`` (10): how long in-flight answers may finish on SIGTERM.
* ``USHER_GATEWAY_KEEPALIVE_SECONDS`` (15): while a streamed answer waits in the queue (and
  on every status stream), a comment line this often keeps proxies from cutting it.
* ``USHER_GATEWAY_WATCH_SECRET``: the key that signs watch tokens (at least 16 bytes); every
  replica behind one address needs the same. Unset: derived from the gateway's service
  credential (``USHER_SERVICE_TOKEN``, else the admin token), which replicas share.
* ``USHER_GATEWAY_WATCH_TOKEN_SECONDS`` (600): how long a watch token opens a stream.
* ``USHER_LOG_LEVEL`` (``info``).

TLS to the services uses ``usher.tls`` (``USHER_TLS_CA``, ``USHER_TLS_CLIENT_CERT``, ...).

**The default token.** Ollama clients usually send no credentials, so a gateway for one
trusted desk can name a tenant token to use when none is sent. Production deployments
should leave ``USHER_GATEWAY_DEFAULT_TOKEN`` unset: every caller then has to send
``Authorization: Bearer <token>`` and is its own tenant (fairness and ownership are per
tenant; a shared default token makes every anonymous caller one tenant).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from usher.auth import open_access_from_env
from usher.config import ConfigError, env_float, env_int, env_str

__all__ = ["GatewaySettings", "split_listen"]


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6) → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"USHER_GATEWAY_LISTEN={listen!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:8080"
    scheduler_address: str = "127.0.0.1:50051"
    notifier_address: str = "127.0.0.1:50053"
    pool_address: str = "127.0.0.1:50052"
    service_token: str = ""
    admin_token: str = ""
    default_token: str = ""
    open_access: bool = False
    rpc_timeout_seconds: float = 10.0
    #: How long a client may take to send its request (headers and body) and how long an
    #: idle keep-alive connection stays open.
    read_timeout_seconds: float = 30.0
    model_cache_seconds: float = 2.0
    max_body_bytes: int = 64 * 1024 * 1024
    ollama_version: str = "0.12.0"
    default_parallel: int = 1
    default_queue_limit: int = 100
    shutdown_grace_seconds: float = 10.0
    keepalive_seconds: float = 15.0
    watch_secret: str = ""
    watch_token_seconds: float = 600.0
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        d = cls()
        settings = cls(
            listen=env_str("USHER_GATEWAY_LISTEN", d.listen, env),
            scheduler_address=env_str("USHER_SCHEDULER_ADDRESS", d.scheduler_address, env),
            notifier_address=env_str("USHER_NOTIFIER_ADDRESS", d.notifier_address, env),
            pool_address=env_str("USHER_POOL_ADDRESS", d.pool_address, env),
            service_token=env_str("USHER_SERVICE_TOKEN", d.service_token, env),
            admin_token=env_str("USHER_GATEWAY_ADMIN_TOKEN", d.admin_token, env),
            default_token=env_str("USHER_GATEWAY_DEFAULT_TOKEN", d.default_token, env),
            open_access=open_access_from_env(env),
            rpc_timeout_seconds=env_float(
                "USHER_GATEWAY_RPC_TIMEOUT_SECONDS", d.rpc_timeout_seconds, env
            ),
            read_timeout_seconds=env_float(
                "USHER_GATEWAY_READ_TIMEOUT_SECONDS", d.read_timeout_seconds, env
            ),
            model_cache_seconds=env_float(
                "USHER_GATEWAY_MODEL_CACHE_SECONDS", d.model_cache_seconds, env
            ),
            max_body_bytes=env_int("USHER_GATEWAY_MAX_BODY_BYTES", d.max_body_bytes, env),
            ollama_version=env_str("USHER_GATEWAY_OLLAMA_VERSION", d.ollama_version, env),
            default_parallel=env_int("USHER_DEFAULT_PARALLEL", d.default_parallel, env),
            default_queue_limit=env_int("USHER_QUEUE_MAX_SIZE", d.default_queue_limit, env),
            shutdown_grace_seconds=env_float(
                "USHER_SHUTDOWN_GRACE_SECONDS", d.shutdown_grace_seconds, env
            ),
            keepalive_seconds=env_float(
                "USHER_GATEWAY_KEEPALIVE_SECONDS", d.keepalive_seconds, env
            ),
            watch_secret=env_str("USHER_GATEWAY_WATCH_SECRET", d.watch_secret, env),
            watch_token_seconds=env_float(
                "USHER_GATEWAY_WATCH_TOKEN_SECONDS", d.watch_token_seconds, env
            ),
            log_level=env_str("USHER_LOG_LEVEL", d.log_level, env),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ConfigError naming the first bad setting."""
        split_listen(self.listen)
        if not self.service_token and not self.admin_token:
            raise ConfigError(
                "USHER_SERVICE_TOKEN is needed to read the fleet from the Pool at "
                "USHER_POOL_ADDRESS (or set USHER_GATEWAY_ADMIN_TOKEN)"
            )
        if self.rpc_timeout_seconds <= 0:
            raise ConfigError("USHER_GATEWAY_RPC_TIMEOUT_SECONDS must be positive")
        if not self.read_timeout_seconds > 0:
            raise ConfigError("USHER_GATEWAY_READ_TIMEOUT_SECONDS must be positive")
        if self.model_cache_seconds < 0:
            raise ConfigError("USHER_GATEWAY_MODEL_CACHE_SECONDS must not be negative")
        if self.max_body_bytes < 1024:
            raise ConfigError("USHER_GATEWAY_MAX_BODY_BYTES must be at least 1024")
        if self.keepalive_seconds <= 0:
            raise ConfigError("USHER_GATEWAY_KEEPALIVE_SECONDS must be positive")
        if self.watch_secret and len(self.watch_secret.encode()) < 16:
            raise ConfigError("USHER_GATEWAY_WATCH_SECRET must be at least 16 bytes")
        if self.watch_token_seconds <= 0:
            raise ConfigError("USHER_GATEWAY_WATCH_TOKEN_SECONDS must be positive")
