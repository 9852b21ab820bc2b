"""Retries and dead letters through real processes: a request whose model server keeps
failing is retried with exponential backoff and jitter, lands on the dead-letter list with
its cause after its last attempt, and RetryDeadLetter runs it again once the server heals."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import httpx
import pytest
import redis.asyncio as aioredis

from clients.aio import AsyncUsherClient
from clients.types import RequestState
from usher.keys import ModelKeys
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
BACKOFF = 0.4


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=("--fleet", "1", "--instant", "--parallel", "2"),
        scheduler_env={
            "USHER_MAX_ATTEMPTS": "3",
            "USHER_RETRY_BACKOFF_SECONDS": str(BACKOFF),
            "USHER_RETRY_BACKOFF_MAX_SECONDS": "5",
        },
        pool_env={"USHER_CIRCUIT_FAILURE_THRESHOLD": "100"},
    )
    with LocalStack(config) as running:
        yield running


async def test_a_failing_request_backs_off_dead_letters_with_its_cause_and_can_be_retried(
    stack: LocalStack,
) -> None:
    server = stack.model_urls[0]
    async with httpx.AsyncClient() as http:
        await http.post(
            f"{server}/_emulator/faults",
            json={"fail_next": 1000, "fail_status": 500, "fail_message": "GPU fell off the bus"},
        )
    async with (
        AsyncUsherClient(
            stack.scheduler_address, stack.notifier_address, token="alice-token"
        ) as alice,
        AsyncUsherClient(
            stack.scheduler_address, stack.notifier_address, token="admin-token"
        ) as admin,
    ):
        final = await alice.submit_and_wait(MODEL, "doomed", wait_timeout=30, check=False)
        assert final.state == RequestState.FAILED
        assert "GPU fell off the bus" in final.error
        assert final.attempts == 3

        redis = aioredis.from_url(stack.redis_url)
        try:
            # The model's stream has every state event of the request; its own stream lacks
            # its first (its queuing, or its running when a claim took it at once).
            events = [
                (entry_id, fields)
                for entry_id, fields in cast(
                    list[tuple[bytes, dict[bytes, bytes]]],
                    await redis.xrange(ModelKeys(MODEL).events),
                )
                if fields[b"id"] == final.id.encode()
            ]
        finally:
            await redis.aclose()
        if events[0][1][b"type"] == b"queued":
            del events[0]  # queued, then claimed: its first running follows
        kinds = [(fields[b"type"].decode(), int(fields[b"ts"])) for _, fields in events]
        starts = [ts for kind, ts in kinds if kind == "running"]
        requeues = [ts for kind, ts in kinds if kind == "requeued"]
        assert len(starts) == 3 and len(requeues) == 2, kinds
        # Each attempt failed at once and was QUEUED again at once (watchers see it waiting,
        # not running; it held no lease), out of line for its backoff (jittered in the
        # upper half of 0.4 s, then of 0.8 s), then back in line ("queued") and run.
        assert [k for k, _ in kinds if k in ("running", "requeued", "queued")] == [
            "running",
            "requeued",
            "queued",
            "running",
            "requeued",
            "queued",
            "running",
        ], kinds
        requeued = [f for _, f in events if f[b"type"] == b"requeued"]
        assert all(f[b"state"] == str(int(RequestState.QUEUED)).encode() for f in requeued)
        assert all(int(f[b"retry_at_ms"]) > int(f[b"ts"]) for f in requeued)
        assert starts[1] - requeues[0] >= BACKOFF / 2 * 1000
        assert starts[2] - requeues[1] >= BACKOFF * 1000

        dead = await admin.admin.dead_letters(MODEL)
        assert [(r.id, r.error) for r in dead] == [(final.id, final.error)]

        async with httpx.AsyncClient() as http:
            await http.delete(f"{server}/_emulator/faults")
        retried = await admin.admin.retry_dead_letter(final.id)
        assert retried.state == RequestState.QUEUED
        done = await alice.wait(final.id, timeout=30)
        assert done.state == RequestState.COMPLETED and done.text
        assert await admin.admin.dead_letters(MODEL) == ()
