"""Every Prometheus metric Usher exposes, in one place (the contract in deploy/METRICS.md).

Each service serves ``/metrics`` on ``USHER_METRICS_PORT`` (0 = off). Counters and
histograms are updated where things happen; gauges that describe Redis state (queue depth,
slots in use) are refreshed by a small loop, since Prometheus collectors cannot await.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from usher.settings import UsherSettings

__all__ = [
    "CIRCUIT_STATE",
    "DEDUP_HITS",
    "DISPATCH_LOOPS",
    "EARLY_STARTS",
    "ETA_ERROR",
    "FANOUT_LAG",
    "GRPC_CALLS",
    "INSTANCE_UP",
    "MODELS_LOADED",
    "POOL_REQUESTS",
    "PROCESSING_SECONDS",
    "QUEUE_DEPTH",
    "QUEUE_LIMIT",
    "QUEUE_RUNNING",
    "QUEUE_WAIT",
    "REJECTED",
    "REQUESTS",
    "SLOTS_IN_USE",
    "SLOTS_TOTAL",
    "SLOT_HOLDS",
    "SUBMITTED",
    "SUBMIT_AWAITED",
    "TIME_TO_FIRST_TOKEN",
    "WATCHERS",
    "WATCH_UPDATES",
    "Children",
    "MetricsSettings",
    "metrics_host",
    "serve_metrics",
]

# Seconds from a few milliseconds to an hour: queue waits and generations both span that.
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)

_M = TypeVar("_M", bound=MetricWrapperBase)


class Children(Generic[_M]):
    """A labelled metric's children, each looked up once: ``labels()`` checks the names
    and takes a lock on every call, a cost paid per request on the hot paths."""

    def __init__(self, metric: _M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *labels: str) -> _M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


# ---- Every service ---------------------------------------------------------------------------
GRPC_CALLS = Counter(
    "usher_grpc_server_calls_total",
    "gRPC calls this replica received, by method (how evenly replicas share the load); in "
    "usher serve, also the calls its services make to one another in process.",
    ["method"],
)

# ---- Scheduler ----------------------------------------------------------------------------
SUBMITTED = Counter(
    "usher_submitted_total",
    "Submit calls by result (queued, deduplicated, replayed, rejected).",
    ["model", "result"],
)
REQUESTS = Counter(
    "usher_requests_total",
    "Requests that reached a terminal state, by outcome.",
    ["model", "outcome"],
)
REJECTED = Counter("usher_rejected_total", "Requests refused, by reason.", ["model", "reason"])
DEDUP_HITS = Counter(
    "usher_dedup_hits_total", "Submits that joined an identical live request.", ["model"]
)
SUBMIT_AWAITED = Counter(
    "usher_submit_awaited_total",
    "Submits asked to wait for their request's end (await_result), by how the wait went.",
    ["model", "outcome"],
)
EARLY_STARTS = Counter(
    "usher_early_starts_total",
    "Generates sent beside their request's enqueue, by whether the claim then took it.",
    ["model", "outcome"],
)
DISPATCH_LOOPS = Gauge(
    "usher_dispatch_loops",
    "Requests this Scheduler replica can run at once (its dispatch loops).",
)
QUEUE_DEPTH = Gauge("usher_queue_depth", "Requests waiting in the model's queue.", ["model"])
QUEUE_RUNNING = Gauge("usher_queue_running", "Requests of the model being run.", ["model"])
QUEUE_LIMIT = Gauge("usher_queue_limit", "The model's queue size limit.", ["model"])
QUEUE_WAIT = Histogram(
    "usher_queue_wait_seconds", "Time from submit to dispatch.", ["model"], buckets=_LATENCY_BUCKETS
)
PROCESSING_SECONDS = Histogram(
    "usher_processing_seconds",
    "Time from dispatch to the end of the answer.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
SLOT_HOLDS = Counter(
    "usher_slot_holds_total",
    "Slots held for a tenant's next request (anticipatory idling), by how the hold ended.",
    ["model", "outcome"],
)
ETA_ERROR = Histogram(
    "usher_eta_error_seconds",
    "Actual wait minus the wait promised at submit (absolute).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)

# ---- Pool ---------------------------------------------------------------------------------
INSTANCE_UP = Gauge(
    "usher_pool_instance_up", "1 when the instance passes health checks.", ["instance"]
)
CIRCUIT_STATE = Gauge(
    "usher_pool_circuit_state",
    "Circuit of an instance: 0 closed, 1 half-open, 2 open.",
    ["instance"],
)
SLOTS_IN_USE = Gauge("usher_slots_in_use", "Slots held now.", ["instance", "model"])
SLOTS_TOTAL = Gauge("usher_slots_total", "Slots an instance offers per model.", ["instance"])
MODELS_LOADED = Gauge("usher_models_loaded", "Models loaded on the instance.", ["instance"])
POOL_REQUESTS = Counter(
    "usher_pool_requests_total",
    "Generate calls by instance and outcome.",
    ["instance", "model", "outcome"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "usher_time_to_first_token_seconds",
    "From the upstream call to its first token.",
    ["instance", "model"],
    buckets=_LATENCY_BUCKETS,
)

# ---- Notifier -----------------------------------------------------------------------------
WATCHERS = Gauge("usher_notifier_watchers", "Open Watch streams on this replica.")
WATCH_UPDATES = Counter("usher_notifier_updates_total", "Updates sent to watchers.", ["kind"])
FANOUT_LAG = Histogram(
    "usher_notifier_fanout_lag_seconds",
    "From an event's append in Redis to its dispatch here.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class MetricsSettings(UsherSettings):
    #: The host /metrics listens on; empty = the host of the service's own address.
    metrics_host: str = ""


def metrics_host(listen: str, env: Mapping[str, str] | None = None) -> str:
    """Where /metrics listens: ``USHER_METRICS_HOST`` when set, else the host of the
    service's own address (``listen``), so a service kept on loopback keeps its metrics
    there too."""
    explicit = MetricsSettings.from_env(env).metrics_host
    if explicit:
        return explicit.strip("[]")
    host = listen.rpartition(":")[0].strip("[]")
    return host or "0.0.0.0"


def serve_metrics(port: int, address: str = "127.0.0.1") -> None:
    """Serve /metrics on ``address``:``port`` (port 0 = don't)."""
    if port:
        start_http_server(port, addr=address)
