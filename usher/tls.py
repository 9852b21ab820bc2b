"""TLS for every gRPC server and client, mutual TLS between services as an option.

Servers: ``USHER_TLS_CERT`` and ``USHER_TLS_KEY`` (PEM paths) turn TLS on;
``USHER_TLS_CLIENT_CA`` additionally requires clients to present a certificate signed by
that CA (mTLS). Clients: ``USHER_TLS_CA`` (the CA that signed the servers' certificates)
turns TLS on; ``USHER_TLS_CLIENT_CERT`` and ``USHER_TLS_CLIENT_KEY`` present a client
certificate for mTLS. Without these, traffic is plaintext (local development).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from usher.config import ConfigError, env_str

__all__ = ["KEEPALIVE", "RECONNECT", "ClientTls", "ServerTls", "open_channel"]


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}={path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ServerTls:
    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerTls | None:
        cert = env_str("USHER_TLS_CERT", "", env)
        key = env_str("USHER_TLS_KEY", "", env)
        if not cert and not key:
            return None
        if not cert or not key:
            raise ConfigError("USHER_TLS_CERT and USHER_TLS_KEY must be set together")
        client_ca = env_str("USHER_TLS_CLIENT_CA", "", env)
        return cls(
            _read("USHER_TLS_CERT", cert),
            _read("USHER_TLS_KEY", key),
            _read("USHER_TLS_CLIENT_CA", client_ca) if client_ca else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientTls | None:
        ca = env_str("USHER_TLS_CA", "", env)
        if not ca:
            return None
        cert = env_str("USHER_TLS_CLIENT_CERT", "", env)
        key = env_str("USHER_TLS_CLIENT_KEY", "", env)
        if bool(cert) != bool(key):
            raise ConfigError("USHER_TLS_CLIENT_CERT and USHER_TLS_CLIENT_KEY must be set together")
        return cls(
            _read("USHER_TLS_CA", ca),
            _read("USHER_TLS_CLIENT_CERT", cert) if cert else None,
            _read("USHER_TLS_CLIENT_KEY", key) if key else None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


#: Ping an idle or busy connection every 10 s; no answer within 5 s closes it.
KEEPALIVE = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
#: Reconnect soon after a service restarts (gRPC's own backoff grows to two minutes).
RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3000),
)


def open_channel(
    address: str,
    tls: ClientTls | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel to another Usher service: TLS when configured, plaintext otherwise.

    Keepalive pings find a connection whose peer vanished without closing it (a node lost,
    a half-open socket): the calls on it fail within ``KEEPALIVE`` instead of waiting
    forever on a stream that will never speak again, and the work behind them is retried."""
    options = [*KEEPALIVE, *RECONNECT]
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, tls.credentials(), options=options, interceptors=interceptors
    )
