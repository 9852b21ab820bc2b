"""Every RPC of every service driven by hypothesis with messages built from the proto
descriptors (usher.testing.proto_strategies), against the whole stack as real processes on
real sockets, with every kind of caller: each answer is OK or a documented status (never
UNKNOWN or INTERNAL, never internal text), nothing accepted is lost, Redis stays bounded.

Bounded and deterministic: a fixed number of derandomized examples per RPC."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usher.testing.proto_strategies import message_strategy, near
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import notifier_pb2, pool_pb2, request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow

UNARY_EXAMPLES = 150
#: Long polls and streams wait for their timeout when nothing happens: fewer of them.
WAITING_EXAMPLES = 15
CALL_TIMEOUT = 2.0
STREAM_TIMEOUT = 0.5
STORED_BOUND = 16 * 1024 * 1024
MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest")
CALLERS: list[tuple[tuple[str, str], ...]] = [
    (),
    (("authorization", "Bearer not-a-token"),),
    (("authorization", "Basic alice-token"),),
    (("authorization", "Bearer alice-token"),),
    (("authorization", "Bearer carol-token"),),
    (("authorization", "Bearer admin-token"),),
    (("authorization", "Bearer service-token"),),
]
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,  # the Pool: a model server failed after output started
}
INTERNAL_TEXT = re.compile(r"Traceback|Exception|Error\(|usher:|EVALSHA|WRONGTYPE|OOM |\.py\b")
#: Requests that pass validation: half of their examples are these with a field or two
#: changed, so the run reaches what lies behind validation too.
VALID: dict[str, Message] = {
    "Submit": scheduler_pb2.SubmitRequest(
        model=MODELS[1], generate=request_pb2.GenerateInput(prompt="Why is the sky blue?")
    ),
    "List": scheduler_pb2.ListRequest(page_size=5),
    "GetQueueStats": scheduler_pb2.GetQueueStatsRequest(models=[MODELS[1]]),
    "WatchQueues": notifier_pb2.WatchQueuesRequest(models=[MODELS[1]]),
}
#: Admin calls that would take the fleet away from the rest of the run.
SPARED = {"DeregisterInstance", "DrainInstance", "UnloadModel"}


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=("--tokens-per-second", "0", "--load-time", "0.01", "--output-tokens", "3:8"),
        scheduler_env={"USHER_TENANT_MAX_STORED_BYTES": str(STORED_BOUND)},
    )
    with LocalStack(config) as running:
        deadline = time.monotonic() + 15
        channel = grpc.insecure_channel(running.scheduler_address)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        while time.monotonic() < deadline:  # until the Pool has published the fleet's models
            try:
                stub.Submit(
                    scheduler_pb2.SubmitRequest(
                        model=MODELS[0], generate=request_pb2.GenerateInput(prompt="warm up")
                    ),
                    metadata=CALLERS[3],
                    timeout=5,
                )
                break
            except grpc.RpcError:
                time.sleep(0.2)
        channel.close()
        yield running


def _address(stack: LocalStack, service: ServiceDescriptor) -> str:
    if service.name.startswith("Scheduler"):
        return stack.scheduler_address
    if service.name.startswith("Pool"):
        return stack.pool_address
    return stack.notifier_address


def _rpcs() -> list[tuple[ServiceDescriptor, MethodDescriptor]]:
    out = []
    for module in (scheduler_pb2, pool_pb2, notifier_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [(service, method) for method in service.methods if method.name not in SPARED]
    return out


def _call(
    channel: grpc.Channel, method: MethodDescriptor, request: Message, metadata: Any
) -> tuple[grpc.StatusCode, str, Any]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_cls = type(
        # The response class, from the same generated module as the request.
        __import__(
            f"usher.v1.{method.output_type.file.name.rsplit('/', 1)[-1][:-6]}_pb2",
            fromlist=["x"],
        ).__dict__[method.output_type.name]()
    )
    if method.server_streaming:
        stream: Any = channel.unary_stream(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        replies: list[Any] = []
        try:
            for reply in stream(request, metadata=metadata, timeout=STREAM_TIMEOUT):
                replies.append(reply)
        except grpc.RpcError as error:
            return error.code(), error.details() or "", replies
        return grpc.StatusCode.OK, "", replies
    unary: Any = channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    try:
        return grpc.StatusCode.OK, "", unary(request, metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None


@dataclass
class Outcome:
    known_ids: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)


def _exercise(
    channel: grpc.Channel,
    method: MethodDescriptor,
    requests: st.SearchStrategy[Message],
    examples: int,
    outcome: Outcome,
) -> None:
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    # Mostly real callers, so most calls get past authentication into the logic.
    @given(request=requests, caller=st.sampled_from(CALLERS + 3 * CALLERS[3:]))
    def exercise(request: Message, caller: Any) -> None:
        code, details, reply = _call(channel, method, request, caller)
        outcome.codes[(method.name, code.name)] += 1
        label = f"{method.full_name} as {caller[:1]}: {code.name} {details[:200]!r}"
        if code not in DOCUMENTED or INTERNAL_TEXT.search(details):
            outcome.failures.append(label)
        if method.name == "Submit" and code == grpc.StatusCode.OK:
            outcome.accepted.append(reply.request.id)
            outcome.known_ids.append(reply.request.id)

    exercise()


def test_every_rpc_answers_only_documented_statuses(stack: LocalStack) -> None:
    outcome = Outcome()
    known_ids, accepted, failures = outcome.known_ids, outcome.accepted, outcome.failures
    channels = {
        address: grpc.insecure_channel(address)
        for address in (stack.scheduler_address, stack.pool_address, stack.notifier_address)
    }
    for service, method in _rpcs():
        channel = channels[_address(stack, service)]
        waits = method.server_streaming or method.name == "Reserve"
        hints = {
            "model": MODELS,
            "models": MODELS,
            "id": known_ids or ["01JAAAAAAAAAAAAAAAAAAAAAAA"],
            "last_event_id": ["0-0", "0-0\n", "1-0", "99999999999999999999-1"],
            "page_token": ["MTA=", "LTE=", "A" * 300],
            "idempotency_key": ["k", "k\n", "zz:k1"],
            # Some inputs a model would take, so some Submits get through to the queue.
            "prompt": ["Why is the sky blue?"],
            "role": ["user", "system"],
            "content": ["hello"],
            "input": ["embed me"],
        }
        requests = message_strategy(method.input_type, hints)
        if method.name in VALID:
            requests = st.one_of(requests, near(VALID[method.name], hints))
        examples = WAITING_EXAMPLES if waits else UNARY_EXAMPLES
        _exercise(channel, method, requests, examples, outcome)
    for channel in channels.values():
        channel.close()
    print(sorted(outcome.codes.items()))  # shown with -s: how deep the run got
    assert not failures, "\n".join(failures[:25])
    assert accepted, "no Submit was accepted: the run never got past validation"

    # Nothing accepted is lost: every request a Submit accepted can still be read.
    channel = grpc.insecure_channel(stack.scheduler_address)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    for request_id in accepted:
        stub.Get(scheduler_pb2.GetRequest(id=request_id), metadata=CALLERS[5], timeout=10)
    channel.close()

    client = redis.Redis.from_url(stack.redis_url)
    used = int(client.info("memory")["used_memory"])
    client.close()
    assert used < 64 * 1024 * 1024 + 3 * STORED_BOUND, used
