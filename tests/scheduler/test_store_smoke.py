from __future__ import annotations

from services.scheduler.store import FinishedWork, QueueStore
from tests.scheduler.factories import new_request
from usher.v1 import request_pb2


async def test_submit_claim_finish(store: QueueStore) -> None:
    req = new_request()
    outcome = await store.submit(req)
    assert outcome.status == "queued"
    assert (outcome.position, outcome.queue_length) == (1, 1)
    got = await store.get(req.id)
    assert got is not None and got.state == request_pb2.REQUEST_STATE_QUEUED
    assert got.position == 1
    lease = await store.claim("llama3.2", "test")
    assert lease is not None and lease.request.id == req.id
    assert await store.finish(
        lease,
        FinishedWork(
            state=request_pb2.REQUEST_STATE_COMPLETED,
            actual_tokens=150,
            service_ms=1000,
            output_tokens=50,
            tokens_per_second=50,
        ),
    )
    got = await store.get(req.id)
    assert got is not None and got.state == request_pb2.REQUEST_STATE_COMPLETED
