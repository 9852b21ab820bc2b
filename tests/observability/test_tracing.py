"""One trace id from the client, through Scheduler, across the Redis queue (producer →
consumer with a link), into the Pool and the HTTP call to the model server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.pool.app import PoolApp
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from tests.pool.conftest import fast_emulator_config
from tests.pool.test_pool_service import settings_for
from usher import tracing
from usher.auth import parse_token_map
from usher.emulator import EmulatorFleet
from usher.testing import free_port
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

TOKENS = "alice-token=alice@acme,svc-token=scheduler@usher:service,root-token=root@ops:admin"
_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        tracing.install_provider(provider)
    tracing.set_enabled(True)
    _EXPORTER.clear()
    try:
        yield _EXPORTER
    finally:
        tracing.set_enabled(False)


async def test_one_trace_across_every_service(
    spans: InMemorySpanExporter, redis_server: RedisServer | ExternalRedis, redis_client: object
) -> None:
    async with EmulatorFleet([fast_emulator_config()]) as fleet:
        pool_settings = settings_for(redis_server.url, fleet.urls).replace(
            tokens=parse_token_map(TOKENS)
        )
        pool = PoolApp(pool_settings)
        await pool.start()
        port = free_port()
        scheduler = SchedulerApp(
            SchedulerSettings(
                redis_url=redis_server.url,
                listen=f"127.0.0.1:{port}",
                tokens=parse_token_map(TOKENS),
                pool_address=pool_settings.listen,
                service_token="svc-token",
                dispatch_concurrency=2,
                shutdown_grace_seconds=0.5,
            )
        )
        await scheduler.start()
        try:
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", interceptors=tracing.client_interceptors()
            )
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            auth = (("authorization", "Bearer alice-token"),)
            with tracing.tracer("test-client").start_as_current_span("client.ask") as root:
                reply = await stub.Submit(
                    scheduler_pb2.SubmitRequest(
                        model="llama3.2:1b", generate=request_pb2.GenerateInput(prompt="trace me")
                    ),
                    metadata=auth,
                )
            for _ in range(100):
                got = await stub.Get(scheduler_pb2.GetRequest(id=reply.request.id), metadata=auth)
                if got.request.state == request_pb2.REQUEST_STATE_COMPLETED:
                    break
                await asyncio.sleep(0.05)
            assert got.request.state == request_pb2.REQUEST_STATE_COMPLETED
            await channel.close()
        finally:
            await scheduler.stop()
            await pool.stop()

    trace_id = root.get_span_context().trace_id
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    names = {s.name for s in mine}
    assert "client.ask" in names
    assert "/usher.v1.SchedulerService/Submit" in names
    assert "usher.enqueue" in names
    assert "/usher.v1.PoolService/Generate" in names
    assert any(s.kind == SpanKind.CLIENT and s.name.startswith("POST") for s in mine), names
    producer = next(s for s in mine if s.name == "usher.enqueue")
    consumer = next(s for s in mine if s.name == "usher.dispatch")
    assert producer.kind == SpanKind.PRODUCER and consumer.kind == SpanKind.CONSUMER
    assert [link.context.span_id for link in consumer.links] == [producer.context.span_id]


def test_log_lines_carry_the_trace(spans: InMemorySpanExporter) -> None:
    from usher.logs import add_trace_ids

    with tracing.tracer("t").start_as_current_span("work") as span:
        event = add_trace_ids(None, "info", {"event": "hello"})
    assert event["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert add_trace_ids(None, "info", {"event": "outside"}).get("trace_id") is None
