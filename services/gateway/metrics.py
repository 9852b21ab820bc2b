"""The gateway's Prometheus metrics, in a registry of its own, served at ``GET /metrics``.

* ``usher_gateway_requests_total{route, method, status}``: HTTP requests answered
  (status 499: the client left first);
* ``usher_gateway_request_seconds{route}``: time to the end of the answer, streams included;
* ``usher_gateway_in_flight{route}``: requests being answered now;
* ``usher_gateway_queue_wait_seconds{api}``: queue wait of requests that started;
* ``usher_gateway_disconnects_total{route}``: clients that left early (request cancelled);
* ``usher_gateway_errors_total{code}``: error answers by machine-readable code.

Plus the standard ``process_*`` and ``python_*`` collectors.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    """One set per application (tests may build several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "usher_gateway_requests_total",
            "HTTP requests answered by the gateway.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "usher_gateway_request_seconds",
            "Seconds until the answer (a whole stream included) was sent.",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "usher_gateway_in_flight",
            "HTTP requests being answered now.",
            ["route"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "usher_gateway_queue_wait_seconds",
            "Queue wait of requests submitted through the gateway, when they started.",
            ["api"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.disconnects = Counter(
            "usher_gateway_disconnects_total",
            "Clients that went away before their answer was complete.",
            ["route"],
            registry=self.registry,
        )
        self.errors = Counter(
            "usher_gateway_errors_total",
            "Error answers by machine-readable code.",
            ["code"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
