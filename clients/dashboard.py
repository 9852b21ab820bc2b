"""What ``usher top`` draws (pure): queue badges, the fleet's instances, per-model stats."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from clients.types import Badge, QueueLevel
from usher import messages
from usher.v1 import pool_pb2

__all__ = ["render_dashboard", "render_instances", "render_model_stats", "render_queues"]

_LEVEL_STYLE = {
    QueueLevel.AVAILABLE: "bold green",
    QueueLevel.SHORT: "green",
    QueueLevel.MEDIUM: "yellow",
    QueueLevel.LONG: "bold red",
}
_HEALTH = {
    pool_pb2.INSTANCE_HEALTH_HEALTHY: Text("healthy", "green"),
    pool_pb2.INSTANCE_HEALTH_UNHEALTHY: Text("unhealthy", "bold red"),
}
_CIRCUIT = {
    pool_pb2.CIRCUIT_STATE_CLOSED: Text("closed", "green"),
    pool_pb2.CIRCUIT_STATE_HALF_OPEN: Text("half-open", "yellow"),
    pool_pb2.CIRCUIT_STATE_OPEN: Text("open", "bold red"),
}


def _seconds(value: float) -> str:
    if value <= 0:
        return "-"
    if value < 10:
        return f"{value:.1f}s"
    return messages.duration_phrase(value)


def render_queues(badges: Sequence[Badge]) -> Table:
    table = Table(title="Queues", title_justify="left", expand=False)
    for column in ("model", "status", "queued", "running", "wait", "suggestion"):
        table.add_column(column, justify="right" if column in ("queued", "running") else "left")
    for badge in sorted(badges, key=lambda b: b.model):
        level = badge.level.name.lower() if badge.level != QueueLevel.UNSPECIFIED else "-"
        status = Text(level, _LEVEL_STYLE.get(badge.level, ""))
        if badge.queue_full:
            status = Text("full", "bold red")
        wait = (
            "now"
            if badge.level == QueueLevel.AVAILABLE
            else messages.wait_phrase(badge.wait.min_seconds, badge.wait.max_seconds)
        )
        table.add_row(
            badge.label or badge.model,
            status,
            str(badge.queued),
            messages.running_phrase(badge.running, badge.capacity, badge.external_running),
            wait,
            badge.suggestion,
        )
    if not badges:
        table.add_row("(no models yet)", "", "", "", "", "")
    return table


def render_instances(instances: Sequence[pool_pb2.InstanceStatus]) -> Table:
    table = Table(title="Instances", title_justify="left")
    for column in (
        "instance",
        "kind",
        "health",
        "circuit",
        "active",
        "loaded",
        "latency",
        "errors",
    ):
        table.add_column(column, justify="right" if column in ("active", "errors") else "left")
    for instance in sorted(instances, key=lambda i: i.config.id):
        kind = pool_pb2.InstanceKind.Name(instance.config.kind).removeprefix("INSTANCE_KIND_")
        name = Text(instance.config.id)
        if instance.draining:
            name.append(" (draining)", "yellow")
        if instance.config.external:
            name.append(" (external)", "cyan")
        health = _HEALTH.get(instance.health, Text("unknown", "dim"))
        if instance.last_error and instance.health != pool_pb2.INSTANCE_HEALTH_HEALTHY:
            health = Text.assemble(health, Text(f" {instance.last_error[:40]}", "dim"))
        circuit = _CIRCUIT.get(instance.circuit, Text("-", "dim"))
        open_models = [
            model
            for model, state in instance.model_circuits.items()
            if state != pool_pb2.CIRCUIT_STATE_CLOSED
        ]
        if open_models:
            circuit = Text.assemble(circuit, Text(f" ({', '.join(sorted(open_models))})", "red"))
        loaded = ", ".join(m.name for m in instance.loaded) or "-"
        latency = instance.recent_latency.ToMilliseconds()
        table.add_row(
            name,
            kind.lower(),
            health,
            circuit,
            f"{instance.active}/{instance.parallel}",
            loaded,
            f"{latency} ms" if latency else "-",
            f"{instance.recent_error_rate:.0%}",
        )
    return table


def render_model_stats(stats: Sequence[pool_pb2.ModelStats]) -> Table:
    table = Table(title="Models", title_justify="left")
    columns = ("model", "active", "queued", "capacity", "done", "failed", "wait", "took", "tok/s")
    for column in (*columns, "loaded on"):
        table.add_column(column, justify="left" if column in ("model", "loaded on") else "right")
    for stat in sorted(stats, key=lambda s: s.model):
        table.add_row(
            stat.model,
            str(stat.active),
            str(stat.queued),
            str(stat.capacity),
            str(stat.processed),
            str(stat.failed),
            _seconds(stat.avg_wait.ToMilliseconds() / 1000),
            _seconds(stat.avg_processing.ToMilliseconds() / 1000),
            f"{stat.tokens_per_second:.0f}" if stat.tokens_per_second else "-",
            ", ".join(stat.loaded_on) or "-",
        )
    return table


def render_dashboard(
    badges: Sequence[Badge],
    instances: Sequence[pool_pb2.InstanceStatus] | None = None,
    stats: Sequence[pool_pb2.ModelStats] | None = None,
    *,
    problems: Sequence[str] = (),
    now: datetime | None = None,
) -> RenderableType:
    """One frame: queues, then (with a Pool address) instances and model stats."""
    parts: list[RenderableType] = [render_queues(badges)]
    if instances is not None:
        parts.append(render_instances(instances))
    if stats is not None:
        parts.append(render_model_stats(stats))
    for problem in problems:
        parts.append(Text(problem, "bold red"))
    stamp = (now or datetime.now()).strftime("%H:%M:%S")
    parts.append(Text(f"usher top • {stamp} • Ctrl-C to quit", "dim"))
    return Group(*parts)
