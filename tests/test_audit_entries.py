"""The audit log's events share stream entries (one XADD per flush and stream), and read
back one by one, in order, paged by their ids."""

from __future__ import annotations

import redis.asyncio as aioredis

from usher import keys
from usher.audit import EVENTS_PER_ENTRY, AuditLog


async def test_a_flush_writes_its_events_in_few_entries_and_pages_read_them_back(
    redis_client: aioredis.Redis,
) -> None:
    audit = AuditLog(redis_client)
    audit.record("acme/alice", "submit", "r0")
    await audit.flush()  # a lone event: an entry of its own, as before
    for i in range(1, EVENTS_PER_ENTRY + 5):
        audit.record("acme/alice", "submit", f"r{i}")
    audit.record("ops/root", "admin.pause_queue", "m", admin=True)
    await audit.flush()
    assert await redis_client.xlen(keys.AUDIT_ACTIVITY) == 3
    assert await redis_client.xlen(keys.AUDIT) == 1
    assert "m" in [e.target for e in await audit.recent(100)]
    targets: list[str] = []
    before = ""
    while page := await audit.recent(7, before):
        targets += [e.target for e in page if e.action == "submit"]
        before = page[-1].id
    assert targets == [f"r{i}" for i in reversed(range(EVENTS_PER_ENTRY + 5))]
    assert len(await audit.recent(100)) == EVENTS_PER_ENTRY + 6
