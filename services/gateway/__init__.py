"""The HTTP front door: Ollama- and OpenAI-compatible endpoints over Usher's gRPC services.

The gateway is a client of the Scheduler (Submit, Get, Cancel, queue admin), the Notifier
(Watch, for streamed output) and the Pool (which models the fleet has); it never queues or
schedules anything itself. One module per API, each with its route table: ``ollama_http``
(``/api/*``), ``openai_http`` (``/v1/*``), ``queue_http`` (``/queue/*``), ``admin_http``
(``/admin/*``); their pure translations ``ollama_shapes`` and ``openai_shapes``; the flow
they share in ``exchange`` (HTTP) and ``flow`` (gRPC); errors in ``errors``; the
application and ``serve()`` in ``app`` (see README.md for the rest).
"""

from __future__ import annotations

__all__: list[str] = []
