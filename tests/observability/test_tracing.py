"""One trace id from the client, through Scheduler, across the Redis queue (producer →
consumer with a link), into the Pool and the HTTP call to the model server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.pool.app import PoolApp
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from tests.pool.conftest import fast_emulator_config
from tests.pool.test_pool_service import settings_for
from usher import metrics, tracing
from usher.auth import parse_token_map
from usher.emulator import EmulatorFleet
from usher.testing import free_port
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

TOKENS = "alice-token=alice@acme,svc-token=scheduler@usher:service,root-token=root@ops:admin"
MODEL = "llama3.2:1b"
AUTH = (("authorization", "Bearer alice-token"),)
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


@contextlib.asynccontextmanager
async def scheduler_on_a_pool(
    redis_url: str, model_urls: list[str]
) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    """A Scheduler and a Pool, each a gRPC server on its own port, and a traced client's
    stub of the Scheduler."""
    pool_settings = settings_for(redis_url, model_urls).replace(tokens=parse_token_map(TOKENS))
    pool = PoolApp(pool_settings)
    await pool.start()
    port = free_port()
    scheduler = SchedulerApp(
        SchedulerSettings(
            redis_url=redis_url,
            listen=f"127.0.0.1:{port}",
            tokens=parse_token_map(TOKENS),
            pool_address=pool_settings.listen,
            service_token="svc-token",
            dispatch_concurrency=2,
            shutdown_grace_seconds=0.5,
        )
    )
    await scheduler.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=tracing.client_interceptors()
    )
    try:
        yield scheduler_pb2_grpc.SchedulerServiceStub(channel)
    finally:
        await channel.close()
        await scheduler.stop()
        await pool.stop()


async def test_one_trace_across_every_service(
    spans: InMemorySpanExporter, redis_server: RedisServer | ExternalRedis, redis_client: object
) -> None:
    async with (
        EmulatorFleet([fast_emulator_config()]) as fleet,
        scheduler_on_a_pool(redis_server.url, fleet.urls) as stub,
    ):
        with tracing.tracer("test-client").start_as_current_span("client.ask") as root:
            reply = await stub.Submit(
                scheduler_pb2.SubmitRequest(
                    model=MODEL, generate=request_pb2.GenerateInput(prompt="trace me")
                ),
                metadata=AUTH,
            )
        for _ in range(100):
            got = await stub.Get(scheduler_pb2.GetRequest(id=reply.request.id), metadata=AUTH)
            if got.request.state == request_pb2.REQUEST_STATE_COMPLETED:
                break
            await asyncio.sleep(0.05)
        assert got.request.state == request_pb2.REQUEST_STATE_COMPLETED

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


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


async def test_a_request_started_early_runs_under_its_dispatch_span(
    spans: InMemorySpanExporter, redis_server: RedisServer | ExternalRedis, redis_client: object
) -> None:
    """A Submit waiting for its answer has its Generate sent beside its enqueue (the early
    start): that Generate hangs under the request's ``usher.dispatch`` span, as a claimed
    request's does, not under the enqueue that sent it."""
    confirmed = metrics.EARLY_STARTS.labels(MODEL, "confirmed")
    before = confirmed._value.get()
    async with (
        EmulatorFleet([fast_emulator_config()]) as fleet,
        scheduler_on_a_pool(redis_server.url, fleet.urls) as stub,
    ):
        for n in range(4):
            with tracing.tracer("test-client").start_as_current_span("client.ask"):
                reply = await stub.Submit(
                    scheduler_pb2.SubmitRequest(
                        model=MODEL,
                        generate=request_pb2.GenerateInput(prompt=f"trace me {n}"),
                        result_only=True,
                        await_result=duration_pb2.Duration(seconds=10),
                    ),
                    metadata=AUTH,
                )
            assert reply.request.state == request_pb2.REQUEST_STATE_COMPLETED
    assert confirmed._value.get() > before, "no Submit was started early"
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    generates = [
        s
        for s in finished
        if s.name.startswith("/usher.v1.PoolService/Generate") and s.kind == SpanKind.SERVER
    ]
    assert len(generates) == 4
    for generate in generates:
        chain = _ancestors(generate, by_id)
        # Generate ← usher.dispatch ← usher.enqueue (the consumer's parent is its producer).
        assert [n for n in chain if n.startswith("usher.")] == [
            "usher.dispatch",
            "usher.enqueue",
        ], chain
        assert chain[-1] == "client.ask", chain
    dispatches = [s for s in finished if s.name == "usher.dispatch"]
    assert len(dispatches) == 4 and all(s.end_time is not None for s in dispatches)


def test_log_lines_carry_the_trace(spans: InMemorySpanExporter) -> None:
    from usher.logs import add_trace_ids

    with tracing.tracer("t").start_as_current_span("work") as span:
        event = add_trace_ids(None, "info", {"event": "hello"})
    assert event["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert add_trace_ids(None, "info", {"event": "outside"}).get("trace_id") is None
