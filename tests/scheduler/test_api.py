"""The Scheduler's gRPC API on a real socket, backed by a real Redis."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.scheduler.conftest import SchedulerClient
from tests.scheduler.factories import generate_submit
from usher.v1 import request_pb2, scheduler_pb2

A = SchedulerClient.auth


async def submit(
    client: SchedulerClient, user: str = "alice", **kw: object
) -> scheduler_pb2.SubmitResponse:
    request = kw.pop("request", None) or generate_submit()
    assert isinstance(request, scheduler_pb2.SubmitRequest)
    for name, value in kw.items():
        setattr(request, name, value)
    return await client.scheduler.Submit(request, metadata=A(user))


def details(error: grpc.aio.AioRpcError) -> list[object]:
    status = rpc_status.from_call(error)
    assert status is not None
    out: list[object] = []
    for any_detail in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                out.append(message)
    return out


async def test_submit_answers_position_and_eta(scheduler: SchedulerClient) -> None:
    first = await submit(scheduler)
    second = await submit(scheduler, request=generate_submit(prompt="second"))
    assert first.request.state == request_pb2.REQUEST_STATE_QUEUED
    assert (second.request.position.position, second.request.position.queue_length) == (2, 2)
    assert second.request.tenant.user == "alice" and second.request.tenant.organization == "acme"
    eta = second.request.eta
    assert eta.max.ToMilliseconds() >= eta.min.ToMilliseconds() > 0
    got = await scheduler.scheduler.Get(
        scheduler_pb2.GetRequest(id=first.request.id), metadata=A("alice")
    )
    assert got.request.position.position == 1
    assert got.request.position.queue_length == 2


async def test_submit_answers_what_get_reads_back(scheduler: SchedulerClient) -> None:
    """Submit builds its answer from what it just stored instead of reading it back: the two
    must agree field for field (the ETA aside, which may move with the clock)."""
    request = generate_submit(prompt="compare me")
    request.labels["team"] = "search"
    request.priority = request_pb2.PRIORITY_HIGH
    request.queue_timeout.FromSeconds(90)
    request.idempotency_key = "compare-1"
    submitted = (await submit(scheduler, request=request)).request
    got = (
        await scheduler.scheduler.Get(
            scheduler_pb2.GetRequest(id=submitted.id), metadata=A("alice")
        )
    ).request
    submitted.ClearField("eta")
    got.ClearField("eta")
    assert submitted == got


async def test_unauthenticated_calls_are_refused(scheduler: SchedulerClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.scheduler.Submit(generate_submit())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.scheduler.Submit(
            generate_submit(), metadata=(("authorization", "Bearer nope"),)
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


BAD_INPUTS = [
    (
        "model",
        scheduler_pb2.SubmitRequest(
            model="bad model!", generate=request_pb2.GenerateInput(prompt="x")
        ),
    ),
    (
        "model",
        scheduler_pb2.SubmitRequest(model="{slot}", generate=request_pb2.GenerateInput(prompt="x")),
    ),
    ("model", scheduler_pb2.SubmitRequest(generate=request_pb2.GenerateInput(prompt="x"))),
    ("input", scheduler_pb2.SubmitRequest(model="llama3.2")),
    (
        "generate.prompt",
        scheduler_pb2.SubmitRequest(
            model="llama3.2", generate=request_pb2.GenerateInput(prompt="   ")
        ),
    ),
    ("chat.messages", scheduler_pb2.SubmitRequest(model="llama3.2", chat=request_pb2.ChatInput())),
    (
        "chat.messages[0].role",
        scheduler_pb2.SubmitRequest(
            model="llama3.2",
            chat=request_pb2.ChatInput(
                messages=[request_pb2.ChatMessage(role="robot", content="hi")]
            ),
        ),
    ),
    (
        "embed.input[1]",
        scheduler_pb2.SubmitRequest(
            model="llama3.2", embed=request_pb2.EmbedInput(input=["a", ""])
        ),
    ),
    (
        "generate",
        scheduler_pb2.SubmitRequest(
            model="llama3.2", generate=request_pb2.GenerateInput(prompt="x" * 1_000_001)
        ),
    ),
    (
        "priority",
        scheduler_pb2.SubmitRequest(
            model="llama3.2",
            generate=request_pb2.GenerateInput(prompt="x"),
            priority=-1,  # type: ignore[arg-type]
        ),
    ),
    (
        "priority",
        scheduler_pb2.SubmitRequest(
            model="llama3.2",
            generate=request_pb2.GenerateInput(prompt="x"),
            priority=9,  # type: ignore[arg-type]
        ),
    ),
    (
        "generate.format",
        scheduler_pb2.SubmitRequest(
            model="llama3.2", generate=request_pb2.GenerateInput(prompt="x", format="yaml")
        ),
    ),
    (
        "idempotency_key",
        scheduler_pb2.SubmitRequest(
            model="llama3.2",
            generate=request_pb2.GenerateInput(prompt="x"),
            idempotency_key="has space",
        ),
    ),
    (
        "await_result",
        scheduler_pb2.SubmitRequest(
            model="llama3.2",
            generate=request_pb2.GenerateInput(prompt="x"),
            await_result=duration_pb2.Duration(seconds=601),
        ),
    ),
    (
        "await_result",
        scheduler_pb2.SubmitRequest(
            model="llama3.2",
            generate=request_pb2.GenerateInput(prompt="x"),
            await_result=duration_pb2.Duration(seconds=-1),
        ),
    ),
    (
        "options.temperature",
        scheduler_pb2.SubmitRequest(
            model="llama3.2",
            generate=request_pb2.GenerateInput(prompt="x"),
            options=request_pb2.GenerationOptions(temperature=-1),
        ),
    ),
]


@pytest.mark.parametrize(("field", "request_message"), BAD_INPUTS)
async def test_bad_input_names_the_field_and_stores_nothing(
    scheduler: SchedulerClient, field: str, request_message: scheduler_pb2.SubmitRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.scheduler.Submit(request_message, metadata=A("alice"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    (bad,) = details(info.value)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert any(v.field == field for v in bad.field_violations)
    assert await scheduler.app.redis.dbsize() == 0


@pytest.mark.parametrize("bad_id", ["", "nope", "01HZZZZZZZZZZZZZZZZZZZZZZ!", "x" * 300])
async def test_bad_ids_are_invalid_argument(scheduler: SchedulerClient, bad_id: str) -> None:
    for call in (
        scheduler.scheduler.Get(scheduler_pb2.GetRequest(id=bad_id), metadata=A("alice")),
        scheduler.scheduler.Cancel(scheduler_pb2.CancelRequest(id=bad_id), metadata=A("alice")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "id" in (info.value.details() or "")


async def test_unknown_id_is_not_found(scheduler: SchedulerClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.scheduler.Get(
            scheduler_pb2.GetRequest(id="01JB8Z5V0000000000000000AA"), metadata=A("alice")
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_other_tenants_cannot_see_or_cancel(scheduler: SchedulerClient) -> None:
    mine = await submit(scheduler, "alice")
    for user in ("bob", "carol"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await scheduler.scheduler.Get(
                scheduler_pb2.GetRequest(id=mine.request.id), metadata=A(user)
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await scheduler.scheduler.Cancel(
                scheduler_pb2.CancelRequest(id=mine.request.id), metadata=A(user)
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await scheduler.scheduler.List(scheduler_pb2.ListRequest(), metadata=A("bob"))
    assert list(listed.requests) == []
    admin_view = await scheduler.scheduler.Get(
        scheduler_pb2.GetRequest(id=mine.request.id), metadata=A("root")
    )
    assert admin_view.request.id == mine.request.id


async def test_list_pages_own_requests_newest_first(scheduler: SchedulerClient) -> None:
    ids = [
        (await submit(scheduler, request=generate_submit(prompt=f"p{i}"))).request.id
        for i in range(5)
    ]
    await submit(scheduler, "bob")
    page = await scheduler.scheduler.List(
        scheduler_pb2.ListRequest(page_size=3), metadata=A("alice")
    )
    assert [r.id for r in page.requests] == ids[::-1][:3]
    rest = await scheduler.scheduler.List(
        scheduler_pb2.ListRequest(page_size=3, page_token=page.next_page_token), metadata=A("alice")
    )
    assert [r.id for r in rest.requests] == ids[::-1][3:]
    assert rest.next_page_token == ""


async def test_cancel_queued_removes_it_at_once(scheduler: SchedulerClient) -> None:
    first = await submit(scheduler)
    second = await submit(scheduler, request=generate_submit(prompt="two"))
    cancelled = await scheduler.scheduler.Cancel(
        scheduler_pb2.CancelRequest(id=first.request.id, reason="changed my mind"),
        metadata=A("alice"),
    )
    assert cancelled.request.state == request_pb2.REQUEST_STATE_CANCELLED
    assert cancelled.request.error == "changed my mind"
    moved = await scheduler.scheduler.Get(
        scheduler_pb2.GetRequest(id=second.request.id), metadata=A("alice")
    )
    assert (moved.request.position.position, moved.request.position.queue_length) == (1, 1)


async def test_cancel_running_signals_the_dispatcher(scheduler: SchedulerClient) -> None:
    sent = await submit(scheduler)
    lease = await scheduler.app.store.claim("llama3.2", "dispatcher-1")
    assert lease is not None
    answer = await scheduler.scheduler.Cancel(
        scheduler_pb2.CancelRequest(id=sent.request.id), metadata=A("alice")
    )
    assert answer.request.state == request_pb2.REQUEST_STATE_RUNNING
    assert answer.request.cancel_requested
    assert await scheduler.app.store.heartbeat(lease) == 1


async def test_cancel_finished_is_failed_precondition(scheduler: SchedulerClient) -> None:
    from services.scheduler.store import FinishedWork

    sent = await submit(scheduler)
    lease = await scheduler.app.store.claim("llama3.2", "dispatcher-1")
    assert lease is not None
    await scheduler.app.store.finish(lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.scheduler.Cancel(
            scheduler_pb2.CancelRequest(id=sent.request.id), metadata=A("alice")
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "COMPLETED" in (info.value.details() or "")


async def test_full_queue_is_resource_exhausted_with_retry_info(scheduler: SchedulerClient) -> None:
    await scheduler.admin.UpdateQueueConfig(
        scheduler_pb2.UpdateQueueConfigRequest(model="llama3.2", max_queue_size=2),
        metadata=A("root"),
    )
    await submit(scheduler, request=generate_submit(prompt="1"))
    await submit(scheduler, request=generate_submit(prompt="2"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await submit(scheduler, request=generate_submit(prompt="3"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (retry,) = details(info.value)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() >= 1000
    listed = await scheduler.scheduler.List(scheduler_pb2.ListRequest(), metadata=A("alice"))
    assert len(listed.requests) == 2
    # Raising the limit at runtime admits it.
    await scheduler.admin.UpdateQueueConfig(
        scheduler_pb2.UpdateQueueConfigRequest(model="llama3.2", max_queue_size=3),
        metadata=A("root"),
    )
    third = await submit(scheduler, request=generate_submit(prompt="3"))
    assert third.request.position.position == 3


async def test_idempotency_key_returns_the_original(scheduler: SchedulerClient) -> None:
    first = await submit(scheduler, idempotency_key="order-42")
    again = await submit(scheduler, idempotency_key="order-42")
    assert again.replayed and again.request.id == first.request.id
    other_caller = await submit(scheduler, "bob", idempotency_key="order-42")
    assert not other_caller.replayed and other_caller.request.id != first.request.id


async def test_identical_deterministic_requests_share_one(scheduler: SchedulerClient) -> None:
    greedy = generate_submit(prompt="same", temperature=0)
    first = await submit(scheduler, "alice", request=greedy)
    second = await submit(scheduler, "bob", request=generate_submit(prompt="same", temperature=0))
    assert second.deduplicated and second.request.id == first.request.id
    # bob can now see it; carol (another organization) gets her own.
    seen = await scheduler.scheduler.Get(
        scheduler_pb2.GetRequest(id=first.request.id), metadata=A("bob")
    )
    assert seen.request.id == first.request.id
    third = await submit(scheduler, "carol", request=generate_submit(prompt="same", temperature=0))
    assert not third.deduplicated
    sampled = await submit(
        scheduler, "bob", request=generate_submit(prompt="same", temperature=0.8)
    )
    assert not sampled.deduplicated
    # A caller streaming the tokens does not share a result-only run (it writes no output).
    whole = generate_submit(prompt="same", temperature=0)
    whole.result_only = True
    assert not (await submit(scheduler, "bob", request=whole)).deduplicated
    # bob leaving does not cancel alice's request.
    left = await scheduler.scheduler.Cancel(
        scheduler_pb2.CancelRequest(id=first.request.id), metadata=A("bob")
    )
    assert left.request.state == request_pb2.REQUEST_STATE_CANCELLED
    still = await scheduler.scheduler.Get(
        scheduler_pb2.GetRequest(id=first.request.id), metadata=A("alice")
    )
    assert still.request.state == request_pb2.REQUEST_STATE_QUEUED


async def test_admin_methods_need_the_admin_role(scheduler: SchedulerClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.admin.GetQueueStats(
            scheduler_pb2.GetQueueStatsRequest(), metadata=A("alice")
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await submit(scheduler)
    stats = await scheduler.admin.GetQueueStats(
        scheduler_pb2.GetQueueStatsRequest(), metadata=A("root")
    )
    assert [(s.config.model, s.queued) for s in stats.stats] == [("llama3.2", 1)]


async def test_switch_provider_moves_a_queued_request_to_the_external_lane(
    scheduler: SchedulerClient,
) -> None:
    first = await submit(scheduler)
    second = await submit(scheduler, request=generate_submit(prompt="two"))
    moved = await scheduler.scheduler.SwitchProvider(
        scheduler_pb2.SwitchProviderRequest(id=first.request.id), metadata=A("alice")
    )
    assert moved.request.route == request_pb2.ROUTE_EXTERNAL
    assert moved.request.state == request_pb2.REQUEST_STATE_QUEUED
    behind = await scheduler.scheduler.Get(
        scheduler_pb2.GetRequest(id=second.request.id), metadata=A("alice")
    )
    assert behind.request.position.position == 1
    lease = await scheduler.app.store.claim("llama3.2", "external", external=True)
    assert lease is not None and lease.request.id == first.request.id


async def test_switch_provider_refuses_local_only_and_running(scheduler: SchedulerClient) -> None:
    local = await submit(scheduler, fallback_policy=request_pb2.FALLBACK_POLICY_LOCAL_ONLY)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.scheduler.SwitchProvider(
            scheduler_pb2.SwitchProviderRequest(id=local.request.id), metadata=A("alice")
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "local-only" in (info.value.details() or "")
    await scheduler.app.store.claim("llama3.2", "d")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.scheduler.SwitchProvider(
            scheduler_pb2.SwitchProviderRequest(id=local.request.id), metadata=A("alice")
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
