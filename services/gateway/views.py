"""Pure views of the fleet and the queues: Pool and Scheduler messages → JSON bodies.

``/api/tags``, ``/api/ps``, ``/v1/models`` and a synthesized ``/api/show`` come from
``PoolService.ListInstances``; ``/queue/stats`` (the Guard Proxy's shape) from
``SchedulerAdminService.GetQueueStats`` joined with ``PoolService.GetModelStats``;
``/queue/memory`` from psutil figures.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from services.gateway.ollama_shapes import ollama_timestamp
from usher.v1 import pool_pb2, scheduler_pb2

__all__ = [
    "GIB",
    "catalogue",
    "display_name",
    "memory_body",
    "model_queue_stats",
    "openai_models_body",
    "ps_body",
    "public_queue_stats",
    "queue_stats_body",
    "resolve_model",
    "synthesized_show",
    "tags_body",
]

GIB = 1024**3
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def display_name(name: str) -> str:
    """The name with its tag, as Ollama shows it (``nomic-embed-text`` → ``...:latest``)."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def _local(instances: Sequence[pool_pb2.InstanceStatus]) -> list[pool_pb2.InstanceStatus]:
    """Instances of the local fleet (external providers serve only the external lane)."""
    return [s for s in instances if not s.config.external]


def catalogue(instances: Sequence[pool_pb2.InstanceStatus]) -> dict[str, list[str]]:
    """Model → ids of the local instances that have it, in instance order."""
    out: dict[str, list[str]] = {}
    for status in _local(instances):
        for model in status.available_models:
            out.setdefault(model, []).append(status.config.id)
        for loaded in status.loaded:
            ids = out.setdefault(loaded.name, [])
            if status.config.id not in ids:
                ids.append(status.config.id)
    return out


def resolve_model(name: str, known: Collection[str]) -> str | None:
    """The fleet's name for ``name`` (Ollama matches ``x`` and ``x:latest``), or None."""
    if name in known:
        return name
    alternative = display_name(name)
    if alternative != name and alternative in known:
        return alternative
    if name.endswith(":latest") and name.removesuffix(":latest") in known:
        return name.removesuffix(":latest")
    lowered = {k.lower(): k for k in known}
    return lowered.get(name.lower()) or lowered.get(alternative.lower())


def _details(entry: Mapping[str, Any] | None) -> dict[str, Any]:
    details = entry.get("details") if entry else None
    if isinstance(details, dict):
        return dict(details)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def tags_body(
    instances: Sequence[pool_pb2.InstanceStatus],
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``/api/tags`` across the fleet: every model any local instance has, once.

    ``metadata`` (model → an instance's own ``/api/tags`` entry) fills size, digest and
    details where known; otherwise the size of a loaded copy is used.
    """
    metadata = metadata or {}
    sizes: dict[str, int] = {}
    for status in _local(instances):
        for loaded in status.loaded:
            sizes[loaded.name] = max(sizes.get(loaded.name, 0), int(loaded.size_bytes))
    models = []
    for model in sorted(catalogue(instances)):
        entry = metadata.get(model)
        models.append(
            {
                "name": model,
                "model": model,
                "modified_at": str(entry.get("modified_at"))
                if entry and entry.get("modified_at")
                else ollama_timestamp(_EPOCH),
                "size": int(entry.get("size", 0)) if entry else sizes.get(model, 0),
                "digest": str(entry.get("digest", "")) if entry else "",
                "details": _details(entry),
            }
        )
    return {"models": models}


def ps_body(
    instances: Sequence[pool_pb2.InstanceStatus],
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``/api/ps`` across the fleet: one entry per loaded model, with the instances that
    hold it (``instances``, an Usher addition) and the latest expiry."""
    metadata = metadata or {}
    merged: dict[str, dict[str, Any]] = {}
    for status in _local(instances):
        for loaded in status.loaded:
            expires = (
                loaded.expires_at.ToDatetime(tzinfo=UTC) if loaded.HasField("expires_at") else None
            )
            entry = merged.get(loaded.name)
            if entry is None:
                meta = metadata.get(loaded.name)
                entry = {
                    "name": loaded.name,
                    "model": loaded.name,
                    "size": int(loaded.size_bytes),
                    "digest": str(meta.get("digest", "")) if meta else "",
                    "details": _details(meta),
                    "expires_at": expires,
                    "size_vram": int(loaded.size_vram_bytes),
                    "context_length": int(loaded.context_length),
                    "instances": [status.config.id],
                }
                merged[loaded.name] = entry
                continue
            entry["instances"].append(status.config.id)
            entry["size"] = max(entry["size"], int(loaded.size_bytes))
            entry["size_vram"] = max(entry["size_vram"], int(loaded.size_vram_bytes))
            if expires is not None and (
                entry["expires_at"] is None or expires > entry["expires_at"]
            ):
                entry["expires_at"] = expires
    models = []
    for name in sorted(merged):
        entry = merged[name]
        expires_at = entry["expires_at"]
        entry["expires_at"] = ollama_timestamp(expires_at or _EPOCH)
        models.append(entry)
    return {"models": models}


def openai_models_body(instances: Sequence[pool_pb2.InstanceStatus]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "usher"}
            for model in sorted(catalogue(instances))
        ],
    }


def synthesized_show(model: str, instances: Sequence[pool_pb2.InstanceStatus]) -> dict[str, Any]:
    """A plausible ``/api/show`` when no instance could be asked."""
    context = 0
    for status in _local(instances):
        for loaded in status.loaded:
            if loaded.name == model:
                context = max(context, int(loaded.context_length))
    embedding = "embed" in model.lower()
    return {
        "license": "",
        "modelfile": f"# Modelfile synthesized by the Usher gateway\nFROM {model}\n",
        "parameters": "",
        "template": "" if embedding else "{{ .Prompt }}",
        "details": _details(None),
        "model_info": {"general.context_length": context} if context else {},
        "capabilities": ["embedding"] if embedding else ["completion"],
        "modified_at": ollama_timestamp(_EPOCH),
    }


# -- queue statistics --------------------------------------------------------------------


def model_queue_stats(
    model: str,
    queue: scheduler_pb2.QueueStats | None,
    fleet: pool_pb2.ModelStats | None,
    *,
    uptime_seconds: float,
    default_queue_limit: int = 0,
) -> dict[str, Any]:
    """One model in the Guard Proxy's ``/queue/stats`` shape (plus a few Usher extras).

    A model the Scheduler has not seen yet (no ``queue``) shows the default queue limit.
    """
    parallel = int(fleet.capacity) if fleet is not None and fleet.capacity else 0
    if not parallel and queue is not None:
        parallel = int(queue.config.parallel)
    limit = int(queue.config.max_queue_size) if queue is not None else default_queue_limit
    if queue is not None:
        active, queued = int(queue.running), int(queue.queued)
    elif fleet is not None:
        active, queued = int(fleet.active), int(fleet.queued)
    else:
        active = queued = 0
    processed = int(queue.completed) if queue is not None else int(fleet.processed if fleet else 0)
    rejected = int(queue.rejected) if queue is not None else int(fleet.rejected if fleet else 0)
    wait_ms = queue.avg_queue_wait.ToMilliseconds() if queue is not None else 0
    processing_ms = queue.avg_service_time.ToMilliseconds() if queue is not None else 0
    if fleet is not None and not processing_ms:
        processing_ms = fleet.avg_processing.ToMilliseconds()
    out: dict[str, Any] = {
        "model": model,
        "parallel_limit": parallel,
        "queue_limit": limit,
        "active_requests": active,
        "queued_requests": queued,
        "available_slots": max(0, parallel - active),
        "queue_available": max(0, limit - queued),
        "total_processed": processed,
        "total_rejected": rejected,
        "avg_wait_time_ms": round(float(wait_ms), 1),
        "avg_processing_time_ms": round(float(processing_ms), 1),
        "uptime_seconds": int(uptime_seconds),
    }
    if queue is not None:
        out["failed"] = int(queue.failed)
        out["cancelled"] = int(queue.cancelled)
        out["expired"] = int(queue.expired)
        out["queue_timeout_seconds"] = queue.config.queue_timeout.ToMilliseconds() / 1000
    if fleet is not None:
        out["loaded_on"] = list(fleet.loaded_on)
        out["tokens_per_second"] = round(float(fleet.tokens_per_second), 2)
    return out


def queue_stats_body(
    queues: Sequence[scheduler_pb2.QueueStats],
    fleet: Sequence[pool_pb2.ModelStats],
    *,
    default_parallel: int,
    default_queue_limit: int,
    uptime_seconds: float,
) -> dict[str, Any]:
    """The Guard Proxy's ``/queue/stats`` envelope over every model either side knows."""
    by_queue = {q.config.model: q for q in queues}
    by_fleet = {f.model: f for f in fleet}
    models = {
        model: model_queue_stats(
            model,
            by_queue.get(model),
            by_fleet.get(model),
            uptime_seconds=uptime_seconds,
            default_queue_limit=default_queue_limit,
        )
        for model in sorted(set(by_queue) | set(by_fleet))
    }
    return {
        "default_parallel": default_parallel,
        "default_queue_limit": default_queue_limit,
        "total_models": len(models),
        "models": models,
    }


def memory_body(
    total_bytes: int, available_bytes: int, used_bytes: int, percent: float, recommended: int
) -> dict[str, Any]:
    """``/queue/memory``: figures in GiB, one decimal, as the Guard Proxy printed them."""
    return {
        "total_gb": round(total_bytes / GIB, 1),
        "available_gb": round(available_bytes / GIB, 1),
        "used_gb": round(used_bytes / GIB, 1),
        "percent": round(float(percent), 1),
        "recommended_parallel": recommended,
    }


#: What anyone may see of a model's queue (what a model picker's badge shows); counters of
#: outcomes, failures and placements are for operators.
PUBLIC_QUEUE_FIELDS = (
    "model",
    "parallel_limit",
    "queue_limit",
    "active_requests",
    "queued_requests",
    "available_slots",
    "queue_available",
    "avg_wait_time_ms",
)


def public_queue_stats(body: Mapping[str, Any]) -> dict[str, Any]:
    """``/queue/stats`` for callers who are not operators: the badge figures only."""
    models = {
        name: {k: v for k, v in stats.items() if k in PUBLIC_QUEUE_FIELDS}
        for name, stats in body.get("models", {}).items()
    }
    return {**body, "models": models, "scope": "public"}
