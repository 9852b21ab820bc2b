"""Counters an emulated instance keeps so tests and benchmarks can see what the
scheduler did (how many loads, evictions, the peak concurrency per model...).

Served as JSON by ``GET /_emulator/stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["EmulatorStats", "ModelStats"]


@dataclass
class _Counters:
    """What both an instance and each of its models count: loads and why models left,
    requests running now (and the most at once), tokens generated."""

    loads: int = 0
    unloads: int = 0
    #: Unloaded to make room for another model.
    evictions: int = 0
    #: Unloaded because a request needed different load options (num_ctx).
    reloads: int = 0
    #: Unloaded because its keep-alive ran out (or keep_alive was 0).
    expirations: int = 0
    in_flight: int = 0
    in_flight_max: int = 0
    tokens_generated: int = 0


@dataclass
class ModelStats(_Counters):
    """Per-model counters."""

    #: Requests that got a slot and started generating/embedding.
    requests: int = 0
    completed: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class EmulatorStats(_Counters):
    """Instance-wide counters plus a ``ModelStats`` per model name."""

    #: Every inference request that reached a handler (including rejected ones).
    requests_received: int = 0
    #: Inference requests that completed successfully (loads/unloads included).
    requests_served: int = 0
    requests_failed: int = 0
    #: 503 "server busy" rejections.
    requests_rejected: int = 0
    queue_depth: int = 0
    queue_depth_max: int = 0
    models: dict[str, ModelStats] = field(default_factory=dict)

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def started(self, name: str) -> None:
        """A request got a slot on ``name``."""
        m = self.model(name)
        m.requests += 1
        m.in_flight += 1
        m.in_flight_max = max(m.in_flight_max, m.in_flight)
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)

    def finished(self, name: str) -> None:
        m = self.model(name)
        m.in_flight -= 1
        self.in_flight -= 1

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth = depth
        self.queue_depth_max = max(self.queue_depth_max, depth)

    def reset(self) -> None:
        """Zero the counters but keep live gauges (in-flight, queue depth) truthful."""
        in_flight = {name: m.in_flight for name, m in self.models.items() if m.in_flight}
        total_in_flight, depth = self.in_flight, self.queue_depth
        for f in fields(self):
            if f.name != "models":
                setattr(self, f.name, 0)
        self.models = {}
        for name, n in in_flight.items():
            self.model(name).in_flight = n
        self.in_flight = total_in_flight
        self.queue_depth = depth

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["models"] = {name: m.to_dict() for name, m in sorted(self.models.items())}
        return out
