"""The HTTP front door: Ollama- and OpenAI-compatible endpoints over Usher's gRPC services.

The gateway is a client of the Scheduler (Submit, Get, Cancel, queue admin), the Notifier
(Watch, for streamed output) and the Pool (which models the fleet has); it never queues or
schedules anything itself. Modules: ``settings`` (environment), ``translation`` (pure
JSON ⇄ protobuf functions and error mapping), ``backend`` (long-lived gRPC channels and the
model catalogue), ``flow`` (one request's submit → watch → cancel life), ``metrics``
(Prometheus), ``app`` (aiohttp routes) and ``__main__`` (``usher-gateway``).
"""

from __future__ import annotations

__all__: list[str] = []
