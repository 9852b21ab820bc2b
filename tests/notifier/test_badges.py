"""A model picker's badges from queue numbers (services/notifier/updates.py, pure)."""

from __future__ import annotations

import re

from services.notifier import updates
from usher.queue.eta import ModelAverages
from usher.v1 import notifier_pb2

K = notifier_pb2


def _badge(queued: int, running: int, *, seconds: float = 60.0, limit: int = 100) -> str:
    badge = updates.badge(
        updates.BadgeInputs(
            model="qwq",
            queued=queued,
            running=running,
            capacity=1,
            averages=ModelAverages(service_seconds=seconds),
            max_queue_size=limit,
        )
    )
    return f"{K.QueueLevel.Name(badge.level)} {badge.label}"


def test_each_level_has_its_label() -> None:
    assert _badge(0, 0) == "QUEUE_LEVEL_AVAILABLE qwq (Available now)"
    assert _badge(1, 1, seconds=20) == "QUEUE_LEVEL_SHORT qwq (1 in queue)"
    assert re.fullmatch(r"QUEUE_LEVEL_LONG qwq \(8 in queue - \d+\+ min wait\)", _badge(8, 1))
    assert re.fullmatch(
        r"QUEUE_LEVEL_\w+ qwq \(Queue full - .+ wait\)", _badge(5, 1, seconds=20, limit=5)
    )
