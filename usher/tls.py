"""TLS for every gRPC server and client, mutual TLS between services as an option.

Servers: ``USHER_TLS_CERT`` and ``USHER_TLS_KEY`` (PEM paths) turn TLS on;
``USHER_TLS_CLIENT_CA`` additionally requires clients to present a certificate signed by
that CA (mTLS). Clients: ``USHER_TLS_CA`` (the CA that signed the servers' certificates)
turns TLS on; ``USHER_TLS_CLIENT_CERT`` and ``USHER_TLS_CLIENT_KEY`` present a client
certificate for mTLS. Without these, traffic is plaintext (local development).

Renewed certificates are picked up without a restart (cert-manager rewrites the mounted
Secret long before expiry): a server reads the files again for each new connection's
handshake when they changed, and a channel opened by ``open_channel`` opens a new
connection with the new files for the calls that start after the change (calls already
running finish on the old one). A half-written renewal (key and certificate that do not
belong together) is ignored until it is complete.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from usher.balancing import channel_target
from usher.config import ConfigError
from usher.logs import get_logger
from usher.settings import UsherSettings

__all__ = [
    "KEEPALIVE",
    "RECONNECT",
    "ClientTls",
    "ReloadingChannel",
    "ServerTls",
    "TlsSettings",
    "key_pair_problem",
    "open_channel",
]

log = get_logger(__name__)

#: How long calls still running on a channel whose certificates were renewed may go on
#: before that old channel is closed (a Generate stream lasts the whole answer).
OLD_CHANNEL_GRACE_SECONDS = 3600.0


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}={path}: {exc.strerror}") from None


def _fingerprint(paths: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is rewritten or its Secret volume's symlink is swapped."""
    marks = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            marks.append((-1, -1, -1))
        else:
            marks.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(marks)


def key_pair_problem(cert: bytes, key: bytes) -> str | None:
    """Why ``key`` is not the private key of the first certificate in ``cert``, or None."""
    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        return f"not a PEM certificate and unencrypted key: {exc}"
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(*spki) != private.public_key().public_bytes(*spki):
        return "the key does not belong to the certificate"
    return None


class TlsSettings(UsherSettings):
    """Files (PEM) of the TLS between Usher's processes; empty = plaintext."""

    #: A service's certificate and key, and the CA its clients' certificates must chain to
    #: (mutual TLS) when set.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    #: What a caller trusts, and its own certificate and key for mutual TLS.
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""


@dataclass(frozen=True)
class ServerTls:
    cert: bytes
    key: bytes
    client_ca: bytes | None = None
    #: The files these came from (cert, key[, client CA]): renewals are picked up. None =
    #: fixed bytes.
    paths: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerTls | None:
        return cls.from_settings(TlsSettings.from_env(env))

    @classmethod
    def from_settings(cls, settings: TlsSettings) -> ServerTls | None:
        """The server's certificate (and client CA), read from the files named; None when
        the settings name none."""
        cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        if not cert and not key:
            return None
        if not cert or not key:
            raise ConfigError("USHER_TLS_CERT and USHER_TLS_KEY must be set together")
        tls = cls(
            _read("USHER_TLS_CERT", cert),
            _read("USHER_TLS_KEY", key),
            _read("USHER_TLS_CLIENT_CA", client_ca) if client_ca else None,
            (cert, key, client_ca) if client_ca else (cert, key),
        )
        problem = key_pair_problem(tls.cert, tls.key)
        if problem:
            raise ConfigError(f"USHER_TLS_CERT={cert}, USHER_TLS_KEY={key}: {problem}")
        return tls

    def _configuration(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )

    def credentials(self) -> grpc.ServerCredentials:
        if self.paths is None:
            return grpc.ssl_server_credentials(
                [(self.key, self.cert)],
                root_certificates=self.client_ca,
                require_client_auth=self.client_ca is not None,
            )
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            _ServerReloader(self),
            require_client_authentication=self.client_ca is not None,
        )


class _ServerReloader:
    """gRPC asks before each new handshake: a new configuration when the files changed."""

    def __init__(self, tls: ServerTls) -> None:
        assert tls.paths is not None
        self._paths = tls.paths
        self._seen = _fingerprint(self._paths)

    def __call__(self) -> Any:
        seen = _fingerprint(self._paths)
        if seen == self._seen:
            return None
        try:
            files = [Path(p).read_bytes() for p in self._paths]
        except OSError as exc:
            log.warning("tls_reload_failed", error=str(exc))
            return None
        problem = key_pair_problem(files[0], files[1])
        if problem:  # mid-renewal: try again at the next handshake
            log.warning("tls_reload_failed", error=problem)
            return None
        self._seen = seen
        log.info("tls_server_certificate_reloaded", cert=self._paths[0])
        client_ca = files[2] if len(files) > 2 else None
        return ServerTls(files[0], files[1], client_ca)._configuration()


@dataclass(frozen=True)
class ClientTls:
    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    #: The files these came from (CA[, cert, key]): renewals are picked up. None = fixed.
    paths: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientTls | None:
        return cls.from_settings(TlsSettings.from_env(env))

    @classmethod
    def from_settings(cls, settings: TlsSettings) -> ClientTls | None:
        """The CA to trust (and the client's own certificate) from the files named; None
        when the settings name no CA."""
        ca, cert, key = settings.tls_ca, settings.tls_client_cert, settings.tls_client_key
        if not ca:
            return None
        if bool(cert) != bool(key):
            raise ConfigError("USHER_TLS_CLIENT_CERT and USHER_TLS_CLIENT_KEY must be set together")
        return cls(
            _read("USHER_TLS_CA", ca),
            _read("USHER_TLS_CLIENT_CERT", cert) if cert else None,
            _read("USHER_TLS_CLIENT_KEY", key) if key else None,
            (ca, cert, key) if cert else (ca,),
        )

    def reread(self) -> ClientTls | None:
        """The same files read again; None while they are unreadable or mid-renewal."""
        if self.paths is None:
            return self
        try:
            files = [Path(p).read_bytes() for p in self.paths]
        except OSError as exc:
            log.warning("tls_reload_failed", error=str(exc))
            return None
        if len(files) == 3:
            problem = key_pair_problem(files[1], files[2])
            if problem:
                log.warning("tls_reload_failed", error=problem)
                return None
            return ClientTls(files[0], files[1], files[2], self.paths)
        return ClientTls(files[0], paths=self.paths)

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


class _Method:
    """A multi-callable that calls through whichever channel is current at call time."""

    def __init__(self, owner: ReloadingChannel, kind: str, method: str, kwargs: Any) -> None:
        self._owner, self._kind, self._method, self._kwargs = owner, kind, method, kwargs
        self._bound: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if self._bound is None or self._bound[0] is not channel:
            self._bound = channel, getattr(channel, self._kind)(self._method, **self._kwargs)
        return self._bound[1](*args, **kwargs)


class ReloadingChannel(grpc.aio.Channel):
    """A channel whose TLS files are watched: after a renewal, new calls go over a new
    connection made with the new files; the old channel closes once its calls are done
    (or after ``OLD_CHANNEL_GRACE_SECONDS``)."""

    def __init__(
        self,
        address: str,
        tls: ClientTls,
        options: Sequence[tuple[str, Any]],
        interceptors: Sequence[grpc.aio.ClientInterceptor],
    ) -> None:
        assert tls.paths is not None
        self._address, self._tls = address, tls
        self._options, self._interceptors = list(options), list(interceptors)
        self._seen = _fingerprint(tls.paths)
        self._channel = self._open(tls)
        self._retiring: set[asyncio.Task[None]] = set()

    def _open(self, tls: ClientTls) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self._address, tls.credentials(), options=self._options, interceptors=self._interceptors
        )

    def current(self) -> grpc.aio.Channel:
        assert self._tls.paths is not None
        seen = _fingerprint(self._tls.paths)
        if seen != self._seen:
            renewed = self._tls.reread()
            if renewed is not None:
                self._seen, self._tls = seen, renewed
                old, self._channel = self._channel, self._open(renewed)
                task = asyncio.ensure_future(old.close(OLD_CHANNEL_GRACE_SECONDS))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
                log.info("tls_client_certificates_reloaded", address=self._address)
        return self._channel

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "unary_unary", method, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "unary_stream", method, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "stream_unary", method, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "stream_stream", method, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for task in list(self._retiring):
            task.cancel()
        await self._channel.close(grace)

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def open_channel(
    address: str,
    tls: ClientTls | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel to another Usher service: TLS when configured, plaintext otherwise.

    Keepalive pings find a connection whose peer vanished without closing it (a node lost,
    a half-open socket): the calls on it fail within ``KEEPALIVE`` instead of waiting
    forever on a stream that will never speak again, and the work behind them is retried.
    With TLS from files, renewed certificates are used for the calls after the renewal."""
    target, balancing = channel_target(address)
    options = [*KEEPALIVE, *RECONNECT, *balancing]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if tls.paths is not None:
        return ReloadingChannel(target, tls, options, interceptors)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=options, interceptors=interceptors
    )
