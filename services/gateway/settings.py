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
from typing import Any, Self

from pydantic import Field, field_validator, model_validator

from usher.auth import open_access_from_env
from usher.config import ConfigError
from usher.settings import LogLevel, SettingsFile, UsherSettings, lowercase

__all__ = ["GatewaySettings", "split_listen"]


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6) → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


class GatewaySettings(UsherSettings):
    listen: str = Field("127.0.0.1:8080", validation_alias="USHER_GATEWAY_LISTEN")
    scheduler_address: str = "127.0.0.1:50051"
    notifier_address: str = "127.0.0.1:50053"
    pool_address: str = "127.0.0.1:50052"
    service_token: str = ""
    admin_token: str = Field("", validation_alias="USHER_GATEWAY_ADMIN_TOKEN")
    default_token: str = Field("", validation_alias="USHER_GATEWAY_DEFAULT_TOKEN")
    #: USHER_AUTH_OPEN, refused in production mode (read by ``from_env``).
    open_access: bool = Field(False, validation_alias="USHER_AUTH_OPEN")
    rpc_timeout_seconds: float = Field(
        10.0, gt=0, validation_alias="USHER_GATEWAY_RPC_TIMEOUT_SECONDS"
    )
    #: How long a client may take to send its request (headers and body) and how long an
    #: idle keep-alive connection stays open.
    read_timeout_seconds: float = Field(
        30.0, gt=0, validation_alias="USHER_GATEWAY_READ_TIMEOUT_SECONDS"
    )
    model_cache_seconds: float = Field(
        2.0, ge=0, validation_alias="USHER_GATEWAY_MODEL_CACHE_SECONDS"
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, validation_alias="USHER_GATEWAY_MAX_BODY_BYTES"
    )
    ollama_version: str = Field("0.12.0", validation_alias="USHER_GATEWAY_OLLAMA_VERSION")
    default_parallel: int = Field(1, ge=1)
    default_queue_limit: int = Field(100, ge=1, validation_alias="USHER_QUEUE_MAX_SIZE")
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    keepalive_seconds: float = Field(15.0, gt=0, validation_alias="USHER_GATEWAY_KEEPALIVE_SECONDS")
    watch_secret: str = Field("", validation_alias="USHER_GATEWAY_WATCH_SECRET")
    watch_token_seconds: float = Field(
        600.0, gt=0, validation_alias="USHER_GATEWAY_WATCH_TOKEN_SECONDS"
    )
    log_level: LogLevel = "info"

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, listen: str) -> str:
        split_listen(listen)
        return listen

    @field_validator("watch_secret")
    @classmethod
    def _long_enough(cls, secret: str) -> str:
        if secret and len(secret.encode()) < 16:
            raise ValueError("must be at least 16 bytes")
        return secret

    _lowercase = field_validator("log_level", mode="before")(lowercase)

    @model_validator(mode="after")
    def _can_read_the_fleet(self) -> Self:
        if not self.service_token and not self.admin_token:
            raise ConfigError(
                "USHER_SERVICE_TOKEN is needed to read the fleet from the Pool at "
                "USHER_POOL_ADDRESS (or set USHER_GATEWAY_ADMIN_TOKEN)"
            )
        return self

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, file: SettingsFile | None = None, **given: Any
    ) -> Self:
        # Open access has its own rule (refused in production), shared with the services.
        return super().from_env(
            env, file=file, **{"open_access": open_access_from_env(env), **given}
        )
