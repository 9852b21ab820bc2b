"""The SDK against a running Usher: results, streamed tokens, resumed watches, retries after
a full queue, typed errors, and the blocking client."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis

from clients.aio import AsyncUsherClient
from clients.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from clients.retry import RetryEvent, RetryPolicy
from clients.sync import UsherClient
from clients.types import (
    QueueLevel,
    RequestKind,
    RequestState,
    Update,
    UpdateKind,
)
from tests.clients.helpers import MODEL, wait_for_state
from usher.keys import ModelKeys
from usher.testing.processes import ServiceProcess
from usher.testing.stack import LocalStack

pytestmark = pytest.mark.slow


async def test_submit_and_wait_returns_the_completed_request(alice: AsyncUsherClient) -> None:
    request = await alice.submit_and_wait(MODEL, "Why is the sky blue?", num_predict=20)
    assert request.state == RequestState.COMPLETED
    assert request.kind == RequestKind.GENERATE
    assert request.text and request.result is not None
    assert request.result.served_by_instance == "ollama-0"
    assert request.usage is not None and request.usage.completion_tokens == 20
    assert (request.user, request.organization) == ("alice", "acme")
    assert request.status_message().startswith("Your response is ready! Processing took")
    assert request.raw.id == request.id  # the proto stays at hand


async def test_submit_and_wait_stores_no_output_as_it_comes_unless_told(
    stack: LocalStack, alice: AsyncUsherClient
) -> None:
    """submit_and_wait submits result only: no token events are written for it (a watch
    after the end still gets all of the text); ``result_only=False`` writes them."""
    quiet = await alice.submit_and_wait(MODEL, "quiet", num_predict=12)
    told = await alice.submit_and_wait(MODEL, "told", num_predict=12, result_only=False)
    with redis.Redis.from_url(stack.redis_url) as client:
        kinds = {
            request.id: {
                fields[b"type"]
                for _, fields in client.xrange(ModelKeys(request.model).request_events(request.id))
            }
            for request in (quiet, told)
        }
    assert b"tokens" not in kinds[quiet.id]
    assert b"tokens" in kinds[told.id]
    (snapshot,) = [u async for u in alice.watch(quiet.id)]
    assert snapshot.kind == UpdateKind.COMPLETED
    assert snapshot.text_delta == quiet.text and quiet.text
    assert snapshot.completion_tokens == 12


async def test_chat_messages_with_a_system_prompt(alice: AsyncUsherClient) -> None:
    request = await alice.submit_and_wait(
        MODEL,
        messages=[{"role": "user", "content": "hello"}, ("assistant", "hi"), ("user", "more")],
        system="Be brief.",
        num_predict=10,
        priority="high",
        labels={"app": "tests"},
    )
    assert request.kind == RequestKind.CHAT
    assert request.state == RequestState.COMPLETED
    assert request.labels == {"app": "tests"}
    assert request.priority.label == "high"


async def test_streamed_tokens_join_to_the_final_text(alice: AsyncUsherClient) -> None:
    updates: list[Update] = []
    stream = alice.stream_tokens(MODEL, "Tell me a story", num_predict=60, on_update=updates.append)
    pieces = [piece async for piece in stream]
    assert len(pieces) > 1, "the answer should arrive in several pieces"
    assert stream.request is not None and stream.submission is not None
    assert "".join(pieces) == stream.request.text
    assert stream.request.id == stream.submission.id == stream.request_id
    assert updates[-1].kind == UpdateKind.COMPLETED


async def test_a_watch_survives_the_notifier_dying_mid_answer(
    stack: LocalStack, alice: AsyncUsherClient
) -> None:
    retries: list[RetryEvent] = []
    watcher = AsyncUsherClient(
        stack.scheduler_address,
        stack.notifier_address,
        token="alice-token",
        retry=RetryPolicy(max_total_wait=20.0, on_retry=retries.append),
    )
    submission = await alice.submit(MODEL, "A long answer, please", num_predict=250)
    updates: list[Update] = []
    restart: asyncio.Task[ServiceProcess] | None = None
    try:
        async with watcher:
            async for update in watcher.watch(submission.id):
                updates.append(update)
                if restart is None and update.kind == UpdateKind.PROGRESS:
                    stack.notifiers[0].kill()  # SIGKILL mid-answer: the stream drops
                    restart = asyncio.create_task(asyncio.to_thread(stack.start_notifier, 0))
    finally:
        # Even when the watch fails: a restart still under way after the stack stops
        # would leave a Notifier running after the suite.
        if restart is not None:
            await restart
    assert restart is not None
    assert any(r.method == "Watch" for r in retries), "the stream should have been resumed"
    ids = [u.event_id for u in updates if u.event_id]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    final = updates[-1]
    assert final.kind == UpdateKind.COMPLETED
    assert "".join(u.text_delta for u in updates) == final.request.text
    assert final.request.usage is not None and final.request.usage.completion_tokens == 250


async def test_resuming_from_an_event_id_replays_only_what_followed(
    alice: AsyncUsherClient,
) -> None:
    request = await alice.submit_and_wait(MODEL, "Replay me", num_predict=30)
    everything = [u async for u in alice.watch(request.id)]
    assert [u.kind for u in everything] == [UpdateKind.COMPLETED]  # a finished request
    first = everything[0]
    assert first.text_delta == request.text  # the snapshot carries all output


async def test_a_full_queue_is_retried_when_retry_info_says(
    stack: LocalStack, bob: AsyncUsherClient, operator: AsyncUsherClient
) -> None:
    model = "qwen2.5:0.5b"
    # One short request first, so the scheduler knows how long this model's requests take
    # (RetryInfo says about one service time per slot, at least a second).
    await bob.submit_and_wait(model, "warm up", num_predict=5)
    config = await operator.admin.update_queue_config(model, max_queue_size=1)
    assert config.max_queue_size == 1
    try:
        # Two requests hold both slots, a third waits: the queue (of one) is full.
        for i in (1, 2):
            blocker = await bob.submit(model, f"blocker {i}", num_predict=100)
            await wait_for_state(bob, blocker.id, RequestState.RUNNING, RequestState.COMPLETED)
        await bob.submit(model, "waiting", num_predict=10)

        impatient = AsyncUsherClient(
            stack.scheduler_address,
            stack.notifier_address,
            token="carol-token",
            retry=RetryPolicy(max_total_wait=0.5),
        )
        async with impatient:
            with pytest.raises(ResourceExhausted) as refused:
                await impatient.submit(model, "no room", num_predict=10)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.retry_after is not None and 1.0 <= refused.value.retry_after < 5
        assert "full" in refused.value.message
        assert "retry in" in refused.value.describe()

        retries: list[RetryEvent] = []
        patient = AsyncUsherClient(
            stack.scheduler_address,
            stack.notifier_address,
            token="carol-token",
            retry=RetryPolicy(max_total_wait=20.0, on_retry=retries.append),
        )
        started = time.monotonic()
        async with patient:
            submission = await patient.submit(model, "room eventually", num_predict=10)
            assert (await patient.wait(submission.id)).state == RequestState.COMPLETED
        assert retries, "the first attempt should have found the queue full"
        first = retries[0]
        assert first.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert first.error.retry_after is not None
        assert first.delay >= first.error.retry_after  # RetryInfo honoured, never shortened
        assert time.monotonic() - started >= first.delay
    finally:
        await operator.admin.update_queue_config(model, max_queue_size=100)


async def test_bad_input_raises_typed_errors_naming_the_fields(
    alice: AsyncUsherClient, bob: AsyncUsherClient
) -> None:
    with pytest.raises(InvalidArgument) as empty:
        await alice.submit(MODEL, "")
    assert empty.value.fields == ("generate.prompt",)
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(InvalidArgument) as named:
        await alice.submit("not a model!", "hi", queue_timeout=-1)
    assert {"model", "queue_timeout"} <= set(named.value.fields)

    with pytest.raises(InvalidArgument) as nothing:
        await alice.submit(MODEL)  # checked before any call
    assert nothing.value.fields == ("input",)

    with pytest.raises(InvalidArgument) as priority:
        await alice.submit(MODEL, "hi", priority="urgent")
    assert priority.value.fields == ("priority",)

    with pytest.raises(InvalidArgument) as bad_id:
        await alice.get("nope")
    assert bad_id.value.fields == ("id",)

    mine = await alice.submit_and_wait(MODEL, "mine", num_predict=5)
    with pytest.raises(PermissionDenied):
        await bob.get(mine.id)
    with pytest.raises(NotFound):
        await alice.get("01" + "0" * 24)
    with pytest.raises(FailedPrecondition):
        await alice.cancel(mine.id)


async def test_cancel_and_list(alice: AsyncUsherClient) -> None:
    submission = await alice.submit(MODEL, "cancel me", num_predict=250)
    await alice.cancel(submission.id, "changed my mind")
    cancelled = await wait_for_state(alice, submission.id, RequestState.CANCELLED)
    assert cancelled.state == RequestState.CANCELLED
    listed = await alice.list(states=["cancelled"], limit=10)
    assert submission.id in {r.id for r in listed}
    assert all(r.state == RequestState.CANCELLED for r in listed)


async def test_queue_badges(alice: AsyncUsherClient) -> None:
    stream = alice.queues([MODEL])
    (badge,) = await anext(stream)
    await stream.aclose()
    assert badge.model == MODEL
    assert badge.capacity == 2
    assert badge.level != QueueLevel.UNSPECIFIED
    assert badge.label.startswith(MODEL)


def test_the_blocking_client(stack: LocalStack) -> None:
    with UsherClient(
        stack.scheduler_address,
        stack.notifier_address,
        pool_address=stack.pool_address,
        token="bob-token",
    ) as usher:
        request = usher.submit_and_wait(MODEL, "sync hello", num_predict=15)
        assert request.state == RequestState.COMPLETED and request.text

        stream = usher.stream_tokens(MODEL, "sync story", num_predict=40)
        pieces = list(stream)
        assert stream.request is not None and "".join(pieces) == stream.request.text

        kinds = [u.kind for u in usher.watch(request.id)]
        assert kinds == [UpdateKind.COMPLETED]

        long = usher.submit(MODEL, "sync cancel", num_predict=250)
        watch = usher.watch(long.id)
        first = next(watch)  # iterators work step by step in blocking code
        assert first.request.id == long.id
        usher.cancel(long.id)
        assert list(watch)[-1].kind == UpdateKind.CANCELLED

        assert request.id in {r.id for r in usher.list(limit=20)}
        assert any(i.config.id == "ollama-0" for i in usher.list_instances())
        badges = next(iter(usher.queues([MODEL])))
        assert badges[0].model == MODEL
