"""The SDK's pieces on their own (no services): errors from statuses, retry timing, enum
and request building, resuming a dropped watch against a scripted in-process Notifier, and
what ``usher top`` draws."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from rich.console import Console

from clients.aio import AsyncUsherClient, _already_seen, build_submit_request
from clients.cli import exit_code_for, parse_duration, parse_keep_alive
from clients.dashboard import render_dashboard
from clients.errors import (
    InvalidArgument,
    NotFound,
    OutputRestarted,
    ResourceExhausted,
    ServerError,
    Unavailable,
    error_from_rpc,
)
from clients.retry import RetryEvent, RetryPolicy, call_with_retry
from clients.sync import UsherClient
from clients.types import (
    Badge,
    FallbackPolicy,
    Priority,
    Request,
    RequestState,
    UpdateKind,
)
from tests.clients.scripted_notifier import (
    DONE,
    QUEUED,
    RUNNING,
    ScriptedNotifier,
    scripted_event,
    serve_notifier,
)
from usher.v1 import notifier_pb2, pool_pb2, request_pb2

K = notifier_pb2


def _rpc_error(code: grpc.StatusCode, message: str, *details: object) -> grpc.aio.AioRpcError:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)  # type: ignore[arg-type]
        status.details.append(packed)
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, message)


# -- errors --------------------------------------------------------------------------------


def test_bad_request_details_become_field_violations() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="model", description="is required"),
            error_details_pb2.BadRequest.FieldViolation(field="input", description="missing"),
        ]
    )
    error = error_from_rpc(
        _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "model: is required; input: missing", bad)
    )
    assert isinstance(error, InvalidArgument)
    assert error.fields == ("model", "input")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(error) == "INVALID_ARGUMENT: model: is required; input: missing"
    assert exit_code_for(error) == 2


def test_retry_info_becomes_retry_after() -> None:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(2500)
    error = error_from_rpc(
        _rpc_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the queue for model 'x' is full (3 waiting); retry later",
            info,
        )
    )
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after == 2.5
    assert error.describe() == "the queue for model 'x' is full (3 waiting); retry in 3s"
    assert exit_code_for(error) == 4


def test_statuses_map_to_classes_and_exit_codes() -> None:
    plain = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "request x not found"
    )
    assert isinstance(error_from_rpc(plain), NotFound)
    assert exit_code_for(error_from_rpc(plain)) == 3
    odd = grpc.aio.AioRpcError(
        grpc.StatusCode.DATA_LOSS, grpc.aio.Metadata(), grpc.aio.Metadata(), "lost"
    )
    assert isinstance(error_from_rpc(odd), ServerError)
    assert exit_code_for(error_from_rpc(odd)) == 1


# -- retries -------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_caps() -> None:
    policy = RetryPolicy(initial_backoff=0.2, max_backoff=1.0, multiplier=2.0)
    for attempt, ceiling in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (9, 1.0)):
        delays = [policy.backoff(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_retry_info_is_never_shortened() -> None:
    policy = RetryPolicy(retry_info_jitter=0.1)
    error = ResourceExhausted("full", retry_after=3.0)
    delays = [policy.delay_for(error, 1) for _ in range(50)]
    assert all(d is not None and 3.0 <= d <= 3.3 for d in delays)
    assert policy.delay_for(InvalidArgument("bad"), 1) is None
    assert RetryPolicy(retry_unavailable=False).delay_for(Unavailable("down"), 1) is None


async def test_call_with_retry_retries_unavailable_then_gives_up() -> None:
    events: list[RetryEvent] = []
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, on_retry=events.append)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return "ok"

    assert await call_with_retry("Get", flaky, policy) == "ok"
    assert [e.attempt for e in events] == [1, 2] and events[0].method == "Get"

    async def down() -> str:
        raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")

    started = time.monotonic()
    with pytest.raises(Unavailable):
        await call_with_retry("Get", down, RetryPolicy(initial_backoff=0.01, max_total_wait=0.2))
    assert time.monotonic() - started < 1.0


async def test_a_retry_info_longer_than_the_budget_fails_at_once() -> None:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromSeconds(10)

    async def full() -> str:
        raise _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", info)

    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as caught:
        await call_with_retry("Submit", full, RetryPolicy(max_total_wait=5))
    assert caught.value.retry_after == 10
    assert time.monotonic() - started < 1.0


# -- values --------------------------------------------------------------------------------


def test_enums_parse_names_numbers_and_proto_names() -> None:
    assert Priority.parse("high") is Priority.HIGH
    assert Priority.parse("PRIORITY_BATCH") is Priority.BATCH
    assert Priority.parse(4) is Priority.LOW
    assert FallbackPolicy.parse("after-timeout") is FallbackPolicy.AFTER_TIMEOUT
    assert RequestState.parse("Cancelled") is RequestState.CANCELLED
    assert FallbackPolicy.LOCAL_ONLY.label == "local-only"
    with pytest.raises(ValueError, match="critical, high, normal, low, batch"):
        Priority.parse("urgent")


def test_build_submit_request_maps_every_option() -> None:
    before = datetime.now(UTC).timestamp()
    request = build_submit_request(
        "llama3.2:1b",
        messages=[{"role": "user", "content": "hi"}],
        system="be brief",
        priority="critical",
        fallback="local-only",
        queue_timeout=90,
        deadline=60.0,
        temperature=0.0,
        seed=7,
        num_predict=12,
        stop=["\n\n"],
        options={"mirostat": 2},
        labels={"team": "x"},
        result_only=True,
    )
    assert [m.role for m in request.chat.messages] == ["system", "user"]
    assert request.result_only
    assert request.priority == request_pb2.PRIORITY_CRITICAL
    assert request.fallback_policy == request_pb2.FALLBACK_POLICY_LOCAL_ONLY
    assert request.queue_timeout.seconds == 90
    assert before + 59 <= request.deadline.seconds <= before + 61
    assert request.options.HasField("temperature") and request.options.temperature == 0.0
    assert request.options.seed == 7 and request.options.num_predict == 12
    assert list(request.options.stop) == ["\n\n"]
    assert request.options.extra["mirostat"] == 2
    assert request.labels["team"] == "x"
    assert len(request.idempotency_key) == 32  # a fresh uuid: retries are safe

    plain = build_submit_request("m", "hello", idempotency_key="k-1")
    assert plain.WhichOneof("input") == "generate" and plain.idempotency_key == "k-1"
    assert not plain.HasField("options")
    assert not plain.result_only  # watchers get the output as it comes

    with pytest.raises(InvalidArgument) as both:
        build_submit_request("m", "hello", embed=["x"])
    assert both.value.fields == ("input",)
    with pytest.raises(InvalidArgument) as fallback:
        build_submit_request("m", "hello", fallback="sometimes")
    assert fallback.value.fields == ("fallback_policy",)


def test_event_ids_compare_as_stream_ids() -> None:
    assert _already_seen("9-5", "10-0")
    assert not _already_seen("10-1", "10-0")
    assert _already_seen("10-0", "10-0")
    assert not _already_seen("1-0", "")


def test_a_queued_request_says_where_it_stands() -> None:
    proto = request_pb2.LlmRequest(id="r1", model="m", state=request_pb2.REQUEST_STATE_QUEUED)
    proto.position.position, proto.position.queue_length = 3, 7
    proto.eta.min.FromSeconds(120)
    proto.eta.max.FromSeconds(180)
    request = Request.from_proto(proto)
    assert (request.position, request.queue_length) == (3, 7)
    assert request.status_message() == (
        "You are #3 of 7 in the queue • Estimated wait: 2–3 minutes"
    )
    assert request.result is None and request.text == "" and not request.is_terminal


def test_durations() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("1.5h") == 5400
    assert parse_duration("12") == 12
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")
    assert parse_keep_alive("8h") == 28_800
    assert parse_keep_alive("Forever") == -1  # until unloaded by hand


def test_the_dashboard_draws_badges_instances_and_stats() -> None:
    badge = notifier_pb2.QueueBadge(
        model="qwq", queued=9, running=2, capacity=2, level=K.QUEUE_LEVEL_LONG,
        label="qwq (Queue full - 5+ min wait)", queue_full=True,
        suggestion="Consider llama3.2 for faster results",
    )  # fmt: skip
    badge.wait.max.FromSeconds(400)
    instance = pool_pb2.InstanceStatus(
        config=pool_pb2.InstanceConfig(id="gpu-1", kind=pool_pb2.INSTANCE_KIND_OLLAMA),
        health=pool_pb2.INSTANCE_HEALTH_HEALTHY,
        circuit=pool_pb2.CIRCUIT_STATE_CLOSED,
        draining=True,
        loaded=[pool_pb2.LoadedModel(name="qwq")],
        active=2,
        parallel=2,
        model_circuits={"qwq": pool_pb2.CIRCUIT_STATE_OPEN},
    )
    stats = pool_pb2.ModelStats(model="qwq", active=2, queued=9, capacity=2, processed=40)
    console = Console(record=True, width=200)
    console.print(render_dashboard([Badge.from_proto(badge)], [instance], [stats]))
    text = console.export_text()
    for expected in (
        "qwq (Queue full - 5+ min wait)",
        "full",
        "Consider llama3.2",
        "gpu-1 (draining)",
        "healthy",
        "closed (qwq)",
        "2/2",
        "Models",
        "40",
    ):
        assert expected in text, expected


# -- resuming a watch, against a scripted Notifier ----------------------------------------


@pytest.fixture
def fast_retry() -> RetryPolicy:
    return RetryPolicy(initial_backoff=0.01, max_backoff=0.05, max_total_wait=5)


async def test_a_dropped_watch_resumes_from_the_last_event_without_repeats(
    fast_retry: RetryPolicy,
) -> None:
    e1 = scripted_event("5-1", K.UPDATE_KIND_SNAPSHOT, QUEUED)
    position = scripted_event("", K.UPDATE_KIND_POSITION, QUEUED)
    e2 = scripted_event("5-2", K.UPDATE_KIND_RUNNING, RUNNING)
    e3 = scripted_event("5-3", K.UPDATE_KIND_PROGRESS, RUNNING, "Hel")
    e4 = scripted_event("5-4", K.UPDATE_KIND_PROGRESS, RUNNING, "lo")
    e5 = scripted_event("5-5", K.UPDATE_KIND_COMPLETED, DONE, final="Hello")
    # The second stream repeats an event the client already has (e.g. a replay racing the
    # live feed): the client must drop it.
    notifier = ScriptedNotifier([[e1, position, e2, e3, None], [e3, e4, None], [e5]])
    server, address = await serve_notifier(notifier)
    try:
        async with AsyncUsherClient("127.0.0.1:1", address, retry=fast_retry) as client:
            updates = [u async for u in client.watch("01ABC")]
    finally:
        await server.stop(None)
    assert notifier.resumed_from == ["", "5-3", "5-4"]
    assert [u.event_id for u in updates] == ["5-1", "", "5-2", "5-3", "5-4", "5-5"]
    assert "".join(u.text_delta for u in updates) == updates[-1].request.text == "Hello"
    assert updates[-1].kind == UpdateKind.COMPLETED and updates[-1].is_terminal


async def test_tokens_after_a_requeue_start_over(fast_retry: RetryPolicy) -> None:
    script = [
        scripted_event("7-1", K.UPDATE_KIND_RUNNING, RUNNING),
        scripted_event("7-2", K.UPDATE_KIND_PROGRESS, RUNNING, "wrong "),
        scripted_event("7-3", K.UPDATE_KIND_REQUEUED, QUEUED),
        scripted_event("7-4", K.UPDATE_KIND_RUNNING, RUNNING),
        scripted_event("7-5", K.UPDATE_KIND_PROGRESS, RUNNING, "right"),
        scripted_event("7-6", K.UPDATE_KIND_COMPLETED, DONE, final="right"),
    ]
    notifier = ScriptedNotifier([script, script])
    server, address = await serve_notifier(notifier)
    try:
        async with AsyncUsherClient("127.0.0.1:1", address, retry=fast_retry) as client:
            with pytest.raises(OutputRestarted):
                _ = [piece async for piece in client.tokens("01ABC")]
            restarts: list[bool] = []
            stream = client.tokens("01ABC", on_restart=lambda: restarts.append(True))
            pieces = [piece async for piece in stream]
    finally:
        await server.stop(None)
    assert restarts == [True]
    assert pieces[-1] == "right" and stream.request is not None
    assert stream.request.text == "right"


async def test_a_quiet_stream_past_its_deadline_reconnects_without_counting_a_failure() -> None:
    waiting = scripted_event("4-1", K.UPDATE_KIND_SNAPSHOT, QUEUED)
    done = scripted_event("4-2", K.UPDATE_KIND_COMPLETED, DONE, final="x")
    notifier = ScriptedNotifier([[waiting, 5.0], [done]])
    server, address = await serve_notifier(notifier)
    # No failure may be retried at all: only a healthy reconnect can get this watch through.
    strict = RetryPolicy(max_total_wait=0.0)
    try:
        async with AsyncUsherClient(
            "127.0.0.1:1", address, retry=strict, stream_timeout=1.2
        ) as client:
            kinds = [u.kind async for u in client.watch("01ABC")]
    finally:
        await server.stop(None)
    assert kinds == [UpdateKind.SNAPSHOT, UpdateKind.COMPLETED]
    assert notifier.resumed_from == ["", "4-1"]


def test_the_blocking_client_iterates_a_watch(fast_retry: RetryPolicy) -> None:
    e1 = scripted_event("3-1", K.UPDATE_KIND_SNAPSHOT, RUNNING, "a")
    e2 = scripted_event("3-2", K.UPDATE_KIND_COMPLETED, DONE, final="a")
    notifier = ScriptedNotifier([[e1, None], [e2]])
    with UsherClient("127.0.0.1:1", "127.0.0.1:1", retry=fast_retry) as usher:
        server, address = usher.run(serve_notifier(notifier))
        usher.async_client.notifier_address = address
        try:
            kinds = [u.kind for u in usher.watch("01ABC")]
        finally:
            usher.run(server.stop(None))
    assert kinds == [UpdateKind.SNAPSHOT, UpdateKind.COMPLETED]
    assert notifier.resumed_from == ["", "3-1"]


async def test_wait_asks_again_after_a_dropped_connection(fast_retry: RetryPolicy) -> None:
    done = scripted_event("6-1", K.UPDATE_KIND_COMPLETED, DONE, final="x")
    notifier = ScriptedNotifier([], answers=[None, done])
    server, address = await serve_notifier(notifier)
    try:
        async with AsyncUsherClient("127.0.0.1:1", address, retry=fast_retry) as client:
            final = await client.wait("01ABC")
    finally:
        await server.stop(None)
    assert final.text == "x" and notifier.awaited == 2 and notifier.resumed_from == []


async def test_wait_watches_a_notifier_older_than_await_result(fast_retry: RetryPolicy) -> None:
    done = scripted_event("6-1", K.UPDATE_KIND_COMPLETED, DONE, final="x")
    notifier = ScriptedNotifier([[done], [done]])
    server, address = await serve_notifier(notifier)
    try:
        async with AsyncUsherClient("127.0.0.1:1", address, retry=fast_retry) as client:
            texts = [(await client.wait("01ABC")).text for _ in range(2)]
    finally:
        await server.stop(None)
    # Asked once: from then on the client watches for the final update.
    assert texts == ["x", "x"] and notifier.awaited == 1
    assert notifier.resumed_from == ["", ""]
