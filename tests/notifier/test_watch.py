"""Watch through gRPC: snapshot, places, the final update with its result, resume, lag."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.notifier.app import NotifierApp
from services.notifier.settings import NotifierSettings
from services.scheduler.store import FinishedWork, Lease, QueueStore
from tests.notifier.conftest import NotifierClient
from tests.scheduler.factories import new_request
from usher.inprocess import LocalChannel
from usher.keys import ModelKeys
from usher.testing import free_port
from usher.testing.redis_server import ExternalRedis, RedisServer
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2

K = notifier_pb2
MODEL = "watch-model"
TERMINAL = {
    K.UPDATE_KIND_COMPLETED,
    K.UPDATE_KIND_FAILED,
    K.UPDATE_KIND_CANCELLED,
    K.UPDATE_KIND_EXPIRED,
}


async def _submit(store: QueueStore, user: str = "alice") -> str:
    request = new_request(model=MODEL, user=user)
    await store.submit(request)
    return request.id


async def _claim(store: QueueStore, request_id: str) -> Lease:
    lease = await store.claim(MODEL, "test")
    assert lease is not None and lease.request.id == request_id
    return lease


async def _complete(store: QueueStore, lease: Lease, text: str = "done") -> None:
    usage = request_pb2.Usage(prompt_tokens=3, completion_tokens=2)
    await store.finish(
        lease,
        FinishedWork(
            state=request_pb2.REQUEST_STATE_COMPLETED,
            result=request_pb2.RequestResult(text=text).SerializeToString(),
            usage=usage.SerializeToString(),
            output_tokens=2,
        ),
    )


class Watcher:
    """One Watch call, its updates collected as they arrive."""

    def __init__(
        self,
        notifier: NotifierClient,
        request_id: str,
        last: str = "",
        model: str = "",
        final_only: bool = False,
    ) -> None:
        self.updates: list[notifier_pb2.WatchResponse] = []
        self.arrived = asyncio.Event()
        self.call = notifier.stub.Watch(
            K.WatchRequest(id=request_id, last_event_id=last, model=model, final_only=final_only),
            metadata=notifier.auth("alice"),
        )
        self.task = asyncio.ensure_future(self._collect())

    async def _collect(self) -> None:
        async for update in self.call:
            self.updates.append(update)
            self.arrived.set()

    async def until(self, kind: int, timeout: float = 5.0) -> notifier_pb2.WatchResponse:
        async def wait() -> notifier_pb2.WatchResponse:
            while True:
                for update in self.updates:
                    if update.kind == kind:
                        return update
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(wait(), timeout)

    async def finished(self, timeout: float = 5.0) -> list[notifier_pb2.WatchResponse]:
        await asyncio.wait_for(self.task, timeout)
        return self.updates


async def test_a_queued_request_sees_its_place_then_its_result(
    notifier: NotifierClient, store: QueueStore
) -> None:
    ahead = await _submit(store)
    mine = await _submit(store)
    watcher = Watcher(notifier, mine)
    snapshot = await watcher.until(K.UPDATE_KIND_SNAPSHOT)
    assert snapshot.request.position.position == 2

    await store.cancel(MODEL, ahead, "acme/alice", False, "")
    moved = await watcher.until(K.UPDATE_KIND_POSITION)
    assert (moved.request.position.position, moved.request.position.queue_length) == (1, 1)
    assert moved.message.startswith("You are #1 of 1")

    lease = await _claim(store, mine)
    await watcher.until(K.UPDATE_KIND_RUNNING)
    await store.progress(lease, "tokens", {"text": "do", "tokens": 1})
    await store.progress(lease, "tokens", {"text": "ne", "tokens": 2})
    await _complete(store, lease)
    updates = await watcher.finished()
    kinds = [u.kind for u in updates]
    assert kinds[-1] == K.UPDATE_KIND_COMPLETED and kinds.count(K.UPDATE_KIND_COMPLETED) == 1
    assert "".join(u.text_delta for u in updates) == "done"
    final = updates[-1]
    assert final.request.state == request_pb2.REQUEST_STATE_COMPLETED
    assert final.request.result.text == "done"
    assert final.request.usage.completion_tokens == 2
    assert final.completion_tokens == 2
    assert final.request.HasField("finished_at")
    assert final.message.startswith("Your response is ready")
    event_ids = [u.event_id for u in updates if u.event_id]
    assert event_ids == sorted(set(event_ids), key=lambda e: tuple(map(int, e.split("-"))))


async def test_a_final_only_watch_gets_the_last_update_alone(
    notifier: NotifierClient, store: QueueStore
) -> None:
    ahead = await _submit(store)
    mine = await _submit(store)
    quiet = Watcher(notifier, mine, final_only=True)
    full = Watcher(notifier, mine)
    await full.until(K.UPDATE_KIND_SNAPSHOT)
    await store.cancel(MODEL, ahead, "acme/alice", False, "")  # a new place: not sent to it
    await full.until(K.UPDATE_KIND_POSITION)
    lease = await _claim(store, mine)
    await store.progress(lease, "tokens", {"text": "do", "tokens": 1})
    await full.until(K.UPDATE_KIND_PROGRESS)
    await _complete(store, lease)
    (final,) = await quiet.finished()
    last = (await full.finished())[-1]
    assert final.kind == K.UPDATE_KIND_COMPLETED
    assert (final.event_id, final.request.result.text) == (last.event_id, "done")
    assert final.request.usage.completion_tokens == 2
    assert final.message.startswith("Your response is ready")
    # The same update as the full watch's last (only the time it was sent differs): the
    # updates it was not sent still moved its view and token count.
    assert (final.request, final.completion_tokens, final.message, final.progress) == (
        last.request,
        last.completion_tokens,
        last.message,
        last.progress,
    )


async def test_a_final_only_watch_of_a_finished_request_or_a_resumed_one_ends_at_once(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    lease = await _claim(store, request_id)
    await store.progress(lease, "tokens", {"text": "do", "tokens": 1})
    running = await Watcher(notifier, request_id).until(K.UPDATE_KIND_SNAPSHOT)
    assert running.event_id and running.text_delta == "do"
    await _complete(store, lease)
    for last in ("", running.event_id):
        (final,) = await Watcher(notifier, request_id, last, final_only=True).finished()
        assert final.kind == K.UPDATE_KIND_COMPLETED
        assert final.request.result.text == "done"


async def test_await_result_answers_the_final_update_once_the_request_ends(
    notifier: NotifierClient, store: QueueStore
) -> None:
    """AwaitResult: Watch with final_only in one unary call, for the same final update; its
    deadline passing loses nothing (called again, it answers)."""
    request_id = await _submit(store)
    waiting = asyncio.ensure_future(
        notifier.stub.AwaitResult(
            K.AwaitResultRequest(id=request_id, model=MODEL), metadata=notifier.auth("alice")
        )
    )
    lease = await _claim(store, request_id)
    await store.progress(lease, "tokens", {"text": "do", "tokens": 1})
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await _complete(store, lease)
    final = (await asyncio.wait_for(waiting, 5)).update
    (watched,) = await Watcher(notifier, request_id, final_only=True).finished()
    assert final.kind == K.UPDATE_KIND_COMPLETED
    assert (final.event_id, final.request, final.message) == (
        watched.event_id,
        watched.request,
        watched.message,
    )
    assert final.request.result.text == "done"

    queued = await _submit(store)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await notifier.stub.AwaitResult(
            K.AwaitResultRequest(id=queued), metadata=notifier.auth("alice"), timeout=0.2
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _complete(store, await _claim(store, queued), text="later")
    again = await notifier.stub.AwaitResult(
        K.AwaitResultRequest(id=queued), metadata=notifier.auth("alice"), timeout=5
    )
    assert again.update.request.result.text == "later"
    await _no_watchers_left(notifier)


async def test_an_await_result_call_cancels_as_a_grpc_call_does(
    notifier: NotifierClient, store: QueueStore
) -> None:
    """The gateway cancels its call whatever became of it: done, cancel() changes nothing;
    not awaited yet, it is dropped (in process: the servicer never runs)."""
    request_id = await _submit(store)
    await _complete(store, await _claim(store, request_id))
    asked = K.AwaitResultRequest(id=request_id)
    done = notifier.stub.AwaitResult(asked, metadata=notifier.auth("alice"), timeout=5)
    assert (await done).update.kind == K.UPDATE_KIND_COMPLETED
    assert not done.cancel()
    dropped = notifier.stub.AwaitResult(asked, metadata=notifier.auth("alice"), timeout=5)
    assert dropped.cancel()
    await _no_watchers_left(notifier)


async def test_await_result_checks_as_watch_does(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store, user="bob")
    for asked, code in (
        (K.AwaitResultRequest(id=request_id, model=MODEL), grpc.StatusCode.PERMISSION_DENIED),
        (K.AwaitResultRequest(id="01JAAAAAAAAAAAAAAAAAAAAAAA"), grpc.StatusCode.NOT_FOUND),
        (K.AwaitResultRequest(id="nope"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await notifier.stub.AwaitResult(asked, metadata=notifier.auth("alice"), timeout=5)
        assert caught.value.code() == code
    await _no_watchers_left(notifier)


async def test_many_watchers_of_one_request_each_get_every_update_once(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    watchers = [Watcher(notifier, request_id) for _ in range(20)]
    for watcher in watchers:
        await watcher.until(K.UPDATE_KIND_SNAPSHOT)
    lease = await _claim(store, request_id)
    for i in range(5):
        await store.progress(lease, "tokens", {"text": f"{i};", "tokens": i + 1})
    await _complete(store, lease)
    seen = [await w.finished() for w in watchers]
    expected = [(u.kind, u.event_id, u.text_delta) for u in seen[0][1:]]
    assert [k for k, _, _ in expected].count(K.UPDATE_KIND_PROGRESS) == 5
    for updates in seen:
        assert [(u.kind, u.event_id, u.text_delta) for u in updates[1:]] == expected
        assert updates[-1].request.result.text == "done"


async def test_resuming_replays_only_what_came_after(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    lease = await _claim(store, request_id)
    await store.progress(lease, "tokens", {"text": "a", "tokens": 1})
    first = Watcher(notifier, request_id)
    snapshot = await first.until(K.UPDATE_KIND_SNAPSHOT)
    assert snapshot.text_delta == "a" and snapshot.event_id
    first.call.cancel()
    await store.progress(lease, "tokens", {"text": "b", "tokens": 2})
    await _complete(store, lease)

    resumed = await Watcher(notifier, request_id, last=snapshot.event_id).finished()
    assert [u.kind for u in resumed] == [K.UPDATE_KIND_PROGRESS, K.UPDATE_KIND_COMPLETED]
    assert resumed[0].text_delta == "b"
    assert resumed[-1].request.result.text == "done"
    # Resuming after the final update: nothing is left to send, the stream just ends.
    assert await Watcher(notifier, request_id, last=resumed[-1].event_id).finished() == []


@pytest.mark.parametrize("hint", [MODEL, "another-model"])
async def test_a_model_hint_opens_the_watch_and_a_wrong_one_is_ignored(
    notifier: NotifierClient, store: QueueStore, hint: str
) -> None:
    request_id = await _submit(store)
    lease = await _claim(store, request_id)
    await store.progress(lease, "tokens", {"text": "a", "tokens": 1})
    first = Watcher(notifier, request_id, model=hint)
    snapshot = await first.until(K.UPDATE_KIND_SNAPSHOT)
    assert snapshot.text_delta == "a" and snapshot.request.model == MODEL
    await store.progress(lease, "tokens", {"text": "b", "tokens": 2})
    await first.until(K.UPDATE_KIND_PROGRESS)
    first.call.cancel()
    await _complete(store, lease)
    resumed = await Watcher(notifier, request_id, last=snapshot.event_id, model=hint).finished()
    assert [u.kind for u in resumed] == [K.UPDATE_KIND_PROGRESS, K.UPDATE_KIND_COMPLETED]
    assert resumed[-1].request.result.text == "done"
    await _no_watchers_left(notifier)  # every watcher, the wrong model's too, is gone


async def test_a_model_hint_does_not_skip_the_owner_check(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store, user="bob")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await Watcher(notifier, request_id, model=MODEL).finished()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    missing = "01JAAAAAAAAAAAAAAAAAAAAAAA"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await Watcher(notifier, missing, model=MODEL).finished()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await _no_watchers_left(notifier)


async def _no_watchers_left(notifier: NotifierClient) -> None:
    for _ in range(100):  # a cancelled call's handler ends soon after, not at once
        if not notifier.app.fanout._groups:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"watchers left: {list(notifier.app.fanout._groups)}")


async def test_a_watcher_that_lagged_catches_up_from_redis(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    watcher = Watcher(notifier, request_id)
    await watcher.until(K.UPDATE_KIND_SNAPSHOT)
    fanout = notifier.app.fanout
    (subscriber,) = fanout._groups[request_id].subscribers
    lease = await _claim(store, request_id)
    await watcher.until(K.UPDATE_KIND_RUNNING)
    # As if its buffer had overflowed: whatever was in flight is dropped, it must replay.
    fanout.unsubscribe(subscriber)
    await store.progress(lease, "tokens", {"text": "x", "tokens": 1})
    await _complete(store, lease)
    await asyncio.sleep(0.2)
    assert [u.kind for u in watcher.updates][-1] == K.UPDATE_KIND_RUNNING
    subscriber.mark_lagged()
    updates = await watcher.finished()
    assert [u.kind for u in updates[-2:]] == [K.UPDATE_KIND_PROGRESS, K.UPDATE_KIND_COMPLETED]
    assert len({u.event_id for u in updates}) == len(updates)


async def test_watching_a_finished_request_ends_on_its_final_update(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store)
    await _complete(store, await _claim(store, request_id), text="old news")
    (only,) = await Watcher(notifier, request_id).finished()
    assert only.kind == K.UPDATE_KIND_COMPLETED
    assert only.request.result.text == "old news"


async def test_another_callers_request_is_not_shown(
    notifier: NotifierClient, store: QueueStore
) -> None:
    request_id = await _submit(store, user="bob")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await Watcher(notifier, request_id).finished()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_service_role_may_watch_any_request(
    notifier: NotifierClient, store: QueueStore
) -> None:
    """The gateway watches for a browser holding a watch token it checked."""
    request_id = await _submit(store, user="bob")
    call = notifier.stub.Watch(K.WatchRequest(id=request_id), metadata=notifier.auth("service"))
    first = await asyncio.wait_for(anext(aiter(call)), 5)
    call.cancel()
    assert first.kind == K.UPDATE_KIND_SNAPSHOT and first.request.id == request_id


async def test_badges_name_the_models_asked_for_before_their_first_request(
    notifier: NotifierClient,
) -> None:
    call = notifier.stub.WatchQueues(
        K.WatchQueuesRequest(models=["never-used:1b"]), metadata=notifier.auth("alice")
    )
    first = await asyncio.wait_for(anext(aiter(call)), 5)
    call.cancel()
    (badge,) = first.badges
    assert badge.model == "never-used:1b" and badge.level == K.QUEUE_LEVEL_AVAILABLE
    too_many = notifier.stub.WatchQueues(
        K.WatchQueuesRequest(models=[f"m{i}" for i in range(101)]),
        metadata=notifier.auth("alice"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await anext(aiter(too_many))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_in_retry_backoff_shows_queued_then_takes_its_place(
    notifier: NotifierClient, store: QueueStore
) -> None:
    """A failed attempt waiting out its backoff is shown as QUEUED (to be retried), not
    RUNNING; then back in line, then running again."""
    request_id = await _submit(store)
    watcher = Watcher(notifier, request_id)
    await watcher.until(K.UPDATE_KIND_SNAPSHOT)
    lease = await _claim(store, request_id)
    await watcher.until(K.UPDATE_KIND_RUNNING)
    assert await store.requeue(lease, "model server failed", count_attempt=True, backoff_ms=300)
    requeued = await watcher.until(K.UPDATE_KIND_REQUEUED)
    assert requeued.request.state == request_pb2.REQUEST_STATE_QUEUED
    assert requeued.request.HasField("retry_at")
    assert "will be retried" in requeued.message
    for _ in range(100):  # the reaper puts it back once the backoff has passed
        if (await store.reap(MODEL)).back_in_line:
            break
        await asyncio.sleep(0.05)
    back = await watcher.until(K.UPDATE_KIND_QUEUED)
    assert back.request.state == request_pb2.REQUEST_STATE_QUEUED
    assert not back.request.HasField("retry_at")
    again = await _claim(store, request_id)
    await _complete(store, again)
    updates = await watcher.finished()
    states = {K.UPDATE_KIND_RUNNING, K.UPDATE_KIND_REQUEUED, K.UPDATE_KIND_QUEUED}
    assert [u.kind for u in updates if u.kind in states | {K.UPDATE_KIND_COMPLETED}] == [
        K.UPDATE_KIND_RUNNING,
        K.UPDATE_KIND_REQUEUED,
        K.UPDATE_KIND_QUEUED,
        K.UPDATE_KIND_RUNNING,
        K.UPDATE_KIND_COMPLETED,
    ]
    event_ids = [u.event_id for u in updates if u.event_id]
    assert len(event_ids) == len(set(event_ids))


async def test_a_request_just_queued_is_watched_from_its_record_with_no_event_twice(
    notifier: NotifierClient, store: QueueStore
) -> None:
    """A request's queuing goes to the model's stream alone: a watch opened right after it
    shows the state from the record (a snapshot with no resume token), never a QUEUED
    update after it, and a watch resumed from any token it got replays each later event
    once and ends on the final state."""
    request_id = await _submit(store)
    assert await store.redis.xlen(ModelKeys(MODEL).request_events(request_id)) == 0
    watcher = Watcher(notifier, request_id)
    snapshot = await watcher.until(K.UPDATE_KIND_SNAPSHOT)
    assert snapshot.event_id == "" and snapshot.request.state == request_pb2.REQUEST_STATE_QUEUED
    lease = await _claim(store, request_id)
    await store.progress(lease, "tokens", {"text": "do", "tokens": 1})
    await _complete(store, lease)
    updates = await watcher.finished()
    assert K.UPDATE_KIND_QUEUED not in [u.kind for u in updates]
    tokens = [u.event_id for u in updates if u.event_id]
    assert len(tokens) == len(set(tokens)) == 3  # running, tokens, completed
    for i, token in enumerate(tokens[:-1]):
        resumed = await Watcher(notifier, request_id, last=token).finished()
        assert [u.event_id for u in resumed] == tokens[i + 1 :]
        assert resumed[-1].request.state == request_pb2.REQUEST_STATE_COMPLETED


async def test_the_badges_take_the_queue_limit_the_scheduler_is_given(
    redis_server: RedisServer | ExternalRedis, store: QueueStore
) -> None:
    """USHER_QUEUE_MAX_SIZE reaches the Notifier as it reaches the Scheduler: a queue at
    that limit has a badge marked full (not at the built-in 100)."""
    env = {
        "USHER_REDIS_URL": redis_server.url,
        "USHER_NOTIFIER_LISTEN": f"127.0.0.1:{free_port()}",
        "USHER_API_TOKENS": "alice-token=alice@acme",
        "USHER_QUEUE_MAX_SIZE": "3",
        "USHER_DEFAULT_PARALLEL": "2",
        "USHER_NOTIFIER_HEAP_FREEZE_SECONDS": "0",
    }
    app = NotifierApp(NotifierSettings.from_env(env))
    assert app.queue.defaults.parallel == 2
    for _ in range(3):
        await _submit(store)
    await app.start()
    try:
        stub = notifier_pb2_grpc.NotifierServiceStub(
            LocalChannel.serving(app.registrations).as_channel()
        )
        call = stub.WatchQueues(
            notifier_pb2.WatchQueuesRequest(models=[MODEL]),
            metadata=(("authorization", "Bearer alice-token"),),
        )
        first = await asyncio.wait_for(anext(aiter(call)), 5)
        call.cancel()
    finally:
        await app.stop()
    (badge,) = first.badges
    assert "Queue full" in badge.label, badge.label
