"""The whole path in both shapes — every service a separate process (the trio) and all in
one (``usher serve``): submit → queue → pool → model server → tokens → watcher, against an
emulated Ollama fleet and a real Redis."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from typing import cast

import grpc
import pytest

from usher.ids import REQUEST_ID_METADATA
from usher.testing.stack import LocalStack, StackConfig, quick_fleet
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
K = notifier_pb2
KEYS = "k1:" + base64.b64encode(bytes(range(32))).decode()


def auth(user: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {user}-token"),)


@pytest.fixture(scope="module", params=["trio", "serve"])
def stack(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    config = StackConfig(
        all_in_one=request.param == "serve",
        emulator_args=quick_fleet(300),
        # Everything here also runs with prompts and results encrypted at rest.
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "8", "USHER_ENCRYPTION_KEYS": KEYS},
        notifier_env={"USHER_ENCRYPTION_KEYS": KEYS},
        external_provider=True,
        metrics=True,
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture
async def clients(
    stack: LocalStack,
) -> AsyncIterator[
    tuple[scheduler_pb2_grpc.SchedulerServiceAsyncStub, notifier_pb2_grpc.NotifierServiceAsyncStub]
]:
    scheduler_channel = grpc.aio.insecure_channel(stack.scheduler_address)
    notifier_channel = grpc.aio.insecure_channel(stack.notifier_address)
    yield (
        scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel),
        notifier_pb2_grpc.NotifierServiceStub(notifier_channel),
    )
    await scheduler_channel.close()
    await notifier_channel.close()


def generate(prompt: str, model: str = "llama3.2:1b") -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        model=model, generate=request_pb2.GenerateInput(prompt=prompt)
    )


async def watch_all(
    notifier: notifier_pb2_grpc.NotifierServiceAsyncStub,
    request_id: str,
    user: str = "alice",
    last: str = "",
) -> list[notifier_pb2.WatchResponse]:
    return [
        update
        async for update in notifier.Watch(
            notifier_pb2.WatchRequest(id=request_id, last_event_id=last),
            metadata=auth(user),
            timeout=60,
        )
    ]


async def test_a_request_travels_the_whole_path(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    submitted = await scheduler.Submit(generate("Tell me about queues"), metadata=auth("alice"))
    updates = await watch_all(notifier, submitted.request.id)
    kinds = [u.kind for u in updates]
    assert kinds[0] == K.UPDATE_KIND_SNAPSHOT
    assert kinds[-1] == K.UPDATE_KIND_COMPLETED
    assert K.UPDATE_KIND_PROGRESS in kinds
    final = updates[-1]
    text = "".join(u.text_delta for u in updates)
    assert final.request.result.text == text and text
    assert final.message.startswith("Your response is ready! Processing took")
    assert final.request.usage.completion_tokens > 0
    assert final.request.result.served_by_instance.startswith("ollama-")
    event_ids = [u.event_id for u in updates if u.event_id]
    assert len(event_ids) == len(set(event_ids))


async def test_a_submit_that_awaits_its_result_answers_with_its_end(
    stack: LocalStack,
    clients: tuple,  # type: ignore[type-arg]
) -> None:
    import httpx

    scheduler, notifier = clients
    async with httpx.AsyncClient() as http:
        before = (await http.get(stack.metrics_urls["scheduler-0"])).text
    ended = 0
    for n in range(6):  # a steady caller: its requests start at once on slots kept for it
        asked = generate(f"await {n}")
        asked.result_only = True
        asked.await_result.FromSeconds(20)
        call = scheduler.Submit(asked, metadata=auth("alice"), timeout=30)
        answer = (await call).request
        if answer.state != request_pb2.REQUEST_STATE_COMPLETED:
            continue  # queued first: its end is the Notifier's to tell
        ended += 1
        sent = await call.initial_metadata()
        assert sent is not None and sent.get(REQUEST_ID_METADATA) == answer.id
        # The answer is the request as the store now holds it, result and times included.
        stored = await scheduler.Get(scheduler_pb2.GetRequest(id=answer.id), metadata=auth("alice"))
        assert answer == stored.request and answer.result.text
        final = await notifier.AwaitResult(
            K.AwaitResultRequest(id=answer.id), metadata=auth("alice"), timeout=10
        )
        assert final.update.request == answer
    assert ended, "no request started at once"
    async with httpx.AsyncClient() as http:
        after = (await http.get(stack.metrics_urls["scheduler-0"])).text
    counted = {
        outcome: _sample(after, "usher_submit_awaited_total", outcome=outcome)
        - _sample(before, "usher_submit_awaited_total", outcome=outcome)
        for outcome in ("ended", "not_started_here", "ended_otherwise", "timed_out", "no_time")
    }
    assert counted["ended"] == ended and sum(counted.values()) == 6, counted
    # Started on the model server beside their enqueue, each taken by its claim.
    early = {
        outcome: _sample(after, "usher_early_starts_total", outcome=outcome)
        - _sample(before, "usher_early_starts_total", outcome=outcome)
        for outcome in ("confirmed", "cancelled")
    }
    assert 1 <= early["confirmed"] <= ended and early["cancelled"] == 0, early


async def test_a_request_started_beside_its_enqueue_is_answered_running(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    running = 0
    for n in range(6):  # a steady caller: its requests start at once on slots kept for it
        answer = (await scheduler.Submit(generate(f"running {n}"), metadata=auth("alice"))).request
        await watch_all(notifier, answer.id)
        if answer.state == request_pb2.REQUEST_STATE_QUEUED:
            continue
        running += 1
        # Not "#1 of 1 in the queue": it runs, and its estimate is the time left.
        assert answer.state == request_pb2.REQUEST_STATE_RUNNING
        assert answer.started_at.ToMilliseconds() >= answer.created_at.ToMilliseconds()
        assert not answer.HasField("position")
    assert running, "no request started at once"


async def test_a_submit_with_no_time_to_wait_answers_at_once(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    asked = generate("no time")
    asked.result_only = True
    asked.await_result.FromSeconds(20)
    # Less time than the answer's margin: nothing is waited for, the request still runs.
    answer = (await scheduler.Submit(asked, metadata=auth("alice"), timeout=0.2)).request
    assert answer.state != request_pb2.REQUEST_STATE_COMPLETED
    final = await notifier.AwaitResult(
        K.AwaitResultRequest(id=answer.id), metadata=auth("alice"), timeout=10
    )
    assert final.update.request.state == request_pb2.REQUEST_STATE_COMPLETED


async def test_a_dropped_watch_resumes_without_gaps_or_repeats(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    submitted = await scheduler.Submit(
        generate("A long answer please " * 3), metadata=auth("alice")
    )
    first: list[notifier_pb2.WatchResponse] = []
    call = notifier.Watch(
        notifier_pb2.WatchRequest(id=submitted.request.id), metadata=auth("alice")
    )
    async for update in call:
        first.append(update)
        if update.kind == K.UPDATE_KIND_PROGRESS or update.kind == K.UPDATE_KIND_COMPLETED:
            break
    call.cancel()  # the connection drops mid-answer
    last = [u.event_id for u in first if u.event_id][-1]
    rest = await watch_all(notifier, submitted.request.id, last=last)
    everything = [*first, *rest]
    ids = [u.event_id for u in everything if u.event_id]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert everything[-1].kind == K.UPDATE_KIND_COMPLETED
    assert "".join(u.text_delta for u in everything) == everything[-1].request.result.text


async def test_live_output_and_its_replay_from_redis_agree(clients: tuple) -> None:  # type: ignore[type-arg]
    """Output reaches a live watcher with the ids Redis keeps: in order, once each, and a
    watch resumed after any of them replays exactly the events that followed."""
    scheduler, notifier = clients
    submitted = await scheduler.Submit(
        generate("Stream a long answer " * 4), metadata=auth("alice")
    )
    live = await watch_all(notifier, submitted.request.id)
    assert live[-1].kind == K.UPDATE_KIND_COMPLETED
    ids = [u.event_id for u in live if u.event_id]
    keys = [tuple(int(part) for part in i.split("-")) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    progress = [u for u in live if u.kind == K.UPDATE_KIND_PROGRESS]
    assert len(progress) >= 2
    for resume in {progress[0].event_id, progress[len(progress) // 2].event_id}:
        replayed = await watch_all(notifier, submitted.request.id, last=resume)
        assert [u.event_id for u in replayed] == ids[ids.index(resume) + 1 :]
        after = live[[u.event_id for u in live].index(resume) + 1 :]
        assert [u.text_delta for u in replayed] == [u.text_delta for u in after]


async def test_only_the_owner_may_watch(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    submitted = await scheduler.Submit(generate("private"), metadata=auth("alice"))
    for user in ("bob", "carol"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch_all(notifier, submitted.request.id, user=user)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await watch_all(notifier, submitted.request.id, user="admin"))[
        -1
    ].request.id == submitted.request.id


async def test_a_thousand_watchers_each_see_every_update(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    ids = [
        (await scheduler.Submit(generate(f"question {i}"), metadata=auth("bob"))).request.id
        for i in range(100)
    ]
    watchers = [
        watch_all(notifier, request_id, user="bob") for request_id in ids for _ in range(10)
    ]
    results = await asyncio.gather(*watchers)
    assert len(results) == 1000
    for i in range(len(ids)):
        group = results[i * 10 : (i + 1) * 10]
        for updates in group:
            assert updates[-1].kind == K.UPDATE_KIND_COMPLETED
            assert "".join(u.text_delta for u in updates) == updates[-1].request.result.text
        # Watchers that started together saw the same text: nothing was dropped for some.
        assert len({updates[-1].request.result.text for updates in group}) == 1


async def test_queue_badges_stream(clients: tuple) -> None:  # type: ignore[type-arg]
    _, notifier = clients
    call = notifier.WatchQueues(
        notifier_pb2.WatchQueuesRequest(models=["llama3.2:1b"]), metadata=auth("alice")
    )
    async for update in call:
        (badge,) = update.badges
        assert badge.model == "llama3.2:1b"
        assert badge.capacity == 4  # two instances, two slots each
        assert badge.label.startswith("llama3.2:1b (")
        break
    call.cancel()


async def test_a_user_can_switch_a_waiting_request_to_the_external_provider(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    for i in range(30):  # keep the local fleet busy
        await scheduler.Submit(generate(f"busy {i}"), metadata=auth("carol"))
    waiting = await scheduler.Submit(generate("in a hurry"), metadata=auth("carol"))
    switched = await scheduler.SwitchProvider(
        scheduler_pb2.SwitchProviderRequest(id=waiting.request.id), metadata=auth("carol")
    )
    assert switched.request.route == request_pb2.ROUTE_EXTERNAL
    updates = await watch_all(notifier, waiting.request.id, user="carol")
    assert updates[-1].kind == K.UPDATE_KIND_COMPLETED
    assert updates[-1].request.result.served_by_instance == "external"


async def test_queue_timeout_falls_back_to_the_external_provider(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    for i in range(30):
        await scheduler.Submit(generate(f"busy again {i}"), metadata=auth("carol"))
    request = generate("will time out locally")
    request.fallback_policy = request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT
    request.queue_timeout.FromMilliseconds(300)
    # Behind carol's own backlog (a new tenant would be served ahead of it: fair queuing).
    waiting = await scheduler.Submit(request, metadata=auth("carol"))
    updates = await watch_all(notifier, waiting.request.id, user="carol")
    assert K.UPDATE_KIND_FALLBACK in [u.kind for u in updates]
    assert updates[-1].kind == K.UPDATE_KIND_COMPLETED
    assert updates[-1].request.result.served_by_instance == "external"


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_are_exposed_and_move_under_load(stack: LocalStack, clients: tuple) -> None:  # type: ignore[type-arg]
    import httpx

    scheduler, notifier = clients
    async with httpx.AsyncClient() as http:
        before = (await http.get(stack.metrics_urls["scheduler-0"])).text
        ids = [
            (await scheduler.Submit(generate(f"metered {i}"), metadata=auth("bob"))).request.id
            for i in range(5)
        ]
        for request_id in ids:
            await watch_all(notifier, request_id, user="bob")
        after = (await http.get(stack.metrics_urls["scheduler-0"])).text
        pool = (await http.get(stack.metrics_urls["pool"])).text
        notifier_metrics = (await http.get(stack.metrics_urls["notifier-0"])).text
    model = {"model": "llama3.2:1b"}
    assert (
        _sample(after, "usher_submitted_total", **model)
        >= _sample(before, "usher_submitted_total", **model) + 5
    )
    assert _sample(after, "usher_requests_total", outcome="completed") > _sample(
        before, "usher_requests_total", outcome="completed"
    )
    assert _sample(after, "usher_queue_wait_seconds_count", **model) > 0
    assert _sample(after, "usher_eta_error_seconds_count", **model) > 0
    assert _sample(pool, "usher_pool_instance_up") == 3  # two local instances and the external one
    assert _sample(pool, "usher_pool_requests_total", outcome="ok") >= 5
    assert _sample(notifier_metrics, "usher_notifier_updates_total") > 0
    assert "process_resident_memory_bytes" in after


async def test_a_steady_load_runs_on_kept_slots_with_no_reserve_per_request(
    stack: LocalStack,
    clients: tuple,  # type: ignore[type-arg]
) -> None:
    """Callers asking again as soon as they are answered: after the first requests each one
    runs on the slot its loop kept after the last answer, with no Reserve or Release."""
    import httpx

    scheduler, notifier = clients

    async def calls(method: str) -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(stack.metrics_urls["pool"])).text
        return _sample(text, "usher_grpc_server_calls_total", method=method)

    async def caller(worker: int) -> None:
        for n in range(10):
            submitted = await scheduler.Submit(
                generate(f"steady {worker} {n}"), metadata=auth("carol")
            )
            watch = notifier_pb2.WatchRequest(
                id=submitted.request.id, model=submitted.request.model, final_only=True
            )
            updates = [u async for u in notifier.Watch(watch, metadata=auth("carol"), timeout=60)]
            assert updates[-1].kind == K.UPDATE_KIND_COMPLETED

    reserve, release = "/usher.v1.PoolService/Reserve", "/usher.v1.PoolService/Release"
    generate_call = "/usher.v1.PoolService/Generate"
    before = (await calls(reserve), await calls(release), await calls(generate_call))
    await asyncio.gather(*(caller(w) for w in range(4)))
    after = (await calls(reserve), await calls(release), await calls(generate_call))
    # The Pool's calls are counted (in process too, in usher serve), not read as zero.
    assert after[2] - before[2] >= 40
    # 40 requests: a Reserve each before slots were kept across requests.
    assert after[0] - before[0] <= 20
    assert after[1] - before[1] <= 20
    # No request comes for the kept slots: they go back to the Pool within moments.
    from usher.v1 import pool_pb2, pool_pb2_grpc

    async with grpc.aio.insecure_channel(stack.pool_address) as channel:
        pool = pool_pb2_grpc.PoolServiceStub(channel)
        for _ in range(40):
            listed = await pool.ListInstances(
                pool_pb2.ListInstancesRequest(), metadata=auth("admin")
            )
            if not any(i.active for i in listed.instances):
                break
            await asyncio.sleep(0.1)
        assert [i.active for i in listed.instances] == [0] * len(listed.instances)


async def test_notifier_replicas_work_side_by_side(stack: LocalStack, clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, first = clients
    if len(stack.notifiers) < 2:
        stack.start_notifier(1)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.notifiers[1].port}")
    second = notifier_pb2_grpc.NotifierServiceStub(channel)
    ids = [
        (await scheduler.Submit(generate(f"replicated {i}"), metadata=auth("bob"))).request.id
        for i in range(10)
    ]
    both = await asyncio.gather(
        *(watch_all(n, request_id, user="bob") for request_id in ids for n in (first, second))
    )
    await channel.close()
    for a, b in zip(both[::2], both[1::2], strict=True):
        assert a[-1].kind == b[-1].kind == K.UPDATE_KIND_COMPLETED
        assert "".join(u.text_delta for u in a) == "".join(u.text_delta for u in b)


async def test_prompts_and_results_are_ciphertext_in_redis(
    stack: LocalStack,
    clients: tuple,  # type: ignore[type-arg]
) -> None:
    import redis.asyncio as aioredis

    from usher.keys import ModelKeys

    scheduler, notifier = clients
    submitted = await scheduler.Submit(generate("a very private question"), metadata=auth("alice"))
    updates = await watch_all(notifier, submitted.request.id)
    assert updates[-1].request.result.text  # watchers read plaintext
    client = aioredis.Redis.from_url(stack.redis_url)
    keys = ModelKeys("llama3.2:1b")
    stored = cast(dict[bytes, bytes], await client.hgetall(keys.request(submitted.request.id)))
    events = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await client.xrange(keys.request_events(submitted.request.id)),
    )
    await client.aclose()
    assert not stored.get(b"payload")  # a finished request keeps no prompt at all (emptied)
    assert updates[-1].request.result.text.encode()[:12] not in stored[b"result"]
    assert all(
        not value.startswith(updates[-1].request.result.text[:8].encode())
        for _, fields in events
        for value in fields.values()
    )


async def test_a_model_the_fleet_does_not_offer_is_not_found_and_stores_nothing(
    stack: LocalStack,
    clients: tuple,  # type: ignore[type-arg]
) -> None:
    import redis.asyncio as aioredis

    from usher import keys

    scheduler, _ = clients
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await scheduler.Submit(generate("hi", model="no-such-model:7b"), metadata=auth("alice"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    details = raised.value.details() or ""
    assert "no-such-model:7b" in details
    assert "llama3.2:1b" in details  # the models there are, named
    client = aioredis.Redis.from_url(stack.redis_url)
    stray = [k async for k in client.scan_iter(match="*no-such-model*")]
    listed = await client.smembers(keys.MODELS)
    await client.aclose()
    assert stray == []
    assert b"no-such-model:7b" not in listed


async def test_a_name_without_its_tag_is_the_fleets_latest(clients: tuple) -> None:  # type: ignore[type-arg]
    scheduler, notifier = clients
    untagged = scheduler_pb2.SubmitRequest(
        model="nomic-embed-text", embed=request_pb2.EmbedInput(input=["hello"])
    )
    submitted = await scheduler.Submit(untagged, metadata=auth("alice"))
    assert submitted.request.model == "nomic-embed-text:latest"
    updates = await watch_all(notifier, submitted.request.id)
    assert updates[-1].request.state == request_pb2.REQUEST_STATE_COMPLETED
