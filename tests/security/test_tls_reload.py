"""Renewed certificates are picked up without a restart: the files are rewritten with a new
CA and new certificates (as cert-manager does on renewal), then a new connection is made."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.aio import AsyncUsherClient
from usher.config import ConfigError
from usher.server import GrpcServer
from usher.testing import free_port
from usher.testing.certs import CertificateFiles, make_certificates
from usher.tls import ClientTls, ReloadingChannel, ServerTls, key_pair_problem, open_channel


async def check(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def refused(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def renew_certificate_only(env: dict[str, str], other: CertificateFiles) -> None:
    """The first half of a renewal: the certificate is written, its key not yet."""
    Path(env["USHER_TLS_CERT"]).write_bytes(other.server_cert.read_bytes())


def env_of(certs: CertificateFiles, mutual: bool) -> dict[str, str]:
    env = {"USHER_TLS_CERT": str(certs.server_cert), "USHER_TLS_KEY": str(certs.server_key)}
    env["USHER_TLS_CA"] = str(certs.ca)
    if mutual:
        env["USHER_TLS_CLIENT_CA"] = str(certs.ca)
        env["USHER_TLS_CLIENT_CERT"] = str(certs.client_cert)
        env["USHER_TLS_CLIENT_KEY"] = str(certs.client_key)
    return env


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
async def server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, dict[str, str], Path]]:
    folder = tmp_path / "certs"
    env = env_of(make_certificates(folder), request.param)
    port = free_port()
    grpc_server = GrpcServer([], f"127.0.0.1:{port}", 0.1, ServerTls.from_env(env))
    await grpc_server.start()
    yield f"localhost:{port}", env, folder
    await grpc_server.stop()


async def test_renewed_certificates_are_used_by_new_connections(
    server: tuple[str, dict[str, str], Path],
) -> None:
    address, env, folder = server
    stale = ClientTls.from_env({"USHER_TLS_CA": env["USHER_TLS_CA"]})
    assert stale is not None
    async with open_channel(address, ClientTls.from_env(env)) as channel:
        await check(channel)
        make_certificates(folder)  # renewal: a new CA, new server and client certificates
        # The long-lived channel notices, connects again with the new files, and the
        # server, at that new handshake, presents its new certificate (and trusts the new
        # client certificate under mutual TLS).
        await check(channel)
        await check(channel)
    # A client that still trusts only the old CA (bytes read before the renewal) is
    # refused: the server switched.
    if "USHER_TLS_CLIENT_CA" not in env:
        async with open_channel(address, ClientTls(stale.ca)) as old:
            await refused(old)
    async with open_channel(address, ClientTls.from_env(env)) as fresh:
        await check(fresh)


async def test_a_half_written_renewal_keeps_the_old_certificates(
    server: tuple[str, dict[str, str], Path], tmp_path: Path
) -> None:
    address, env, _ = server
    renew_certificate_only(env, make_certificates(tmp_path / "other"))
    async with open_channel(address, ClientTls.from_env(env)) as channel:
        await check(channel)  # still the old, consistent pair


async def test_the_sdk_follows_renewals_of_its_tls_files(
    server: tuple[str, dict[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, env, folder = server
    for name in ("USHER_TLS_CA", "USHER_TLS_CLIENT_CERT", "USHER_TLS_CLIENT_KEY"):
        if name in env:
            monkeypatch.setenv(name, env[name])
    client = AsyncUsherClient(address, address, token="t")
    channel = client._channel(address)
    assert isinstance(channel, ReloadingChannel)
    await check(channel)
    make_certificates(folder)
    await check(channel)
    await client.close()


def test_a_key_that_does_not_match_its_certificate_is_refused_at_start(tmp_path: Path) -> None:
    one, two = make_certificates(tmp_path / "one"), make_certificates(tmp_path / "two")
    assert key_pair_problem(one.server_cert.read_bytes(), one.server_key.read_bytes()) is None
    assert key_pair_problem(one.server_cert.read_bytes(), two.server_key.read_bytes())
    with pytest.raises(ConfigError, match="USHER_TLS_KEY"):
        ServerTls.from_env(
            {"USHER_TLS_CERT": str(one.server_cert), "USHER_TLS_KEY": str(two.server_key)}
        )
