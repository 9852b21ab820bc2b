"""TLS and mutual TLS on a real gRPC server with generated certificates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from tests.scheduler.conftest import TOKENS
from tests.scheduler.factories import generate_submit
from usher.auth import parse_token_map
from usher.testing import free_port
from usher.testing.certs import CertificateFiles, make_certificates
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.tls import ClientTls, open_channel
from usher.v1 import scheduler_pb2_grpc

AUTH = (("authorization", "Bearer alice-token"),)


@pytest.fixture
def certs(tmp_path: Path) -> CertificateFiles:
    return make_certificates(tmp_path / "certs")


async def start(redis_server: RedisServer | ExternalRedis) -> tuple[SchedulerApp, str]:
    port = free_port()
    app = SchedulerApp(
        SchedulerSettings(
            redis_url=redis_server.url,
            listen=f"127.0.0.1:{port}",
            tokens=parse_token_map(TOKENS),
            shutdown_grace_seconds=0.5,
        )
    )
    await app.start()
    return app, f"localhost:{port}"


async def submit_over(channel: grpc.aio.Channel) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    await stub.Submit(generate_submit(), metadata=AUTH, timeout=5)


@pytest.fixture
async def tls_scheduler(
    certs: CertificateFiles,
    redis_server: RedisServer | ExternalRedis,
    redis_client: object,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[str]:
    monkeypatch.setenv("USHER_TLS_CERT", str(certs.server_cert))
    monkeypatch.setenv("USHER_TLS_KEY", str(certs.server_key))
    app, address = await start(redis_server)
    yield address
    await app.stop()


async def test_tls_server_accepts_tls_clients_only(
    tls_scheduler: str, certs: CertificateFiles
) -> None:
    async with open_channel(tls_scheduler, ClientTls(certs.ca.read_bytes())) as channel:
        await submit_over(channel)
    async with grpc.aio.insecure_channel(tls_scheduler) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await submit_over(plain)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(
    certs: CertificateFiles,
    redis_server: RedisServer | ExternalRedis,
    redis_client: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("USHER_TLS_CERT", str(certs.server_cert))
    monkeypatch.setenv("USHER_TLS_KEY", str(certs.server_key))
    monkeypatch.setenv("USHER_TLS_CLIENT_CA", str(certs.ca))
    app, address = await start(redis_server)
    try:
        monkeypatch.setenv("USHER_TLS_CA", str(certs.ca))
        monkeypatch.setenv("USHER_TLS_CLIENT_CERT", str(certs.client_cert))
        monkeypatch.setenv("USHER_TLS_CLIENT_KEY", str(certs.client_key))
        async with open_channel(address, ClientTls.from_env()) as channel:
            await submit_over(channel)
        async with open_channel(address, ClientTls(certs.ca.read_bytes())) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await submit_over(no_cert)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop()
