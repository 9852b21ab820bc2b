"""A model picker's badges: from queue numbers (services/notifier/updates.py, pure), and on
a real Redis (what BadgeBoard reads of a model's queue)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from services.notifier import updates
from services.notifier.badges import BadgeBoard
from services.scheduler.store import FinishedWork, Lease, QueueStore
from tests.scheduler.factories import new_request
from usher import messages
from usher.queue.eta import ModelAverages
from usher.v1 import notifier_pb2, request_pb2

K = notifier_pb2
MODEL = "badge-model:1b"


async def one_slot(models: Sequence[str]) -> dict[str, int]:
    return dict.fromkeys(models, 1)


async def finish(store: QueueStore, lease: Lease) -> None:
    await store.finish(
        lease,
        FinishedWork(
            state=request_pb2.REQUEST_STATE_COMPLETED,
            result=request_pb2.RequestResult(text="ok").SerializeToString(),
            usage=request_pb2.Usage().SerializeToString(),
            output_tokens=1,
        ),
    )


async def test_external_runs_are_counted_apart_from_the_fleets_slots(store: QueueStore) -> None:
    """One slot; one request runs on it, another at the external provider (it holds a lease
    too). The badge said "2/1 running": it says 1 of 1 slots, +1 external; and once the
    local one ends, the model is available although the external run goes on."""
    local, outside = new_request(model=MODEL), new_request(model=MODEL)
    for request in (local, outside):
        await store.submit(request)
    assert await store.switch_to_external(MODEL, outside.id, "", is_admin=True) == "switched"
    local_lease = await store.claim(MODEL, "test")
    assert local_lease is not None and local_lease.request.id == local.id
    assert await store.claim(MODEL, "test", external=True) is not None
    board = BadgeBoard(store, capacity=one_slot)

    await board.refresh()
    (badge,) = board.current([MODEL])
    assert (badge.running, badge.capacity, badge.external_running) == (1, 1, 1)
    assert messages.running_phrase(badge.running, badge.capacity, badge.external_running) == (
        "1/1 running +1 external"
    )
    assert badge.level != notifier_pb2.QUEUE_LEVEL_AVAILABLE  # the one slot is taken

    await finish(store, local_lease)
    await board.refresh()
    (badge,) = board.current([MODEL])
    assert (badge.running, badge.external_running) == (0, 1)
    assert badge.level == notifier_pb2.QUEUE_LEVEL_AVAILABLE
    assert badge.label == f"{MODEL} (Available now)"


def test_the_running_phrase_names_external_runs_only_when_there_are_some() -> None:
    assert messages.running_phrase(2, 4) == "2/4 running"
    assert messages.running_phrase(0, 1, 0) == "0/1 running"
    assert messages.running_phrase(1, 1, 3) == "1/1 running +3 external"


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
