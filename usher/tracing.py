"""OpenTelemetry tracing: one trace per request, from the client across the Redis queue to
the model server.

gRPC calls carry W3C trace context in metadata (opentelemetry-instrumentation-grpc); the
Scheduler stores the producer span's ``traceparent`` with the request, and the dispatcher
that later claims it starts a consumer span in that trace (with a link to the producer, as
messaging conventions ask); the Pool's HTTP calls carry it on to the model server
(opentelemetry-instrumentation-httpx).

Tracing is on when the standard OTEL_* variables ask for an exporter
(``OTEL_TRACES_EXPORTER`` = otlp | console, or ``OTEL_EXPORTER_OTLP_ENDPOINT``), or when a
test installs a provider with ``install_provider``. Off, it costs nothing: no interceptors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import httpx
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind

__all__ = [
    "client_interceptors",
    "configure_tracing",
    "consumer_span",
    "current_traceparent",
    "enabled",
    "http_client_span",
    "install_provider",
    "instrument_httpx",
    "server_interceptors",
    "set_enabled",
    "start_consumer_span",
    "tracer",
]

_enabled = False


def enabled() -> bool:
    return _enabled


def install_provider(provider: TracerProvider) -> None:
    """Use ``provider`` for every span of this process (tests pass one with an in-memory
    exporter). OpenTelemetry accepts one global provider per process."""
    trace.set_tracer_provider(provider)
    set_enabled(True)


def set_enabled(on: bool) -> None:
    """Whether servers and channels built from now on carry trace context."""
    global _enabled
    _enabled = on


def configure_tracing(service_name: str) -> bool:
    """Set up the exporter named by the standard environment; True when tracing is on."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if not exporter_name and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        exporter_name = "otlp"
    if exporter_name in ("", "none"):
        return False
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install_provider(provider)
    return True


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]


def instrument_httpx(client: httpx.AsyncClient) -> None:
    if _enabled:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client)


@contextmanager
def http_client_span(method: str, url: str, headers: dict[str, str]) -> Iterator[None]:
    """A CLIENT span for an HTTP call made without an instrumented client (the Pool's
    aiohttp calls to model servers), its context injected into ``headers``; nothing at all
    when tracing is off."""
    if not _enabled:
        yield
        return
    attributes = {"http.request.method": method, "url.full": url}
    with tracer("usher.http").start_as_current_span(
        method, kind=SpanKind.CLIENT, attributes=attributes
    ):
        propagate.inject(headers)
        yield


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def start_consumer_span(name: str, traceparent: str, attributes: dict[str, Any]) -> Span:
    """A CONSUMER span continuing the trace stored with a queued request, linked to the
    producer span that queued it; started, not made current, and ended by its caller
    (``trace.use_span``): for work that begins in one task and goes on in another."""
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else context.Context()
    producer = trace.get_current_span(parent).get_span_context()
    links = [Link(producer)] if producer.is_valid else []
    return tracer("usher").start_span(
        name, context=parent, kind=SpanKind.CONSUMER, links=links, attributes=attributes
    )


@contextmanager
def consumer_span(name: str, traceparent: str, attributes: dict[str, Any]) -> Iterator[Span]:
    """``start_consumer_span``'s span, current while the block runs and ended after it."""
    with trace.use_span(
        start_consumer_span(name, traceparent, attributes), end_on_exit=True
    ) as span:
        yield span
